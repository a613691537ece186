"""The scorecard: every benchmark for every stage in one table, with its interval and chance.

At the demo scale most accuracies sit at chance, and that is the honest figure: the table puts
the chance level beside each row and the 95% interval in each cell, so "26% on MMLU" reads as
"indistinguishable from guessing" rather than as progress. Figures without a chance level
(bits per byte, losses) have none. A cell that was not measured says so; the reasons are listed
once under the table.

Also here: MMLU per subject, the HumanEval sandbox's limits, and the trend table of headline
figures across the last evaluation runs (the plot is :func:`pipeline.eval.plots.plot_trend`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pipeline.eval.report import COMPARISONS, JUDGES, STAGES, dig, fmt, is_absent

# row label -> (stage section, value key, interval key or None, chance or None, higher is better)
ROWS: tuple[tuple[str, str, str, str | None, float | None, bool], ...] = (
    ("held-out bits per byte", "heldout", "bpb", None, None, False),
    ("SFT assistant-token loss (nats)", "sft_val", "loss", None, None, False),
    ("BLiMP minimal pairs", "blimp", "accuracy", "ci95", 0.5, True),
    ("LAMBADA last word", "lambada", "accuracy", "ci95", 0.0, True),
    ("GSM8K exact match (chat)", "gsm8k", "accuracy", "ci95", 0.0, True),
    ("MMLU 0-shot (macro)", "mmlu_0shot", "macro_accuracy", "macro_ci95", 0.25, True),
    ("MMLU k-shot (macro)", "mmlu_kshot", "macro_accuracy", "macro_ci95", 0.25, True),
    ("HumanEval pass@1", "humaneval", "pass@1", "ci95", 0.0, True),
)
# chance of a win-rate judge (a coin)
WIN_CHANCE = 0.5


def pct_cell(value: Any, ci: Any = None, n: Any = None) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    out = f"{100 * value:.1f}%"
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(c, float) for c in ci):
        out += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return out + (f" n={n}" if n is not None else "")


def _note(notes: dict[str, list[str]], reason: Any, where: str) -> str:
    notes.setdefault(str(reason), []).append(where)
    return "–"


def scorecard_rows(
    report: Mapping[str, Any],
) -> tuple[list[str], list[list[str]], dict[str, list[str]]]:
    """``(header, rows, notes)``; ``notes`` maps each reason a cell is empty to its cells."""
    header = ["benchmark", "chance", *STAGES]
    rows: list[list[str]] = []
    notes: dict[str, list[str]] = {}
    for label, key, value_key, ci_key, chance, higher in ROWS:
        cells = []
        for stage in STAGES:
            stage_section = dig(report, "stages", stage)
            section = dig(stage_section, key)
            where = f"{key}/{stage}"
            if is_absent(stage_section):
                cells.append(_note(notes, dig(stage_section, "absent"), stage))
            elif section is None or is_absent(section):
                cells.append(_note(notes, dig(section, "absent") or "not measured", where))
            elif ci_key is None:
                cells.append(fmt(section.get(value_key), 3))
            else:
                chance = section.get("chance", chance)
                cells.append(
                    pct_cell(section.get(value_key), section.get(ci_key), section.get("n"))
                )
                if key == "mmlu_kshot":
                    cells[-1] += (
                        f" ({section.get('mean_shots_kept', 0):.1f} of {section['shots']} shots)"
                    )
        arrow = "↑" if higher else "↓"
        chance_cell = "–" if chance is None else f"{100 * float(chance):.0f}%"
        rows.append([f"{label} {arrow}", chance_cell, *cells])
    rows += _pass_at_k_rows(report)
    for judge in JUDGES:
        cells, seen = [], False
        for stage in STAGES:
            pair = next((p for p in COMPARISONS if p.startswith(f"{stage}_vs_")), None)
            r = dig(report, "win_rates", pair, judge) if pair else None
            if r is None or is_absent(r):
                cells.append("–")
                continue
            seen = True
            cells.append(pct_cell(r.get("win_rate"), r.get("ci95"), r.get("n")))
        if seen:
            rows.append(
                [
                    f"win rate over the previous stage ({judge}) ↑",
                    f"{100 * WIN_CHANCE:.0f}%",
                    *cells,
                ]
            )
    return header, rows, notes


def _pass_at_k_rows(report: Mapping[str, Any]) -> list[list[str]]:
    ks: list[str] = []
    for stage in STAGES:
        he = dig(report, "stages", stage, "humaneval")
        if isinstance(he, Mapping) and not is_absent(he):
            ks += [k for k in he if k.startswith("pass@") and k != "pass@1" and k not in ks]
    return [
        [
            f"HumanEval {k} ↑",
            "0%",
            *[pct_cell(dig(report, "stages", s, "humaneval", k)) for s in STAGES],
        ]
        for k in ks
    ]


def notes_lines(notes: Mapping[str, Sequence[str]]) -> list[str]:
    return [f"not measured ({', '.join(where)}): {reason}" for reason, where in notes.items()]


def mmlu_subject_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per subject accuracy of each stage, 0-shot and k-shot side by side."""
    subjects: list[str] = []
    cols = [(s, k) for s in STAGES for k in ("mmlu_0shot", "mmlu_kshot")]
    for stage, key in cols:
        subjects += [
            x for x in dig(report, "stages", stage, key, "per_subject") or {} if x not in subjects
        ]
    rows = []
    for subject in sorted(subjects):
        cells = []
        for stage, key in cols:
            r = dig(report, "stages", stage, key, "per_subject", subject)
            cells.append(f"{100 * r['accuracy']:.0f}% ({r['n']})" if r else "–")
        rows.append([subject, *cells])
    header = ["subject", *[f"{s} {'0' if k == 'mmlu_0shot' else 'k'}-shot" for s, k in cols]]
    return header, rows


