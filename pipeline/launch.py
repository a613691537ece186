"""``launch_stage()``: every training and evaluation asset runs its work through this one call.

The asset builds the stage's typed config (from the profile, once) and its inputs; this module
adds what every run carries (the MLflow store, run name and tags: Dagster run id, asset key,
profile, stage and upstream data versions; the registered model; a data version) and starts the
one child, ``python -m pipeline.child`` (or ``torchrun`` with several processes per node),
through the Pipes client resource, so tests can swap the client.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dagster as dg

from llm_core.stages import stage_module
from llm_core.stages.base import StageConfig, Tracking
from pipeline.child import EXTRAS_ENV
from pipeline.io import version_hash
from pipeline.resources import Compute, MlflowTracking, Paths, Profile

CHILD = "pipeline.child"


class RunKnobs(Protocol):
    """The run-time knobs every training asset's ``dg.Config`` has."""

    resume: bool  # continue from the latest checkpoint of the same config
    steps: int  # 0 keeps the profile's steps


@dataclass(frozen=True)
class StageResources:
    """The resources a training asset hands to :func:`launch_training`."""

    paths: Paths
    profile: Profile
    mlflow: MlflowTracking
    compute: Compute
    pipes: dg.PipesSubprocessClient


def upstream_versions(context: dg.AssetExecutionContext, keys: Sequence[str]) -> dict[str, str]:
    """The data versions of the upstream artefacts this run reads (for MLflow tags)."""
    out = {}
    for key in keys:
        event = context.instance.get_latest_materialization_event(dg.AssetKey(key))
        tags = (
            (event.asset_materialization.tags or {})
            if event and event.asset_materialization
            else {}
        )
        out[key] = tags.get("dagster/data_version", "unknown")
    return out


def child_command(compute: Compute, module: str = CHILD) -> list[str]:
    """``module`` (the child) alone, or under ``torchrun``: ``compute.nproc_per_node`` ranks on
    this node, and with ``compute.nnodes`` > 1 this node's part of a multi-node job
    (:meth:`Compute.torchrun_args`: c10d or static rendezvous at ``compute.rdzv_endpoint``)."""
    args = compute.torchrun_args()
    if args:
        return [sys.executable, "-m", "torch.distributed.run", *args, "-m", module]
    return [sys.executable, "-m", module]


def other_nodes_note(compute: Compute, extras: Mapping[str, Any], paths: Paths, name: str) -> str:
    """Write this run's child extras where every node sees them (the data root) and say how the
    other nodes join: the same child under ``torchrun``, their own ``node_rank``, reading the
    extras from the environment as every rank but 0 does (README, "Scaling out")."""
    path = paths.root() / ".launch" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(extras))
    os.replace(tmp, path)
    node = compute.model_copy(update={"node_rank": 1})
    args = " ".join(node.torchrun_args()).replace("--node_rank=1", "--node_rank=$NODE_RANK")
    return (
        f"multi-node run: {compute.nnodes} nodes; on each other node (NODE_RANK=1..."
        f'{compute.nnodes - 1}) run: {EXTRAS_ENV}="$(cat {path})" python -m '
        f"torch.distributed.run {args} -m {CHILD}"
    )


def launch_stage(
    context: dg.AssetExecutionContext,
    *,
    stage: str,
    config: StageConfig | Mapping[str, Any],
    upstream_keys: Sequence[str],
    version_parts: Sequence[Any],
    pipes_client: dg.PipesSubprocessClient,
    paths: Paths,
    mlflow: MlflowTracking,
    compute: Compute,
    profile_name: str,
    registered_model: str | None = None,
) -> Iterator[Any]:
    """Run ``stage`` (an ``llm_core.stages`` name, or ``evaluation``) in the child through Pipes
    and yield what it reports (the materialisation, and asset checks where it has any).

    A training stage without ``resume`` first loses its old checkpoints, so a run never
    continues a stale one.
    """
    if isinstance(config, StageConfig):
        ckpt = Path(config.out_dir) / "checkpoints"
        if not config.resume and ckpt.exists():
            shutil.rmtree(ckpt)
        config = config.to_dict()
    upstream = upstream_versions(context, upstream_keys)
    tracking = Tracking(
        uri=mlflow.uri(paths),
        experiment=mlflow.experiment,
        run_name=f"{stage}-{profile_name}-{context.run.run_id[:8]}",
        tags={
            "dagster.run_id": context.run.run_id,
            "dagster.asset_key": context.asset_key.to_user_string(),
            "dagster.partition": context.partition_key if context.has_partition_key else "",
            "scriptorium.profile": profile_name,
            "scriptorium.stage": stage,
            **{f"upstream.{k}": v for k, v in upstream.items()},
        },
        registered_model=registered_model,
    )
    extras = {
        "stage": stage,
        "config": dict(config),
        "tracking": tracking.to_dict(),
        "data_version": version_hash(upstream, *version_parts),
    }
    env = {**os.environ, **compute.child_env(os.environ), EXTRAS_ENV: json.dumps(extras)}
    if compute.nnodes > 1:
        if compute.rdzv_backend != "static":
            raise ValueError(
                "a multi-node run launched by Dagster needs Compute.rdzv_backend 'static' "
                "(SCRIPTORIUM_RDZV_BACKEND=static): global rank 0 reports to Dagster and must be "
                "this node's, and c10d orders the nodes itself (use c10d with torchrun by hand)"
            )
        name = f"{context.run.run_id[:8]}-{stage}"
        context.log.info(other_nodes_note(compute, extras, paths, name))
    invocation = pipes_client.run(
        command=child_command(compute), context=context, extras=extras, env=env
    )
    yield from invocation.get_results()


def launch_training(
    context: dg.AssetExecutionContext,
    stage: str,
    *,
    inputs: Mapping[str, Path],
    out: Path,
    run: RunKnobs,
    upstream_keys: Sequence[str],
    version_parts: Sequence[Any],
    registered_model: str,
    resources: StageResources,
) -> Iterator[Any]:
    """A training asset's whole body: the stage's typed config from the profile (read once),
    its inputs and the run's knobs, then :func:`launch_stage`."""
    profile = resources.profile.load()
    config = stage_module(stage).Config.from_profile(
        profile,
        inputs,
        out_dir=out,
        steps=run.steps,
        device=resources.compute.device,
        resume=run.resume,
    )
    yield from launch_stage(
        context,
        stage=stage,
        config=config,
        upstream_keys=upstream_keys,
        version_parts=[*version_parts, run.steps],
        registered_model=registered_model,
        pipes_client=resources.pipes,
        paths=resources.paths,
        mlflow=resources.mlflow,
        compute=resources.compute,
        profile_name=str(profile.get("name")),
    )
