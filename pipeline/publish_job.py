"""``publish_hf_export``: the opt-in Dagster job that pushes the ``hf_export`` folder to the Hub.

Publishing is a decision, not a consequence of training, so it is an op job outside the asset
graph: ``dagster asset materialize --select '*'`` (and every asset job) never runs it; a person
launches it with the repository named in its config. The token and endpoint come from the
``hub`` resource (``HF_TOKEN`` bound through ``dg.EnvVar``, so it never reaches the UI or the event
log); without a token the op fails before any request. The upload itself is
:func:`pipeline.publish.push_folder` (``huggingface_hub``'s ``create_repo`` + ``upload_folder``),
and the result is recorded as an observation of the ``hf_export`` asset: which repository and
commit now hold the folder.
"""

import dagster as dg

from pipeline.publish import push_folder
from pipeline.resources import HubSource, Paths

__all__ = ["PublishConfig", "publish_hf_export", "push_hf_export"]


class PublishConfig(dg.Config):
    """Where to publish: ``repo`` is ORG/NAME on the Hub."""

    repo: str
    revision: str | None = None
    private: bool = False
    commit_message: str = "Upload model from Scriptorium"


@dg.op(description="Upload the hf_export folder to the Hub (create_repo + upload_folder).")
def push_hf_export(
    context: dg.OpExecutionContext, config: PublishConfig, paths: Paths, hub: HubSource
) -> None:
    folder = paths.require("hf_export", "config.json").parent
    if not hub.token:
        raise dg.Failure("HF_TOKEN is not set: nothing was uploaded (the job needs a write token)")
    try:
        result = push_folder(
            folder,
            config.repo,
            token=hub.token,
            endpoint=hub.endpoint or None,
            revision=config.revision,
            private=config.private,
            commit_message=config.commit_message,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise dg.Failure(f"cannot publish {folder}: {exc}") from exc
    context.log_event(
        dg.AssetObservation(
            asset_key="hf_export",
            metadata={
                "hub_repo": result.repo_id,
                "revision": result.revision,
                "commit": result.commit_oid,
                "commit_url": dg.MetadataValue.url(result.commit_url),
                "files": result.files,
            },
        )
    )
    context.log.info(f"published {folder} to {result.repo_id}@{result.revision}")


@dg.job(
    description="Opt-in: publish the exported model (hf_export) to the Hugging Face Hub. "
    "Not part of any asset selection; set HF_TOKEN (and HF_ENDPOINT for a mirror)."
)
def publish_hf_export() -> None:
    push_hf_export()
