"""The report's plots as inline SVG (matplotlib, headless): loss curves, per-stage bars,
benchmark accuracies with their intervals and chance, and the trend across evaluation runs."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.eval.report import COMPARISONS, STAGES, dig, is_absent

# Stage sections plotted as accuracies (each has ``chance`` and an interval).
ACCURACY_SECTIONS = ("blimp", "lambada", "gsm8k", "mmlu_0shot", "mmlu_kshot", "humaneval")
STAGE_COLOURS = {"base": "#4c78a8", "sft": "#f58518", "rlhf": "#54a24b"}


def headline_value(section: Mapping[str, Any]) -> float:
    """The figure a benchmark is read by: MMLU's macro average, else accuracy or win rate."""
    return float(section.get("macro_accuracy", section.get("accuracy", section.get("win_rate"))))


def headline_ci(section: Mapping[str, Any]) -> tuple[float, float]:
    lo, hi = section.get("macro_ci95", section.get("ci95", (math.nan, math.nan)))
    return float(lo), float(hi)


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    try:
        fig.savefig(buf, format="svg", bbox_inches="tight")
    finally:
        plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(curves: Mapping[str, Any]) -> str | None:
    """One panel per stage with a recorded training run: train and validation loss by step."""
    present = {
        s: c for s, c in curves.items() if not is_absent(c) and (c.get("loss") or c.get("val_loss"))
    }
    if not present:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, (stage, c) in zip(axes[0], present.items(), strict=True):
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            if c.get(key):
                ax.plot(
                    [p[0] for p in c[key]], [p[1] for p in c[key]], style, label=key, linewidth=1
                )
        ax.set_title(f"{stage} ({c['registered_model']} v{c['version']})", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss (nats/token)")
    return _svg(fig)


def plot_stage_bars(report: Mapping[str, Any]) -> str | None:
    """bpb and assistant-token loss per stage (lower is better)."""
    figs = [
        ("bpb", ("heldout", "bpb"), "held-out bits per byte"),
        ("sft_val_loss", ("sft_val", "loss"), "assistant-token loss"),
    ]
    panels = []
    for _, path, title in figs:
        values = {s: dig(report, "stages", s, *path) for s in STAGES}
        values = {s: v for s, v in values.items() if isinstance(v, float) and math.isfinite(v)}
        if values:
            panels.append((title, values))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        ax.bar(list(values), list(values.values()), color="#4c78a8")
        ax.set_title(f"{title} (lower is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def plot_accuracies(report: Mapping[str, Any]) -> str | None:
    """Benchmark accuracy per stage with 95% intervals and the chance line; win rates too."""
    groups: list[tuple[str, dict[str, Mapping[str, Any]], float]] = []
    for bench in ACCURACY_SECTIONS:
        per_stage = {s: dig(report, "stages", s, bench) for s in STAGES}
        per_stage = {s: r for s, r in per_stage.items() if r is not None and not is_absent(r)}
        if per_stage:
            chance = next(iter(per_stage.values())).get("chance", 0.0)
            groups.append((bench, per_stage, float(chance)))
    wins = {p: dig(report, "win_rates", p, "reward_model") for p in COMPARISONS}
    wins = {p: r for p, r in wins.items() if r is not None and not is_absent(r)}
    if wins:
        groups.append(("win rate (reward model)", wins, 0.5))
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(3.5 * len(groups), 3), squeeze=False)
    for ax, (title, results, chance) in zip(axes[0], groups, strict=True):
        names = list(results)
        vals = [headline_value(results[n]) for n in names]
        cis = [headline_ci(results[n]) for n in names]
        lo = [max(0.0, v - ci[0]) for v, ci in zip(vals, cis, strict=True)]
        hi = [max(0.0, ci[1] - v) for v, ci in zip(vals, cis, strict=True)]
        ax.bar(names, vals, yerr=[lo, hi], capsize=4, color="#59a14f")
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:g}")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def plot_trend(runs: Sequence[Mapping[str, Any]], chance: Mapping[str, float]) -> str | None:
    """One panel per figure (``blimp_accuracy``, ``bpb``, ...), one line per stage, across the
    evaluation runs in ``runs`` (oldest first, the current one last), chance dashed."""
    if len(runs) < 1:
        return None
    figures: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for x, run in enumerate(runs):
        for name, value in (run.get("metrics") or {}).items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                continue
            stage, _, figure = name.partition("_")
            if "_vs_" in name and name.endswith("win_rate"):  # sft_vs_base[_judge]_win_rate
                line = name.removesuffix("_win_rate")
                figures.setdefault("win_rate", {}).setdefault(line, []).append((x, float(value)))
            elif stage in STAGES:
                figures.setdefault(figure, {}).setdefault(stage, []).append((x, float(value)))
    if not figures:
        return None
    plt = _pyplot()
    cols = min(4, len(figures))
    rows = -(-len(figures) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    labels = [str(r.get("label", i)) for i, r in enumerate(runs)]
    for ax, (figure, lines) in zip(axes.flat, sorted(figures.items()), strict=False):
        for name, points in lines.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", markersize=3,
                    linewidth=1, label=name, color=STAGE_COLOURS.get(name))  # fmt: skip
        if figure in chance:
            ax.axhline(chance[figure], color="grey", linestyle="--", linewidth=1)
        ax.set_title(figure, fontsize=9)
        ax.set_xticks(range(len(runs)), labels, rotation=60, fontsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(figures) :]:
        ax.axis("off")
    fig.tight_layout()
    return _svg(fig)
