"""The map half of ``cleaned_books``: one chunk of books -> candidate texts + MinHash sketches.

A chunk is a contiguous range of the id-sorted task table (manifest rows joined with their
catalog metadata). :func:`clean_chunk` runs the per-book work (:mod:`.clean_worker`: read,
decode, strip, language check, hash, sketch) over a worker pool and writes three files under the
work folder: the kept texts (``<key>.candidates.parquet``, uncompressed, small row groups), what
the reduce needs per kept book (``<key>.sketches.npz``: ids, lengths, SHA-256, the 2 KB OPH
signature, where the text sits) and the chunk's rejects and counters (``<key>.json``). Nothing
here looks across chunks: exact and near-duplicates are decided by the reduce
(:func:`.clean.reduce_chunks`) over the sketches alone, so chunks can run in separate processes,
pods or machines (Dagster's executor spreads the ``clean_book_chunk`` steps) and the result does
not depend on how the books were cut.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.text import clean_worker
from pipeline.text.clean_io import DEFAULT_SOURCE, CandidateWriter
from pipeline.text.clean_worker import BookOutcome, BookTask, process_book
from pipeline.text.pool import main_module_hidden, process_pool, worker_environment

log = logging.getLogger(__name__)

OK_STATUS = "ok"
# Books queued per worker: a long book at the head of the queue (results are consumed in order)
# must not leave the other workers idle; the texts in flight are the memory this costs.
IN_FLIGHT_PER_WORKER = 16


@dataclass(frozen=True)
class ChunkFiles:
    """The three files a chunk leaves in the work folder."""

    candidates: Path
    sketches: Path
    summary: Path

    @classmethod
    def of(cls, work: Path, key: str) -> ChunkFiles:
        return cls(
            work / f"{key}.candidates.parquet", work / f"{key}.sketches.npz", work / f"{key}.json"
        )


def _outcomes(
    tasks: Iterable[BookTask],
    workers: int,
    languages: tuple[str, ...],
    min_chars: int,
    timing: dict[str, float] | None = None,
) -> Iterator[BookOutcome]:
    """Process tasks, yielding outcomes in task order with at most a few books in flight.

    The pool is started (every worker answering) before the first book is submitted: cleaning
    books in this process meanwhile looks free but is not on 2 cores, where it takes the CPU
    and the GIL that the pool's start-up needs and made that start-up ~5x slower. If the pool
    cannot start or breaks (a worker killed, a ``__main__`` that cannot be re-imported), the
    remaining books are cleaned in this process instead of failing the run.
    """

    def local(task: BookTask) -> BookOutcome:
        return process_book(task, languages, min_chars)

    tasks = iter(tasks)
    first = next(tasks, None)
    if first is None:
        return
    tasks = itertools.chain([first], tasks)
    if workers <= 1:
        yield from map(local, tasks)
        return
    with worker_environment(), process_pool(workers) as pool:
        t0 = time.perf_counter()
        try:
            with main_module_hidden():  # workers are spawned by these first submits
                started = [pool.submit(clean_worker.ready) for _ in range(workers)]
            for f in started:
                f.result()
            if timing is not None:
                timing["pool_start_seconds"] = round(time.perf_counter() - t0, 3)
        except Exception as exc:  # e.g. BrokenProcessPool: clean in this process instead
            log.warning("clean: worker pool did not start (%s); running in-process", exc)
            yield from map(local, tasks)
            return
        pending: deque[tuple[BookTask, Future[BookOutcome]]] = deque()
        broken = False
        for task in tasks:
            if broken:
                yield local(task)
                continue
            try:
                pending.append((task, pool.submit(process_book, task, languages, min_chars)))
                while len(pending) >= IN_FLIGHT_PER_WORKER * workers or (
                    pending and pending[0][1].done()
                ):
                    yield pending[0][1].result()
                    pending.popleft()
            except BrokenProcessPool as exc:
                log.warning("clean: worker pool broke (%s); continuing in-process", exc)
                broken = True
                while pending:
                    yield local(pending.popleft()[0])
        for task, future in pending:
            try:
                yield future.result()
            except BrokenProcessPool as exc:
                log.warning("clean: worker pool broke (%s); continuing in-process", exc)
                yield local(task)


def task_table(manifest: pl.DataFrame, catalog: pl.DataFrame) -> pl.DataFrame:
    """Manifest rows (unique ids) joined with catalog metadata by id, sorted by id: the order
    every later decision (exact duplicates: the lower id is kept) follows."""
    manifest = manifest.unique("id", keep="first", maintain_order=True)
    meta_cols = [c for c in ("title", "authors", "languages", "source") if c in catalog.columns]
    joined = manifest.join(
        catalog.select("id", *meta_cols).unique("id", keep="first"), on="id", how="left"
    ).sort("id")
    for col in ("title", "authors", "source", "error"):
        if col not in joined.columns:
            joined = joined.with_columns(pl.lit(None, dtype=pl.String).alias(col))
    if "languages" not in joined.columns:
        joined = joined.with_columns(pl.lit(None, dtype=pl.List(pl.String)).alias("languages"))
    return joined.with_columns(pl.col("source").fill_null(DEFAULT_SOURCE))


def chunk_ranges(n: int, chunk_books: int | None) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of at most ``chunk_books`` (all in one when None); at least one
    range, so an empty corpus still runs the reduce."""
    if chunk_books is not None and chunk_books < 1:
        raise ValueError(f"chunk_books must be >= 1, got {chunk_books}")
    size = max(n, 1) if chunk_books is None else chunk_books
    return [(a, min(a + size, n)) for a in range(0, max(n, 1), size)]


