"""One training loop for every stage (pretraining, SFT, reward modelling, DPO).

The stage-specific part is the ``Objective`` passed in (see ``llm_core.objectives``); the loop
owns optimisation (AdamW or Muon + AdamW from ``llm_core.optim``; cosine or warmup-stable-decay
schedules and runs sized in minutes from ``llm_core.schedule``; gradient accumulation and
clipping, bf16 autocast, optional ``torch.compile``), DDP or FSDP (``llm_core.distributed``),
validation, checkpoints and exact resume.

Observers (MLflow, Dagster Pipes, a progress bar) attach through callbacks with ``on_metrics``,
``on_eval`` and ``on_checkpoint`` methods, so this module imports neither. Callbacks, logs and files
are produced by rank 0 only.

Exact resume rests on three facts: the sampler is step-indexed, the schedule is a pure function of
the step, and checkpoints hold model, optimiser and RNG state. A run resumed from step ``k``
therefore performs the same floating-point operations as an unbroken run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from llm_core.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    remove_stale_temps,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from llm_core.config import TrainConfig
from llm_core.distributed import Parallel
from llm_core.kernels import cpu_bf16_kernels
from llm_core.objectives import Objective
from llm_core.optim import build_optimizer as build_optimizer  # re-exported (benchmarks)
from llm_core.optim import set_lr_factor
from llm_core.schedule import StepPlan, lr_factor
from llm_core.schedule import lr_at as lr_at  # re-exported: the old recipe's AdamW rate

log = logging.getLogger(__name__)
Evaluator = Callable[[nn.Module], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf; raised *before* the optimiser step so weights stay finite."""

    def __init__(
        self, step: int, value: float, what: str = "loss", last_checkpoint: Path | None = None
    ) -> None:
        self.step, self.value, self.what, self.last_checkpoint = step, value, what, last_checkpoint
        where = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else ""
        super().__init__(f"non-finite {what} ({value}) at step {step}{where}")


class SamplerLike(Protocol):
    """What the trainer needs from a batch source: batches plus resumable state."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callback:
    """No-op base; override what you need. Duck-typed objects with any subset also work.

    Hooks run synchronously on rank 0; an exception raised by one (e.g. a cancellation request
    from the orchestrator) stops training, leaving the last committed checkpoint to resume from.
    """

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Training metrics every ``log_every`` steps (and at the last step)."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics every ``eval_every`` steps (and at the last step)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint directory was committed."""


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks this rank's GPU when CUDA is available, else the CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    return torch.device(spec)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's env vars (gloo on CPU, nccl on CUDA).

    Reuses an already-initialised group (e.g. from ``mp.spawn`` in tests); with no env vars this
    is a single process.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, local, world, resolve_device(device, local))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), local, dist.get_world_size(), dev)


_GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40": 181e12,
    "4090": 165e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,
    "T4": 65e12,
}


def default_peak_flops(device: torch.device, dtype: str = "float32") -> float:
    """Dense bf16 peak of a known GPU, or a rough CPU estimate: threads × 3 GHz × 32 FP32
    FLOP/cycle (one 512-bit or two 256-bit FMA units), doubled for bf16 where the CPU has
    AVX512-BF16/AMX dot products (two multiply-adds per FP32 lane). The same convention as
    ``benchmarks/train_throughput.py``. Only used for MFU; set ``TrainConfig.peak_flops`` for
    accuracy on a known machine."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in _GPU_PEAK_BF16.items() if k in name), 100e12)
    fp32 = torch.get_num_threads() * 3.0e9 * 32
    return fp32 * 2 if dtype == "bfloat16" and cpu_has_bf16_dot_products() else fp32


def cpu_has_bf16_dot_products() -> bool:
    """AVX512-BF16 or AMX: the CPU's bf16 peak is twice its float32 peak. Elsewhere bf16 GEMMs
    run at best at the float32 rate (emulated: :func:`llm_core.kernels.cpu_bf16_kernels`)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass
