"""Data stages 1-3: ``gutenberg_catalog`` -> ``gutenberg_books`` -> ``cleaned_books``.

Thin assets: each reads upstream files through ``Paths``, calls one tested function from
``pipeline.sources`` or ``pipeline.text``, writes its own files atomically and returns metadata.

``gutenberg_books`` is graph-backed so that a 75,000-book download fans out: one op plans batches,
one dynamic ``download_book_batch`` step per batch (each its own process under the multiprocess
executor, or its own pod under a Kubernetes executor), one op merges the manifests. Within a
batch the downloads are concurrent. ``dagster asset materialize --select '*'`` still runs it all.
"""

import dataclasses
import shutil
import time
import warnings
from pathlib import Path

import dagster as dg
import polars as pl

from llm_core.config import configs_dir
from pipeline.io import atomic_write_parquet, sha256_file, version_hash
from pipeline.resources import GutenbergSource, Paths, Profile, profile_code_version
from pipeline.sources import gutenberg as pg
from pipeline.sources.http import DEFAULT_MAX_BYTES, PoliteClient
from pipeline.sources.text_sources import parse_text_sources, text_source_books
from pipeline.text.clean import reduce_chunks
from pipeline.text.clean_chunks import ChunkFiles, chunk_ranges, clean_chunk, task_table

GROUP = "data"
CODE_VERSION = "1"


def versioned_output(metadata: dict, data_version: dg.DataVersion) -> dg.Output:
    """The reduce step's ``Output`` of a graph-backed asset, with the asset's data version (what
    ``MaterializeResult`` carries for a plain asset; on ``Output`` Dagster still marks it beta)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(None, metadata=metadata, data_version=data_version)


def _rules(profile: Profile) -> pg.CatalogRules:
    return pg.CatalogRules.from_mapping(profile.section("catalog"))


@dg.asset(
    group_name=GROUP, code_version=profile_code_version(CODE_VERSION, "catalog"), kinds={"polars"}
)
def gutenberg_catalog(
    context: dg.AssetExecutionContext, paths: Paths, profile: Profile, gutenberg: GutenbergSource
) -> dg.MaterializeResult:
    """The books to train on: PG's ``pg_catalog.csv`` filtered by the profile's selection rules."""
    out = paths.asset_dir("gutenberg_catalog")
    url = pg.catalog_url(gutenberg.base_url)
    rules = _rules(profile)
    if rules.max_books == 0:  # no Gutenberg books (a text_sources-only profile): no download
        full = pg.parse_catalog(",".join(pg.CATALOG_COLUMNS).encode() + b"\n")
    else:
        with PoliteClient(user_agent=gutenberg.user_agent) as client:
            pg.download_catalog(gutenberg.base_url, out / "pg_catalog.csv", client)
        full = pg.parse_catalog(out / "pg_catalog.csv")
    selected = pg.select_books(full, rules)
    atomic_write_parquet(selected, out / "catalog.parquet")
    langs = selected.explode("languages").group_by("languages").len().sort("len", descending=True)
    context.log.info(f"catalog {url}: {full.height} rows, {selected.height} selected")
    return dg.MaterializeResult(
        metadata={
            "source_url": dg.MetadataValue.url(url),
            "catalog_rows": full.height,
            "selected_books": selected.height,
            "languages": dg.MetadataValue.json(dict(langs.iter_rows())),
            "path": dg.MetadataValue.path(str(out / "catalog.parquet")),
            "preview": dg.MetadataValue.md(
                "\n".join(
                    f"- {i}: {t}" for i, t in selected.select("id", "title").head(20).iter_rows()
                )
            ),
        },
        data_version=dg.DataVersion(
            version_hash(sha256_file(out / "catalog.parquet"), dataclasses.asdict(rules))
        ),
    )


# --- gutenberg_books: plan -> fan-out downloads -> merge ----------------------------------------


class BookDownloadConfig(dg.Config):
    """Books per download step: each step may run on its own worker."""

    batch_size: int = 1000


@dg.op(ins={"catalog": dg.In(dg.Nothing)}, out=dg.DynamicOut(list))
def plan_book_batches(config: BookDownloadConfig, paths: Paths):
    """Split the selected ids into batches, one dynamic download step each."""
    catalog = pl.read_parquet(paths.require("gutenberg_catalog", "catalog.parquet"))
    ids = catalog["id"].to_list()
    for start in range(0, max(len(ids), 1), config.batch_size):
        batch = ids[start : start + config.batch_size]
        yield dg.DynamicOutput(batch, mapping_key=f"batch_{start // config.batch_size:05d}")


@dg.op
def download_book_batch(
    context: dg.OpExecutionContext,
    ids: list,
    paths: Paths,
    profile: Profile,
    gutenberg: GutenbergSource,
) -> str:
    """Download one batch concurrently; returns the path of the batch's partial manifest."""
    out = paths.asset_dir("gutenberg_books")
    books_dir = out / "books"
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    d = profile.section("download")
    previous = None
    if (out / "manifest.parquet").exists():
        previous = pl.read_parquet(out / "manifest.parquet").filter(pl.col("id").is_in(ids))
    manifest = pg.download_books(
        ids,
        gutenberg.base_url,
        books_dir,
        concurrency=int(d.get("concurrency", 4)),
        requests_per_second=float(d.get("requests_per_second", 5.0)),
        max_retries=int(d.get("max_retries", 5)),
        timeout_s=float(d.get("timeout_s", 60.0)),
        previous_manifest=previous,
        user_agent=gutenberg.user_agent,
        max_bytes=int(d.get("max_book_bytes", DEFAULT_MAX_BYTES)),
    )
    key = context.get_mapping_key() or "batch_00000"
    part = parts / f"{key}.parquet"
    pg.write_manifest(manifest, part)
    counts = dict(manifest.group_by("status").len().iter_rows())
    context.log.info(f"{key}: {len(ids)} books -> {counts}")
    return str(part)


