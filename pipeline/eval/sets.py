"""Benchmark items from the files the ``eval_sets`` asset keeps (``eval_sets/<id>/files/``).

Each loader turns one evaluation set's files into a small frame of items plus a rejects frame
(``eval_set``, ``item``, ``reason``) for records that cannot be scored, so nothing is dropped
silently. Item counts come from the profile; when a set holds more, a seeded subset is taken
(kept in file order), so reruns score exactly the same items and a larger profile's items are
drawn the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.text.adapters.base import read_records
from pipeline.text.adapters.gsm8k import FINAL_ANSWER

REJECTS_SCHEMA = pl.Schema({"eval_set": pl.String, "item": pl.String, "reason": pl.String})
DATA_SUFFIXES = (".parquet", ".json", ".jsonl", ".gz", ".csv")
# The last number of a text: optional sign, thousands separators, optional decimals.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class EvalSetMissing(FileNotFoundError):
    """An evaluation set's files are not where ``eval_sets`` keeps them."""


@dataclass(frozen=True)
class Loaded:
    """Items ready to score and the records that were refused, with a reason each."""

    items: pl.DataFrame
    rejects: pl.DataFrame
    available: int  # usable records in the files, before sub-sampling


def set_files(eval_sets_dir: str | Path, set_id: str) -> list[Path]:
    """The data files of one evaluation set, sorted; an error naming the asset when absent."""
    root = Path(eval_sets_dir) / set_id / "files"
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise EvalSetMissing(
            f"{root}: no files of evaluation set {set_id!r}; materialise the `eval_sets` asset"
        )
    return files


