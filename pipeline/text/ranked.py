"""Ranked preference files: ``k`` responses with scores per prompt, checked row by row.

The source schema is ``llm_codebase``'s: ``{"prompt": ..., "text": [t1, t2, ...], "score": [s1,
s2, ...]}``, lists of any length ``k >= 2``, a shorter list padded with score ``-100`` (no
response in that slot). ``prompt`` is a string (one user turn) or chat messages. Pairs are the
``k = 2`` case (:func:`pairs_as_ranked`). A row that cannot be trained on goes to
``rejects.parquet`` with its ``reason`` (:func:`llm_core.ranking.ranked_row_problem`, plus
``bad_prompt``); the rest is written in the form every ranking method reads
(:class:`llm_core.ranking.Ranked`). Plain Python: no Dagster, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from llm_core.ranking import Ranked, ranked_row_problem
from pipeline.io import atomic_write_parquet

REJECTS_SCHEMA = {"row": pl.Int64, "prompt": pl.String, "record": pl.String, "reason": pl.String}


def _messages(prompt: Any) -> list[dict[str, str]] | None:
    """The prompt as chat messages ending in a user turn, or None when it is not one."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if prompt.strip() else None
    if not isinstance(prompt, list) or not prompt:
        return None
    msgs = []
    for m in prompt:
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            return None
        msgs.append({"role": str(m.get("role")), "content": m["content"]})
    return msgs if msgs[-1]["role"] == "user" else None


def read_ranked_source(path: Path) -> list[dict[str, Any]]:
    """The raw rows of a ranked file: a JSON list, JSON lines or parquet."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ranked preferences file here")
    if path.suffix == ".parquet":
        return pl.read_parquet(path).to_dicts()
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.suffix == ".json" else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if rows is None:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of ranked rows, got {type(rows).__name__}")
    return rows


def sort_ranked(rows: Iterable[Mapping[str, Any]]) -> tuple[Ranked, pl.DataFrame]:
    """The trainable rows (padding slots dropped) and the rejected ones with a ``reason``."""
    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        msgs = _messages(row.get("prompt"))
        texts, scores = row.get("text"), row.get("score")
        if msgs is None:
            reason: str | None = "bad_prompt"
        elif not isinstance(texts, list) or not isinstance(scores, list):
            reason = "length_mismatch" if isinstance(texts, list) else "no_response_list"
        else:
            reason = ranked_row_problem(texts, scores)
        if reason:
            rejects.append(
                {
                    "row": i,
                    "prompt": json.dumps(row.get("prompt"), ensure_ascii=False, default=str),
                    "record": json.dumps(dict(row), ensure_ascii=False, default=str),
                    "reason": reason,
                }
            )
            continue
        kept.append({"prompt": msgs, "text": texts, "score": scores})
    return Ranked.from_records(kept), pl.DataFrame(rejects, schema=REJECTS_SCHEMA)


def pairs_as_ranked(pairs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``preference_pairs`` rows (``prompt``, ``chosen``, ``rejected``) in the ranked source
    schema: the ``k = 2`` case, chosen scored 1 and rejected 0."""
    return [
        {"prompt": list(p["prompt"]), "text": [p["chosen"], p["rejected"]], "score": [1.0, 0.0]}
        for p in pairs
    ]


def write_ranked(rows: Iterable[Mapping[str, Any]], out: Path, name: str) -> dict[str, Any]:
    """``out/<name>.parquet`` (the kept rows) and ``out/rejects.parquet``; returns counts, the
    responses per row and the reasons."""
    ranked, rejects = sort_ranked(rows)
    ranked.write_parquet(out / f"{name}.parquet")
    atomic_write_parquet(rejects, out / "rejects.parquet")
    sizes = [len(r) for r in ranked.responses]
    return {
        "rows": len(ranked),
        "rejected": rejects.height,
        "responses_min": min(sizes, default=0),
        "responses_max": max(sizes, default=0),
        "reasons": dict(rejects["reason"].value_counts().iter_rows()) if rejects.height else {},
    }