def _tasks(
    table: pl.DataFrame, rejects: list[dict[str, Any]]
) -> Iterator[tuple[BookTask, dict[str, Any]]]:
    """Task rows as worker tasks; not-ok rows go straight to rejects."""
    for row in table.iter_rows(named=True):
        if row.get("status") != OK_STATUS:
            error = row.get("error")
            detail = f"status {row.get('status')}" + (f": {error}" if error else "")
            rejects.append({"id": row["id"], "reason": "not_downloaded", "detail": detail})
            continue
        langs = row.get("languages") or ()
        if isinstance(langs, str):  # a raw catalog "en; fr" string instead of a list
            langs = [c.strip() for c in langs.split(";") if c.strip()]
        meta = {"title": row.get("title"), "authors": row.get("authors")}
        meta["source"] = row.get("source") or DEFAULT_SOURCE
        yield BookTask(int(row["id"]), str(row["path"]), tuple(langs)), meta


class _FirstPass:
    """Consumes outcomes in id order: counts them, streams kept texts to the candidates file and
    keeps, per kept book, only what the reduce needs."""

    def __init__(self, writer: CandidateWriter, rejects: list[dict[str, Any]]) -> None:
        self.writer = writer
        self.rejects = rejects
        self.ids: list[int] = []
        self.n_chars: list[int] = []
        self.n_bytes: list[int] = []
        self.sha256: list[str] = []
        self.n_shingles: list[int] = []
        self.signatures: list[np.ndarray] = []
        self.bytes_in = 0
        self.cpu_seconds = 0.0
        self.encodings: Counter[str] = Counter()
        self.styles: Counter[str] = Counter()
        self.languages: Counter[str] = Counter()

    def add(self, o: BookOutcome, meta: dict[str, Any]) -> None:
        self.bytes_in += o.bytes_in
        self.cpu_seconds += o.cpu_seconds
        for counter, key in ((self.encodings, o.encoding), (self.styles, o.style)):
            if key:
                counter[key] += 1
        if o.language:
            self.languages[o.language] += 1
        if o.reason is not None:
            self.rejects.append({"id": o.id, "reason": o.reason, "detail": o.detail})
            return
        assert o.text is not None and o.sha256 is not None and o.sketch is not None
        self.writer.add(o.id, meta, o)
        self.ids.append(o.id)
        self.n_chars.append(o.n_chars)
        self.n_bytes.append(len(o.text))
        self.sha256.append(o.sha256)
        self.n_shingles.append(o.sketch.n_shingles)
        self.signatures.append(o.sketch.signature)


def clean_chunk(
    table: pl.DataFrame,
    work: Path,
    key: str,
    *,
    languages: list[str],
    min_chars: int,
    workers: int = 2,
) -> ChunkFiles:
    """Clean the books of ``table`` (a slice of :func:`task_table`) into the chunk's files."""
    work.mkdir(parents=True, exist_ok=True)
    files = ChunkFiles.of(work, key)
    rejects: list[dict[str, Any]] = []
    meta: dict[int, dict[str, Any]] = {}
    timing: dict[str, float] = {}

    def tasks() -> Iterator[BookTask]:
        for task, m in _tasks(table, rejects):
            meta[task.id] = m  # popped when the outcome arrives: only books in flight are held
            yield task

    first = _FirstPass(CandidateWriter(files.candidates), rejects)
    try:
        for o in _outcomes(tasks(), max(1, workers), tuple(languages), min_chars, timing):
            first.add(o, meta.pop(o.id))
    finally:
        first.writer.close()
    location = [first.writer.location[i] for i in first.ids]
    np.savez(
        files.sketches,
        ids=np.asarray(first.ids, dtype=np.int64),
        n_chars=np.asarray(first.n_chars, dtype=np.int64),
        n_bytes=np.asarray(first.n_bytes, dtype=np.int64),
        n_shingles=np.asarray(first.n_shingles, dtype=np.int64),
        sha256=np.asarray(first.sha256, dtype="U64"),
        signatures=np.stack(first.signatures) if first.signatures else np.empty((0, 0), np.uint64),
        location=np.asarray(location, dtype=np.int64).reshape(-1, 2),
    )
    summary = {
        "books": table.height,
        "rejects": rejects,
        "bytes_in": first.bytes_in,
        "cpu_seconds": first.cpu_seconds,
        "pool_start_seconds": timing.get("pool_start_seconds", 0.0),
        "encodings": dict(first.encodings),
        "styles": dict(first.styles),
        "languages": dict(first.languages),
    }
    files.summary.write_text(json.dumps(summary))
    return files