class TrainResult:
    """What a run produced; ``history``/``eval_history`` drive the loss-curve plot."""

    steps: int
    tokens_seen: int
    wall_time_s: float
    train_time_s: float
    tokens_per_s: float
    mfu: float
    final_metrics: dict[str, float]
    history: list[dict[str, float]]
    eval_history: list[dict[str, float]]
    resumed_from: int | None = None
    last_checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_shape(batch: Any) -> tuple[int, int]:
    """``(rows, seq_len)`` of the token ids in a batch, for throughput accounting.

    A mapping without ``input_ids`` counts every other ``*_ids`` matrix (the chosen and rejected
    sides of preference pairs); one with none counts no tokens (an RL batch of prompts: the
    objective generates the tokens and reports their number as its ``tokens`` metric).
    """
    if not isinstance(batch, Mapping):
        return int(batch[0].size(0)), int(batch[0].size(-1))
    if "input_ids" in batch:
        return int(batch["input_ids"].size(0)), int(batch["input_ids"].size(-1))
    sides = [
        v
        for k, v in batch.items()
        if k.endswith("_ids") and k != "doc_ids" and isinstance(v, torch.Tensor) and v.dim() == 2
    ]
    if not sides:
        return 0, 0
    return sum(int(v.size(0)) for v in sides), max(int(v.size(-1)) for v in sides)


