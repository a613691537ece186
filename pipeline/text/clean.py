"""The ``cleaned_books`` stage: raw PG files -> ``books.parquet`` + ``rejects.parquet``.

Per book, in a pool of ``workers`` processes: read, decode (:mod:`.encoding`), strip
boilerplate (:mod:`.boilerplate`), reject if too short or not in a wanted language
(:mod:`.language`), then hash and sketch the body (:mod:`.dedup`). The parent consumes results in
manifest order with only a few books in flight, drops exact duplicates on the spot (same SHA-256
as an earlier, lower id) and streams every surviving text into an uncompressed *candidates*
parquet file in small row groups. Only ids, lengths, hashes and 2 KB MinHash signatures per book
stay in memory, so memory is bounded whatever the corpus size (~0.5 GB peak over all processes
on the mirror, and no more on a 4x larger corpus).

Near-duplicates can only be decided once every book has been sketched, so the decision is
deferred: after the first pass :func:`.dedup.find_near_duplicates` runs on the signatures,
verifying candidate pairs exactly by re-reading both texts from the candidates file, and a
second, streaming pass copies the candidates minus the dropped ids into ``books.parquet``,
compressing (zstd) and coalescing row groups on the way. Both outputs are written to temp files
and moved into place with ``os.replace``, so a reader never sees half a file.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.text import clean_worker
from pipeline.text.clean_worker import BookOutcome, BookTask, process_book
from pipeline.text.dedup import (
    Similarity,
    Sketch,
    exact_similarity,
    find_near_duplicates,
    shingle_hashes,
)
from pipeline.text.pool import main_module_hidden, process_pool, worker_environment

__all__ = ["BOOKS_SCHEMA", "REJECTS_SCHEMA", "CleanStats", "clean_books"]

log = logging.getLogger(__name__)

OK_STATUS = "ok"
BOOKS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("title", pa.string()),
        ("authors", pa.string()),
        ("language", pa.string()),
        ("text", pa.string()),
        ("n_chars", pa.int64()),
        ("sha256", pa.string()),
        # Where the text came from: "gutenberg" or a profile ``text_sources`` id; the catalog's
        # ``source`` column, else "gutenberg".
        ("source", pa.string()),
    ]
)
REJECTS_SCHEMA = {"id": pl.Int64, "reason": pl.String, "detail": pl.String}
DEFAULT_SOURCE = "gutenberg"
# Candidates (temp file): uncompressed, a few books per row group, so re-reading one book to
# verify a near-duplicate pair is cheap. books.parquet: zstd, row groups of up to 64 MB.
CANDIDATE_GROUP_BOOKS = 4
CANDIDATE_GROUP_BYTES = 8 << 20
ROW_GROUP_BOOKS = 256
ROW_GROUP_BYTES = 64 << 20
COMPRESSION = "zstd"
# Books queued per worker: a long book at the head of the queue (results are consumed in order)
# must not leave the other workers idle; the texts in flight are the memory this costs.
IN_FLIGHT_PER_WORKER = 16


@dataclass
class CleanStats:
    """Counts and throughput of one cleaning run (logged and shown as asset metadata)."""

    books_in: int = 0
    books_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    encodings: dict[str, int] = field(default_factory=dict)
    styles: dict[str, int] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)
    near_duplicate_pairs_verified: int = 0
    workers: int = 1
    seconds: float = 0.0
    book_cpu_seconds: float = 0.0  # CPU time of the per-book work, summed over all workers
    pool_start_seconds: float = 0.0  # until every worker answered (a fixed cost per run)

    @property
    def books_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def mb_per_s(self) -> float:
        """Raw input megabytes (1e6 bytes) per wall-clock second."""
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(books_rejected=self.books_rejected, mb_per_s=round(self.mb_per_s, 2))
        return d

    def __str__(self) -> str:
        return (
            f"{self.books_kept}/{self.books_in} books kept, rejected {self.rejected}, "
            f"{self.bytes_in / 1e6:.1f} MB in -> {self.bytes_out / 1e6:.1f} MB out "
            f"in {self.seconds:.2f}s ({self.mb_per_s:.1f} MB/s, {self.workers} workers), "
            f"encodings {self.encodings}"
        )


def _outcomes(
    tasks: Iterable[BookTask],
    workers: int,
    languages: tuple[str, ...],
    min_chars: int,
    stats: CleanStats | None = None,
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
            if stats is not None:
                stats.pool_start_seconds = round(time.perf_counter() - t0, 3)
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


# ----------------------------------------------------------------------------- parquet I/O
# Arrow arrays are assembled from buffers: ``pa.array`` on Python objects converts ``str`` at
# ~60 MB/s and imports pandas on first use (0.3 s), both larger than the rest of the write.
def _int64_array(values: Sequence[int]) -> pa.Array:
    return pa.Array.from_buffers(
        pa.int64(), len(values), [None, pa.py_buffer(np.asarray(values, dtype=np.int64))]
    )


def _bool_array(values: Sequence[bool]) -> pa.Array:
    bits = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])


def _string_array(values: Sequence[str | bytes | None]) -> pa.Array:
    """Arrow ``string`` array from str / UTF-8 bytes / None (null) values."""
    encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    valid = np.array([v is not None for v in encoded], dtype=bool)
    lengths = np.array([len(v) if v is not None else 0 for v in encoded], dtype=np.int64)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("row group too large for a 32-bit offset string column")
    data = b"".join(v for v in encoded if v is not None)
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    buffers = [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.string(), len(encoded), buffers, null_count=int((~valid).sum()))


def _parquet_writer(path: Path, compression: str = COMPRESSION) -> pq.ParquetWriter:
    """No dictionary and no min/max statistics on the text columns: dictionary-encoding multi-MB
    unique strings only to abandon it, and min/max over whole books, cost 2-3x the write time
    and serve no reader."""
    return pq.ParquetWriter(
        path,
        BOOKS_SCHEMA,
        compression=compression,
        use_dictionary=["language"],
        write_statistics=["id", "n_chars", "language"],
    )


class _CandidateWriter:
    """Streams kept texts to a parquet file in small row groups; remembers where each id is.

    Texts arrive as UTF-8 bytes and go into the Arrow string column without a conversion.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = _parquet_writer(path, compression="none")
        self._rows: list[tuple[Any, ...]] = []
        self._bytes = 0
        self.groups = 0
        self.location: dict[int, tuple[int, int]] = {}  # id -> (row group, row)

    def add(self, book_id: int, meta: dict[str, Any], o: BookOutcome) -> None:
        assert o.text is not None
        self.location[book_id] = (self.groups, len(self._rows))
        row = (book_id, meta.get("title"), meta.get("authors"), o.language, o.text)
        self._rows.append((*row, o.n_chars, o.sha256, meta.get("source") or DEFAULT_SOURCE))
        self._bytes += len(o.text)
        if len(self._rows) >= CANDIDATE_GROUP_BOOKS or self._bytes >= CANDIDATE_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        columns = list(zip(*self._rows, strict=True))
        arrays = [
            _int64_array(col) if field.type == pa.int64() else _string_array(col)
            for field, col in zip(BOOKS_SCHEMA, columns, strict=True)
        ]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=BOOKS_SCHEMA))
        self.groups += 1
        self._rows, self._bytes = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.close()


