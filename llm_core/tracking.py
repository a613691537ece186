"""Plain-MLflow experiment tracking for training runs.

:func:`llm_core.stages.base.execute` is the one caller that writes a stage's run; the pipeline's
evaluation child uses it for the evaluation run. Everything goes through an explicit
``MlflowClient`` bound to one tracking URI rather than MLflow's process-global "active run", so
two trackers (or a test and the code under test) never write into each other's runs.

MLflow is imported lazily: ``import llm_core.trainer`` must stay cheap for ``torchrun`` workers
that never log anything.

MLflow 3 reports usage telemetry (and writes ``~/.config/mlflow/telemetry.json``) unless told
not to; this module turns it off by default (``MLFLOW_DISABLE_TELEMETRY=true`` unless the
environment already says otherwise), as ``dagster.yaml`` does for Dagster. Parameters pass
through :func:`strip_url_credentials`, so a ``user:key@`` URL never lands in the tracking store.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

TRACKED_METRICS = (
    "loss",
    "val_loss",
    "val_perplexity",
    "val_bpb",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    # alignment: reward model and DPO (pairwise), GRPO (online), win rate over the SFT model
    "reward_accuracy",
    "reward_margin",
    "val_reward_accuracy",
    "val_reward_margin",
    "val_ece",
    "bt_loss",
    "lm_loss",
    "logps_chosen",
    "logps_rejected",
    "rewards_chosen",
    "rewards_rejected",
    "val_logps_chosen",
    "val_logps_rejected",
    "reward_mean",
    "kl",
    "reply_len",
    "clip_frac",
    "val_reward",
    "win_rate",
    "policy_reward",
    "sft_reward",
    # classification (llm_core.stages.classify): per task, in training and on validation
    "spam_loss",
    "spam_accuracy",
    "language_loss",
    "language_accuracy",
    "val_spam_accuracy",
    "val_spam_balanced_accuracy",
    "val_language_accuracy",
    "val_language_balanced_accuracy",
)
# Families of metrics tracked whatever their suffix: MoE router losses and expert loads per layer
# (``moe_aux_l0``, ``moe_load_max_l0`` …: llm_core.moe.pop_router_losses).
TRACKED_PREFIXES = ("moe_",)
_MAX_PARAM_LEN = 6000  # MLflow's limit on a parameter value
TELEMETRY_ENV = "MLFLOW_DISABLE_TELEMETRY"  # read by mlflow.telemetry when it would report
os.environ.setdefault(TELEMETRY_ENV, "true")  # opt in with MLFLOW_DISABLE_TELEMETRY=false
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_BATCH = 100  # MLflow's limit on params per log_batch call


def default_tracking_uri(root: str | Path) -> str:
    """``sqlite:///<data_root>/mlflow.db``. MLflow 3 refuses a bare ``./mlruns`` file store."""
    base = Path(root).resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def strip_url_credentials(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://***@host`` wherever a URL appears in ``text``."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"d_model": 64}}`` -> ``{"model.d_model": "64"}``; values are stringified and
    truncated to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        else:
            flat[name] = strip_url_credentials(str(value))[:_MAX_PARAM_LEN]
    return flat


class MlflowTracker:
    """One experiment in one tracking store; at most one open run at a time."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "scriptorium",
        *,
        artifact_location: str | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client: MlflowClient = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_name = experiment
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_location or self._default_artifact_location()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location
            )
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: str | None = None

    def _default_artifact_location(self) -> str | None:
        """Next to the SQLite file, not in the current directory (MLflow's default)."""
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return (db.parent / "mlartifacts").resolve().as_uri()
        return None

    # -- runs ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def start_run(
        self, run_name: str | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[Run]:
        """Open a run for the ``with`` block; it ends FINISHED, or FAILED if the block raises."""
        if self.run_id is not None:
            raise RuntimeError(f"run {self.run_id} is already open on this tracker")
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={k: str(v) for k, v in (tags or {}).items()},
        )
        self.run_id = run.info.run_id
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None

    def _rid(self, run_id: str | None) -> str:
        rid = run_id or self.run_id
        if rid is None:
            raise RuntimeError("no open run: use `with tracker.start_run(...)` or pass run_id")
        return rid

    def get_run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    # -- params and metrics ------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Log a nested config as flattened dotted keys."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self._rid(run_id), params=items[i : i + _BATCH])

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, run_id: str | None = None
    ) -> None:
        """Log finite numeric metrics at ``step`` (NaN/Inf are dropped, not stored)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step))
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(float(v))
        ]
        if items:
            self.client.log_batch(self._rid(run_id), metrics=items)

    def callback(self, keys: Sequence[str] | None = TRACKED_METRICS) -> MlflowCallback:
        """A trainer callback bound to the currently open run."""
        return MlflowCallback(self, self._rid(None), keys)

    # -- artefacts ---------------------------------------------------------------------------
    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None, run_id: str | None = None
    ) -> None:
        """Upload one file, or a directory's contents, under ``artifact_path``."""
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self._rid(run_id), str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(self._rid(run_id), str(p), artifact_path)
        else:
            raise FileNotFoundError(f"{p}: nothing to log")

    def log_artifacts(
        self,
        weights_dir: str | Path | None = None,
        config: Mapping[str, Any] | str | Path | None = None,
        tokenizer_file: str | Path | None = None,
        run_id: str | None = None,
    ) -> None:
        """Weights (``model.safetensors`` + ``config.json``) under ``model/``, the run config as
        ``config/run_config.json`` and the tokenizer under ``tokenizer/``."""
        rid = self._rid(run_id)
        if weights_dir is not None:
            wd = Path(weights_dir)
            for name in ("model.safetensors", "config.json"):
                if not (wd / name).is_file():
                    raise FileNotFoundError(f"{wd / name}: missing from the weights directory")
                self.client.log_artifact(rid, str(wd / name), "model")
        if isinstance(config, Mapping):
            self.client.log_dict(rid, dict(config), "config/run_config.json")
        elif config is not None:
            self.client.log_artifact(rid, str(config), "config")
        if tokenizer_file is not None:
            self.client.log_artifact(rid, str(tokenizer_file), "tokenizer")

    def log_loss_curve_png(
        self,
        history: Sequence[Mapping[str, float]],
        eval_history: Sequence[Mapping[str, float]] = (),
        name: str = "loss_curve.png",
        run_id: str | None = None,
    ) -> Path:
        """Plot training (and validation) loss against step and log it as ``plots/<name>``."""
        import matplotlib

        matplotlib.use("Agg")  # headless: no display in workers or CI
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        try:
            if history:
                ax.plot(
                    [h["step"] for h in history],
                    [h["loss"] for h in history],
                    label="train loss",
                    linewidth=1,
                )
            evals = [e for e in eval_history if "val_loss" in e]
            if evals:
                ax.plot(
                    [e["step"] for e in evals],
                    [e["val_loss"] for e in evals],
                    "o-",
                    label="val loss",
                )
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats/token)")
            ax.grid(alpha=0.3)
            ax.legend()
            out = Path(tempfile.mkdtemp(prefix="loss-curve-")) / name
            fig.savefig(out, bbox_inches="tight")
        finally:
            plt.close(fig)
        self.client.log_artifact(self._rid(run_id), str(out), "plots")
        return out

    # -- registry ----------------------------------------------------------------------------
    def register_model(
        self, name: str, run_id: str | None = None, artifact_path: str = "model"
    ) -> int:
        """Register ``<run artefacts>/<artifact_path>`` as a new version of ``name``."""
        from mlflow.exceptions import MlflowException

        rid = self._rid(run_id)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = f"{self.client.get_run(rid).info.artifact_uri.rstrip('/')}/{artifact_path}"
        mv = self.client.create_model_version(name, source, run_id=rid)
        return int(mv.version)


class MlflowCallback:
    """Trainer callback: step and eval metrics to MLflow, checkpoints as a tag."""

    def __init__(
        self, tracker: MlflowTracker, run_id: str, keys: Sequence[str] | None = TRACKED_METRICS
    ) -> None:
        self.tracker, self.run_id = tracker, run_id
        self.keys = set(keys) if keys is not None else None

    def _filter(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {
            k: v
            for k, v in metrics.items()
            if self.keys is None or k in self.keys or k.startswith(TRACKED_PREFIXES)
        }

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self._filter(metrics), step, self.run_id)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self._filter(metrics), step, self.run_id)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.tracker.client.set_tag(self.run_id, "last_checkpoint", f"{path} (step {step})")
