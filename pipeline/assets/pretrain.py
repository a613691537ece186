"""``pretrained_weights``: pretraining in a subprocess through Dagster Pipes.

The asset only assembles plain arguments (paths, profile, MLflow store and tags) and launches
``python -m pipeline.train_child`` (or ``torchrun`` for several processes). Progress streams into
the Dagster run and the child reports the materialisation with its metadata.
"""

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from pipeline.assets.tokens import bpe_tokenizer, token_shards
from pipeline.io import version_hash
from pipeline.resources import Compute, MlflowTracking, Paths, Profile, profile_code_version

GROUP = "training"
CODE_VERSION = "1"
REGISTERED_MODEL = "scriptorium-pretrained"


class PretrainConfig(dg.Config):
    """Run-time knobs; the model and schedule come from the profile."""

    resume: bool = False  # continue from the latest checkpoint of the same config
    steps: int = 0  # 0 keeps the profile's pretrain.steps


def upstream_versions(context: dg.AssetExecutionContext, keys: list[str]) -> dict[str, str]:
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


def training_command(compute: Compute, module: str) -> list[str]:
    if compute.nproc_per_node > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={compute.nproc_per_node}", "-m", module,
        ]  # fmt: skip
    return [sys.executable, "-m", module]


def launch_training(
    context: dg.AssetExecutionContext,
    *,
    stage: str,
    out: Path,
    upstream_keys: list[str],
    registered_model: str,
    version_parts: Sequence[Any],
    inputs: dict[str, Any],
    profile: Profile,
    paths: Paths,
    mlflow: MlflowTracking,
    compute: Compute,
    resume: bool = False,
    steps: int = 0,
) -> dg.MaterializeResult:
    """Run ``python -m pipeline.train_child`` (or torchrun) for one training ``stage`` through
    Dagster Pipes and return the materialisation the child reports.

    Every training asset passes the same plain extras: the profile, ``out_dir``, the run-time
    knobs, the MLflow store, run name and tags (Dagster run id, asset key, profile, stage and
    the upstream data versions), the registered model name and a data version (a hash of the
    upstream versions and ``version_parts``). ``inputs`` adds the stage's own paths and settings.
    Without ``resume``, old checkpoints are removed first so a run never continues a stale one.
    """
    if not resume and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    p = profile.load()
    upstream = upstream_versions(context, upstream_keys)
    extras = {
        "stage": stage,
        "profile": profile.name,
        **inputs,
        "out_dir": str(out),
        "resume": resume,
        "steps": steps,
        "device": compute.device,
        "mlflow_uri": mlflow.uri(paths),
        "experiment": mlflow.experiment,
        "run_name": f"{stage}-{p.get('name')}-{context.run.run_id[:8]}",
        "tags": {
            "dagster.run_id": context.run.run_id,
            "dagster.asset_key": context.asset_key.to_user_string(),
            "dagster.partition": context.partition_key if context.has_partition_key else "",
            "scriptorium.profile": str(p.get("name")),
            "scriptorium.stage": stage,
            **{f"upstream.{k}": v for k, v in upstream.items()},
        },
        "registered_model": registered_model,
        "data_version": version_hash(upstream, *version_parts),
    }
    env = {**os.environ, "SCRIPTORIUM_TRAIN_EXTRAS": json.dumps(extras)}
    return (
        dg.PipesSubprocessClient()
        .run(
            command=training_command(compute, "pipeline.train_child"),
            context=context,
            extras=extras,
            env=env,
        )
        .get_materialize_result()
    )


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(
        CODE_VERSION, "vocab_size", "context_length", "seed", "model", "pretrain"
    ),
    deps=[token_shards, bpe_tokenizer],
    pool="train",
    kinds={"pytorch", "mlflow"},
)
def pretrained_weights(
    context: dg.AssetExecutionContext,
    config: PretrainConfig,
    paths: Paths,
    profile: Profile,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """A from-scratch decoder-only model trained on the token shards (``model.safetensors``)."""
    shards = paths.require("token_shards", "manifest.json").parent
    tokenizer = paths.require("bpe_tokenizer", "tokenizer.json")
    p = profile.load()
    return launch_training(
        context,
        stage="pretrain",
        out=paths.asset_dir("pretrained_weights"),
        upstream_keys=["token_shards", "bpe_tokenizer"],
        registered_model=REGISTERED_MODEL,
        version_parts=[p.get("model"), p.get("pretrain"), config.steps],
        inputs={"shards_dir": str(shards), "tokenizer": str(tokenizer)},
        profile=profile,
        paths=paths,
        mlflow=mlflow,
        compute=compute,
        resume=config.resume,
        steps=config.steps,
    )
