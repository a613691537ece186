"""The toy questions in the evaluation report: each stage's greedy answer and preference margin.

A teaching profile writes its preference pairs inline (``preference.pairs``: ``{user, chosen,
rejected}``); their prompts are *the questions*. For every model stage present (base, sft,
rlhf) the report shows the greedy answer to each question and the log-probability margin
``log p(chosen) - log p(rejected)`` of the whole reply (``<|end|>`` included). Read across a row,
that is the lesson: pretraining knows the words, SFT learns to answer, alignment moves the
answer (or its margin) to the preferred one.

Kept apart from :mod:`pipeline.eval.run` (the benchmarks): :func:`add_questions` adds a
``questions`` section to the report dict and :func:`question_table` its table, which
``pipeline.eval.report.TABLE_SECTIONS`` renders (escaped) in both ``report.md`` and
``report.html``. Profiles without inline pairs get neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.artefacts import Artefacts
from pipeline.text.profile_data import inline_pairs

# The report's stages and the asset each reads (as pipeline.eval.run names them).
STAGES: Mapping[str, str] = {
    "base": "pretrained_weights",
    "sft": "sft_weights",
    "rlhf": "rlhf_weights",
}
MAX_NEW_TOKENS = 16


def questions(profile: Mapping[str, Any]) -> list[dict[str, str]]:
    """The profile's inline preference pairs as ``{question, chosen, rejected}``, one per
    question: a question with several pairs is shown with its first."""
    frame = inline_pairs(profile.get("preference") or {})
    out: dict[str, dict[str, str]] = {}
    for row in frame.iter_rows(named=True):
        q = row["prompt"][-1]["content"]
        out.setdefault(q, {"question": q, "chosen": row["chosen"], "rejected": row["rejected"]})
    return list(out.values())


def reply_logprobs(
    model: Any, tok: Any, prompts: Sequence[str], replies: Sequence[str]
) -> list[float]:
    """Sum of the log-probabilities of each reply (its tokens and ``<|end|>``) after its
    single-turn prompt, in the chat template the stages train with."""
    import torch

    from llm_core.sft import encode_replies

    data = encode_replies(tok, [[{"role": "user", "content": p}] for p in prompts], list(replies))
    out = []
    device = next(model.parameters()).device
    for i in range(len(prompts)):
        a, b = int(data.offsets[i]), int(data.offsets[i + 1])
        ids = torch.as_tensor(data.ids[a:b], dtype=torch.long, device=device)[None]
        mask = torch.as_tensor(data.mask[a:b][1:], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1])[0], dim=-1)
        picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
        out.append(float(picked[mask].sum()))
    return out


def add_questions(
    report: dict[str, Any], root: str | Path, profile: Mapping[str, Any], device: str = "cpu"
) -> dict[str, Any]:
    """``report`` with a ``questions`` section when the profile has inline preference pairs."""
    import torch

    from llm_core.checkpoint import load_weights
    from llm_core.generate import chat_replies
    from llm_core.tokenizer import load_tokenizer
    from llm_core.trainer import resolve_device

    items = questions(profile)
    if not items:
        return report
    files = Artefacts(Path(root))
    dev = resolve_device(device)
    prompts = [q["question"] for q in items]
    stages: dict[str, Any] = {}
    for stage, asset in STAGES.items():
        weights = files.trained(asset)
        if weights is None:
            continue
        tok = load_tokenizer(files.tokenizer_beside(weights))
        model = load_weights(weights, device=dev).eval()
        with torch.inference_mode():
            answers = chat_replies(
                model, tok, [[{"role": "user", "content": p}] for p in prompts], MAX_NEW_TOKENS
            )
            chosen = reply_logprobs(model, tok, prompts, [q["chosen"] for q in items])
            rejected = reply_logprobs(model, tok, prompts, [q["rejected"] for q in items])
        stages[stage] = [
            {"answer": a, "logp_chosen": c, "logp_rejected": r, "margin": c - r}
            for a, c, r in zip(answers, chosen, rejected, strict=True)
        ]
        del model
    return {**report, "questions": {"items": items, "stages": stages}}


def question_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The ``questions`` section as a table (header, rows) for both report formats; None when
    the report has none (``report.TABLE_SECTIONS`` renders it, escaped)."""
    section = report.get("questions")
    if not section or not section["stages"]:
        return None
    stages = list(section["stages"])
    head = [
        "question",
        "preferred",
        *(f"{s} answer" for s in stages),
        *(f"{s} margin" for s in stages),
    ]
    rows = []
    for i, q in enumerate(section["items"]):
        answers = []
        for s in stages:
            a = section["stages"][s][i]["answer"] or "(nothing)"
            cell = " ".join(a.split())  # one line per reply
            answers.append(f"**{cell}**" if a == q["chosen"] else cell)
        margins = [f"{section['stages'][s][i]['margin']:+.2f}" for s in stages]
        rows.append(
            [" ".join(q["question"].split()), " ".join(q["chosen"].split()), *answers, *margins]
        )
    return head, rows
