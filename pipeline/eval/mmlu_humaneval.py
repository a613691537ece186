"""The two benchmarks added to every stage's section: MMLU at 0 and k shots, and HumanEval.

Kept out of :mod:`pipeline.eval.run` (the pass over the stages) so that module stays small;
each scorer lives in its own module (:mod:`pipeline.eval.mmlu`, :mod:`pipeline.eval.humaneval`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pipeline.eval.humaneval import humaneval_scores
from pipeline.eval.mmlu import MmluLoaded, mmlu_scores
from pipeline.eval.report import absent
from pipeline.eval.sets import Loaded
from pipeline.eval.settings import EvalSettings


def mmlu_and_humaneval(
    model: Any,
    tok: Any,
    sets: Mapping[str, Any],
    s: EvalSettings,
    *,
    chat: bool,
    timed: Callable[[str, Callable[[], Any]], Any],
) -> dict[str, Any]:
    """``mmlu_0shot``, ``mmlu_kshot`` and ``humaneval`` sections (or why each is absent); chat
    stages read both through the chat template. ``timed(name, fn)`` runs and times each."""
    out: dict[str, Any] = {}
    mmlu = sets["mmlu"]
    for name, shots in (("mmlu_0shot", 0), ("mmlu_kshot", s.mmlu_shots)):
        if not isinstance(mmlu, MmluLoaded):
            out[name] = mmlu
        elif name == "mmlu_kshot" and shots <= 0:
            out[name] = absent("evaluation.mmlu_shots is 0")
        else:
            out[name] = timed(
                name,
                lambda k=shots: mmlu_scores(
                    model, tok, mmlu, shots=k, chat=chat, batch_size=s.batch_size, seed=s.seed
                ),
            )
    he = sets["humaneval"]
    out["humaneval"] = (
        timed(
            "humaneval",
            lambda: humaneval_scores(
                model, tok, he.items, s.humaneval, chat=chat, seed=s.seed, batch_size=s.batch_size
            ),
        )
        if isinstance(he, Loaded)
        else he
    )
    return out
