"""The ``cleaned_books`` stage: raw PG files -> ``books.parquet`` + ``rejects.parquet``.

Map, then reduce, so that the stage fans out over chunks of books (the asset runs one Dagster
step per chunk: processes under the multiprocess executor, pods or machines under Kubernetes or
Celery) and still decides duplicates globally:

* **Map** (:func:`.clean_chunks.clean_chunk`, per chunk of the id-sorted manifest): read,
  decode (:mod:`.encoding`), strip boilerplate (:mod:`.boilerplate`), reject if too short or not
  in a wanted language (:mod:`.language`), hash and sketch the body (:mod:`.dedup`), in a pool of
  ``workers`` processes with only a few books in flight. Kept texts stream into the chunk's
  uncompressed *candidates* file; per kept book only ids, lengths, the SHA-256 and a 2 KB
  MinHash signature are kept, so a chunk's memory is bounded whatever its size.
* **Reduce** (:func:`reduce_chunks`, over every chunk's sketches, in id order): exact duplicates
  (same SHA-256 as a lower id), then :func:`.dedup.find_near_duplicates` on the signatures,
  verifying candidate pairs exactly by re-reading both texts from the candidate files, then one
  streaming pass copies the candidates minus the dropped ids into ``books.parquet`` (zstd, row
  groups of exact book counts, so the file does not depend on the chunking). The reduce holds
  ~2 KB per book (150 MB at 75,000 books), never a text beyond the pair being verified.

Both outputs are written to temp files and moved into place with ``os.replace``, so a reader
never sees half a file. :func:`clean_books` runs map and reduce in this process (the tests, the
benchmarks); the asset runs the same two functions as separate steps.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.text.clean_chunks import ChunkFiles, chunk_ranges, clean_chunk, task_table
from pipeline.text.clean_io import BOOKS_SCHEMA, DEFAULT_SOURCE, ExactVerifier, copy_without
from pipeline.text.dedup import Sketch, find_near_duplicates

__all__ = ["BOOKS_SCHEMA", "REJECTS_SCHEMA", "CleanStats", "clean_books", "reduce_chunks"]

REJECTS_SCHEMA = {"id": pl.Int64, "reason": pl.String, "detail": pl.String}
_SKETCH_KEYS = ("ids", "n_chars", "n_bytes", "sha256", "n_shingles", "signatures", "location")


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
    near_duplicate_candidates: int = 0  # pairs sharing >= 2 MinHash bins
    near_duplicate_pairs_verified: int = 0
    workers: int = 1
    seconds: float = 0.0
    book_cpu_seconds: float = 0.0  # CPU time of the per-book work, summed over all workers
    pool_start_seconds: float = 0.0  # until every worker answered (a fixed cost per chunk)

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
            f"encodings {self.encodings}, near-duplicate candidates "
            f"{self.near_duplicate_candidates} (verified {self.near_duplicate_pairs_verified})"
        )


def _with_source(rejects: pl.DataFrame, catalog: pl.DataFrame) -> pl.DataFrame:
    """``rejects`` plus a ``source`` column (from the catalog, by id), so a dropped text source is
    told apart from a dropped book in the one rejects table."""
    if "source" in catalog.columns:
        sources = catalog.select("id", "source").unique("id", keep="first")
        rejects = rejects.join(sources, on="id", how="left")
    else:
        rejects = rejects.with_columns(pl.lit(None, dtype=pl.String).alias("source"))
    return rejects.with_columns(pl.col("source").fill_null(DEFAULT_SOURCE))


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _load_sketches(chunks: Sequence[ChunkFiles], stats: CleanStats, rejects: list[Any]) -> dict:
    """Every chunk's sketches concatenated (id order) and its counters added to ``stats``."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _SKETCH_KEYS}
    counters: dict[str, Counter[str]] = {k: Counter() for k in ("encodings", "styles", "languages")}
    for f, chunk in enumerate(chunks):
        summary = json.loads(chunk.summary.read_text())
        rejects.extend(summary["rejects"])
        stats.bytes_in += summary["bytes_in"]
        stats.book_cpu_seconds += summary["cpu_seconds"]
        stats.pool_start_seconds += summary["pool_start_seconds"]
        for k, counter in counters.items():
            counter.update(summary[k])
        with np.load(chunk.sketches) as z:
            if not len(z["ids"]):
                continue
            for k in _SKETCH_KEYS:
                if k == "location":  # (row group, row) -> (chunk, row group, row)
                    parts[k].append(np.column_stack((np.full(len(z[k]), f), z[k])))
                else:
                    parts[k].append(z[k])
    stats.encodings, stats.styles, stats.languages = (
        dict(sorted(counters[k].items())) for k in ("encodings", "styles", "languages")
    )
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in parts.items()}