def subset(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """``n`` rows drawn with ``seed`` (all rows when ``n`` covers them), in file order."""
    if n < 0:
        raise ValueError(f"item count must be >= 0, got {n}")
    if n >= frame.height:
        return frame
    keep = np.sort(np.random.default_rng(seed).choice(frame.height, size=n, replace=False))
    return frame[keep.tolist()]


def _rejects(set_id: str, items: Sequence[str], reasons: Sequence[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {"eval_set": [set_id] * len(items), "item": list(items), "reason": list(reasons)},
        schema=REJECTS_SCHEMA,
    )


def _split_valid(
    set_id: str, frame: pl.DataFrame, reason: pl.Expr
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``frame`` (with an ``item`` column) split by a ``reason`` expression: null keeps a row."""
    frame = frame.with_columns(reason.alias("_reason"))
    bad = frame.filter(pl.col("_reason").is_not_null())
    rejects = _rejects(set_id, bad["item"].to_list(), bad["_reason"].to_list())
    return frame.filter(pl.col("_reason").is_null()).drop("_reason"), rejects


def _read(files: Sequence[Path], set_id: str, columns: Sequence[str]) -> pl.DataFrame:
    """Concatenated records with an ``item`` id ``<file>:<row>``; an error names a bad file."""
    parts = []
    for path in files:
        frame = read_records(Path(path))
        if missing := [c for c in columns if c not in frame.columns]:
            raise ValueError(f"evaluation set {set_id!r}: {path} lacks columns {missing}")
        item = pl.format("{}:{}", pl.lit(f"{path.parent.name}/{path.name}"), pl.int_range(pl.len()))
        parts.append(
            frame.select(item.alias("item"), *[pl.col(c).cast(pl.String) for c in columns])
        )
    return pl.concat(parts)


def _blank(col: str) -> pl.Expr:
    return pl.col(col).is_null() | (pl.col(col).str.strip_chars() == "")


# ------------------------------------------------------------------------------ BLiMP
def load_blimp(files: Sequence[Path], per_phenomenon: int, seed: int) -> Loaded:
    """Minimal pairs (``good``, ``bad`` sentence) with their ``phenomenon`` (BLiMP's ``UID``).

    ``per_phenomenon`` pairs are drawn from each phenomenon present, so a phenomenon with many
    pairs cannot dominate the overall accuracy.
    """
    raw = _read(files, "blimp", ["UID", "sentence_good", "sentence_bad"]).rename(
        {"UID": "phenomenon", "sentence_good": "good", "sentence_bad": "bad"}
    )
    reason = (
        pl.when(_blank("phenomenon"))
        .then(pl.lit("no phenomenon (UID)"))
        .when(_blank("good") | _blank("bad"))
        .then(pl.lit("empty sentence"))
        .when(pl.col("good") == pl.col("bad"))
        .then(pl.lit("good and bad sentences are identical"))
    )
    valid, rejects = _split_valid("blimp", raw, reason)
    parts = [
        subset(valid.filter(pl.col("phenomenon") == ph), per_phenomenon, seed)
        for ph in sorted(valid["phenomenon"].unique().to_list())
    ]
    items = pl.concat(parts) if parts else valid.clear()
    return Loaded(items, rejects, valid.height)


# ------------------------------------------------------------------------------ LAMBADA
def split_last_word(text: str) -> tuple[str, str] | None:
    """``("context", " word")``: the passage and its last whitespace-separated word, the space
    kept on the word (how a byte-level BPE sees a word inside running text)."""
    stripped = text.rstrip()
    cut = max(stripped.rfind(" "), stripped.rfind("\n"))
    if cut <= 0 or cut == len(stripped) - 1:
        return None
    return stripped[:cut], " " + stripped[cut + 1 :]


def load_lambada(files: Sequence[Path], n: int, seed: int) -> Loaded:
    """Passages split into ``context`` and ``target`` (the last word, with its leading space)."""
    raw = _read(files, "lambada", ["text"])
    items, ctxs, targets, bad, why = [], [], [], [], []
    for item, text in raw.iter_rows():
        parts = split_last_word(text or "")
        if parts is None:
            bad.append(item)
            why.append("no last word to predict")
            continue
        items.append(item)
        ctxs.append(parts[0])
        targets.append(parts[1])
    valid = pl.DataFrame(
        {"item": items, "context": ctxs, "target": targets},
        schema={"item": pl.String, "context": pl.String, "target": pl.String},
    )
    return Loaded(subset(valid, n, seed), _rejects("lambada", bad, why), valid.height)


# ------------------------------------------------------------------------------ GSM8K
def parse_number(text: str, *, last: bool = True) -> float | None:
    """The last (or first) number in ``text`` (``"1,234"``, ``"$18"``, ``"-3.5"``), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1 if last else 0].replace(",", ""))
    except ValueError:
        return None


def final_number(reply: str) -> float | None:
    """A model's final answer: the number after ``####`` when it writes one (GSM8K's own
    format), else the last number of the reply (``The answer is 72.``, what SFT teaches)."""
    marker = re.search(r"####\s*(.+)", reply or "")
    if marker and (value := parse_number(marker.group(1), last=False)) is not None:
        return value
    return parse_number(reply)


def load_gsm8k(files: Sequence[Path], n: int, seed: int) -> Loaded:
    """Questions with their reference ``answer`` (the number after ``####``, as float)."""
    raw = _read(files, "gsm8k_test", ["question", "answer"])
    ref = pl.col("answer").str.extract(FINAL_ANSWER, 1)
    reason = (
        pl.when(_blank("question"))
        .then(pl.lit("empty question"))
        .when(ref.is_null())
        .then(pl.lit("answer has no '#### <final answer>' line"))
    )
    valid, rejects = _split_valid("gsm8k_test", raw, reason)
    valid = valid.with_columns(
        ref.map_elements(parse_number, return_dtype=pl.Float64).alias("reference")
    )
    unparsed = valid.filter(pl.col("reference").is_null())
    rejects = pl.concat(
        [
            rejects,
            _rejects(
                "gsm8k_test",
                unparsed["item"].to_list(),
                ["final answer is not a number"] * unparsed.height,
            ),
        ]
    )
    valid = valid.filter(pl.col("reference").is_not_null()).select("item", "question", "reference")
    return Loaded(subset(valid, n, seed), rejects, valid.height)


# ------------------------------------------------------------------------------ AlpacaEval
def load_alpaca_eval(files: Sequence[Path], n: int, seed: int) -> Loaded:
    """Held-out instructions (``instruction``, ``dataset``) for win rates between stages."""
    raw = _read(files, "alpaca_eval", ["instruction", "dataset"])
    valid, rejects = _split_valid(
        "alpaca_eval", raw, pl.when(_blank("instruction")).then(pl.lit("empty instruction"))
    )
    return Loaded(subset(valid, n, seed), rejects, valid.height)