class Trainer:
    """Runs ``cfg.steps`` optimiser updates of ``objective`` on batches from ``sampler``.

    ``model`` must already live on ``dist_info.device``. ``out_dir`` (rank 0 writes) receives
    ``checkpoints/``; without it nothing is written and resume is unavailable.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        cfg: TrainConfig,
        sampler: SamplerLike,
        *,
        evaluator: Evaluator | None = None,
        out_dir: str | Path | None = None,
        callbacks: Sequence[Any] = (),
        dist_info: DistInfo | None = None,
        keep_checkpoints: int = 3,
    ) -> None:
        if cfg.dtype not in {"float32", "bfloat16"}:
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {cfg.dtype!r}")
        if cfg.grad_accum < 1 or cfg.steps < 0:
            raise ValueError("grad_accum must be >= 1 and steps >= 0")
        self.cfg, self.objective, self.sampler = cfg, objective, sampler
        self.evaluator, self.callbacks = evaluator, list(callbacks)
        self.dist = dist_info or DistInfo(device=next(model.parameters()).device)
        self.device = self.dist.device
        self.raw_model = unwrap_model(model)
        self.ckpt_dir = Path(out_dir) / "checkpoints" if out_dir is not None else None
        self.keep_checkpoints = keep_checkpoints
        # DDP or FSDP (llm_core.distributed); FSDP shards here, before the optimiser is built.
        self.parallel = Parallel.wrap(self.raw_model, cfg.parallel, optimizer=cfg.optimizer,
                                      distributed=self.dist.distributed, device=self.device)  # fmt: skip
        self.optimizer = build_optimizer(self.raw_model, cfg, self.device)
        self.plan = StepPlan.from_config(cfg)  # cfg.steps, or as many as fit cfg.minutes
        self.ddp: DDP | None = self.parallel.ddp
        train_model: nn.Module = self.parallel.module
        self.train_model = torch.compile(train_model) if cfg.compile else train_model
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        if self.autocast_dtype is not None and self.device.type == "cpu":
            log.info("bf16 autocast on this CPU: %s GEMMs (see llm_core.kernels.cpu_bf16_kernels)",
                     cpu_bf16_kernels())  # fmt: skip
        self.peak_flops = cfg.peak_flops or default_peak_flops(self.device, cfg.dtype)
        self.step = 0
        self.tokens_seen = 0
        self.train_time_s = 0.0
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None
        self._flops_per_token: float | None = None
        self._session_t0 = time.perf_counter()

    # -- observers ---------------------------------------------------------------------------
    def _emit(self, hook: str, *args: Any) -> None:
        if not self.dist.is_main:
            return
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _planned(self, session_steps: int) -> int:
        """Updates in the whole run, as planned before the next one (``StepPlan``); under DDP
        rank 0's plan, so that every rank stops at the same step."""
        was_frozen = self.plan.frozen
        self.plan.update(self.step, time.perf_counter() - self._session_t0, session_steps)
        if self.dist.distributed and not was_frozen:
            plan = torch.tensor([self.plan.total, int(self.plan.frozen)], device=self.device)
            dist.broadcast(plan, src=0)
            self.plan.total, self.plan.frozen = int(plan[0]), bool(plan[1])
        return self.plan.total

    def _lr(self, step: int | None = None) -> float:
        """The AdamW rate (``cfg.lr`` × the schedule) of update ``step`` (default: the next)."""
        step = self.step if step is None else step
        return self.cfg.lr * lr_factor(step, self.cfg, self.plan.total)

    def _mfu(self, tokens_per_s: float) -> float:
        if not self._flops_per_token:
            return float("nan")
        return tokens_per_s * self._flops_per_token / (self.peak_flops * self.dist.world_size)

    # -- state ---------------------------------------------------------------------------------
    def _resume(self) -> int | None:
        if self.ckpt_dir is None:
            raise ValueError("resume=True needs out_dir")
        if self.dist.is_main:  # the saving rank: leftovers of a killed save go now
            remove_stale_temps(self.ckpt_dir)
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            log.info("no checkpoint under %s; starting fresh", self.ckpt_dir)
            return None
        state = self.parallel.load_checkpoint(path, self.optimizer, map_location=self.device)
        self.sampler.load_state_dict(state.sampler_state)
        if state.rng_states:
            restore_rng_state(state.rng_states)
        extra = state.extra
        saved_cfg = extra.get("train_config", {})
        changed = sorted(
            k for k, v in self.cfg.to_dict().items() if k in saved_cfg and saved_cfg[k] != v
        )
        if changed and self.dist.is_main:
            log.warning(
                "resuming %s with changed train config %s: the run will differ from an "
                "unbroken one",
                path,
                changed,
            )
        self.step = state.step
        self.tokens_seen = int(extra.get("tokens_seen", 0))
        self.plan.load_state_dict(extra.get("step_plan", {}))
        self.train_time_s = float(extra.get("train_time_s", 0.0))
        self.history = list(extra.get("history", []))
        self.eval_history = list(extra.get("eval_history", []))
        self.last_checkpoint = path
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return state.step

    def _checkpoint(self) -> None:
        assert self.ckpt_dir is not None
        model_view, optim_view = self.parallel.checkpoint_views(self.optimizer)  # FSDP: gathers
        if self.dist.is_main:
            self.last_checkpoint = save_checkpoint(
                self.ckpt_dir,
                self.step,
                model_view,
                optim_view,
                {"kind": f"warmup_{self.cfg.schedule}", "step": self.step, "lr": self._lr()},
                self.sampler.state_dict(),
                capture_rng_state(),
                {
                    "tokens_seen": self.tokens_seen,
                    "train_time_s": self.train_time_s,
                    "history": self.history,
                    "eval_history": self.eval_history,
                    "train_config": self.cfg.to_dict(),
                    "step_plan": self.plan.state_dict(time.perf_counter() - self._session_t0),
                },
                keep_last=self.keep_checkpoints,
            )
            self._emit("on_checkpoint", self.step, self.last_checkpoint)
        if self.dist.distributed:
            dist.barrier()

    def evaluate(self) -> dict[str, float]:
        """Run the evaluator (if any) on the unwrapped model and report it via ``on_eval``."""
        if self.evaluator is None:
            return {}
        with self._autocast():
            metrics = self.evaluator(self.raw_model)
        self.eval_history.append({"step": self.step, **metrics})
        self._emit("on_eval", self.step, metrics)
        if self.dist.is_main:
            log.info("step %d eval %s", self.step, _fmt(metrics))
        return metrics

    # -- the loop ------------------------------------------------------------------------------
    def _train_step(self) -> tuple[float, float, dict[str, float], int]:
        """One optimiser update; returns (loss, grad_norm, objective metrics, global tokens)."""
        cfg = self.cfg
        set_lr_factor(self.optimizer, lr_factor(self.step, cfg, self.plan.total))
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = _to_device(self.sampler.next_batch(), self.device)
            rows, seq_len = _batch_shape(batch)
            tokens += rows * seq_len
            if self._flops_per_token is None:
                fpt = getattr(self.raw_model, "flops_per_token", None)
                self._flops_per_token = float(fpt(seq_len)) if callable(fpt) else 0.0
            with self.parallel.no_sync(micro == cfg.grad_accum - 1):
                with self._autocast():
                    loss, metrics = self.objective(self.train_model, batch)
                (loss / cfg.grad_accum).backward()
            made = metrics.pop("tokens", None)  # an objective that generates its batch (RL)
            if made is not None:
                tokens += int(made)
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + torch.as_tensor(v).detach().float()
        loss_sum /= cfg.grad_accum
        if self.dist.distributed:
            dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
            loss_sum /= self.dist.world_size
        loss_val = float(loss_sum)
        if not math.isfinite(loss_val):
            raise NonFiniteLossError(self.step + 1, loss_val, "loss", self.last_checkpoint)
        clip = cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else float("inf")
        grad_norm = self.parallel.clip_grad_norm(clip)  # the global norm, FSDP shards or not
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                self.step + 1, grad_norm, "gradient norm", self.last_checkpoint
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics_out = {k: float(v) / cfg.grad_accum for k, v in metric_sums.items()}
        return loss_val, grad_norm, metrics_out, tokens * self.dist.world_size

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``cfg.steps`` (or for ``cfg.minutes``); with ``resume`` continue from the
        latest checkpoint."""
        cfg = self.cfg
        wall0 = time.perf_counter()
        resumed_from = self._resume() if resume else None
        self._session_t0, session_steps = time.perf_counter(), 0
        self.train_model.train()
        window: list[tuple[float, float, int]] = []  # (loss, seconds, tokens) since last log
        session_tokens, session_time = 0, 0.0
        final_eval: dict[str, float] = {}
        last: dict[str, float] = {}
        while self.step < self._planned(session_steps):
            t0 = time.perf_counter()
            loss, gnorm, obj_metrics, tokens = self._train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.step, session_steps = self.step + 1, session_steps + 1
            self.tokens_seen += tokens
            self.train_time_s += dt
            session_tokens, session_time = session_tokens + tokens, session_time + dt
            lr = self._lr(self.step - 1)
            self.history.append({"step": self.step, "loss": loss, "lr": lr, "grad_norm": gnorm})
            window.append((loss, dt, tokens))
            done = self.step == self._planned(session_steps)
            if (cfg.log_every > 0 and self.step % cfg.log_every == 0) or done:
                secs = sum(w[1] for w in window)
                tps = sum(w[2] for w in window) / secs if secs > 0 else float("nan")
                last = {
                    **{k: v for k, v in obj_metrics.items() if k != "loss"},
                    "loss": sum(w[0] for w in window) / len(window),
                    "lr": lr,
                    "grad_norm": gnorm,
                    "tokens_per_s": tps,
                    "mfu": self._mfu(tps),
                    "tokens_seen": float(self.tokens_seen),
                    **({"planned_steps": float(self.plan.total)} if cfg.minutes else {}),
                }
                window = []
                self._emit("on_metrics", self.step, last)
                if self.dist.is_main:
                    log.info("step %d/%d %s", self.step, self.plan.total, _fmt(last))
            if self.evaluator is not None and (
                (cfg.eval_every > 0 and self.step % cfg.eval_every == 0) or done
            ):
                final_eval = self.evaluate()
            if self.ckpt_dir is not None and (
                (cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0) or done
            ):
                self._checkpoint()
        if not final_eval and self.evaluator is not None and self.eval_history:
            final_eval = {k: v for k, v in self.eval_history[-1].items() if k != "step"}
        tps = session_tokens / session_time if session_time > 0 else float("nan")
        final = {**last, **final_eval}
        if self.history:
            final.setdefault("loss", self.history[-1]["loss"])
        return TrainResult(
            steps=self.step,
            tokens_seen=self.tokens_seen,
            wall_time_s=time.perf_counter() - wall0,
            train_time_s=self.train_time_s,
            tokens_per_s=tps,
            mfu=self._mfu(tps) if session_time > 0 else float("nan"),
            final_metrics=final,
            history=self.history,
            eval_history=self.eval_history,
            resumed_from=resumed_from,
            last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
        )


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