@dg.op(out=dg.Out(dg.Nothing))
def merge_book_manifests(
    context: dg.OpExecutionContext, parts: list, paths: Paths, profile: Profile
) -> None:
    """Merge batch manifests into ``manifest.parquet`` and enforce the failure budget."""
    out = paths.asset_dir("gutenberg_books")
    manifest = pl.concat([pl.read_parquet(p) for p in sorted(parts)], how="vertical_relaxed")
    manifest = manifest.sort("id")
    pg.write_manifest(manifest, out / "manifest.parquet")
    for p in parts:
        Path(p).unlink(missing_ok=True)
    d = profile.section("download")
    pg.check_failures(manifest, float(d.get("max_failure_fraction", 0.05)))
    counts = dict(manifest.group_by("status").len().iter_rows())
    ok = manifest.filter(pl.col("status") == "ok")
    context.add_output_metadata(
        {
            "books_ok": counts.get("ok", 0),
            "books_missing": counts.get("missing", 0),
            "books_failed": counts.get("failed", 0),
            "bytes": int(ok["bytes"].sum() or 0),
            "retried_requests": int((manifest["attempts"] - 1).clip(lower_bound=0).sum() or 0),
            "path": dg.MetadataValue.path(str(out / "manifest.parquet")),
        },
    )


@dg.graph_asset(
    group_name=GROUP,
    ins={"gutenberg_catalog": dg.AssetIn(dagster_type=dg.Nothing)},
)
def gutenberg_books(gutenberg_catalog):
    """Raw PG text files (``books/{id}.txt``) and ``manifest.parquet``; reruns fetch only gaps."""
    parts = plan_book_batches(catalog=gutenberg_catalog).map(download_book_batch).collect()
    return merge_book_manifests(parts)


# --- cleaned_books -------------------------------------------------------------------------------


