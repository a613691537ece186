"""Labelled texts for the classifiers: the UCI SMS Spam Collection and Gutenberg paragraphs.

Pure data processing (no torch, no Dagster). Both datasets are written in the layout the
``classify`` stage reads (:mod:`llm_core.stages.classify`): ``labels.json`` plus
``<split>/{train,val,test}.parquet`` with ``text`` and ``label`` columns.

SMS spam: the archive's ``SMSSpamCollection`` is one ``label TAB text`` line per message. A line
without a tab, with a label other than ``ham``/``spam``, with an empty text or not valid UTF-8 is
rejected with that reason, as is every exact repeat of an earlier message (the collection has
several hundred). Two split modes, both seeded:

* ``natural``: all rows, stratified by label, 70/10/20;
* ``balanced``: the book's (ch. 6): ham undersampled to the spam count, 70/10/20. It is cut
  *inside* each natural split (the same 70/10/20 of each label, ham then undersampled), so the
  balanced test rows are a subset of the natural test rows and a model trained on either split
  never sees a row of the other's test split.

Paragraph language: paragraphs of the mirror's books, labelled with the catalog's ``Language``
and split *by book*, so no book is in two splits; a language with fewer books than train, val and
test need is rejected, book by book.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.io import atomic_write_json, atomic_write_parquet

SMS_MEMBER = "SMSSpamCollection"
SMS_LABELS = ("ham", "spam")
FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test
PARTS = ("train", "val", "test")
REJECT_SCHEMA = {"line": pl.Int64, "raw": pl.String, "reason": pl.String, "detail": pl.String}
ROW_SCHEMA = {"line": pl.Int64, "label": pl.String, "text": pl.String}


class SmsFormatError(ValueError):
    """The archive is not the SMS Spam Collection (names the file and what is wrong)."""


@dataclass
class Parsed:
    """Kept rows (``line``, ``label``, ``text``) and rejected lines with a ``reason``."""

    rows: pl.DataFrame
    rejects: pl.DataFrame


def read_sms_zip(path: Path) -> bytes:
    """The bytes of the archive's ``SMSSpamCollection`` member; a clear error otherwise."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if Path(n).name == SMS_MEMBER]
            if not names:
                raise SmsFormatError(f"{path}: no {SMS_MEMBER} member (has {zf.namelist()})")
            return zf.read(names[0])
    except zipfile.BadZipFile as exc:
        raise SmsFormatError(f"{path}: not a zip archive ({exc})") from exc


def parse_sms(data: bytes) -> Parsed:
    """Parse ``label TAB text`` lines; each bad line is a reject with its reason, and every
    exact repeat of an earlier kept message is a ``duplicate`` reject naming the first line."""
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    seen: dict[str, int] = {}

    def reject(n: int, raw: str, reason: str, detail: str = "") -> None:
        rejects.append({"line": n, "raw": raw[:500], "reason": reason, "detail": detail})

    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline
    for n, raw_bytes in enumerate(lines, start=1):
        raw_bytes = raw_bytes.removesuffix(b"\r")
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            reject(n, raw_bytes.decode("utf-8", "replace"), "invalid_utf8", str(exc))
            continue
        label, tab, text = raw.partition("\t")
        text = text.strip()
        if not tab:
            reject(n, raw, "missing_tab", "expected 'ham|spam<TAB>text'")
        elif label.strip() not in SMS_LABELS:
            reject(n, raw, "unknown_label", f"label {label.strip()!r} is not ham or spam")
        elif not text:
            reject(n, raw, "empty_text")
        elif text in seen:
            reject(n, raw, "duplicate", f"same message as line {seen[text]}")
        else:
            seen[text] = n
            rows.append({"line": n, "label": label.strip(), "text": text})
    return Parsed(
        pl.DataFrame(rows, schema=ROW_SCHEMA), pl.DataFrame(rejects, schema=REJECT_SCHEMA)
    )


