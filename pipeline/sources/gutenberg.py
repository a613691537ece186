"""Project Gutenberg: catalog parsing, book selection and resumable bulk download.

The crawl is designed for the full catalog (about 75,000 books): downloads stream to disk through
a bounded thread pool, and the only per-book state is one manifest row. The manifest is what makes
reruns cheap and safe: a rerun re-requests only books that are missing, failed, or whose file on
disk no longer matches the recorded SHA-256, so a crash or a damaged disk costs only what was lost.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.sources.http import (
    DEFAULT_MAX_BYTES,
    DEFAULT_USER_AGENT,
    DownloadFailed,
    DownloadResult,
    NotFound,
    PoliteClient,
    atomic_write_bytes,
    remove_stale_temp_files,
    sha256_file,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://www.gutenberg.org"
# pg_catalog.csv header -> our snake_case column names.
CATALOG_COLUMNS = {
    "Text#": "id",
    "Type": "type",
    "Issued": "issued",
    "Title": "title",
    "Language": "languages",
    "Authors": "authors",
    "Subjects": "subjects",
    "LoCC": "locc",
    "Bookshelves": "bookshelves",
}
MANIFEST_SCHEMA: dict[str, Any] = {
    "id": pl.Int64,
    "url": pl.String,
    "path": pl.String,
    "bytes": pl.Int64,
    "sha256": pl.String,
    "status": pl.String,  # "ok" | "missing" (404) | "failed" | "unverified" (maybe truncated)
    "attempts": pl.Int64,  # requests made in the run that wrote the row (0 = reused)
    "error": pl.String,
}


# The real pg_catalog.csv is ~15 MB; a gzip "catalog" may expand no further than this.
MAX_CATALOG_BYTES = 256 << 20
# A book whose end nothing vouched for (no Content-Length, not chunked) must still show PG's end
# marker ("*** END OF THE PROJECT GUTENBERG EBOOK", older "End of the Project Gutenberg Etext").
_PG_END = re.compile(rb"END OF (?:THE |THIS )?PROJECT GUTENBERG", re.IGNORECASE)


class CatalogFormatError(ValueError):
    """The catalog file is not in pg_catalog.csv format."""


def _gunzip_bounded(data: bytes, limit: int, name: str) -> bytes:
    """Decompress gzip ``data`` into at most ``limit`` bytes; a bomb raises instead of filling RAM."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise CatalogFormatError(f"{name}: corrupt gzip data ({exc})") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise CatalogFormatError(f"{name}: decompresses to more than {limit} bytes; refused")
    return out


class DownloadFailuresError(RuntimeError):
    """Too many books failed to download; lists their ids."""


def catalog_url(base_url: str = DEFAULT_BASE_URL) -> str:
    return f"{base_url.rstrip('/')}/cache/epub/feeds/pg_catalog.csv"


def book_url(base_url: str, book_id: int) -> str:
    return f"{base_url.rstrip('/')}/cache/epub/{book_id}/pg{book_id}.txt"


# --------------------------------------------------------------------------------------- catalog
def parse_catalog(
    source: Path | str | bytes, *, max_bytes: int = MAX_CATALOG_BYTES
) -> pl.DataFrame:
    """Parse ``pg_catalog.csv`` (path or bytes, optionally gzip-compressed) into typed columns.

    Every column is read as text first (the catalog mixes numbers and free text, and titles may
    contain newlines inside quoted fields), then ``id`` becomes Int64 and ``languages`` a list.
    A catalog (or its decompressed form) over ``max_bytes`` is refused.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and Path(source).stat().st_size > max_bytes:
        raise CatalogFormatError(f"{name}: larger than {max_bytes} bytes; refused")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = _gunzip_bounded(data, max_bytes, name)
    data = data.removeprefix(b"\xef\xbb\xbf")
    header = next(csv.reader(io.StringIO(data.split(b"\n", 1)[0].decode("utf-8", "replace"))), [])
    missing = [c for c in CATALOG_COLUMNS if c not in header]
    if missing:
        raise CatalogFormatError(
            f"{name}: not a Project Gutenberg catalog; missing columns {missing} (header: {header})"
        )
    try:
        raw = pl.read_csv(io.BytesIO(data), infer_schema=False, columns=list(CATALOG_COLUMNS))
    except pl.exceptions.PolarsError as exc:
        raise CatalogFormatError(f"{name}: cannot parse catalog CSV: {exc}") from exc
    text_cols = [c for c in CATALOG_COLUMNS if c != "Text#"]
    df = raw.with_columns(pl.col(text_cols).fill_null("")).select(
        pl.col("Text#").str.strip_chars().cast(pl.Int64, strict=False).alias("id"),
        *(pl.col(c).alias(CATALOG_COLUMNS[c]) for c in text_cols if c != "Language"),
        pl.col("Language")
        .str.split(";")
        .list.eval(pl.element().str.strip_chars().filter(pl.element().str.strip_chars() != ""))
        .alias("languages"),
    )
    bad = raw.filter(df["id"].is_null())["Text#"].head(5).to_list()
    if bad:
        raise CatalogFormatError(f"{name}: non-numeric Text# values, e.g. {bad}")
    return df.select(CATALOG_COLUMNS.values())


@dataclass
class CatalogRules:
    """Which catalog rows become training books. Empty lists mean "no restriction".

    ``bookshelves``/``subjects`` match case-insensitive substrings, any of them; ``languages``
    matches when any of a book's languages is listed; ``max_books`` keeps the lowest N ids.
    """

    types: list[str] = field(default_factory=lambda: ["Text"])
    languages: list[str] = field(default_factory=lambda: ["en"])
    ids: list[int] = field(default_factory=list)
    exclude_ids: list[int] = field(default_factory=list)
    bookshelves: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    max_books: int | None = None

    def __post_init__(self) -> None:
        if self.max_books is not None and self.max_books < 0:
            raise ValueError(f"max_books must be >= 0 or None, got {self.max_books}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> CatalogRules:
        """Build from a profile's ``catalog:`` section, rejecting unknown keys (typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown catalog rule(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(mapping))


