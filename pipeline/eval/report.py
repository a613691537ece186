"""The report: headline figures, comparison with the previous run, finiteness, JSON/MD/HTML.

``report`` is a plain dict (see :func:`pipeline.eval.run.evaluate`); a section that could not
be measured is ``{"absent": "<why>"}``, never a made-up number. The headline figures are flat
``<stage>_<figure>`` names (``base_bpb``, ``sft_blimp_accuracy``, ``rlhf_vs_sft_win_rate``):
MLflow metrics of the evaluation run and numeric Dagster metadata, so both UIs plot them over
materialisations, and the keys the next run compares against.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

STAGES = ("base", "sft", "rlhf")
# figure -> (path inside a stage's section, higher is better)
STAGE_FIGURES: Mapping[str, tuple[tuple[str, str], bool]] = {
    "bpb": (("heldout", "bpb"), False),
    "sft_val_loss": (("sft_val", "loss"), False),
    "blimp_accuracy": (("blimp", "accuracy"), True),
    "lambada_accuracy": (("lambada", "accuracy"), True),
    "gsm8k_accuracy": (("gsm8k", "accuracy"), True),
    "mmlu_0shot_accuracy": (("mmlu_0shot", "macro_accuracy"), True),
    "mmlu_kshot_accuracy": (("mmlu_kshot", "macro_accuracy"), True),
    "humaneval_pass_at_1": (("humaneval", "pass@1"), True),
}
COMPARISONS = ("sft_vs_base", "rlhf_vs_sft")
JUDGES = {"reward_model": "win_rate", "http": "judge_win_rate"}
Rows = tuple[list[str], list[list[str]]]


def absent(reason: str) -> dict[str, str]:
    """The one way a report says a figure was not measured, and why."""
    return {"absent": reason}


def is_absent(section: Any) -> bool:
    return not isinstance(section, Mapping) or "absent" in section


def dig(obj: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(obj, Mapping) or k not in obj:
            return None
        obj = obj[k]
    return obj


def higher_is_better(name: str) -> bool:
    """Direction of a headline figure, from its suffix."""
    if name.endswith("win_rate"):
        return True
    for figure, (_, higher) in STAGE_FIGURES.items():
        if name.endswith(f"_{figure}"):
            return higher
    raise KeyError(f"unknown headline figure {name!r}")


def headline(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat figures of every measured stage and comparison (absent ones are left out)."""
    out: dict[str, float] = {}
    for stage in STAGES:
        section = dig(report, "stages", stage)
        if is_absent(section):
            continue
        for figure, (path, _) in STAGE_FIGURES.items():
            value = dig(section, *path)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{stage}_{figure}"] = float(value)
    for pair in COMPARISONS:
        for judge, suffix in JUDGES.items():
            value = dig(report, "win_rates", pair, judge, "win_rate")
            if isinstance(value, int | float):
                out[f"{pair}_{suffix}"] = float(value)
    return out


def compare(
    current: Mapping[str, float],
    previous: Mapping[str, Any] | None,
    tolerance: float,
) -> dict[str, Any]:
    """Change of each headline figure since the previous evaluation run.

    A figure *regresses* when it moves in its bad direction by more than ``tolerance``
    (absolute: fractions for rates, bits or nats for losses). A figure new in this run, or one
    the previous run had and this one lacks (a stage gone), is listed, not flagged.
    """
    if previous is None:
        return {**absent("no previous evaluation run in MLflow"), "tolerance": tolerance}
    before: Mapping[str, float] = previous.get("metrics", {})
    figures, regressions = {}, []
    for name, value in current.items():
        if name not in before:
            continue
        change = value - before[name]
        worse = -change if higher_is_better(name) else change
        regressed = bool(math.isfinite(worse) and worse > tolerance)
        figures[name] = {
            "previous": before[name],
            "current": value,
            "change": change,
            "regressed": regressed,
        }
        if regressed:
            regressions.append(name)
    known = [n for n in before if _is_headline(n)]
    return {
        "previous_run_id": previous.get("run_id"),
        "previous_dagster_run_id": previous.get("dagster_run_id"),
        "tolerance": tolerance,
        "figures": figures,
        "regressions": regressions,
        "new": sorted(set(current) - set(before)),
        "dropped": sorted(set(known) - set(current)),
    }


