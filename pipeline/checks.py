"""Asset checks: each reads the artefact from disk and tests one promise the asset makes."""

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pyarrow.parquet as pq

from llm_core.data import read_manifest
from llm_core.tokenizer import held_out_stats, load_tokenizer
from pipeline.assets.gutenberg import cleaned_books
from pipeline.assets.tokens import bpe_tokenizer, held_out_texts, token_shards
from pipeline.resources import Paths, Profile
from pipeline.text.boilerplate import find_boilerplate


@dg.asset_check(asset=cleaned_books, blocking=True)
def no_boilerplate_left(paths: Paths) -> dg.AssetCheckResult:
    """No cleaned book still carries Project Gutenberg header, footer or licence text."""
    offenders: dict[int, list[str]] = {}
    pf = pq.ParquetFile(paths.require("cleaned_books", "books.parquet"))
    # One row group at a time: iter_batches over the whole file reads ahead across row groups,
    # and its memory grew with the corpus (730 MB at 4,000 books against 251 MB per group).
    for group in range(pf.num_row_groups):
        for batch in pf.iter_batches(batch_size=16, row_groups=[group], columns=["id", "text"]):
            ids, texts = batch["id"].to_pylist(), batch["text"].to_pylist()
            for book_id, text in zip(ids, texts, strict=True):
                hits = find_boilerplate(text)
                if hits:
                    offenders[book_id] = hits[:3]
    return dg.AssetCheckResult(
        passed=not offenders,
        metadata={
            "books_with_boilerplate": len(offenders),
            "examples": dg.MetadataValue.json({str(k): v for k, v in list(offenders.items())[:10]}),
        },
    )


@dg.asset_check(asset=cleaned_books)
def language_mix_as_configured(paths: Paths, profile: Profile) -> dg.AssetCheckResult:
    """Every kept book's detected language is one the profile asks for."""
    allowed = set(profile.section("clean").get("languages") or ["en"])
    books = pl.scan_parquet(paths.require("cleaned_books", "books.parquet"))
    mix = books.group_by("language").agg(pl.len()).collect()
    counts = dict(mix.iter_rows())
    unexpected = {k: v for k, v in counts.items() if k not in allowed}
    return dg.AssetCheckResult(
        passed=not unexpected,
        metadata={"languages": dg.MetadataValue.json(counts), "allowed": sorted(allowed)},
    )


@dg.asset_check(asset=bpe_tokenizer, blocking=True)
def tokenizer_roundtrip(paths: Paths, profile: Profile) -> dg.AssetCheckResult:
    """decode(encode(text)) == text on every held-out text, byte for byte (a word-level
    tokenizer: its words joined by single spaces, see ``held_out_stats``)."""
    tok = load_tokenizer(paths.require("bpe_tokenizer", "tokenizer.json"))
    failures = []
    n = 0
    for book_id, text in held_out_texts(paths, profile):
        n += 1
        if not held_out_stats(tok, [text]).roundtrip_exact:
            failures.append(book_id)
    return dg.AssetCheckResult(
        passed=n > 0 and not failures,
        metadata={"held_out_books": n, "failures": dg.MetadataValue.json(failures)},
    )


def _max_id(path: Path, arr: np.ndarray, block: int = 8 << 20) -> int:
    """The largest id of a shard, read in blocks rather than through the map: every mapped page
    the ``max`` touches stays resident, so a 100 M-token shard would add 200 MB to the check."""
    offset = path.stat().st_size - arr.nbytes  # the .npy header
    top = -1
    with path.open("rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(block * arr.itemsize):
            top = max(top, int(np.frombuffer(chunk, dtype=arr.dtype).max()))
    return top


@dg.asset_check(asset=token_shards, blocking=True)
def shards_valid(paths: Paths, profile: Profile) -> dg.AssetCheckResult:
    """Every shard loads with ``np.load(mmap_mode='r')`` and every id is below ``vocab_size``."""
    root = paths.asset_dir("token_shards", create=False)
    manifest = read_manifest(root)
    vocab_size = int(profile.load()["vocab_size"])
    bad: list[str] = []
    max_id = -1
    for entry in manifest["shards"]:
        arr = np.load(root / entry["file"], mmap_mode="r")
        if arr.dtype.name != manifest["dtype"] or arr.shape[0] != entry["tokens"]:
            bad.append(f"{entry['file']}: dtype/length mismatch")
            continue
        m = _max_id(root / entry["file"], arr) if arr.size else -1
        max_id = max(max_id, m)
        if m >= vocab_size:
            bad.append(f"{entry['file']}: id {m} >= vocab_size {vocab_size}")
    splits = manifest["splits"]
    if splits.get("val", {}).get("books", 0) < 1:
        bad.append("val split has no book")
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={
            "shards": len(manifest["shards"]),
            "max_id": max_id,
            "problems": dg.MetadataValue.json(bad),
        },
    )


ALL_CHECKS = [no_boilerplate_left, language_mix_as_configured, tokenizer_roundtrip, shards_valid]
