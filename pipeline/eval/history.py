"""What the report reads back from MLflow: each stage's loss curves and the previous evaluation.

* Loss curves: the training run behind the latest version of each stage's registered model
  (``scriptorium-pretrained``, ``-sft``, ``-reward``, ``-rlhf``), its ``loss`` and ``val_loss``
  histories. The weights on disk are the last materialisation, which registered that version.
* The previous evaluation: the newest FINISHED run tagged ``scriptorium.stage=evaluation`` in the
  experiment, read *before* this evaluation opens its own run; its metrics are the headline
  figures the comparison starts from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

EVALUATION_STAGE_TAG = "scriptorium.stage"
EVALUATION_STAGE = "evaluation"
# Registered model per stage (the names the training assets register).
REGISTERED_MODELS: Mapping[str, str] = {
    "base": "scriptorium-pretrained",
    "sft": "scriptorium-sft",
    "reward": "scriptorium-reward",
    "rlhf": "scriptorium-rlhf",
}
CURVE_METRICS = ("loss", "val_loss")
MAX_POINTS = 300


def latest_model_run(client: MlflowClient, name: str) -> dict[str, Any] | None:
    """``{"run_id", "version"}`` of the newest version of a registered model, or None."""
    versions = list(client.search_model_versions(f"name='{name}'"))
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    return {"run_id": newest.run_id, "version": int(newest.version)} if newest.run_id else None


def metric_series(client: MlflowClient, run_id: str, key: str) -> list[list[float]]:
    """``[[step, value], ...]`` of one metric, thinned evenly to at most ``MAX_POINTS``."""
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    if len(points) > MAX_POINTS:
        stride = -(-len(points) // MAX_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return [[float(s), float(v)] for s, v in points]


def loss_curves(client: MlflowClient) -> dict[str, Any]:
    """Per stage: its registered model's run id and version and its loss histories."""
    out: dict[str, Any] = {}
    for stage, name in REGISTERED_MODELS.items():
        found = latest_model_run(client, name)
        if found is None:
            out[stage] = {"absent": f"no registered model {name!r}"}
            continue
        series = {k: metric_series(client, found["run_id"], k) for k in CURVE_METRICS}
        out[stage] = {"registered_model": name, **found, **series}
    return out


def previous_evaluation(client: MlflowClient, experiment_id: str) -> dict[str, Any] | None:
    """The newest finished evaluation run: ``{"run_id", "start_time", "metrics", "tags"}``."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{EVALUATION_STAGE_TAG}` = '{EVALUATION_STAGE}' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    return {
        "run_id": run.info.run_id,
        "start_time": run.info.start_time,
        "metrics": dict(run.data.metrics),
        "dagster_run_id": run.data.tags.get("dagster.run_id"),
    }


def evaluation_history(client: MlflowClient, experiment_id: str, n: int) -> list[dict[str, Any]]:
    """The last ``n`` finished evaluation runs, oldest first, each ``{"run_id", "start_time",
    "metrics"}``: the points of the report's trend plot (read before this run opens its own)."""
    if n <= 0:
        return []
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{EVALUATION_STAGE_TAG}` = '{EVALUATION_STAGE}' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=n,
    )
    return [
        {
            "run_id": r.info.run_id,
            "start_time": r.info.start_time,
            "metrics": dict(r.data.metrics),
        }
        for r in reversed(runs)
    ]
