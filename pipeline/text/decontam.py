"""Decontamination: the evaluation sets (``configs/eval_sets.yaml``) and a word n-gram index.

A training conversation that shares a long word n-gram with an evaluation prompt is dropped from
the SFT mix: a model that saw the test question (or its answer) during training makes every later
score meaningless. The rule follows GPT-3's (Brown et al., 2020, appendix C): ``n`` is the 5th
percentile of the set's prompt lengths in words, clamped to ``[min_n, max_n]`` (8 and 13 by
default), and a prompt shorter than ``n`` words (but at least ``min_words``) must appear whole.
Words are lower-cased ``\\w+`` runs, so punctuation and spacing do not hide a copy; in Chinese and
Japanese, which have no spaces, each Han/Kana character is a word (character n-grams).

Everything is vectorised: polars splits and hashes the words, NumPy builds rolling hashes of every
window and ``searchsorted`` looks them up, so checking tens of thousands of conversations against
~15,000 evaluation prompts takes well under a second. Collisions of the 64-bit hashes are
negligible at this scale (~1e-10 per lookup).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from pipeline.text.adapters.base import read_records
from pipeline.text.adapters.registry import ID_PATTERN, REPO_PATTERN, SHA256_PATTERN

_KEYS = frozenset(
    {"id", "repo", "url", "revision", "patterns", "sha256", "files", "columns", "prompt_fields",
     "licence"}
)  # fmt: skip
FILE_PLACEHOLDER = "{file}"
_HASH_SEED = 20_240_611
_PRIME = np.uint64(1_099_511_628_211)  # FNV-64 prime: an odd multiplier mixes every word in
# One Han/Kana character, or a run of other word characters (English: exactly ``\w+``).
WORD_PATTERN = r"[\p{Han}\p{Hiragana}\p{Katakana}]|[^\W\p{Han}\p{Hiragana}\p{Katakana}]+"
PROMPTS_SCHEMA = pl.Schema({"eval_set": pl.String, "prompt": pl.String})


class EvalSetConfigError(ValueError):
    """An invalid evaluation-sets file; the message names every bad entry."""


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set whose prompts the training data must not contain.

    Downloaded exactly like an SFT source (``repo``/``revision``/``patterns`` on the Hub, or a
    plain ``url`` pinned by ``sha256``); ``prompt_fields`` are the columns holding prompt text.
    """

    id: str
    prompt_fields: tuple[str, ...]
    licence: str
    repo: str | None = None
    revision: str | None = None
    patterns: tuple[str, ...] = ()
    url: str | None = None
    sha256: str | None = None
    # url only: names substituted for ``{file}`` in ``url`` (one download each), so a set
    # published as many files (MMLU: one CSV per subject) is one entry.
    files: tuple[str, ...] = ()
    # column names of headerless CSV files, whose first row is data
    columns: tuple[str, ...] = ()

    def urls(self) -> list[str]:
        """Every URL of a url entry: ``url`` itself, or once per name of ``files``."""
        assert self.url is not None
        if not self.files:
            return [self.url]
        return [self.url.replace(FILE_PLACEHOLDER, name) for name in self.files]


def load_eval_sets(path: Path | str) -> list[EvalSet]:
    """Read and validate ``configs/eval_sets.yaml``; every problem is reported at once."""
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, Mapping) or not isinstance(data.get("eval_sets"), list):
        raise EvalSetConfigError(f"{path}: expected a mapping with an 'eval_sets' list")
    problems: list[str] = []
    sets: list[EvalSet] = []
    for index, entry in enumerate(data["eval_sets"], start=1):
        errors = _entry_errors(entry)
        label = f"eval set #{index}" + (
            f" ({entry.get('id')!r})" if isinstance(entry, Mapping) else ""
        )
        if not errors and any(s.id == entry["id"] for s in sets):
            errors.append(f"duplicate id {entry['id']!r}")
        if errors:
            problems += [f"{path}: {label}: {e}" for e in errors]
            continue
        sets.append(
            EvalSet(
                id=entry["id"],
                prompt_fields=tuple(entry["prompt_fields"]),
                licence=entry["licence"],
                repo=entry.get("repo"),
                revision=entry.get("revision"),
                patterns=tuple(entry.get("patterns") or ()),
                url=entry.get("url"),
                sha256=entry.get("sha256"),
                files=tuple(entry.get("files") or ()),
                columns=tuple(entry.get("columns") or ()),
            )
        )
    if problems:
        raise EvalSetConfigError("\n".join(problems))
    return sets


