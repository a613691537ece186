"""Alignment: ``preference_pairs`` + ``sft_weights`` -> ``reward_model`` -> ``rlhf_weights``.

Both assets run an :mod:`llm_core.stages` stage in the ``train`` pool, like ``sft_weights``,
through :func:`pipeline.launch.launch_stage`:

* ``reward_model``: the SFT model's transformer plus a scalar head, Bradley–Terry on the pairs
  (stage ``reward``, profile section ``reward_train``); metadata: held-out pairwise accuracy,
  reward margin and calibration (ECE). Registered as ``scriptorium-reward``.
* ``rlhf_weights``: the SFT model aligned by ``dpo`` (default), ``grpo`` (online RL against the
  reward model) or ``best_of_n`` (rejection sampling + SFT), picked by :class:`RLHFConfig` or
  the profile's ``rlhf.method``; each method is its own MLflow run (stage = method). Metadata
  names the method, links the run, and gives the reward model's win rate of the aligned model
  over the SFT model on held-out prompts. Registered as ``scriptorium-rlhf``.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from pipeline.artefacts import STAGE_ASSETS
from pipeline.launch import StageResources, launch_training
from pipeline.resources import Compute, MlflowTracking, Paths, Profile, profile_code_version

GROUP = "training"  # the train_job runs every training stage, one at a time (pool)
CODE_VERSION = "1"
REWARD_MODEL = "scriptorium-reward"
RLHF_MODEL = "scriptorium-rlhf"
# The alignment stages: every stage whose artefact is rlhf_weights (pipeline/artefacts.py).
METHODS = tuple(stage for stage, asset in STAGE_ASSETS.items() if asset == "rlhf_weights")


class RewardConfig(dg.Config):
    """Run-time knobs; the schedule, pooling and LM mixing come from ``reward_train``."""

    resume: bool = False  # continue from the latest checkpoint of the same config
    steps: int = 0  # 0 keeps the profile's reward_train.steps


class RLHFConfig(dg.Config):
    """Run-time knobs; everything else comes from the profile's ``rlhf`` section."""

    method: str = ""  # dpo | grpo | best_of_n; empty keeps the profile's rlhf.method (dpo)
    resume: bool = False
    steps: int = 0  # 0 keeps the profile's steps for the method


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "reward_train", "seed"),
    deps=[
        dg.AssetKey("preference_pairs"),
        dg.AssetKey("sft_weights"),
        dg.AssetKey("bpe_tokenizer"),
    ],
    pool="train",
    kinds={"pytorch", "mlflow"},
)
def reward_model(
    context: dg.AssetExecutionContext,
    config: RewardConfig,
    paths: Paths,
    profile: Profile,
    mlflow: MlflowTracking,
    compute: Compute,
    pipes: dg.PipesSubprocessClient,
) -> Iterator[Any]:
    """A reward model (SFT backbone + scalar head) trained on the preference pairs."""
    yield from launch_training(
        context,
        "reward",
        inputs=paths.artefacts().stage_inputs("reward"),
        out=paths.asset_dir("reward_model"),
        run=config,
        upstream_keys=["preference_pairs", "sft_weights", "bpe_tokenizer"],
        version_parts=[profile.load().get("reward_train")],
        registered_model=REWARD_MODEL,
        resources=StageResources(paths, profile, mlflow, compute, pipes),
    )


def rlhf_method(config: RLHFConfig, profile: Profile) -> str:
    """The run's method: the config's, else the profile's ``rlhf.method``, else ``dpo``."""
    method = config.method or str(profile.section("rlhf").get("method") or "dpo")
    if method not in METHODS:
        raise ValueError(f"rlhf method {method!r} is not one of {list(METHODS)}")
    return method


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "rlhf", "seed"),
    deps=[
        dg.AssetKey("preference_pairs"),
        dg.AssetKey("sft_weights"),
        reward_model,
        dg.AssetKey("bpe_tokenizer"),
    ],
    pool="train",
    kinds={"pytorch", "mlflow"},
)
def rlhf_weights(
    context: dg.AssetExecutionContext,
    config: RLHFConfig,
    paths: Paths,
    profile: Profile,
    mlflow: MlflowTracking,
    compute: Compute,
    pipes: dg.PipesSubprocessClient,
) -> Iterator[Any]:
    """The aligned chat model: ``sft_weights`` after DPO, GRPO or best-of-n."""
    method = rlhf_method(config, profile)
    context.log.info(f"aligning sft_weights with {method}")
    yield from launch_training(
        context,
        method,
        inputs=paths.artefacts().stage_inputs(method),
        out=paths.asset_dir("rlhf_weights"),
        run=config,
        upstream_keys=["preference_pairs", "sft_weights", "reward_model", "bpe_tokenizer"],
        version_parts=[method, profile.load().get("rlhf")],
        registered_model=RLHF_MODEL,
        resources=StageResources(paths, profile, mlflow, compute, pipes),
    )