def sandbox_lines(report: Mapping[str, Any]) -> list[str]:
    """The HumanEval sandbox's limits and what its programs did, per stage."""
    lines = []
    for stage in STAGES:
        he = dig(report, "stages", stage, "humaneval")
        if not isinstance(he, Mapping) or is_absent(he):
            continue
        if not lines:
            box = he.get("sandbox", {})
            lines.append(
                f"limits per program: wall clock {box.get('timeout_s')} s, CPU {box.get('cpu_s')} s, "
                f"address space {box.get('memory_mb')} MiB, files {box.get('file_mb')} MiB, "
                f"{box.get('workers')} at once; network: {box.get('network')}; "
                f"{box.get('process')}; blocked: {box.get('blocked')}"
            )
        lines.append(
            f"{stage}: {he.get('samples_per_problem')} sample(s)/problem at temperature "
            f"{he.get('temperature')}, outcomes {he.get('outcomes')}, {he.get('sandbox_seconds')} s "
            "in the sandbox"
        )
    return lines


def trend_runs(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The previous evaluation runs (oldest first) and this one, each with a short label."""
    runs = [dict(r) for r in dig(report, "trend", "runs") or []]
    runs.append(
        {
            "run_id": report.get("mlflow_run_id"),
            "start_time": None,
            "metrics": report.get("headline", {}),
            "label": "this run",
        }
    )
    for r in runs:
        if "label" not in r:
            t = r.get("start_time")
            r["label"] = (
                datetime.fromtimestamp(t / 1000, UTC).strftime("%m-%d %H:%M")
                if isinstance(t, int | float)
                else str(r.get("run_id"))[:8]
            )
    return runs


def trend_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headline figures (rows) across the runs of :func:`trend_runs` (columns)."""
    runs = trend_runs(report)
    names = list(report.get("headline", {}))
    rows = [[n, *[fmt((r.get("metrics") or {}).get(n), 3) for r in runs]] for n in names]
    return ["figure", *[str(r["label"]) for r in runs]], rows


def trend_chance(report: Mapping[str, Any]) -> dict[str, float]:
    """Chance level per headline figure suffix (``mmlu_0shot_accuracy`` -> 0.25)."""
    out: dict[str, float] = {"win_rate": WIN_CHANCE}
    for stage in STAGES:
        for _, key, value_key, ci_key, _, _ in ROWS:
            section = dig(report, "stages", stage, key)
            if ci_key and isinstance(section, Mapping) and "chance" in section:
                suffix = {"macro_accuracy": "accuracy", "pass@1": "pass_at_1"}.get(
                    value_key, value_key
                )
                out[f"{key}_{suffix}"] = float(section["chance"])
    return out
