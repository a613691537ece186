"""What every training stage shares: the typed config, the result, MLflow and the command line.

A stage is one module of :mod:`llm_core.stages` with three things:

* ``Config``: a frozen dataclass (a :class:`StageConfig`) built once from the profile's section
  (:meth:`StageConfig.from_profile`), carried as JSON to a subprocess or a ``torchrun`` rank
  (:meth:`~StageConfig.to_dict` / :meth:`~StageConfig.from_dict`), with its defaults in one place;
* ``run(config, callbacks) -> StageResult``: trains and writes ``config.out_dir``;
* ``main()``: ``python -m llm_core.stages.<stage>`` / ``torchrun -m llm_core.stages.<stage>``.

:func:`execute` is the one place a stage's MLflow run is written (params, step metrics, weights,
loss curve, samples, registered model), for the command line and the Dagster child alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from llm_core.config import ModelConfig, TrainConfig, load_profile

if TYPE_CHECKING:  # torch loads only where a stage runs, not in every Dagster step process
    from llm_core.trainer import TrainResult

log = logging.getLogger(__name__)


class Markdown(str):
    """A figure meant to be rendered as Markdown (samples, examples) rather than plain text."""


def json_safe(value: Any) -> Any:
    """Strict JSON: NaN/Inf become ``null`` (the default encoder would emit invalid ``NaN``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    return value


def write_metrics(out: Path, summary: dict[str, Any]) -> None:
    """``out/metrics.json`` in strict JSON, written atomically."""
    from llm_core.data import atomic_write_bytes

    atomic_write_bytes(
        out / "metrics.json", (json.dumps(json_safe(summary), indent=2) + "\n").encode()
    )


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------------ config
_BASE_FIELDS = ("out_dir", "train", "profile", "resume")


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """The settings every stage has: where it writes, its optimiser schedule and resume.

    Subclasses add their input paths (named in ``INPUTS``) and their own knobs, each with its
    default. ``SECTION`` is the profile section holding the knobs; ``METHOD`` names a mapping
    inside it that overrides the section's shared keys (``rlhf.grpo``); ``SHARED`` lists keys of
    the section that belong to sibling stages and are not this stage's business.
    """

    SECTION: ClassVar[str] = ""
    METHOD: ClassVar[str | None] = None
    INPUTS: ClassVar[tuple[str, ...]] = ()
    SHARED: ClassVar[frozenset[str]] = frozenset()
    BLOCKS: ClassVar[frozenset[str]] = frozenset()  # the section's per-method mappings
    # field -> dataclass whose fields are read from the section's keys (e.g. GRPO's knobs)
    NESTED: ClassVar[Mapping[str, type]] = {}

    out_dir: Path
    train: TrainConfig
    profile: str = ""  # the profile's name, recorded with the run
    resume: bool = False  # continue from the latest checkpoint in out_dir/checkpoints

    @classmethod
    def profile_fields(cls, profile: Mapping[str, Any], section: Mapping[str, Any]) -> dict:
        """Fields taken from outside the stage's own keys (the model shape, shared settings)."""
        return {}

    @classmethod
    def from_profile(
        cls,
        profile: Mapping[str, Any],
        inputs: Mapping[str, str | Path],
        *,
        out_dir: str | Path,
        steps: int = 0,
        device: str | None = None,
        resume: bool = False,
    ) -> Self:
        """The stage's typed config from its profile section; unknown keys are an error that names
        the section, so a typo never silently falls back to a default."""
        if cls.SECTION not in profile:  # e.g. the sft section of a pretraining-only profile
            raise ValueError(
                f"profile {profile.get('name')!r} has no {cls.SECTION!r} section: this stage is "
                "not part of it"
            )
        raw = dict(profile.get(cls.SECTION) or {})
        keys = {k: v for k, v in raw.items() if not isinstance(v, dict)}
        if cls.METHOD is not None:
            keys.update(raw.get(cls.METHOD) or {})
        train_names = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
        own = cls.own_fields()
        nested = {n for t in cls.NESTED.values() for n in (f.name for f in dataclasses.fields(t))}
        unknown = set(keys) - train_names - own - nested - cls.SHARED
        unknown |= {k for k, v in raw.items() if isinstance(v, dict)} - cls.BLOCKS
        if unknown:
            where = f"{cls.SECTION}.{cls.METHOD}" if cls.METHOD else cls.SECTION
            raise ValueError(
                f"profile {profile.get('name')!r}, section {where!r}: unknown key(s) "
                f"{sorted(unknown)}; {cls.__name__} takes {sorted(own | nested | train_names)}"
            )
        missing = [k for k in cls.INPUTS if k not in inputs]
        if missing:
            raise ValueError(f"{cls.__name__}: missing input path(s) {missing}")
        train = {k: v for k, v in keys.items() if k in train_names}
        train.setdefault("seed", profile.get("seed", 1337))
        if steps:  # an explicit step count means exactly that many: no time budget
            train["steps"], train["minutes"] = int(steps), None
        if device:  # the run's device wins over the section's
            train["device"] = device
        fields: dict[str, Any] = {k: v for k, v in keys.items() if k in own}
        for name, typ in cls.NESTED.items():
            sub = {f.name: keys[f.name] for f in dataclasses.fields(typ) if f.name in keys}
            fields[name] = typ(**sub)
        fields.update(cls.profile_fields(profile, raw))
        return cls(
            out_dir=Path(out_dir),
            train=TrainConfig.from_dict(train),
            profile=str(profile.get("name") or ""),
            resume=resume,
            **{k: Path(v) for k, v in inputs.items() if k in cls.INPUTS},
            **fields,
        )

    @classmethod
    def own_fields(cls) -> set[str]:
        """The stage's knobs: its fields other than the common ones and the input paths."""
        return {f.name for f in dataclasses.fields(cls)} - set(_BASE_FIELDS) - set(cls.INPUTS)

    def knobs(self) -> dict[str, Any]:
        """The stage's own settings (for MLflow params and the run's metadata)."""
        return {k: json_safe(getattr(self, k)) for k in sorted(self.own_fields())}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: what travels to a Pipes child or a torchrun rank."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = dataclasses.asdict(value)
            out[f.name] = json_safe(value)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """The inverse of :meth:`to_dict`: the typed config back from plain JSON."""
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value, hint = d[f.name], hints[f.name]
            if f.name in cls.NESTED:
                value = cls.NESTED[f.name](**value)
            elif hint is TrainConfig:
                value = TrainConfig.from_dict(value)
            elif hint is ModelConfig:
                value = ModelConfig.from_dict(value)
            elif value is not None and Path in (hint, *typing.get_args(hint)):
                value = Path(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def model_config(self) -> dict[str, Any]:
        """The trained model's shape: the starting weights' own ``config.json``."""
        init = getattr(self, "init_weights", None)
        config = Path(init) / "config.json" if init else None
        return json.loads(config.read_text()) if config and config.is_file() else {}


# ------------------------------------------------------------------------------ result
@dataclass
class StageResult:
    """What every stage returns: the trainer's result, ``metrics.json``'s summary, the stage's
    headline figures (plain values; :class:`Markdown` for prose), samples of the trained model
    on fixed prompts, and the folder it wrote. On ranks other than 0 only ``train`` is set."""

    train: TrainResult
    out_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    samples_key: str = "samples"
    # Final figures for MLflow's metrics (at the last step) and files it keeps beside the
    # weights under ``evaluation/`` (a classifier's test metrics and confusion matrices).
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)

    def headline(self) -> dict[str, Any]:
        """The figures every stage reports, then the stage's own."""
        final = self.train.final_metrics
        return {
            "params": self.summary.get("num_params"),
            "tokens_seen": self.train.tokens_seen,
            "steps": self.train.steps,
            "final_train_loss": final.get("loss"),
            "final_val_loss": final.get("val_loss"),
            **self.figures,
            "tokens_per_s": round(self.train.tokens_per_s, 1),
            "mfu": self.train.mfu,
            "device": self.summary.get("device"),
            "world_size": self.summary.get("world_size"),
            self.samples_key: Markdown(
                "\n\n".join(f"**{p}** {c}" for p, c in self.samples.items())
            ),
        }


def runtime() -> dict[str, str]:
    """What the numbers depend on besides the config: the torch build, the CPU's kernels and
    the threads (their count and OpenMP's wait policy move CPU throughput several-fold)."""
    import torch

    from llm_core.kernels import cpu_bf16_kernels

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_kernels": cpu_bf16_kernels(),
        "threads": str(torch.get_num_threads()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"),
    }


def precision(train: TrainConfig, device: str, rt: Mapping[str, str]) -> str:
    """``float32``, ``bfloat16`` or, on a CPU without native bf16 GEMMs, ``bfloat16 (emulated)``."""
    if (
        train.dtype == "bfloat16"
        and device.startswith("cpu")
        and rt["cpu_bf16_kernels"] == "emulated"
    ):
        return "bfloat16 (emulated: float32 GEMMs on bf16 operands)"
    return train.dtype


# ------------------------------------------------------------------------------ tracking
@dataclass(frozen=True)
class Tracking:
    """Where and how a stage's MLflow run is written (rank 0 only)."""

    uri: str
    experiment: str = "scriptorium"
    run_name: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    registered_model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tags": dict(self.tags)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tracking:
        return cls(**d)


@dataclass(frozen=True)
class TrackedRun:
    """The MLflow run a stage wrote: ids, a browsable link and the registered version."""

    run_id: str
    experiment_id: str
    link: str
    registered: str | None
    wall_time_s: float
    precision: str


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A browsable link: the server itself for http stores, else the `make ui` MLflow UI."""
    base = tracking_uri if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def execute(
    stage: ModuleType,
    config: StageConfig,
    tracking: Tracking | None = None,
    callbacks: Sequence[Any] = (),
    log_line: Callable[[str], None] | None = None,
) -> tuple[StageResult, TrackedRun | None]:
    """Run ``stage`` on ``config``; on rank 0 with ``tracking``, inside one MLflow run.

    The one place a stage is tracked: params (profile, model, the section's settings, runtime),
    step and eval metrics, the weights, ``metrics.json``, the loss curve, the samples and the
    registered model version.
    """
    if tracking is None or not is_main_rank():
        return stage.run(config, callbacks), None

    from llm_core.tracking import MlflowTracker

    tracker = MlflowTracker(tracking.uri, tracking.experiment)
    t0 = time.perf_counter()
    rt = runtime()
    if config.train.dtype == "bfloat16" and log_line is not None:
        log_line(f"bf16 autocast; on CPU its GEMMs are {rt['cpu_bf16_kernels']}")
    with tracker.start_run(tracking.run_name, tracking.tags) as run:
        tracker.log_params(
            {
                "stage": stage.__name__.rsplit(".", 1)[-1],
                "profile": config.profile,
                "model": config.model_config(),
                config.SECTION: {**config.train.to_dict(), **config.knobs()},
                "runtime": rt,
            }
        )
        result = stage.run(config, [tracker.callback(), *callbacks])
        out = config.out_dir
        tokenizer = out / "tokenizer.json"
        tracker.log_artifacts(
            weights_dir=out,
            config=config.to_dict(),
            tokenizer_file=tokenizer if tokenizer.is_file() else getattr(config, "tokenizer", None),
        )
        tracker.log_artifact(out / "metrics.json")
        tracker.log_loss_curve_png(result.train.history, result.train.eval_history)
        tracker.log_metrics(result.metrics, step=result.train.steps)
        for path in result.artifacts:
            tracker.log_artifact(path, "evaluation")
        version = None
        if tracking.registered_model:
            version = tracker.register_model(tracking.registered_model, run.info.run_id)
        tracker.client.log_dict(run.info.run_id, result.samples, f"{result.samples_key}.json")
        run_id, exp_id = run.info.run_id, run.info.experiment_id
    tracked = TrackedRun(
        run_id=run_id,
        experiment_id=exp_id,
        link=run_link(tracker.tracking_uri, exp_id, run_id),
        registered=f"{tracking.registered_model} v{version}" if version is not None else None,
        wall_time_s=round(time.perf_counter() - t0, 1),
        precision=precision(config.train, str(result.summary.get("device", "cpu")), rt),
    )
    return result, tracked


# ------------------------------------------------------------------------------ command line
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(stage: ModuleType) -> argparse.ArgumentParser:
    """``--profile``, ``--out``, one flag per input path, the run-time knobs and MLflow."""
    cfg: type[StageConfig] = stage.Config
    name = stage.__name__.rsplit(".", 1)[-1]
    p = argparse.ArgumentParser(
        prog=f"python -m llm_core.stages.{name}", description=(stage.__doc__ or "").split("\n")[0]
    )
    p.add_argument("--profile", default=None, help="profile name (tiny, demo …) or YAML path")
    p.add_argument("--config-json", type=Path, help="a saved stage config instead of --profile")
    p.add_argument("--out", type=Path, help="output folder (the stage's weights)")
    for key in cfg.INPUTS:
        p.add_argument(_flag(key), type=Path, help=f"input: {key.replace('_', ' ')}")
    p.add_argument("--steps", type=int, default=0, help=f"override {cfg.SECTION}.steps")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--mlflow-uri", default=None, help="tracking store; enables MLflow logging")
    p.add_argument("--mlflow-experiment", default="scriptorium")
    p.add_argument("--run-name", default=None)
    p.add_argument("--register-model", default=None, help="register the weights under this name")
    p.add_argument("--tag", action="append", default=[], help="run tag key=value (repeatable)")
    p.add_argument("--log-level", default="INFO")
    return p


def parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--tag expects key=value, got {item!r}")
        tags[key] = value
    return tags


def config_from_args(stage: ModuleType, args: argparse.Namespace) -> StageConfig:
    cfg: type[StageConfig] = stage.Config
    if args.config_json is not None:
        return cfg.from_dict(json.loads(args.config_json.read_text()))
    if args.out is None:
        raise SystemExit("--out is required (or --config-json)")
    inputs = {k: getattr(args, k) for k in cfg.INPUTS if getattr(args, k) is not None}
    missing = [_flag(k) for k in cfg.INPUTS if k not in inputs]
    if missing:
        raise SystemExit(f"missing input(s): {' '.join(missing)}")
    return cfg.from_profile(
        load_profile(args.profile),
        inputs,
        out_dir=args.out,
        steps=args.steps,
        device=args.device,
        resume=args.resume,
    )


def main(stage: ModuleType, argv: Sequence[str] | None = None) -> int:
    """The command line of every stage (single process or under ``torchrun``)."""
    args = build_parser(stage).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    config = config_from_args(stage, args)
    tracking = None
    if args.mlflow_uri:
        tracking = Tracking(
            uri=args.mlflow_uri,
            experiment=args.mlflow_experiment,
            run_name=args.run_name,
            tags=parse_tags(args.tag),
            registered_model=args.register_model,
        )
    result, tracked = execute(stage, config, tracking, log_line=log.info)
    if is_main_rank():
        shown = {k: v for k, v in result.headline().items() if not isinstance(v, Markdown)}
        print(json.dumps(json_safe({**shown, "mlflow_run_id": tracked and tracked.run_id})))
    return 0


def module_main(module_name: str) -> Callable[[Sequence[str] | None], int]:
    """``main`` for a stage module: ``main = module_main(__name__)``."""
    return lambda argv=None: main(sys.modules[module_name], argv)