def _any_substring(column: str, needles: list[str]) -> pl.Expr:
    lowered = pl.col(column).str.to_lowercase()
    return pl.any_horizontal([lowered.str.contains(n.lower(), literal=True) for n in needles])


def select_books(df: pl.DataFrame, rules: CatalogRules) -> pl.DataFrame:
    """Filter the parsed catalog by ``rules``; sorted by id, so the result is deterministic."""
    conditions: list[pl.Expr] = []
    if rules.types:
        conditions.append(pl.col("type").is_in(rules.types))
    if rules.languages:
        wanted = list(rules.languages)
        conditions.append(pl.col("languages").list.eval(pl.element().is_in(wanted)).list.any())
    if rules.ids:
        conditions.append(pl.col("id").is_in(rules.ids))
    if rules.exclude_ids:
        conditions.append(~pl.col("id").is_in(rules.exclude_ids))
    if rules.bookshelves:
        conditions.append(_any_substring("bookshelves", rules.bookshelves))
    if rules.subjects:
        conditions.append(_any_substring("subjects", rules.subjects))
    selected = df.filter(*conditions) if conditions else df
    selected = selected.sort("id", maintain_order=True)
    if rules.ids:
        absent = sorted(set(rules.ids) - set(selected["id"].to_list()))
        if absent:
            log.warning("explicitly listed ids not selected (absent or filtered out): %s", absent)
    return selected.head(rules.max_books) if rules.max_books is not None else selected


# -------------------------------------------------------------------------------------- download
def download_catalog(base_url: str, dest: Path | str, client: PoliteClient) -> DownloadResult:
    """Fetch ``pg_catalog.csv`` atomically to ``dest`` (capped at :data:`MAX_CATALOG_BYTES`)."""
    return client.download(catalog_url(base_url), Path(dest), max_bytes=MAX_CATALOG_BYTES)


def _row(book_id: int, url: str, path: Path, status: str, **values: Any) -> dict[str, Any]:
    return {
        "id": book_id,
        "url": url,
        "path": str(path),
        "bytes": None,
        "sha256": None,
        "status": status,
        "attempts": 0,
        "error": None,
        **values,
    }


def _is_intact(path: Path, row: Mapping[str, Any]) -> bool:
    """Cheap size check first; hash only files whose size still matches."""
    try:
        if path.stat().st_size != row["bytes"]:
            return False
    except OSError:
        return False
    return sha256_file(path) == row["sha256"]


def has_end_marker(path: Path) -> bool:
    """Whether a downloaded book shows Project Gutenberg's end-of-book marker."""
    return _PG_END.search(path.read_bytes()) is not None


def _fetch_book(
    client: PoliteClient,
    book_id: int,
    base_url: str,
    books_dir: Path,
    previous: Mapping[str, Any] | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, Any]:
    """Reuse an intact previous download, else fetch; never raises for a per-book failure."""
    dest = books_dir / f"{book_id}.txt"
    if previous is not None and _is_intact(dest, previous):
        return _row(
            book_id, previous["url"], dest, "ok", bytes=previous["bytes"], sha256=previous["sha256"]
        )
    url = book_url(base_url, book_id)
    try:
        result = client.download(url, dest, max_bytes=max_bytes)
    except NotFound as exc:
        return _row(book_id, url, dest, "missing", attempts=exc.attempts, error=str(exc))
    except DownloadFailed as exc:
        return _row(book_id, url, dest, "failed", attempts=exc.attempts, error=str(exc))
    except OSError as exc:  # local disk trouble: record it, let check_failures decide
        return _row(book_id, url, dest, "failed", attempts=1, error=f"GET {url}: {exc!r}")
    status, error = "ok", None
    if not result.verified and not has_end_marker(dest):
        # Nothing vouches for the end (no Content-Length, not chunked) and the book's own end
        # marker is absent: maybe cut short. Not "ok", so cleaning rejects it and a rerun refetches.
        status = "unverified"
        error = f"GET {url}: no Content-Length and no Project Gutenberg end marker"
    return _row(
        book_id,
        url,
        dest,
        status,
        bytes=result.bytes,
        sha256=result.sha256,
        attempts=result.attempts,
        error=error,
    )


