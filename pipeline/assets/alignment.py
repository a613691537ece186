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
* ``rlhf/<method>``: one asset per method listed in the profile's ``rlhf.methods`` (read when
  the code location loads, as ``sft_sources/<id>`` are), each the SFT model aligned by that
  method into its own folder ``$SCRIPTORIUM_DATA/rlhf/<method>/``, so the methods can be
  compared side by side (``evaluation_report`` has a column per materialised method).
  ``rlhf.method`` stays ``rlhf_weights``'s, the one model later assets read; ``rlhf.methods``
  lists the others (``--select '*'`` runs ``rlhf.method`` plus these). Registered as
  ``scriptorium-rlhf-<method>``.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from pipeline.artefacts import STAGE_ASSETS, rlhf_method_key
from pipeline.launch import StageResources, launch_training
from pipeline.resources import Compute, MlflowTracking, Paths, Profile, profile_code_version
from pipeline.text.profile_data import load_time_profile

GROUP = "training"  # the train_job runs every training stage, one at a time (pool)
CODE_VERSION = "1"
ALIGN_INPUTS = [dg.AssetKey(k) for k in ("preference_pairs", "sft_weights", "bpe_tokenizer")]
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

    method: str = ""  # one of METHODS; empty keeps the profile's rlhf.method (dpo)
    resume: bool = False
    steps: int = 0  # 0 keeps the profile's steps for the method


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "reward_train", "seed"),
    deps=ALIGN_INPUTS,
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


def _align(
    context: dg.AssetExecutionContext,
    method: str,
    asset_key: str,
    run: dg.Config,
    registered_model: str,
    resources: StageResources,
) -> Iterator[Any]:
    """Align ``sft_weights`` with ``method`` into ``asset_key``'s folder: the one launch that
    ``rlhf_weights`` and every ``rlhf/<method>`` share."""
    paths, profile = resources.paths, resources.profile
    yield from launch_training(
        context,
        method,
        inputs=paths.artefacts().stage_inputs(method),
        out=paths.asset_dir(asset_key),
        run=run,
        upstream_keys=["preference_pairs", "sft_weights", "reward_model", "bpe_tokenizer"],
        version_parts=[method, profile.load().get("rlhf")],
        registered_model=registered_model,
        resources=resources,
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
    deps=[*ALIGN_INPUTS, reward_model],
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
    resources = StageResources(paths, profile, mlflow, compute, pipes)
    yield from _align(context, method, "rlhf_weights", config, RLHF_MODEL, resources)


class MethodConfig(dg.Config):
    """Run-time knobs of one ``rlhf/<method>`` asset; the rest is the profile's ``rlhf``."""

    resume: bool = False
    steps: int = 0  # 0 keeps the profile's steps for the method


def profile_methods(profile: dict[str, Any]) -> list[str]:
    """The profile's ``rlhf.methods`` (each checked), without ``rlhf.method``: that one is
    ``rlhf_weights`` already, and training it twice would only cost time."""
    section = dict(profile.get("rlhf") or {})
    methods = list(section.get("methods") or [])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"profile rlhf.methods: unknown method(s) {unknown}; one of {METHODS}")
    main = str(section.get("method") or "dpo")
    return [m for m in dict.fromkeys(methods) if m != main]


def rlhf_method_asset(method: str) -> dg.AssetsDefinition:
    """The asset ``rlhf/<method>``: ``sft_weights`` aligned by ``method`` into its own folder."""

    @dg.asset(
        key=dg.AssetKey(["rlhf", method]),
        group_name=GROUP,
        code_version=profile_code_version(CODE_VERSION, "rlhf", "seed"),
        deps=[*ALIGN_INPUTS, reward_model],
        pool="train",
        kinds={"pytorch", "mlflow"},
        description=f"The chat model aligned by `{method}`, kept beside the other methods.",
    )
    def _method(
        context: dg.AssetExecutionContext,
        config: MethodConfig,
        paths: Paths,
        profile: Profile,
        mlflow: MlflowTracking,
        compute: Compute,
        pipes: dg.PipesSubprocessClient,
    ) -> Iterator[Any]:
        resources = StageResources(paths, profile, mlflow, compute, pipes)
        key, model = rlhf_method_key(method), f"{RLHF_MODEL}-{method}"
        yield from _align(context, method, key, config, model, resources)

    return _method


# Only the methods the profile keeps side by side (``rlhf.methods``), like ``sft_sources/<id>``.
RLHF_METHODS = profile_methods(load_time_profile())
rlhf_method_assets = [rlhf_method_asset(m) for m in RLHF_METHODS]