class _ExactVerifier:
    """``verify(id_a, id_b)`` for dedup: exact shingle sets recomputed from the candidates file.

    Holds a handful of shingle arrays (LRU), never the corpus.
    """

    def __init__(self, path: Path, location: dict[int, tuple[int, int]], cache: int = 6) -> None:
        self._file = pq.ParquetFile(path)
        self._location = location
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._size = cache
        self.calls = 0

    def _shingles(self, book_id: int) -> np.ndarray:
        if book_id in self._cache:
            self._cache.move_to_end(book_id)
            return self._cache[book_id]
        group, row = self._location[book_id]
        text = self._file.read_row_group(group, columns=["text"]).column(0)[row].as_py()
        shingles = shingle_hashes(text)
        self._cache[book_id] = shingles
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return shingles

    def __call__(self, a: int, b: int) -> Similarity:
        self.calls += 1
        return exact_similarity(self._shingles(a), self._shingles(b))

    def close(self) -> None:
        self._file.close()


def _copy_without(src: Path, dst: Path, drop: set[int]) -> None:
    """Stream ``src`` into ``dst`` without the ``drop`` ids, compressing and coalescing the small
    candidate row groups into large ones; at most one output row group is held in memory."""
    reader = pq.ParquetFile(src)
    pending: list[pa.Table] = []
    rows = size = 0
    with _parquet_writer(dst) as writer:
        for g in range(reader.num_row_groups):
            table = reader.read_row_group(g)
            if drop:
                keep = [i not in drop for i in table.column("id").to_pylist()]
                table = table.filter(_bool_array(keep))
            pending.append(table)
            rows, size = rows + table.num_rows, size + table.nbytes
            if rows >= ROW_GROUP_BOOKS or size >= ROW_GROUP_BYTES:
                writer.write_table(pa.concat_tables(pending), row_group_size=rows)
                pending, rows, size = [], 0, 0
        if rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=rows)
    reader.close()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


