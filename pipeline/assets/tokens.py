"""Data stages 4-5: ``bpe_tokenizer`` and ``token_shards``.

Both use the same held-out books (``split_val_books`` over the cleaned ids, the profile's
``val_books`` and ``seed``): the tokenizer never trains on them, and they become the ``val`` split
of the shards, so bits per byte on them measures text the whole pipeline has never seen.
"""

import json
import shutil
import time
from pathlib import Path

import dagster as dg
import polars as pl

from llm_core.tokenizer import SPECIAL_TOKENS, held_out_stats, timed_train
from pipeline.assets.gutenberg import cleaned_books, versioned_output
from pipeline.io import atomic_write_text, dir_bytes, sha256_file, version_hash
from pipeline.resources import Paths, Profile, profile_code_version
from pipeline.text.shards import (
    ShardChunk,
    budgeted,
    char_split,
    encode_chunk,
    iter_book_texts,
    merge_parts,
    plan_shard_chunks,
    split_val_books,
    tokenizer_sample,
)

GROUP = "data"
CODE_VERSION = "1"


def held_out_ids(paths: Paths, profile: Profile) -> set[int]:
    """The held-out books; none when the profile splits by characters (``val_fraction``)."""
    books = paths.require("cleaned_books", "books.parquet")
    ids = pl.scan_parquet(books).select("id").collect()["id"].to_list()
    p = profile.load()
    if val_fraction(profile):
        return set()
    return split_val_books(ids, int(p.get("val_books", 1)), int(p.get("seed", 0)))


def held_out_texts(paths: Paths, profile: Profile) -> list[tuple[int, str]]:
    """``(book id, text)`` of everything held out: whole books, or every book's tail."""
    books = paths.require("cleaned_books", "books.parquet")
    val_ids = held_out_ids(paths, profile)
    held = list(iter_book_texts(books, include=val_ids))
    if fraction := val_fraction(profile):
        _, val_chars = char_split(fraction)
        held += list(iter_book_texts(books, exclude=val_ids, chars=val_chars))
    return held


def val_fraction(profile: Profile) -> float:
    """The profile's ``val_fraction``: the last fraction of every text's characters is held out
    (a one-story corpus cannot hold out a whole book); 0 or unset holds out ``val_books``."""
    return float(profile.load().get("val_fraction") or 0.0)


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(
        CODE_VERSION, "vocab_size", "val_books", "val_fraction", "seed", "tokenizer"
    ),
    deps=[cleaned_books],
    kinds={"huggingface"},
)
def bpe_tokenizer(
    context: dg.AssetExecutionContext, paths: Paths, profile: Profile
) -> dg.MaterializeResult:
    """The tokenizer (``tokenizer.json``; byte-level BPE, or word-level with ``tokenizer.kind:
    word``) with the reserved chat specials, vocab from the profile."""
    books = paths.require("cleaned_books", "books.parquet")
    out = paths.asset_dir("bpe_tokenizer")
    p = profile.load()
    vocab_size = int(p["vocab_size"])
    settings = p.get("tokenizer") or {}
    min_frequency = int(settings.get("min_frequency", 2))
    kind = str(settings.get("kind", "bpe"))
    val_ids = held_out_ids(paths, profile)
    train_chars, _ = char_split(val_fraction(profile))
    max_chars = settings.get("max_chars")
    sample = tokenizer_sample(
        books,
        exclude=val_ids,
        max_chars=None if max_chars is None else int(max_chars),
        seed=int(p.get("seed", 0)),
        fraction=train_chars[1] - train_chars[0],
    )
    texts = (
        t for _, t in iter_book_texts(books, include=sample.ids, exclude=val_ids, chars=train_chars)
    )
    if sample.ids is not None:  # the last sampled book is cut to the budget
        texts = budgeted(texts, sample.chars)
    tok, seconds = timed_train(texts, vocab_size, kind=kind, min_frequency=min_frequency)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    stats = held_out_stats(tok, [t for _, t in held_out_texts(paths, profile)])
    if not stats.roundtrip_exact and kind == "bpe":  # a word vocabulary may lack held-out words
        raise RuntimeError(f"tokenizer does not round-trip held-out book #{stats.first_mismatch}")
    atomic_write_text(
        out / "stats.json",
        json.dumps(
            {
                **stats.to_dict(),
                "train_seconds": seconds,
                "held_out_ids": sorted(val_ids),
                "max_chars": max_chars,
                "train_chars": sample.chars,
                "train_books": sample.books,
                "corpus_chars": sample.corpus_chars,
            }
        ),
    )
    sha = sha256_file(out / "tokenizer.json")
    context.log.info(f"BPE vocab={tok.get_vocab_size()} in {seconds:.1f}s; {stats.to_dict()}")
    return dg.MaterializeResult(
        metadata={
            "vocab_size": tok.get_vocab_size(),
            "kind": kind,
            "special_tokens": dg.MetadataValue.json(list(SPECIAL_TOKENS)),
            "train_seconds": round(seconds, 2),
            # The training sample: `tokenizer.max_chars` bounds it (unset: every train book).
            "max_chars": max_chars if max_chars is not None else "unbounded",
            "train_chars": sample.chars,
            "train_books": sample.books,
            "corpus_chars": sample.corpus_chars,
            "sampled_fraction": round(sample.chars / max(sample.corpus_chars, 1), 4),
            "held_out_books": dg.MetadataValue.json(sorted(val_ids)),
            "held_out_bytes_per_token": round(stats.bytes_per_token, 4),
            "roundtrip_exact": stats.roundtrip_exact,
            "tokenizer_sha256": sha,
            "path": dg.MetadataValue.path(str(out / "tokenizer.json")),
        },
        data_version=dg.DataVersion(sha[:16]),
    )


