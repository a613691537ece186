"""Data stages 4-5: ``bpe_tokenizer`` and ``token_shards``.

Both use the same held-out books (``split_val_books`` over the cleaned ids, the profile's
``val_books`` and ``seed``): the tokenizer never trains on them, and they become the ``val`` split
of the shards, so bits per byte on them measures text the whole pipeline has never seen.
"""

import json

import dagster as dg
import polars as pl

from llm_core.tokenizer import SPECIAL_TOKENS, held_out_stats, timed_train
from pipeline.assets.gutenberg import cleaned_books
from pipeline.io import atomic_write_text, dir_bytes, sha256_file, version_hash
from pipeline.resources import Paths, Profile, profile_code_version
from pipeline.text.shards import encode_books_to_shards, iter_book_texts, split_val_books

GROUP = "data"
CODE_VERSION = "1"


def held_out_ids(paths: Paths, profile: Profile) -> set[int]:
    books = paths.require("cleaned_books", "books.parquet")
    ids = pl.scan_parquet(books).select("id").collect()["id"].to_list()
    p = profile.load()
    return split_val_books(ids, int(p.get("val_books", 1)), int(p.get("seed", 0)))


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "vocab_size", "val_books", "seed", "tokenizer"),
    deps=[cleaned_books],
    kinds={"huggingface"},
)
def bpe_tokenizer(
    context: dg.AssetExecutionContext, paths: Paths, profile: Profile
) -> dg.MaterializeResult:
    """Byte-level BPE (``tokenizer.json``) with the reserved chat specials, vocab from the profile."""
    books = paths.require("cleaned_books", "books.parquet")
    out = paths.asset_dir("bpe_tokenizer")
    p = profile.load()
    vocab_size = int(p["vocab_size"])
    min_frequency = int((p.get("tokenizer") or {}).get("min_frequency", 2))
    val_ids = held_out_ids(paths, profile)
    texts = (t for _, t in iter_book_texts(books, exclude=val_ids))
    tok, seconds = timed_train(texts, vocab_size, min_frequency=min_frequency)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    held = [t for _, t in iter_book_texts(books, include=val_ids)]
    stats = held_out_stats(tok, held)
    if not stats.roundtrip_exact:
        raise RuntimeError(f"tokenizer does not round-trip held-out book #{stats.first_mismatch}")
    atomic_write_text(
        out / "stats.json",
        json.dumps({**stats.to_dict(), "train_seconds": seconds, "held_out_ids": sorted(val_ids)}),
    )
    sha = sha256_file(out / "tokenizer.json")
    context.log.info(f"BPE vocab={tok.get_vocab_size()} in {seconds:.1f}s; {stats.to_dict()}")
    return dg.MaterializeResult(
        metadata={
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": dg.MetadataValue.json(list(SPECIAL_TOKENS)),
            "train_seconds": round(seconds, 2),
            "held_out_books": dg.MetadataValue.json(sorted(val_ids)),
            "held_out_bytes_per_token": round(stats.bytes_per_token, 4),
            "roundtrip_exact": stats.roundtrip_exact,
            "tokenizer_sha256": sha,
            "path": dg.MetadataValue.path(str(out / "tokenizer.json")),
        },
        data_version=dg.DataVersion(sha[:16]),
    )


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "vocab_size", "val_books", "seed", "shards"),
    deps=[cleaned_books, bpe_tokenizer],
    kinds={"numpy"},
)
def token_shards(
    context: dg.AssetExecutionContext, paths: Paths, profile: Profile
) -> dg.MaterializeResult:
    """``.npy`` token shards (train/val split by book) and ``manifest.json`` for the trainer."""
    books = paths.require("cleaned_books", "books.parquet")
    tokenizer = paths.require("bpe_tokenizer", "tokenizer.json")
    out = paths.asset_dir("token_shards")
    p = profile.load()
    val_ids = held_out_ids(paths, profile)
    manifest, stats = encode_books_to_shards(
        books,
        tokenizer,
        out,
        tokens_per_shard=int(p["shards"]["tokens_per_shard"]),
        val_ids=val_ids,
        vocab_size=int(p["vocab_size"]),
    )
    context.log.info(
        f"{stats.n_shards} shards, {stats.tokens} tokens, {stats.tokens_per_s:,.0f} tok/s"
    )
    return dg.MaterializeResult(
        metadata={
            "train_tokens": stats.tokens.get("train", 0),
            "val_tokens": stats.tokens.get("val", 0),
            "train_books": stats.books.get("train", 0),
            "val_books": stats.books.get("val", 0),
            "shards": stats.n_shards,
            "dtype": manifest["dtype"],
            "tokens_per_s": round(stats.tokens_per_s),
            "bytes_on_disk": dir_bytes(out),
            "tokenizer_sha256": manifest["tokenizer_sha256"],
            "path": dg.MetadataValue.path(str(out / "manifest.json")),
        },
        data_version=dg.DataVersion(
            version_hash(manifest["tokenizer_sha256"], [s["sha256"] for s in manifest["shards"]])
        ),
    )
