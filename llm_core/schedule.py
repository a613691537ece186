"""Learning-rate schedules and the step plan of a run sized in minutes.

Schedules are pure functions of the update index and the planned number of updates, which is
what exact resume rests on (see :mod:`llm_core.trainer`). They return a *factor* of each
parameter group's peak rate, so Muon and AdamW groups with different peaks follow one curve.

- ``cosine`` (the old recipe): linear warmup, cosine decay to ``min_lr_ratio``.
- ``wsd`` (warmup-stable-decay, as in MiniCPM and nanochat): linear warmup, the peak rate for
  most of the run, then a linear decay to ``min_lr_ratio`` over the last ``decay_fraction`` of
  the updates. The stable phase does not depend on the run's length, which is what lets a run
  sized in minutes decide its length late: :class:`StepPlan` keeps re-estimating how many steps
  fit the budget until the decay has to start, and only then fixes the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llm_core.config import TrainConfig

SCHEDULES = ("cosine", "wsd")
# Steps a time-budgeted cosine run measures before it fixes its length (warmup, if longer, is
# measured instead: its rates do not depend on the length either).
PROBE_STEPS = 5


def lr_factor(step: int, cfg: TrainConfig, total: int | None = None) -> float:
    """The multiplier of the peak rate for update ``step`` (0-based) of ``total`` (default
    ``cfg.steps``)."""
    total = cfg.steps if total is None else total
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        start = decay_start(total, cfg)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / max(1, total - start))
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {cfg.schedule!r}")


def decay_start(total: int, cfg: TrainConfig) -> int:
    """First update of WSD's decay phase: the last ``decay_fraction`` of ``total``, after warmup."""
    return max(cfg.warmup_steps, total - round(cfg.decay_fraction * total))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The AdamW learning rate of update ``step`` of a ``cfg.steps`` run (``cfg.lr`` × factor)."""
    return cfg.lr * lr_factor(step, cfg)


def length_free_until(total: int, cfg: TrainConfig) -> int:
    """Updates before this index have rates that do not depend on ``total``: the warmup (at least
    :data:`PROBE_STEPS` for cosine) or WSD's warmup and stable phase."""
    if cfg.schedule == "wsd":
        return decay_start(total, cfg)
    return max(cfg.warmup_steps, PROBE_STEPS)


@dataclass
class StepPlan:
    """How many updates the run makes: ``cfg.steps``, or as many as fit ``cfg.minutes``.

    With a time budget the total is re-estimated before every update from the measured seconds
    per update (evaluations and checkpoints included, as they take wall time too) until the next
    update's rate would depend on it; then it is fixed (``frozen``), so the decay completes even
    if steps later run slower. ``cfg.steps > 0`` caps the total. ``elapsed_s`` (budget time of
    earlier sessions) and the plan travel in checkpoints, so a resumed run keeps its length.
    """

    cfg: TrainConfig
    total: int
    frozen: bool
    elapsed_s: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> StepPlan:
        if cfg.minutes is None:
            return cls(cfg, cfg.steps, frozen=True)
        if cfg.minutes <= 0:
            raise ValueError(f"train.minutes must be > 0, got {cfg.minutes}")
        return cls(cfg, cfg.steps if cfg.steps > 0 else 1 << 40, frozen=False)

    @property
    def budget_s(self) -> float:
        return float(self.cfg.minutes or 0.0) * 60.0

    def update(self, step: int, session_s: float, session_steps: int) -> int:
        """The total before update ``step``, given ``session_s`` seconds for ``session_steps``
        updates in this session (the first update of a session keeps the current plan)."""
        if self.frozen or session_steps == 0:
            return self.total
        per_step = session_s / session_steps
        left = self.budget_s - self.elapsed_s - session_s
        fit = step + max(1, math.floor(left / per_step)) if left > 0 else step
        if self.cfg.steps > 0:
            fit = min(fit, self.cfg.steps)
        self.total = max(fit, step)
        if step >= length_free_until(self.total, self.cfg) or self.total == step:
            self.frozen = True
        return self.total

    def state_dict(self, session_s: float) -> dict[str, Any]:
        return {"total": self.total, "frozen": self.frozen, "elapsed_s": self.elapsed_s + session_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved plan; a run sized in steps keeps ``cfg.steps`` (which may have grown)."""
        if state and self.cfg.minutes is not None:
            self.total, self.frozen = int(state["total"]), bool(state["frozen"])
            self.elapsed_s = float(state["elapsed_s"])