# ------------------------------------------------------------------------------------ stage
def _tasks(
    manifest: pl.DataFrame, catalog: pl.DataFrame, rejects: list[dict[str, Any]]
) -> Iterator[tuple[BookTask, dict[str, Any]]]:
    """Manifest rows joined with catalog metadata, by id; not-ok rows go straight to rejects."""
    meta_cols = [c for c in ("title", "authors", "languages", "source") if c in catalog.columns]
    joined = manifest.join(
        catalog.select("id", *meta_cols).unique("id", keep="first"), on="id", how="left"
    ).sort("id")
    has_error = "error" in joined.columns
    for row in joined.iter_rows(named=True):
        if row.get("status") != OK_STATUS:
            error = row.get("error") if has_error else None
            detail = f"status {row.get('status')}" + (f": {error}" if error else "")
            rejects.append({"id": row["id"], "reason": "not_downloaded", "detail": detail})
            continue
        langs = row.get("languages") or ()
        if isinstance(langs, str):  # a raw catalog "en; fr" string instead of a list
            langs = [c.strip() for c in langs.split(";") if c.strip()]
        langs = tuple(langs)
        meta = {"title": row.get("title"), "authors": row.get("authors")}
        meta["source"] = row.get("source") or DEFAULT_SOURCE
        yield BookTask(int(row["id"]), str(row["path"]), langs), meta


def _with_source(rejects: pl.DataFrame, catalog: pl.DataFrame) -> pl.DataFrame:
    """``rejects`` plus a ``source`` column (from the catalog, by id), so a dropped text source is
    told apart from a dropped book in the one rejects table."""
    if "source" in catalog.columns:
        sources = catalog.select("id", "source").unique("id", keep="first")
        rejects = rejects.join(sources, on="id", how="left")
    else:
        rejects = rejects.with_columns(pl.lit(None, dtype=pl.String).alias("source"))
    return rejects.with_columns(pl.col("source").fill_null(DEFAULT_SOURCE))