def _previous_ok_rows(previous: pl.DataFrame | Path | str | None) -> dict[int, dict[str, Any]]:
    if previous is None:
        return {}
    if not isinstance(previous, pl.DataFrame):
        if not Path(previous).exists():
            return {}
        previous = read_manifest(previous)
    missing = {"id", "url", "bytes", "sha256", "status"} - set(previous.columns)
    if missing:
        raise ValueError(f"previous manifest lacks columns {sorted(missing)}")
    ok = previous.filter(pl.col("status") == "ok").select("id", "url", "bytes", "sha256")
    return {row["id"]: row for row in ok.iter_rows(named=True)}


def download_books(
    ids: Iterable[int],
    base_url: str,
    books_dir: Path | str,
    *,
    concurrency: int = 4,
    requests_per_second: float = 2.0,
    max_retries: int = 4,
    timeout_s: float = 30.0,
    previous_manifest: pl.DataFrame | Path | str | None = None,
    backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    user_agent: str = DEFAULT_USER_AGENT,
    progress: Callable[[int, int], None] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> pl.DataFrame:
    """Download books to ``books_dir/{id}.txt``; returns the manifest (one row per id, by id).

    Each file is published atomically, so an interrupted run leaves only hidden ``.part`` temp
    files, which the next run over the same ids deletes (other ids' temp files are left alone, so
    disjoint batches may share ``books_dir`` concurrently). Books recorded ``ok`` in ``previous_manifest`` whose file
    is still intact are not requested again (their row keeps ``attempts == 0``). Only
    ``concurrency * 4`` tasks are queued at a time, so memory stays flat for 75,000 ids.
    ``progress(done, total)`` is called after each book. ``max_bytes`` caps each book (decoded
    bytes): a bigger body is recorded ``failed`` rather than filling the disk.
    """
    books_dir = Path(books_dir)
    books_dir.mkdir(parents=True, exist_ok=True)
    unique_ids = list(dict.fromkeys(int(i) for i in ids))
    # Only our own ids' leftovers: other batches may be writing into the same directory right now.
    stale = remove_stale_temp_files(books_dir, {f"{i}.txt" for i in unique_ids})
    if stale:
        log.info("removed %d temp file(s) left by an interrupted run in %s", stale, books_dir)
    previous = _previous_ok_rows(previous_manifest)
    rows: list[dict[str, Any]] = []
    window = max(1, concurrency) * 4

    def collect(done: Iterable[Future[dict[str, Any]]]) -> None:
        for future in done:
            rows.append(future.result())
            if progress is not None:
                progress(len(rows), len(unique_ids))

    with (
        PoliteClient(
            requests_per_second=requests_per_second,
            max_retries=max_retries,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            user_agent=user_agent,
        ) as client,
        ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="gutenberg") as pool,
    ):
        pending: set[Future[dict[str, Any]]] = set()
        for book_id in unique_ids:
            pending.add(
                pool.submit(
                    _fetch_book,
                    client,
                    book_id,
                    base_url,
                    books_dir,
                    previous.get(book_id),
                    max_bytes,
                )
            )
            if len(pending) >= window:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                collect(done)
        collect(wait(pending).done)
    manifest = pl.DataFrame(rows, schema=MANIFEST_SCHEMA).sort("id")
    counts = dict(manifest.group_by("status").len().iter_rows())
    log.info("gutenberg download: %s", counts)
    return manifest


def check_failures(manifest: pl.DataFrame, max_failure_fraction: float) -> None:
    """Raise if the share of ``failed`` books (404s excluded) exceeds ``max_failure_fraction``.

    404s are upstream facts (withdrawn books), not crawl health, so they never count.
    """
    total = manifest.height
    failed = manifest.filter(pl.col("status") == "failed").sort("id")
    if total == 0 or failed.height / total <= max_failure_fraction:
        return
    ids = failed["id"].to_list()
    shown = ", ".join(map(str, ids[:50])) + (
        f", ... ({len(ids) - 50} more)" if len(ids) > 50 else ""
    )
    examples = "; ".join(failed["error"].head(3).fill_null("").to_list())
    raise DownloadFailuresError(
        f"{failed.height} of {total} books failed to download "
        f"({failed.height / total:.1%} > {max_failure_fraction:.1%} allowed): ids {shown}. "
        f"First errors: {examples}"
    )


def write_manifest(df: pl.DataFrame, path: Path | str) -> None:
    """Write the manifest as parquet atomically (temp file + rename): never a half-written file."""
    buffer = io.BytesIO()
    df.write_parquet(buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def read_manifest(path: Path | str) -> pl.DataFrame:
    return pl.read_parquet(path)
