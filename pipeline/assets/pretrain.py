"""``pretrained_weights``: the ``pretrain`` stage of :mod:`llm_core.stages`, run through Pipes.

The asset names the stage's inputs and hands them to :func:`pipeline.launch.launch_training`,
which builds the stage's typed config from the profile and launches it; progress streams into the Dagster run and the child
reports the materialisation with its metadata.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from pipeline.assets.tokens import bpe_tokenizer, token_shards
from pipeline.launch import StageResources, launch_training
from pipeline.resources import Compute, MlflowTracking, Paths, Profile, profile_code_version

GROUP = "training"
CODE_VERSION = "1"
REGISTERED_MODEL = "scriptorium-pretrained"


class PretrainConfig(dg.Config):
    """Run-time knobs; the model and schedule come from the profile."""

    resume: bool = False  # continue from the latest checkpoint of the same config
    steps: int = 0  # 0 keeps the profile's pretrain.steps


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
    pipes: dg.PipesSubprocessClient,
) -> Iterator[Any]:
    """A from-scratch decoder-only model trained on the token shards (``model.safetensors``)."""
    p = profile.load()
    yield from launch_training(
        context,
        "pretrain",
        inputs=paths.artefacts().stage_inputs("pretrain"),
        out=paths.asset_dir("pretrained_weights"),
        run=config,
        upstream_keys=["token_shards", "bpe_tokenizer"],
        version_parts=[p.get("model"), p.get("pretrain")],
        registered_model=REGISTERED_MODEL,
        resources=StageResources(paths, profile, mlflow, compute, pipes),
    )