def _entry_errors(entry: Any) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"expected a mapping, got {type(entry).__name__}"]
    errors = []
    if unknown := sorted(set(entry) - _KEYS):
        errors.append(f"unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    if not isinstance(entry.get("id"), str) or not ID_PATTERN.fullmatch(entry["id"]):
        errors.append(f"'id' must match {ID_PATTERN.pattern}")
    repo, url = entry.get("repo"), entry.get("url")
    if (repo is None) == (url is None):
        errors.append("set exactly one of 'repo' and 'url'")
    if repo is not None and (
        not isinstance(repo, str)
        or not REPO_PATTERN.fullmatch(repo)
        or not entry.get("revision")
        or not entry.get("patterns")
    ):
        errors.append("a repo entry needs 'repo: org/name', 'revision' and 'patterns'")
    sha = entry.get("sha256")
    if sha is not None and (url is None or not SHA256_PATTERN.fullmatch(str(sha))):
        errors.append("'sha256' (64 hex digits) applies to url entries only")
    files = entry.get("files")
    if files is not None and (
        url is None
        or sha is not None
        or FILE_PLACEHOLDER not in str(url)
        or not isinstance(files, list)
        or not files
        or not all(isinstance(f, str) and ID_PATTERN.fullmatch(f) for f in files)
    ):
        errors.append(
            f"'files' (a list of names matching {ID_PATTERN.pattern}) needs a url holding "
            f"{FILE_PLACEHOLDER!r} and no 'sha256'"
        )
    columns = entry.get("columns")
    if columns is not None and (
        not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns)
    ):
        errors.append("'columns' must be a non-empty list of column names")
    fields = entry.get("prompt_fields")
    if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
        errors.append("'prompt_fields' must be a non-empty list of column names")
    if not isinstance(entry.get("licence"), str):
        errors.append("'licence' is required")
    return errors


def read_eval_file(path: Path, columns: Sequence[str] = ()) -> pl.DataFrame:
    """One file of an evaluation set: what :func:`read_records` reads, plus CSV. A CSV is read
    with ``columns`` as its header when given (MMLU's files have none), every field as text."""
    if path.name.lower().endswith(".csv"):
        frame = pl.read_csv(
            path, has_header=not columns, infer_schema=False, quote_char='"', encoding="utf8"
        )
        if columns:
            if frame.width != len(columns):
                raise ValueError(
                    f"{path}: {frame.width} CSV columns, expected {len(columns)} ({list(columns)})"
                )
            frame.columns = list(columns)
        return frame
    return read_records(path)


def eval_prompts(eval_set: EvalSet, files: Sequence[Path]) -> pl.DataFrame:
    """The set's prompt texts (one row per non-empty field value) as ``eval_set``/``prompt``."""
    parts = []
    for path in files:
        frame = read_eval_file(Path(path), eval_set.columns)
        missing = [f for f in eval_set.prompt_fields if f not in frame.columns]
        if missing:
            raise ValueError(f"eval set {eval_set.id!r}: {Path(path).name} lacks {missing}")
        for field in eval_set.prompt_fields:
            parts.append(frame.select(pl.col(field).cast(pl.String).alias("prompt")))
    prompts = pl.concat(parts) if parts else PROMPTS_SCHEMA.to_frame().select("prompt")
    prompts = prompts.filter(pl.col("prompt").str.strip_chars() != "").unique(maintain_order=True)
    return prompts.select(pl.lit(eval_set.id).alias("eval_set"), "prompt")