class _FirstPass:
    """Consumes outcomes in manifest order: counts them, drops exact duplicates, streams kept
    texts to the candidates file and keeps, per kept book, only what dedup needs."""

    def __init__(self, writer: _CandidateWriter, rejects: list[dict[str, Any]]) -> None:
        self.writer = writer
        self.rejects = rejects
        self.ids: list[int] = []
        self.n_chars: list[int] = []
        self.n_bytes: list[int] = []
        self.sketches: list[Sketch] = []
        self.bytes_in = 0
        self.cpu_seconds = 0.0
        self.encodings: Counter[str] = Counter()
        self.styles: Counter[str] = Counter()
        self.languages: Counter[str] = Counter()
        self._seen_sha: dict[str, int] = {}

    def add(self, o: BookOutcome, meta: dict[str, Any]) -> None:
        self.bytes_in += o.bytes_in
        self.cpu_seconds += o.cpu_seconds
        for counter, key in ((self.encodings, o.encoding), (self.styles, o.style)):
            if key:
                counter[key] += 1
        if o.language:
            self.languages[o.language] += 1
        if o.reason is None and o.sha256 in self._seen_sha:
            o.reason, o.detail = "exact_duplicate", f"same text as {self._seen_sha[o.sha256]}"
        if o.reason is not None:
            self.rejects.append({"id": o.id, "reason": o.reason, "detail": o.detail})
            return
        assert o.text is not None and o.sha256 is not None and o.sketch is not None
        self._seen_sha[o.sha256] = o.id
        self.writer.add(o.id, meta, o)
        self.ids.append(o.id)
        self.n_chars.append(o.n_chars)
        self.n_bytes.append(len(o.text))
        self.sketches.append(o.sketch)


def clean_books(
    manifest: pl.DataFrame,
    catalog: pl.DataFrame,
    out_dir: Path,
    *,
    languages: list[str],
    min_chars: int,
    near_duplicate_threshold: float,
    workers: int = 2,
) -> CleanStats:
    """Clean every book of ``manifest`` into ``out_dir/books.parquet`` and ``rejects.parquet``.

    ``manifest``: ``id, path, status[, error]`` (status ``ok`` = file on disk); ``catalog``:
    ``id, title, authors, languages`` (list of codes). Each input id ends up in exactly one of
    the two outputs. See the module docstring for the passes and the memory bound.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    books_path, rejects_path = out_dir / "books.parquet", out_dir / "rejects.parquet"
    candidates = out_dir / f".candidates.{os.getpid()}.parquet"
    temps = (candidates, _tmp(books_path), _tmp(rejects_path))
    manifest = manifest.unique("id", keep="first", maintain_order=True)
    stats = CleanStats(books_in=manifest.height, workers=max(1, workers))
    rejects: list[dict[str, Any]] = []
    meta: dict[int, dict[str, Any]] = {}

    def tasks() -> Iterator[BookTask]:
        for task, m in _tasks(manifest, catalog, rejects):
            meta[task.id] = m  # popped when the outcome arrives: only books in flight are held
            yield task

    try:
        first = _FirstPass(_CandidateWriter(candidates), rejects)
        try:
            for o in _outcomes(tasks(), stats.workers, tuple(languages), min_chars, stats):
                first.add(o, meta.pop(o.id))
        finally:
            first.writer.close()

        verifier = _ExactVerifier(candidates, first.writer.location)
        try:
            dups = find_near_duplicates(
                first.ids, first.n_chars, first.sketches, near_duplicate_threshold, verify=verifier
            )
        finally:
            verifier.close()
        dropped = {d.dropped for d in dups}
        rejects.extend(
            {"id": d.dropped, "reason": "near_duplicate", "detail": d.detail()} for d in dups
        )

        _copy_without(candidates, temps[1], dropped)
        os.replace(temps[1], books_path)
        _with_source(pl.DataFrame(rejects, schema=REJECTS_SCHEMA), catalog).sort(
            "id"
        ).write_parquet(temps[2])
        os.replace(temps[2], rejects_path)
    finally:
        for p in temps:
            p.unlink(missing_ok=True)

    stats.books_kept = len(first.ids) - len(dropped)
    stats.bytes_in = first.bytes_in
    stats.bytes_out = sum(
        n for i, n in zip(first.ids, first.n_bytes, strict=True) if i not in dropped
    )
    stats.rejected = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    stats.encodings = dict(sorted(first.encodings.items()))
    stats.styles = dict(sorted(first.styles.items()))
    stats.languages = dict(sorted(first.languages.items()))
    stats.near_duplicate_pairs_verified = verifier.calls
    stats.book_cpu_seconds = round(first.cpu_seconds, 3)
    stats.seconds = time.perf_counter() - t0
    return stats