def _cut(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Split points (train end, val end) of ``n`` rows; val and test get at least one row each
    when there are three or more rows."""
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
    return n - n_val - n_test, n - n_test


def split_sms(rows: pl.DataFrame, seed: int) -> dict[str, dict[str, pl.DataFrame]]:
    """``{"natural": {train, val, test}, "balanced": {...}}``, both seeded (module docstring)."""
    natural: dict[str, list[pl.DataFrame]] = {p: [] for p in PARTS}
    balanced: dict[str, list[pl.DataFrame]] = {p: [] for p in PARTS}
    by_label = {lab: rows.filter(pl.col("label") == lab) for lab in SMS_LABELS}
    for k, lab in enumerate(SMS_LABELS):
        df = by_label[lab]
        df = df[np.random.default_rng([seed, k]).permutation(df.height)]
        a, b = _cut(df.height, FRACTIONS)
        for part, piece in zip(PARTS, (df[:a], df[a:b], df[b:]), strict=True):
            natural[part].append(piece)
    for i, part in enumerate(PARTS):
        ham, spam = natural[part][0], natural[part][1]
        keep = np.random.default_rng([seed, 2, i]).permutation(ham.height)[: spam.height]
        balanced[part] = [ham[np.sort(keep)], spam]
    out = {}
    for mode, parts in (("balanced", balanced), ("natural", natural)):
        out[mode] = {p: _shuffle(pl.concat(parts[p]), seed) for p in PARTS}
    return out


def _shuffle(df: pl.DataFrame, seed: int) -> pl.DataFrame:
    return df[np.random.default_rng([seed, 3, df.height]).permutation(df.height)]


def write_dataset(
    out: Path,
    splits: Mapping[str, Mapping[str, pl.DataFrame]],
    labels: Iterable[str],
    default_split: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``labels.json`` and ``<split>/<part>.parquet`` (atomic); returns the row counts per
    split, part and label."""
    counts: dict[str, Any] = {}
    for split, parts in splits.items():
        counts[split] = {}
        for part, df in parts.items():
            atomic_write_parquet(df, out / split / f"{part}.parquet")
            counts[split][part] = dict(sorted(df.group_by("label").len().iter_rows()))
    info = {
        "labels": list(labels),
        "splits": list(splits),
        "default_split": default_split,
        "counts": counts,
        **(extra or {}),
    }
    atomic_write_json(out / "labels.json", info)
    return counts


# ------------------------------------------------------------------------------ paragraphs
_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ParagraphConfig:
    """Profile section ``language_paragraphs``."""

    ids: tuple[int, ...] = ()  # explicit books; empty: the first books_per_language of each
    books_per_language: int = 6
    min_books: int = 3  # a language needs a train, a val and a test book
    paragraphs_per_book: int = 60
    min_chars: int = 80  # shorter paragraphs (headings, verse lines) are skipped
    max_chars: int = 400  # longer ones are cut (the classifier reads the first tokens anyway)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> ParagraphConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(m) - known
        if unknown:
            raise ValueError(
                f"language_paragraphs: unknown key(s) {sorted(unknown)}; takes {sorted(known)}"
            )
        d = dict(m)
        if "ids" in d:
            d["ids"] = tuple(int(i) for i in d["ids"] or ())
        return cls(**d)


def select_language_books(catalog: pl.DataFrame, cfg: ParagraphConfig) -> pl.DataFrame:
    """Books of one language each (``id``, ``language``, ``title``): ``cfg.ids`` when given,
    else the first ``books_per_language`` by id of every single-language book of type Text."""
    df = catalog.filter(pl.col("languages").list.len() == 1).with_columns(
        pl.col("languages").list.first().alias("language")
    )
    if "type" in df.columns:
        df = df.filter(pl.col("type") == "Text")
    if cfg.ids:
        missing = sorted(set(cfg.ids) - set(df["id"].to_list()))
        if missing:
            raise ValueError(
                f"language_paragraphs.ids {missing}: not single-language catalog books"
            )
        df = df.filter(pl.col("id").is_in(list(cfg.ids)))
    else:
        df = df.sort("id").group_by("language", maintain_order=True).head(cfg.books_per_language)
    return df.select("id", "language", "title").sort("id")


def book_paragraphs(body: str, book_id: int, cfg: ParagraphConfig, seed: int) -> list[str]:
    """Up to ``paragraphs_per_book`` paragraphs of one book body (whitespace collapsed, at
    least ``min_chars``, cut at ``max_chars``), a seeded sample in book order."""
    paras = [_SPACE.sub(" ", p).strip() for p in _BREAK.split(body)]
    paras = [p[: cfg.max_chars] for p in paras if len(p) >= cfg.min_chars]
    if len(paras) > cfg.paragraphs_per_book:
        rng = np.random.default_rng([seed, book_id])
        keep = np.sort(rng.choice(len(paras), cfg.paragraphs_per_book, replace=False))
        paras = [paras[i] for i in keep]
    return paras


def split_by_book(
    books: pl.DataFrame, paragraphs: Mapping[int, list[str]], cfg: ParagraphConfig, seed: int
) -> tuple[dict[str, pl.DataFrame], pl.DataFrame, list[str]]:
    """Per language, its books shuffled (seeded) into train/val/test (70/10/20, at least one
    book each); every paragraph follows its book. Returns the parts, the rejects (a book of a
    language with fewer than ``min_books`` usable books, or with no usable paragraph) and the
    label set (the languages kept, sorted)."""
    rejects: list[dict[str, Any]] = []
    parts: dict[str, list[dict[str, Any]]] = {p: [] for p in PARTS}
    usable = books.filter(pl.col("id").is_in([i for i, p in paragraphs.items() if p]))
    for row in books.filter(~pl.col("id").is_in(usable["id"])).iter_rows(named=True):
        rejects.append({"line": row["id"], "raw": row["title"], "reason": "no_paragraphs",
                        "detail": f"no paragraph of >= {cfg.min_chars} chars"})  # fmt: skip
    labels = []
    for lang in sorted(set(usable["language"].to_list())):
        ids = sorted(usable.filter(pl.col("language") == lang)["id"].to_list())
        if len(ids) < max(cfg.min_books, 3):
            for row in usable.filter(pl.col("id").is_in(ids)).iter_rows(named=True):
                rejects.append({"line": row["id"], "raw": row["title"], "reason": "too_few_books",
                                "detail": f"{lang}: {len(ids)} book(s) < {cfg.min_books}"})  # fmt: skip
            continue
        labels.append(lang)
        order = [ids[i] for i in np.random.default_rng([seed, len(labels)]).permutation(len(ids))]
        a, b = _cut(len(order), FRACTIONS)
        for part, chunk in zip(PARTS, (order[:a], order[a:b], order[b:]), strict=True):
            for book in chunk:
                parts[part] += [{"book": book, "label": lang, "text": t} for t in paragraphs[book]]
    schema = {"book": pl.Int64, "label": pl.String, "text": pl.String}
    frames = {p: _shuffle(pl.DataFrame(parts[p], schema=schema), seed) for p in PARTS}
    return frames, pl.DataFrame(rejects, schema=REJECT_SCHEMA), labels


def read_text_bytes(data: bytes) -> str:
    """A downloaded book's text, decoded and with its Gutenberg boilerplate cut off."""
    from pipeline.text.boilerplate import strip_boilerplate
    from pipeline.text.encoding import decode_text

    return strip_boilerplate(decode_text(data).text).body


def sms_preview(df: pl.DataFrame, n: int = 4) -> str:
    """A few rows as a Markdown list (Dagster metadata)."""
    buf = io.StringIO()
    for label, text in df.select("label", "text").head(n).iter_rows():
        buf.write(f"- **{label}**: {text[:160]!r}\n")
    return buf.getvalue() or "(no rows)"