class ShardChunkConfig(dg.Config):
    """Books per sharding step (each may run on its own worker)."""

    chunk_books: int = 500


def _parts_dir(paths: Paths) -> Path:
    return paths.asset_dir("token_shards") / "_parts"


@dg.op(ins={"books": dg.In(dg.Nothing), "tokenizer": dg.In(dg.Nothing)}, out=dg.DynamicOut(list))
def plan_token_chunks(config: ShardChunkConfig, paths: Paths, profile: Profile):
    """One dynamic ``encode_token_chunk`` step per ``chunk_books`` books of each split."""
    books = paths.require("cleaned_books", "books.parquet")
    parts = _parts_dir(paths)
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    (parts / "started").write_text(str(time.time()))
    chunks = plan_shard_chunks(
        books,
        val_ids=held_out_ids(paths, profile),
        val_fraction=val_fraction(profile),
        chunk_books=config.chunk_books,
    ) or [ShardChunk("train", ())]
    for k, chunk in enumerate(chunks):
        yield dg.DynamicOutput([f"part_{k:05d}", *chunk.to_list()], mapping_key=f"part_{k:05d}")


@dg.op
def encode_token_chunk(
    context: dg.OpExecutionContext, chunk: list, paths: Paths, profile: Profile
) -> dict:
    """Encode one chunk of books into a raw part file (no shard boundaries yet)."""
    key, *spec = chunk
    p = profile.load()
    part = encode_chunk(
        paths.require("cleaned_books", "books.parquet"),
        paths.require("bpe_tokenizer", "tokenizer.json"),
        _parts_dir(paths),
        key,
        ShardChunk.from_list(spec),
        vocab_size=int(p["vocab_size"]),
        encoder=str(p["shards"].get("encoder", "auto")),
    )
    context.log.info(f"{key}: {part['books']} books, {part['tokens']} tokens ({part['encoder']})")
    return part


@dg.op(out=dg.Out(dg.Nothing))
def merge_token_shards(context: dg.OpExecutionContext, parts: list, paths: Paths, profile: Profile):
    """The reduce: parts -> fixed-size ``.npy`` shards + ``manifest.json``, as one pass writes."""
    tokenizer = paths.require("bpe_tokenizer", "tokenizer.json")
    out = paths.asset_dir("token_shards")
    p = profile.load()
    val_ids = held_out_ids(paths, profile)
    work = _parts_dir(paths)
    manifest, stats = merge_parts(
        work,
        sorted(parts, key=lambda part: part["key"]),
        tokenizer,
        out,
        tokens_per_shard=int(p["shards"]["tokens_per_shard"]),
        val_ids=val_ids,
        vocab_size=int(p["vocab_size"]),
        val_fraction=val_fraction(profile),
    )
    stats.seconds = time.time() - float((work / "started").read_text())
    shutil.rmtree(work, ignore_errors=True)
    context.log.info(
        f"{stats.n_shards} shards, {stats.tokens} tokens, {stats.tokens_per_s:,.0f} tok/s"
    )
    return versioned_output(
        metadata={
            "train_tokens": stats.tokens.get("train", 0),
            "val_tokens": stats.tokens.get("val", 0),
            "train_books": stats.books.get("train", 0),
            "val_books": stats.books.get("val", 0),
            "shards": stats.n_shards,
            "chunks": len(parts),
            "dtype": manifest["dtype"],
            "tokens_per_s": round(stats.tokens_per_s),
            "encoder": stats.encoder,
            "bytes_on_disk": dir_bytes(out),
            "tokenizer_sha256": manifest["tokenizer_sha256"],
            "path": dg.MetadataValue.path(str(out / "manifest.json")),
        },
        data_version=dg.DataVersion(
            version_hash(manifest["tokenizer_sha256"], [s["sha256"] for s in manifest["shards"]])
        ),
    )


@dg.graph_asset(
    group_name=GROUP,
    code_version=profile_code_version(
        CODE_VERSION, "vocab_size", "val_books", "val_fraction", "seed", "shards"
    ),
    ins={
        "cleaned_books": dg.AssetIn(dagster_type=dg.Nothing),
        "bpe_tokenizer": dg.AssetIn(dagster_type=dg.Nothing),
    },
    kinds={"numpy"},
)
def token_shards(cleaned_books, bpe_tokenizer):
    """``.npy`` token shards (train/val split by book) and ``manifest.json`` for the trainer.
    Fans out: one ``encode_token_chunk`` step per ``chunk_books`` books, then one merge that cuts
    the fixed-size shards (:mod:`pipeline.text.shards`)."""
    parts = plan_token_chunks(books=cleaned_books, tokenizer=bpe_tokenizer)
    return merge_token_shards(parts.map(encode_token_chunk).collect())
