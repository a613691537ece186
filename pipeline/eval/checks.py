"""The evaluation report's asset checks, as pure functions of the report.

A check whose inputs are absent (no SFT stage yet, no previous run) passes with a note saying it
was skipped and why: a graph that has not reached a stage is not a failure of that stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.eval.report import dig, is_absent

SFT_BELOW_BASE = "sft_val_loss_below_base"
RLHF_WINS = "rlhf_win_rate_over_sft"
FINITE = "numbers_finite"
NO_REGRESSION = "no_regression"
# name -> (description, severity when it fails)
CHECKS: Mapping[str, tuple[str, str]] = {
    SFT_BELOW_BASE: ("SFT's loss on assistant tokens is below the base model's.", "ERROR"),
    RLHF_WINS: ("The RLHF model wins at least 50% against SFT (reward-model judge).", "ERROR"),
    FINITE: ("Every number in report.json is finite.", "ERROR"),
    NO_REGRESSION: (
        "No headline figure got worse than the previous evaluation by more than "
        "evaluation.regression_tolerance (a warning: it never blocks).",
        "WARN",
    ),
}


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    note: str
    severity: str
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _outcome(name: str, passed: bool, note: str, skipped: bool = False) -> CheckOutcome:
    return CheckOutcome(name, passed, note, CHECKS[name][1], skipped)


def sft_below_base(report: Mapping[str, Any]) -> CheckOutcome:
    base = dig(report, "stages", "base", "sft_val")
    sft = dig(report, "stages", "sft", "sft_val")
    if is_absent(base) or is_absent(sft):
        why = dig(sft, "absent") or dig(base, "absent") or "a stage is absent"
        return _outcome(SFT_BELOW_BASE, True, f"skipped: {why}", skipped=True)
    ok = sft["loss"] < base["loss"]
    return _outcome(
        SFT_BELOW_BASE, ok, f"sft {sft['loss']:.4f} vs base {base['loss']:.4f} nats/token"
    )


def rlhf_wins(report: Mapping[str, Any]) -> CheckOutcome:
    r = dig(report, "win_rates", "rlhf_vs_sft")
    judged = dig(r, "reward_model")
    if is_absent(r) or is_absent(judged):
        why = dig(judged, "absent") or dig(r, "absent") or "no reward-model verdict"
        return _outcome(RLHF_WINS, True, f"skipped: {why}", skipped=True)
    lo, hi = judged["ci95"]
    note = f"win rate {judged['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] over n={judged['n']}"
    return _outcome(RLHF_WINS, judged["win_rate"] >= 0.5, note)


def finite(non_finite_paths: list[str]) -> CheckOutcome:
    if non_finite_paths:
        shown = ", ".join(non_finite_paths[:10])
        return _outcome(FINITE, False, f"{len(non_finite_paths)} non-finite: {shown}")
    return _outcome(FINITE, True, "every number is finite")


def no_regression(report: Mapping[str, Any]) -> CheckOutcome:
    comp = report.get("comparison") or {}
    if is_absent(comp):
        return _outcome(NO_REGRESSION, True, f"skipped: {comp.get('absent')}", skipped=True)
    regress = comp.get("regressions") or []
    if regress:
        changes = ", ".join(f"{n} {comp['figures'][n]['change']:+.4f}" for n in regress)
        return _outcome(NO_REGRESSION, False, f"regressed beyond {comp['tolerance']}: {changes}")
    return _outcome(
        NO_REGRESSION, True, f"{len(comp.get('figures') or {})} figures within {comp['tolerance']}"
    )


def run_checks(report: Mapping[str, Any], non_finite_paths: list[str]) -> list[CheckOutcome]:
    """Every check of :data:`CHECKS`, in that order."""
    return [
        sft_below_base(report),
        rlhf_wins(report),
        finite(non_finite_paths),
        no_regression(report),
    ]