def reduce_chunks(
    chunks: Sequence[ChunkFiles],
    out_dir: Path,
    tasks: pl.DataFrame,
    *,
    near_duplicate_threshold: float,
    workers: int = 1,
) -> CleanStats:
    """Decide duplicates over all ``chunks`` (in id order) and write the stage's two outputs.

    ``tasks``: the :func:`.clean_chunks.task_table` the chunks were cut from (``id``,
    ``source``). Only sketches are read here, plus the two texts of a pair being verified and
    the final streaming copy.
    """
    out_dir = Path(out_dir)
    books_path, rejects_path = out_dir / "books.parquet", out_dir / "rejects.parquet"
    stats = CleanStats(books_in=tasks.height, workers=max(1, workers))
    rejects: list[dict[str, Any]] = []
    cat = _load_sketches(chunks, stats, rejects)
    ids = cat["ids"].astype(np.int64).tolist()
    # Exact duplicates: the same cleaned text as a lower id (ids ascend across the chunks).
    seen: dict[str, int] = {}
    keep: list[int] = []
    dropped: set[int] = set()
    for k, (book_id, sha) in enumerate(zip(ids, cat["sha256"].tolist(), strict=True)):
        if sha in seen:
            detail = f"same text as {seen[sha]}"
            rejects.append({"id": book_id, "reason": "exact_duplicate", "detail": detail})
            dropped.add(book_id)
        else:
            seen[sha] = book_id
            keep.append(k)
    location = {ids[k]: tuple(int(x) for x in cat["location"][k]) for k in keep}
    verifier = ExactVerifier([c.candidates for c in chunks], location)
    counts: dict[str, int] = {}
    try:
        dups = find_near_duplicates(
            [ids[k] for k in keep],
            [int(cat["n_chars"][k]) for k in keep],
            [Sketch(int(cat["n_shingles"][k]), cat["signatures"][k]) for k in keep],
            near_duplicate_threshold,
            verify=verifier,
            counts=counts,
        )
    finally:
        verifier.close()
    stats.near_duplicate_candidates = counts.get("candidate_pairs", 0)
    dropped |= {d.dropped for d in dups}
    rejects.extend(
        {"id": d.dropped, "reason": "near_duplicate", "detail": d.detail()} for d in dups
    )
    temps = (_tmp(books_path), _tmp(rejects_path))
    try:
        copy_without([c.candidates for c in chunks], temps[0], dropped)
        os.replace(temps[0], books_path)
        table = pl.DataFrame(rejects, schema=REJECTS_SCHEMA)
        _with_source(table, tasks).sort("id").write_parquet(temps[1])
        os.replace(temps[1], rejects_path)
    finally:
        for p in temps:
            p.unlink(missing_ok=True)
    n_bytes = cat["n_bytes"].tolist()
    stats.books_kept = len(ids) - len(dropped)
    stats.bytes_out = int(sum(n for i, n in zip(ids, n_bytes, strict=True) if i not in dropped))
    stats.rejected = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    stats.near_duplicate_pairs_verified = verifier.calls
    stats.book_cpu_seconds = round(stats.book_cpu_seconds, 3)
    return stats


def clean_books(
    manifest: pl.DataFrame,
    catalog: pl.DataFrame,
    out_dir: Path,
    *,
    languages: list[str],
    min_chars: int,
    near_duplicate_threshold: float,
    workers: int = 2,
    chunk_books: int | None = None,
) -> CleanStats:
    """Clean every book of ``manifest`` into ``out_dir/books.parquet`` and ``rejects.parquet``.

    ``manifest``: ``id, path, status[, error]`` (status ``ok`` = file on disk); ``catalog``:
    ``id, title, authors, languages`` (list of codes). Each input id ends up in exactly one of
    the two outputs. Map over chunks of ``chunk_books`` (all in one by default), then reduce, in
    this process; the outputs do not depend on ``chunk_books``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f".chunks.{os.getpid()}"
    tasks = task_table(manifest, catalog)
    try:
        chunks = [
            clean_chunk(
                tasks.slice(a, b - a),
                work,
                f"chunk_{k:05d}",
                languages=languages,
                min_chars=min_chars,
                workers=workers,
            )
            for k, (a, b) in enumerate(chunk_ranges(tasks.height, chunk_books))
        ]
        stats = reduce_chunks(
            chunks,
            out_dir,
            tasks,
            near_duplicate_threshold=near_duplicate_threshold,
            workers=workers,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats.seconds = time.perf_counter() - t0
    return stats
