"""Cleaned books -> ``.npy`` token shards, streaming with bounded memory.

Books are read from ``books.parquet`` in small record batches (never the whole table), encoded in
parallel with ``Tokenizer.encode_batch`` (Rust threads), and appended to fixed-size shards by
``llm_core.data.ShardWriter``. ``<|endoftext|>`` follows every book so the model learns where
documents end and packed windows can still be told apart. Peak memory is one batch of text plus
one shard buffer, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from llm_core.data import ShardWriter, write_manifest
from llm_core.tokenizer import EOT, file_sha256, load_tokenizer

SHARD_FORMAT = "scriptorium-shards/1"


def split_val_books(ids: Iterable[int], n_val: int, seed: int) -> set[int]:
    """Pick the held-out books: the ``n_val`` ids that rank first under a seeded hash.

    Hash ranking (rather than "the last N ids") keeps the choice stable and unbiased as the catalog
    grows; at least one book is held out whenever there are two or more books.
    """
    ids = sorted(set(int(i) for i in ids))
    if len(ids) < 2:
        return set()
    n = max(1, min(n_val, len(ids) - 1))
    rank = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return set(rank[:n])


def iter_book_texts(
    books_parquet: str | Path,
    *,
    include: set[int] | None = None,
    exclude: set[int] | None = None,
    batch_rows: int = 8,
) -> Iterator[tuple[int, str]]:
    """Stream ``(id, text)`` from ``books.parquet`` a few rows at a time, in file order."""
    pf = pq.ParquetFile(books_parquet)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["id", "text"]):
        for book_id, text in zip(
            batch.column("id").to_pylist(), batch.column("text").to_pylist(), strict=True
        ):
            if include is not None and book_id not in include:
                continue
            if exclude is not None and book_id in exclude:
                continue
            yield int(book_id), text


def _batches_by_bytes(items: Iterator[tuple[int, str]], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for _, text in items:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@dataclass
class ShardStats:
    tokens: dict[str, int]
    books: dict[str, int]
    bytes: dict[str, int]
    n_shards: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_books_to_shards(
    books_parquet: str | Path,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    tokens_per_shard: int,
    val_ids: set[int],
    vocab_size: int,
    batch_chars: int = 8 << 20,
) -> tuple[dict[str, Any], ShardStats]:
    """Encode every book into train/val shards under ``out_dir`` and write ``manifest.json``.

    ``vocab_size`` is the profile's; a tokenizer that disagrees is an error here rather than an
    out-of-range embedding index later.
    """
    tok = load_tokenizer(tokenizer_path)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {tok.get_vocab_size()} tokens, more than the "
            f"profile's vocab_size={vocab_size}"
        )
    eot_id = tok.token_to_id(EOT)
    dtype = shard_dtype(vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.npy"):
        stale.unlink()

    t0 = time.perf_counter()
    entries: list[dict[str, Any]] = []
    tokens: dict[str, int] = {}
    books: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for split, include, exclude in (("train", None, val_ids), ("val", val_ids, None)):
        writer = ShardWriter(out_dir, split=split, tokens_per_shard=tokens_per_shard, dtype=dtype)
        n_books = n_bytes = 0
        texts = iter_book_texts(books_parquet, include=include, exclude=exclude)
        for batch in _batches_by_bytes(texts, batch_chars):
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                ids = np.asarray(enc.ids, dtype=dtype)
                writer.write(ids)
                writer.write(np.asarray([eot_id], dtype=dtype))
            n_books += len(batch)
            n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        split_entries = writer.close()
        entries.extend(split_entries)
        tokens[split] = sum(e["tokens"] for e in split_entries)
        books[split] = n_books
        nbytes[split] = n_bytes

    manifest = {
        "format": SHARD_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "tokens_per_shard": tokens_per_shard,
        "val_book_ids": sorted(val_ids),
        "splits": {
            s: {"tokens": tokens[s], "bytes": nbytes[s], "books": books[s]} for s in tokens
        },
        "shards": entries,
    }
    write_manifest(out_dir, manifest)
    stats = ShardStats(tokens, books, nbytes, len(entries), time.perf_counter() - t0)
    return manifest, stats