def with_text_sources(
    manifest: pl.DataFrame, catalog: pl.DataFrame, dest: Path, profile: Profile
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The Gutenberg manifest and catalog plus the profile's ``text_sources`` (fetched into
    ``dest``), so one cleaning pass and one rejects table cover both."""
    sources = parse_text_sources(profile.load().get("text_sources"))
    catalog = catalog.with_columns(pl.lit("gutenberg").alias("source"))
    if not sources:
        return manifest, catalog
    extra_manifest, extra_catalog = text_source_books(sources, dest, configs_dir().parent)
    manifest = pl.concat(
        [manifest.select(extra_manifest.columns), extra_manifest], how="vertical_relaxed"
    )
    catalog = pl.concat(
        [catalog.select(extra_catalog.columns), extra_catalog], how="vertical_relaxed"
    )
    return manifest, catalog


class CleanChunkConfig(dg.Config):
    """Books per cleaning step (each may run on its own worker) and processes within a step."""

    chunk_books: int = 500
    workers: int = 2


def _clean_work(paths: Paths) -> Path:
    return paths.asset_dir("cleaned_books") / "_chunks"


@dg.op(ins={"books": dg.In(dg.Nothing)}, out=dg.DynamicOut(list))
def plan_clean_chunks(config: CleanChunkConfig, paths: Paths, profile: Profile):
    """The id-sorted task table (manifest + catalog + the profile's ``text_sources``), written
    once for the chunk steps, and one dynamic ``clean_book_chunk`` step per range of it."""
    out = paths.asset_dir("cleaned_books")
    manifest = pl.read_parquet(paths.require("gutenberg_books", "manifest.parquet"))
    books_dir = paths.asset_dir("gutenberg_books") / "books"
    manifest = manifest.with_columns(
        pl.col("id")
        .map_elements(lambda i: str(books_dir / f"{i}.txt"), return_dtype=pl.String)
        .alias("path")
    )
    catalog = pl.read_parquet(paths.require("gutenberg_catalog", "catalog.parquet"))
    manifest, catalog = with_text_sources(manifest, catalog, out / "text_sources", profile)
    tasks = task_table(manifest, catalog)
    work = _clean_work(paths)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atomic_write_parquet(tasks, work / "tasks.parquet")
    (work / "started").write_text(str(time.time()))
    for k, (start, end) in enumerate(chunk_ranges(tasks.height, config.chunk_books)):
        yield dg.DynamicOutput([start, end], mapping_key=f"chunk_{k:05d}")


@dg.op
def clean_book_chunk(
    context: dg.OpExecutionContext,
    rows: list,
    config: CleanChunkConfig,
    paths: Paths,
    profile: Profile,
) -> str:
    """Clean one range of the task table: candidate texts + MinHash sketches, no global state."""
    work = _clean_work(paths)
    start, end = rows
    tasks = pl.read_parquet(work / "tasks.parquet").slice(start, end - start)
    c = profile.section("clean")
    key = context.get_mapping_key() or "chunk_00000"
    clean_chunk(
        tasks,
        work,
        key,
        languages=c.get("languages") or ["en"],
        min_chars=int(c.get("min_chars", 2000)),
        workers=config.workers,
    )
    context.log.info(f"{key}: {tasks.height} books")
    return key


@dg.op(out=dg.Out(dg.Nothing))
def merge_cleaned_chunks(
    context: dg.OpExecutionContext,
    keys: list,
    paths: Paths,
    profile: Profile,
):
    """The reduce: exact and near-duplicates over every chunk's sketches, then ``books.parquet``
    and ``rejects.parquet``."""
    out = paths.asset_dir("cleaned_books")
    work = _clean_work(paths)
    tasks = pl.read_parquet(work / "tasks.parquet")
    c = profile.section("clean")
    stats = reduce_chunks(
        [ChunkFiles.of(work, k) for k in sorted(keys)],
        out,
        tasks,
        near_duplicate_threshold=float(c.get("near_duplicate_threshold", 0.8)),
    )
    stats.seconds = time.time() - float((work / "started").read_text())
    shutil.rmtree(work, ignore_errors=True)
    rejects = pl.read_parquet(out / "rejects.parquet")
    by_reason = dict(rejects.group_by("reason").len().iter_rows()) if rejects.height else {}
    books_sha = sha256_file(out / "books.parquet")
    kept = pl.scan_parquet(out / "books.parquet")
    context.log.info(f"cleaned {stats}")
    return versioned_output(
        metadata={
            "books_in": tasks.height,
            "books_kept": int(kept.select(pl.len()).collect().item()),
            "rejected": rejects.height,
            "rejected_by_reason": dg.MetadataValue.json(by_reason),
            "books_by_source": dg.MetadataValue.json(
                dict(kept.group_by("source").len().collect().iter_rows())
            ),
            # Per language: the kept books, and every book read by its detected language
            # (a mixed `clean.languages: [en, zh]` profile shows both here).
            "books_by_language": dg.MetadataValue.json(
                dict(kept.group_by("language").len().sort("language").collect().iter_rows())
            ),
            "detected_languages": dg.MetadataValue.json(stats.languages),
            "chunks": len(keys),
            "near_duplicate_candidates": stats.near_duplicate_candidates,
            "near_duplicate_pairs_verified": stats.near_duplicate_pairs_verified,
            "seconds": round(stats.seconds, 2),
            "books_sha256": books_sha,
            "path": dg.MetadataValue.path(str(out / "books.parquet")),
            "rejects": dg.MetadataValue.md(
                "\n".join(
                    f"- {r['id']}: {r['reason']} ({r['detail']})"
                    for r in rejects.head(30).iter_rows(named=True)
                )
                or "none"
            ),
        },
        data_version=dg.DataVersion(books_sha[:16]),
    )


@dg.graph_asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "clean", "text_sources"),
    ins={"gutenberg_books": dg.AssetIn(dagster_type=dg.Nothing)},
    kinds={"polars"},
)
def cleaned_books(gutenberg_books):
    """Decoded, boilerplate-free, language-checked, deduplicated books + a rejects table: the
    Gutenberg books and the profile's ``text_sources``, each row with its ``source``. Fans out:
    one ``clean_book_chunk`` step per ``chunk_books`` books, then one reduce over their MinHash
    sketches (:mod:`pipeline.text.clean`)."""
    keys = plan_clean_chunks(books=gutenberg_books).map(clean_book_chunk).collect()
    return merge_cleaned_chunks(keys)
