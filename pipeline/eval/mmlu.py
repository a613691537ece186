"""MMLU: four-way multiple choice over 56 subjects, scored by the log-likelihood of the letter.

As lm-evaluation-harness's ``mmlu`` task: the prompt is a one-line description of the subject,
``k`` solved examples and the question with its lettered options, ending in ``Answer:``; the
model's choice is the letter (`` A`` .. `` D``) it gives the highest probability next, so a model
that never learned the format still gets a number (chance: 25%). Chat stages read the same
blocks through the chat template: each example is a user turn answered by an assistant turn
holding its letter, and the letter scored is the first token of the assistant's reply.

Examples are drawn (seeded) from the other questions of the same subject, never the scored one:
the mirror holds only the test split. When the prompt does not fit the model's window, examples
are dropped (the farthest first) until it does; the mean number kept is reported, so a 5-shot
figure of a 256-token model says how many shots it really saw.

Accuracy is reported per subject, pooled (with a Wilson interval) and macro-averaged over
subjects (MMLU's headline figure, with a stratified normal interval).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.eval.sets import Loaded, _blank, _rejects, subset
from pipeline.text.decontam import read_eval_file

LETTERS = ("A", "B", "C", "D")
COLUMNS = ("question", *LETTERS, "answer")
CHANCE = 0.25
SET_ID = "mmlu"
Z95 = 1.959963984540054


@dataclass(frozen=True)
class MmluLoaded(Loaded):
    """The scored items plus every valid question (the pool the examples are drawn from)."""

    pool: pl.DataFrame = field(default_factory=pl.DataFrame)


def subject_of(path: Path) -> str:
    """``abstract_algebra_test.csv`` -> ``abstract_algebra``."""
    return path.name.removesuffix(".csv").removesuffix("_test")


def load_mmlu(files: Sequence[Path], per_subject: int, seed: int) -> MmluLoaded:
    """Questions (``subject``, ``question``, ``A``..``D``, ``answer``) from MMLU's headerless
    CSVs; ``per_subject`` are drawn from each subject, so large subjects cannot dominate."""
    parts = []
    for path in files:
        frame = read_eval_file(Path(path), COLUMNS)
        item = pl.format("{}:{}", pl.lit(Path(path).name), pl.int_range(pl.len()))
        parts.append(
            frame.select(
                item.alias("item"), pl.lit(subject_of(Path(path))).alias("subject"), *COLUMNS
            )
        )
    raw = pl.concat(parts).with_columns(pl.col("answer").str.strip_chars().str.to_uppercase())
    reason = (
        pl.when(_blank("question"))
        .then(pl.lit("empty question"))
        .when(pl.any_horizontal(*[_blank(c) for c in LETTERS]))
        .then(pl.lit("empty option"))
        .when(~pl.col("answer").is_in(list(LETTERS)))
        .then(pl.lit("answer is not one of A, B, C, D"))
    )
    raw = raw.with_columns(reason.alias("_reason"))
    bad = raw.filter(pl.col("_reason").is_not_null())
    rejects = _rejects(SET_ID, bad["item"].to_list(), bad["_reason"].to_list())
    pool = raw.filter(pl.col("_reason").is_null()).drop("_reason")
    chosen = [
        subset(pool.filter(pl.col("subject") == s), per_subject, seed)
        for s in sorted(pool["subject"].unique().to_list())
    ]
    items = pl.concat(chosen) if chosen else pool.clear()
    return MmluLoaded(items, rejects, pool.height, pool)


# ------------------------------------------------------------------------------ prompts
def describe(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."


def question_block(row: dict[str, Any]) -> str:
    """The question, its four lettered options and ``Answer:`` (harness format)."""
    options = "\n".join(f"{letter}. {row[letter]}" for letter in LETTERS)
    return f"{row['question'].strip()}\n{options}\nAnswer:"


def base_prompt(subject: str, shots: Sequence[dict[str, Any]], row: dict[str, Any]) -> str:
    solved = "".join(f"{question_block(s)} {s['answer']}\n\n" for s in shots)
    return f"{describe(subject)}\n\n{solved}{question_block(row)}"


def chat_messages(
    subject: str, shots: Sequence[dict[str, Any]], row: dict[str, Any]
) -> list[dict[str, str]]:
    """Each example a user turn answered by its letter; the description opens the first turn."""
    turns = [*shots, row]
    messages: list[dict[str, str]] = []
    for i, t in enumerate(turns):
        head = f"{describe(subject)}\n\n" if i == 0 else ""
        messages.append({"role": "user", "content": head + question_block(t)})
        if i < len(shots):
            messages.append({"role": "assistant", "content": str(t["answer"])})
    return messages


def draw_shots(pool: pl.DataFrame, row: dict[str, Any], k: int, seed: int) -> list[dict[str, Any]]:
    """``k`` other questions of ``row``'s subject, the same for every stage and rerun."""
    if k <= 0:
        return []
    others = pool.filter((pl.col("subject") == row["subject"]) & (pl.col("item") != row["item"]))
    if others.height == 0:
        return []
    rng = np.random.default_rng([seed, zlib.crc32(row["item"].encode())])
    pick = rng.choice(others.height, size=min(k, others.height), replace=False)
    return [others.row(int(i), named=True) for i in pick]