# ------------------------------------------------------------------------------ n-gram index
def word_hashes(texts: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hash of every word, row of every word, words per row)`` of ``texts``, in order.

    A Han/Kana character is a word of its own (Chinese has no spaces): the n-gram rule then
    reads character n-grams there, the way it reads word n-grams in English."""
    words = texts.fill_null("").str.to_lowercase().str.extract_all(WORD_PATTERN)
    counts = words.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = words.explode().drop_nulls()
    hashes = flat.hash(seed=_HASH_SEED).to_numpy().astype(np.uint64)
    rows = np.repeat(np.arange(len(texts), dtype=np.int64), counts)
    return hashes, rows, counts


def window_hashes(
    hashes: np.ndarray, rows: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rolling hashes of every ``n``-word window inside one row: ``(hash, row, start)``.

    ``h = sum_j w[i+j] * P^(n-1-j)`` in wrapping uint64 arithmetic, built with ``n`` vector
    operations; windows that would span two rows are dropped.
    """
    m = len(hashes) - n + 1
    if m <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.uint64), empty, empty
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            acc = acc * _PRIME + hashes[j : j + m]
    starts = np.arange(m, dtype=np.int64)
    inside = rows[:m] == rows[n - 1 :]
    return acc[inside], rows[:m][inside], starts[inside]


@dataclass
class NgramIndex:
    """Hashes of evaluation n-grams, grouped by ``n``, each tagged with its evaluation set."""

    grams: dict[int, tuple[np.ndarray, np.ndarray]]  # n -> (sorted hashes, set index)
    set_names: list[str]
    n_per_set: dict[str, int]

    @classmethod
    def build(
        cls, prompts: pl.DataFrame, *, min_n: int = 8, max_n: int = 13, min_words: int = 6
    ) -> NgramIndex:
        """Index ``prompts`` (columns ``eval_set``, ``prompt``) with the per-set ``n`` rule."""
        if not 1 <= min_words <= min_n <= max_n:
            raise ValueError("need 1 <= min_words <= min_n <= max_n")
        names = prompts["eval_set"].unique(maintain_order=True).to_list()
        by_n: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        n_per_set: dict[str, int] = {}
        for s, name in enumerate(names):
            texts = prompts.filter(pl.col("eval_set") == name)["prompt"]
            hashes, rows, counts = word_hashes(texts)
            p5 = float(np.percentile(counts, 5)) if len(counts) else max_n
            n = int(min(max(math.floor(p5), min_n), max_n))
            n_per_set[name] = n
            h, _, _ = window_hashes(hashes, rows, n)
            by_n.setdefault(n, []).append((h, np.full(len(h), s, dtype=np.int32)))
            # A prompt shorter than n words must appear whole: index its one window, of its
            # own length (a row of exactly `length` words has exactly one such window).
            for length in np.unique(counts[(counts >= min_words) & (counts < n)]):
                keep = np.isin(rows, np.flatnonzero(counts == length))
                h, _, _ = window_hashes(hashes[keep], rows[keep], int(length))
                by_n.setdefault(int(length), []).append((h, np.full(len(h), s, dtype=np.int32)))
        grams = {}
        for n, parts in by_n.items():
            h = np.concatenate([p[0] for p in parts])
            owner = np.concatenate([p[1] for p in parts])
            order = np.argsort(h, kind="stable")
            grams[n] = (h[order], owner[order])
        return cls(grams, names, n_per_set)

    def match(self, texts: pl.Series) -> pl.Series:
        """Per text, the name of the first evaluation set it overlaps (null when clean)."""
        hashes, rows, _ = word_hashes(texts)
        hit = np.full(len(texts), -1, dtype=np.int64)
        for n in sorted(self.grams):
            table, owner = self.grams[n]
            h, r, _ = window_hashes(hashes, rows, n)
            if not len(h) or not len(table):
                continue
            pos = np.searchsorted(table, h).clip(max=len(table) - 1)
            found = table[pos] == h
            for row, s in zip(r[found], owner[pos[found]], strict=True):
                if hit[row] < 0:
                    hit[row] = s
        names = np.array([*self.set_names, ""], dtype=object)
        out = names[hit]  # -1 picks the trailing "" (clean)
        return pl.Series("contaminated_by", out, dtype=pl.String).replace("", None)