def _is_headline(name: str) -> bool:
    try:
        higher_is_better(name)
    except KeyError:
        return False
    return True


def non_finite(obj: Any, path: str = "") -> list[str]:
    """Paths of every NaN or infinite number in a nested report (``stages.base.heldout.bpb``)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path]
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, list | tuple):
        return [p for i, v in enumerate(obj) for p in non_finite(v, f"{path}[{i}]")]
    return []


# ------------------------------------------------------------------------------ formatting
def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def fmt_acc(section: Any) -> str:
    """``41.2% [30.1, 53.0] (n=80)`` or the reason it is absent."""
    if is_absent(section):
        return f"absent: {section.get('absent')}" if isinstance(section, Mapping) else "absent"
    lo, hi = section.get("ci95", (None, None))
    acc = section.get("accuracy", section.get("win_rate"))
    return f"{100 * acc:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={section.get('n')})"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(x: str) -> str:  # Markdown renders raw HTML: escape it, as render_html does
        return md_escape(str(x)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def win_rate_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "comparison",
        "judge",
        "win rate [95% CI]",
        "wins/ties/losses",
        "order agreement",
        "empty replies",
    ]
    rows = []
    for pair in COMPARISONS:
        section = dig(report, "win_rates", pair)
        if is_absent(section):
            rows.append([pair, "–", f"absent: {dig(section, 'absent')}", "–", "–", "–"])
            continue
        a, b = pair.split("_vs_")
        empty = (
            f"{section.get(f'empty_{a}')} / {section.get(f'empty_{b}')} of {section.get('prompts')}"
        )
        for judge in JUDGES:
            r = section.get(judge)
            if r is None:
                continue
            if is_absent(r):
                rows.append([pair, judge, f"absent: {r.get('absent')}", "–", "–", empty])
                continue
            rows.append(
                [
                    pair,
                    str(r.get("judge")),
                    fmt_acc(r),
                    f"{r['wins']}/{r['ties']}/{r['losses']}",
                    fmt(r.get("order_agreement")),
                    empty,
                ]
            )
    return header, rows


def comparison_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    figures = dig(report, "comparison", "figures")
    header = ["figure", "previous", "current", "change", "regression"]
    if not isinstance(figures, Mapping):
        return header, []
    rows = [
        [
            name,
            fmt(f["previous"]),
            fmt(f["current"]),
            f"{f['change']:+.4f}",
            "**yes**" if f["regressed"] else "no",
        ]
        for name, f in sorted(figures.items())
    ]
    return header, rows


def md_escape(text: str) -> str:
    """``<``, ``>`` and ``&`` as entities: generations and dataset text may hold raw HTML
    (``<script>``, ``<img onerror=…>``) that a Markdown viewer would otherwise render."""
    return html.escape(text, quote=False)


def _one_line(text: str) -> str:
    return text.replace("\n", " ⏎ ").strip() or "(empty)"


# Extra tables (title, report -> (header, rows) or None when there is nothing to show), rendered
# in both formats after the per-benchmark sections: a small section added by another feature
# is one line here and one function beside its data.
def _questions(report: Mapping[str, Any]) -> Rows | None:
    from pipeline.eval.questions import question_table

    return question_table(report)


def _epochs(report: Mapping[str, Any]) -> Rows | None:
    from pipeline.eval.epochs import epoch_table

    return epoch_table(report)


def _continuations(report: Mapping[str, Any]) -> Rows | None:
    from pipeline.eval.epochs import continuation_table

    return continuation_table(report)


def _methods(report: Mapping[str, Any]) -> Rows | None:
    from pipeline.eval.methods import method_table

    return method_table(report)


TABLE_SECTIONS: tuple[tuple[str, Callable[[Mapping[str, Any]], Rows | None]], ...] = (
    # each alignment method's own win rate over SFT (rlhf_weights and every rlhf/<method>)
    ("Alignment methods: reward-model win rate over SFT", _methods),
    # the learning profiles (toy, verdict): margin = log p(preferred) - log p(rejected)
    ("Toy questions: greedy answers per stage", _questions),
    ("Pretraining: train and val loss per epoch", _epochs),
    ("Sampled continuations of the pretrained model", _continuations),
)


def render_markdown(report: Mapping[str, Any], *, headline_only: bool = False) -> str:
    """The report as Markdown (also the Dagster ``report`` metadata when ``headline_only``)."""
    from pipeline.eval import scorecard  # imports this module: imported when rendering

    parts = [f"## Evaluation report ({report.get('profile')})", "", "### Scorecard", ""]
    header, rows, notes = scorecard.scorecard_rows(report)
    parts += [md_table(header, rows), ""]
    parts += [f"- {line}" for line in scorecard.notes_lines(notes)] + [""]
    parts += [
        "### Win rates (judged on held-out AlpacaEval instructions)",
        "",
        md_table(*win_rate_rows(report)),
        "",
    ]
    comp = report.get("comparison", {})
    if is_absent(comp):
        parts += [f"Comparison: {comp.get('absent')}.", ""]
    else:
        regress = comp.get("regressions") or []
        parts += [
            f"### Change since evaluation run `{comp.get('previous_run_id')}` "
            f"(tolerance {comp.get('tolerance')})",
            "",
            f"Regressions: {', '.join(regress) if regress else 'none'}.",
            "",
            md_table(*comparison_rows(report)),
            "",
        ]
    if headline_only:
        return "\n".join(parts)
    parts += ["### Checks", ""]
    parts += [
        f"- {'✅' if c['passed'] else '❌'} `{c['name']}`: {md_escape(str(c['note']))}"
        for c in report.get("checks", [])
    ]
    parts += ["", "### BLiMP per phenomenon", ""]
    parts += [md_table(*blimp_rows(report)), ""]
    subjects = scorecard.mmlu_subject_rows(report)
    parts += ["### MMLU per subject", "", md_table(*subjects) if subjects[1] else "not run", ""]
    parts += ["### HumanEval sandbox", ""]
    parts += [f"- {line}" for line in scorecard.sandbox_lines(report) or ["not run"]] + [""]
    parts += ["### Trend over the last evaluation runs (MLflow)", ""]
    parts += [md_table(*scorecard.trend_rows(report)), ""]
    for title, rows_of in TABLE_SECTIONS:
        if (table := rows_of(report)) is not None:
            parts += [f"### {title}", "", md_table(*table), ""]
    parts += ["### Generations", ""]
    for stage in STAGES:
        gen = dig(report, "stages", stage, "generations")
        if gen is None or is_absent(gen):
            continue
        parts += [f"**{stage}** (settings: {gen['settings']})", ""]
        parts += [
            f"- *{md_escape(s['prompt'])}* → {md_escape(_one_line(s['reply']))}"
            for s in gen["samples"]
        ]
        parts.append("")
    parts += ["### Evaluation sets", "", md_table(*sets_rows(report)), ""]
    return "\n".join(parts)


def blimp_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    phenomena: list[str] = []
    for stage in STAGES:
        per = dig(report, "stages", stage, "blimp", "per_phenomenon") or {}
        phenomena += [p for p in per if p not in phenomena]
    rows = []
    for ph in phenomena:
        cells = []
        for stage in STAGES:
            r = dig(report, "stages", stage, "blimp", "per_phenomenon", ph)
            cells.append(fmt_acc(r) if r else "–")
        rows.append([ph, *cells])
    return ["phenomenon", *STAGES], rows


def sets_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for set_id, s in (report.get("sets") or {}).items():
        if is_absent(s):
            rows.append([set_id, "–", "–", "–", f"absent: {s.get('absent')}"])
        else:
            rows.append([set_id, str(s["available"]), str(s["used"]), str(s["rejected"]), "-"])
    return ["set", "available", "used", "rejected", "note"], rows


# ------------------------------------------------------------------------------ HTML
def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c).replace('**', ''))}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
    "text-align:left;font-size:14px}th{background:#f3f3f3}.pass{color:#2a7}.fail{color:#c33}"
    "figure{margin:1em 0}pre{white-space:pre-wrap;background:#f7f7f7;padding:6px}"
)


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page: the Markdown report's tables plus inline SVG plots."""
    from pipeline.eval import plots, scorecard  # both import this module

    esc = html.escape
    header, rows, notes = scorecard.scorecard_rows(report)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Scriptorium evaluation ({esc(str(report.get('profile')))})</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Evaluation report ({esc(str(report.get('profile')))})</h1>",
        f"<p>Created {esc(str(report.get('created')))}; MLflow run {esc(str(report.get('mlflow_run_id')))}.</p>",
        "<h2>Scorecard</h2>",
        html_table(header, rows),
        "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in scorecard.notes_lines(notes)) + "</ul>",
        "<h2>Win rates</h2>",
        html_table(*win_rate_rows(report)),
    ]
    comp = report.get("comparison", {})
    out.append("<h2>Change since the previous evaluation</h2>")
    if is_absent(comp):
        out.append(f"<p>{esc(str(comp.get('absent')))}.</p>")
    else:
        regress = comp.get("regressions") or []
        out.append(
            f"<p>Previous run {esc(str(comp.get('previous_run_id')))}, tolerance "
            f"{esc(str(comp.get('tolerance')))}; regressions: {esc(', '.join(regress) or 'none')}.</p>"
        )
        out.append(html_table(*comparison_rows(report)))
    out.append("<h2>Checks</h2><ul>")
    for c in report.get("checks", []):
        cls = "pass" if c["passed"] else "fail"
        out.append(f'<li class="{cls}"><code>{esc(c["name"])}</code>: {esc(c["note"])}</li>')
    out.append("</ul>")
    trend = plots.plot_trend(scorecard.trend_runs(report), scorecard.trend_chance(report))
    for title, svg in (
        ("Trend across the last evaluation runs (MLflow; dashed: chance)", trend),
        ("Loss curves (MLflow)", plots.plot_loss_curves(report.get("loss_curves") or {})),
        ("Per-stage loss", plots.plot_stage_bars(report)),
        ("Benchmark accuracy and win rate (95% CI, dashed: chance)", plots.plot_accuracies(report)),
    ):
        out.append(f"<h2>{esc(title)}</h2>")
        out.append(f"<figure>{svg}</figure>" if svg else "<p>Nothing to plot.</p>")
    out += ["<h2>BLiMP per phenomenon</h2>", html_table(*blimp_rows(report))]
    out += ["<h2>MMLU per subject</h2>", html_table(*scorecard.mmlu_subject_rows(report))]
    box = scorecard.sandbox_lines(report) or ["not run"]
    out += ["<h2>HumanEval sandbox</h2><ul>", *[f"<li>{esc(x)}</li>" for x in box], "</ul>"]
    out += ["<h2>Trend table</h2>", html_table(*scorecard.trend_rows(report))]
    for title, rows_of in TABLE_SECTIONS:
        if (table := rows_of(report)) is not None:
            out += [f"<h2>{esc(title)}</h2>", html_table(*table)]
    out.append("<h2>Generations</h2>")
    for stage in STAGES:
        gen = dig(report, "stages", stage, "generations")
        if gen is None or is_absent(gen):
            continue
        out.append(
            f"<h3>{esc(stage)}</h3><p>settings: <code>{esc(str(gen['settings']))}</code></p>"
        )
        out.append(
            html_table(["prompt", "reply"], [[s["prompt"], s["reply"]] for s in gen["samples"]])
        )
    out += ["<h2>Evaluation sets</h2>", html_table(*sets_rows(report)), "</body></html>"]
    return "\n".join(out) + "\n"
