"""A synthetic gutenberg.org-layout mirror of N distinct English books, built from the real mirror.

Why not copy or reshuffle the mirror's books: the mirror holds ~45 MB of English text, and 4,000
books of ~0.3 MB drawn from it by paragraphs would repeat each paragraph in ~27 books. Every pair
of books would then share real 5-word shingles, so the near-duplicate pass would see millions of
candidate pairs that a real catalog of distinct works does not have, and the benchmark would
measure the generator rather than the pipeline.

So the *body* of each book is new text from a word-level Markov chain (order 1) fitted on the
mirror's English bodies: real words with their real frequencies and real word-to-word transitions
(the statistics that BPE training and language detection see), paragraph lengths drawn from the
real books' paragraphs, lines wrapped at ~72 characters as PG's plain-text files are. Common
phrases repeat across books as they do in a real library; long passages do not. Around each body
sits a real Project Gutenberg header and footer (from a randomly chosen English book of the
mirror) with the ebook number replaced by the new id, so the real boilerplate stripper runs on
real boilerplate.

The chain is run in many lanes at once (one numpy step moves every lane), so generating 1.2 GB
takes about a minute instead of a Python loop per word. Deterministic for a given seed.

Layout written under ``root``: ``gutenberg/cache/epub/{id}/pg{id}.txt`` and
``gutenberg/cache/epub/feeds/pg_catalog.csv`` (PG's own columns), which the project's mirror
server (``scriptorium mirror serve root``) serves at ``/``.
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FIRST_ID = 100_001  # above every real PG number, so a generated id never names a real book
LINE_CHARS = 72
CATALOG_HEADER = ["Text#", "Type", "Issued", "Title", "Language", "Authors", "Subjects", "LoCC",
                  "Bookshelves"]  # fmt: skip


@dataclass
class _Template:
    """What one real mirror book lends to generated books: its boilerplate and its catalog row."""

    id: int
    header: str
    footer: str
    row: dict[str, Any]
    words: int


@dataclass
class Model:
    """The fitted chain: vocabulary, successor lists grouped by word, paragraph lengths."""

    vocab: np.ndarray  # object array of str
    succ: np.ndarray  # successors of every occurrence, grouped by predecessor (int32)
    start: np.ndarray  # row start of each word in ``succ``
    count: np.ndarray  # successors per word (0: a dead end, restart anywhere)
    para_words: np.ndarray  # real paragraph lengths, in words
    templates: list[_Template]
    words_per_byte: float


def _renumber(boiler: str, old: int, new: int) -> str:
    """The header or footer with the ebook number replaced (``#1342``, ``/1342/``, ``1342-0``)."""
    boiler = re.sub(rf"#\s*{old}(?!\d)", f"#{new}", boiler)
    return re.sub(rf"(?<![\d.]){old}(?=[/-]\d|/|\.txt|\b)", str(new), boiler)


def fit(mirror: Path) -> Model:
    """Fit the chain on the English books of ``mirror`` (their decoded, boilerplate-free bodies)."""
    from pipeline.sources.gutenberg import parse_catalog
    from pipeline.text.boilerplate import strip_boilerplate
    from pipeline.text.encoding import decode_text

    gut = mirror / "gutenberg" / "cache" / "epub"
    catalog = parse_catalog(gut / "feeds" / "pg_catalog.csv")
    raw_rows = _raw_catalog_rows(gut / "feeds" / "pg_catalog.csv")
    vocab: dict[str, int] = {}
    stream: list[int] = []
    para_words: list[int] = []
    templates: list[_Template] = []
    body_bytes = 0
    for rec in catalog.iter_rows(named=True):
        path = gut / str(rec["id"]) / f"pg{rec['id']}.txt"
        if rec["languages"] != ["en"] or rec["type"] != "Text" or not path.exists():
            continue
        text = decode_text(path.read_bytes()).text
        cut = strip_boilerplate(text)
        if cut.header_end <= 0 or cut.footer_start >= len(text) or len(cut.body) < 20_000:
            continue  # a book without both markers lends no boilerplate
        n0 = len(stream)
        for para in re.split(r"\n[ \t]*\n", cut.body):
            words = para.split()
            if not words:
                continue
            para_words.append(len(words))
            stream.extend(vocab.setdefault(w, len(vocab)) for w in words)
        body_bytes += len(cut.body.encode("utf-8"))
        templates.append(
            _Template(
                rec["id"],
                text[: cut.header_end],
                text[cut.footer_start :],
                raw_rows[rec["id"]],
                len(stream) - n0,
            )
        )
    if not templates:
        raise SystemExit(f"no English book with PG markers under {gut}")
    w = np.asarray(stream, dtype=np.int32)
    order = np.argsort(w[:-1], kind="stable")
    succ = w[1:][order]
    count = np.bincount(w[:-1], minlength=len(vocab)).astype(np.int64)
    start = np.concatenate(([0], np.cumsum(count)[:-1]))
    words = np.empty(len(vocab), dtype=object)
    words[:] = list(vocab)
    return Model(words, succ, start, count, np.asarray(para_words), templates, len(w) / body_bytes)


def _raw_catalog_rows(path: Path) -> dict[int, dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return {int(r["Text#"]): r for r in csv.DictReader(fh) if r["Text#"].strip().isdigit()}


def _word_stream(model: Model, rng: np.random.Generator, lanes: int = 1024) -> Iterator[np.ndarray]:
    """Endless blocks of generated word ids: ``lanes`` chains advanced together, lane-major."""
    n = len(model.vocab)
    cur = rng.integers(0, n, size=lanes)
    steps = 2048
    while True:
        block = np.empty((steps, lanes), dtype=np.int32)
        for s in range(steps):
            cnt = model.count[cur]
            dead = cnt == 0
            pos = model.start[cur] + (rng.random(lanes) * np.maximum(cnt, 1)).astype(np.int64)
            nxt = model.succ[np.minimum(pos, len(model.succ) - 1)]
            if dead.any():
                nxt = np.where(dead, rng.integers(0, n, size=lanes), nxt)
            block[s] = nxt
            cur = nxt
        yield block.T.reshape(-1)


def _layout(model: Model, ids: np.ndarray, rng: np.random.Generator) -> str:
    """Words -> text: paragraphs of real lengths, separated by blank lines, wrapped lines."""
    words = model.vocab[ids]
    lens = np.fromiter((len(x) for x in words), dtype=np.int64, count=len(words))
    # paragraph boundaries: real lengths drawn until the book's words are used up
    plens = rng.choice(model.para_words, size=max(1, len(ids) // 20))
    ends = np.cumsum(plens)
    ends = ends[ends < len(ids)]
    sep = np.full(len(ids), " ", dtype=object)
    para_start = np.zeros(len(ids), dtype=np.int64)
    para_start[ends] = ends
    para_start = np.maximum.accumulate(para_start)
    cs = np.cumsum(lens + 1)
    rel = cs - np.concatenate(([0], cs))[para_start]
    line = rel // LINE_CHARS
    wrap = np.flatnonzero(line[1:] != line[:-1])  # break before the word that crosses the margin
    sep[wrap] = "\n"
    sep[ends - 1] = "\n\n"
    sep[-1] = ""
    out = np.empty(2 * len(ids), dtype=object)
    out[0::2], out[1::2] = words, sep
    return "".join(out.tolist())


def generate(
    mirror: Path, root: Path, n_books: int, *, seed: int = 0, mb_per_book: float = 0.3
) -> dict[str, Any]:
    """Write ``n_books`` distinct books and their catalog under ``root``; returns a summary."""
    t0 = time.perf_counter()
    model = fit(mirror)
    rng = np.random.default_rng(seed)
    gut = root / "gutenberg" / "cache" / "epub"
    (gut / "feeds").mkdir(parents=True, exist_ok=True)
    # Book lengths: the real books' lengths, rescaled so the mean is ``mb_per_book``.
    real = np.asarray([t.words for t in model.templates], dtype=np.float64)
    target_words = mb_per_book * 1e6 * model.words_per_byte
    lengths = np.maximum(2_000, rng.choice(real, size=n_books) * target_words / real.mean()).astype(
        np.int64
    )
    stream = _word_stream(model, rng)
    buf = np.empty(0, dtype=np.int32)
    rows, total = [], 0
    for i, n_words in enumerate(lengths):
        while len(buf) < n_words:
            buf = np.concatenate((buf, next(stream)))
        ids, buf = buf[:n_words], buf[n_words:]
        t = model.templates[int(rng.integers(len(model.templates)))]
        book_id = FIRST_ID + i
        text = (
            _renumber(t.header, t.id, book_id).rstrip("\n")
            + "\n\n\n"
            + _layout(model, ids, rng)
            + "\n\n\n"
            + _renumber(t.footer, t.id, book_id).lstrip("\n")
        )
        data = text.encode("utf-8")
        dest = gut / str(book_id) / f"pg{book_id}.txt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        total += len(data)
        rows.append(
            {
                **t.row,
                "Text#": str(book_id),
                "Title": f"Synthetic book {i + 1} (after {t.row['Title']})",
            }
        )
    with (gut / "feeds" / "pg_catalog.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CATALOG_HEADER, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return {
        "books": n_books,
        "mb": round(total / 1e6, 1),
        "vocabulary_words": len(model.vocab),
        "template_books": len(model.templates),
        "seconds": round(time.perf_counter() - t0, 1),
    }
