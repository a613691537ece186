"""The alignment methods side by side: one column per materialised method in the report.

Every alignment stage writes its reward-model win rate over ``sft_weights`` into its
``metrics.json`` (the same held-out preference prompts, greedy replies, ties half: see
:func:`llm_core.stages.alignment.win_rate`). This reads them back from ``rlhf_weights/`` (the
profile's ``rlhf.method``, the model later assets use) and from each ``rlhf/<method>/``, so the
report shows the methods next to each other without re-scoring anything. Plain Python.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipeline.artefacts import Artefacts, rlhf_method_key

FIGURES = ("win_rate", "ci95", "wins", "ties", "losses", "n", "reward_mean",
           "baseline_reward_mean", "reply_tokens_mean", "baseline_reply_tokens_mean")  # fmt: skip


def _read(files: Artefacts, key: str) -> dict[str, Any] | None:
    path = files.metrics(key)
    if files.trained(key) is None or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    win = summary.get("win_rate") or {}
    return {
        "asset": key,
        "method": summary.get("method"),
        "steps": summary.get("steps"),
        "wall_time_s": summary.get("wall_time_s"),
        **{k: win.get(k) for k in FIGURES},
    }


def method_figures(files: Artefacts) -> dict[str, dict[str, Any]]:
    """``{column: figures}`` for ``rlhf_weights`` and every materialised ``rlhf/<method>``."""
    out: dict[str, dict[str, Any]] = {}
    main = _read(files, "rlhf_weights")
    if main is not None:
        out[f"rlhf_weights ({main['method']})"] = main
    folder = files.dir("rlhf")
    if folder.is_dir():
        for sub in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            figures = _read(files, rlhf_method_key(sub))
            if figures is not None:
                out[sub] = figures
    return out


def method_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Figures as rows, one column per method (None when no method reported a win rate)."""
    methods = report.get("rlhf_methods")
    if not isinstance(methods, Mapping) or not methods:
        return None

    def pct(x: Any) -> str:
        return f"{x:.1%}" if isinstance(x, int | float) else "–"

    def num(x: Any, fmt: str = "{:.2f}") -> str:
        return fmt.format(x) if isinstance(x, int | float) else "–"

    rows: list[tuple[str, Any]] = [
        ("win rate over SFT", lambda f: pct(f["win_rate"])),
        ("95% CI (Wilson)", lambda f: f"[{pct(f['ci95'][0])}, {pct(f['ci95'][1])}]"
                                      if f.get("ci95") else "–"),  # fmt: skip
        ("wins/ties/losses (n)", lambda f: f"{f['wins']}/{f['ties']}/{f['losses']} ({f['n']})"),
        ("mean reward: aligned / SFT",
         lambda f: f"{num(f['reward_mean'])} / {num(f['baseline_reward_mean'])}"),
        ("mean reply tokens: aligned / SFT",
         lambda f: f"{num(f['reply_tokens_mean'], '{:.1f}')} / "
                   f"{num(f['baseline_reply_tokens_mean'], '{:.1f}')}"),
        ("steps", lambda f: str(f.get("steps"))),
        ("training wall time (s)", lambda f: num(f.get("wall_time_s"), "{:.0f}")),
    ]  # fmt: skip
    header = ["figure", *methods]
    return header, [[name, *(get(f) for f in methods.values())] for name, get in rows]