def encode_items(
    tok: Any,
    items: pl.DataFrame,
    pool: pl.DataFrame,
    *,
    shots: int,
    chat: bool,
    window: int,
    seed: int,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Prompt ids per item (shots dropped until it fits ``window``), the option ids, and the
    number of shots each item kept."""
    from llm_core.sft import encode_prompt

    def encode(subject: str, s: list[dict[str, Any]], row: dict[str, Any]) -> list[int]:
        if chat:
            return encode_prompt(tok, chat_messages(subject, s, row))
        return tok.encode(base_prompt(subject, s, row), add_special_tokens=False).ids

    contexts, kept = [], []
    for row in items.iter_rows(named=True):
        chosen = draw_shots(pool, row, shots, seed)
        ids = encode(row["subject"], chosen, row)
        while len(ids) > window and chosen:
            chosen = chosen[1:]
            ids = encode(row["subject"], chosen, row)
        contexts.append(ids)
        kept.append(len(chosen))
    # Base: the letter follows "Answer:" after a space; chat: it opens the assistant's reply.
    spelled = list(LETTERS) if chat else [f" {x}" for x in LETTERS]
    options = [tok.encode(s, add_special_tokens=False).ids for s in spelled]
    return contexts, options, kept


def macro_interval(per_subject: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """95% interval of the unweighted mean over subjects (stratified normal approximation)."""
    ps = [(r["accuracy"], r["n"]) for r in per_subject.values() if r["n"]]
    if not ps:
        return (float("nan"), float("nan"))
    mean = sum(p for p, _ in ps) / len(ps)
    # a subject at 0% or 100% still carries the uncertainty of its n (add-2 smoothing)
    var = sum(((p * n + 1) / (n + 2)) * (1 - (p * n + 1) / (n + 2)) / n for p, n in ps)
    half = Z95 * math.sqrt(var) / len(ps)
    return (max(0.0, mean - half), min(1.0, mean + half))


def mmlu_scores(
    model: Any, tok: Any, loaded: MmluLoaded, *, shots: int, chat: bool, batch_size: int, seed: int
) -> dict[str, Any]:
    """Accuracy per subject, pooled and macro-averaged, at ``shots`` examples per prompt."""
    from llm_core.evaluate import binomial_accuracy, choice_logprobs

    window = int(model.config.context_length)
    contexts, options, kept = encode_items(
        tok, loaded.items, loaded.pool, shots=shots, chat=chat, window=window, seed=seed
    )
    scores = choice_logprobs(model, contexts, options, batch_size=batch_size)
    answers = np.array([LETTERS.index(a) for a in loaded.items["answer"].to_list()])
    picked = scores.picked
    correct = picked == answers
    subjects = np.asarray(loaded.items["subject"].to_list(), dtype=object)
    per = {
        s: binomial_accuracy(int(correct[subjects == s].sum()), int((subjects == s).sum()))
        for s in sorted(set(subjects.tolist()))
    }
    macro = float(np.mean([r["accuracy"] for r in per.values()])) if per else float("nan")
    letters_picked = {x: int((picked == i).sum()) for i, x in enumerate(LETTERS)}
    return {
        **binomial_accuracy(int(correct.sum()), len(correct)),
        "chance": CHANCE,
        "macro_accuracy": macro,
        "macro_ci95": macro_interval(per),
        "subjects": len(per),
        "shots": shots,
        "mean_shots_kept": float(np.mean(kept)) if kept else 0.0,
        "truncated": scores.truncated,
        "picked": letters_picked,
        "per_subject": per,
        "template": "chat" if chat else "plain",
        "method": "argmax of log p(letter) after 'Answer:' (lm-evaluation-harness mmlu)",
    }
