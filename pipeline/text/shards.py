"""Cleaned books -> ``.npy`` token shards, streaming with bounded memory.

Books are read from ``books.parquet`` in small record batches (never the whole table), encoded in
parallel with ``Tokenizer.encode_batch`` (Rust threads), and appended to fixed-size shards by
``llm_core.data.shards.ShardWriter``. ``<|endoftext|>`` follows every book so the model learns where
documents end and packed windows can still be told apart. Peak memory is one batch of text plus
one shard buffer, whatever the corpus size. Nothing here imports torch: a data-stage process
stays at the import floor of NumPy, pyarrow and ``tokenizers``.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from llm_core.data.shards import ShardWriter, write_manifest
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


def char_split(val_fraction: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(train, val) character ranges when every book is split by characters: the profile's
    ``val_fraction`` (the last fraction of each text is held out; "LLMs from scratch" holds out
    10% of its one short story this way). 0 keeps whole books in train."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"profile `val_fraction` must be in [0, 1), got {val_fraction}")
    return (0.0, 1.0 - val_fraction), (1.0 - val_fraction, 1.0)


def iter_book_texts(
    books_parquet: str | Path,
    *,
    include: set[int] | None = None,
    exclude: set[int] | None = None,
    batch_rows: int = 8,
    chars: tuple[float, float] = (0.0, 1.0),
) -> Iterator[tuple[int, str]]:
    """Stream ``(id, text)`` from ``books.parquet`` a few rows at a time, in file order.

    ``chars`` keeps that fraction of each text, by character: ``(0, 0.9)`` is the first 90%,
    ``(0.9, 1)`` the rest (the split by characters of a one-book corpus, see
    :func:`char_split`)."""
    lo, hi = chars
    pf = pq.ParquetFile(books_parquet)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["id", "text"]):
        for book_id, text in zip(
            batch.column("id").to_pylist(), batch.column("text").to_pylist(), strict=True
        ):
            if include is not None and book_id not in include:
                continue
            if exclude is not None and book_id in exclude:
                continue
            if (lo, hi) != (0.0, 1.0):
                text = text[int(lo * len(text)) : int(hi * len(text))]
            yield int(book_id), text


def split_for_encoding(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ~``max_chars`` that encode to exactly the same tokens.

    Cuts fall just after a newline that is followed by a non-space character: there the GPT-2
    pre-tokeniser always ends a pre-token (the newline stands alone) and BPE never merges across
    pre-tokens, so concatenating the pieces' ids equals encoding the whole text. Pieces bound the
    tokenizer's per-call memory (a 3 MB book otherwise holds ~1 GB of Encoding state) and give
    the Rust thread pool more items to share out.
    """
    pieces, start, n = [], 0, len(text)
    while n - start > max_chars:
        cut = start + max_chars
        while cut > start + max_chars // 2 and not (
            text[cut - 1] == "\n" and not text[cut].isspace()
        ):
            cut -= 1
        if cut <= start + max_chars // 2:  # no safe cut nearby: keep the piece whole (rare)
            cut = text.find("\n", start + max_chars)
            while cut != -1 and cut + 1 < n and text[cut + 1].isspace():
                cut = text.find("\n", cut + 1)
            if cut == -1 or cut + 1 >= n:
                break
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _batches_by_bytes(
    items: Iterator[tuple[int, str]], max_chars: int, piece_chars: int
) -> Iterator[tuple[list[str], list[int], int]]:
    """Batches of pieces, with how many pieces each book has and the batch's UTF-8 bytes."""
    batch: list[str] = []
    counts: list[int] = []
    size = nbytes = 0
    for _, text in items:
        pieces = split_for_encoding(text, piece_chars)
        batch.extend(pieces)
        counts.append(len(pieces))
        size += len(text)
        nbytes += len(text.encode("utf-8"))
        if size >= max_chars:
            yield batch, counts, nbytes
            batch, counts, size, nbytes = [], [], 0, 0
    if batch:
        yield batch, counts, nbytes


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
    batch_chars: int = 4 << 20,
    piece_chars: int = 64 << 10,
    val_fraction: float = 0.0,
) -> tuple[dict[str, Any], ShardStats]:
    """Encode every book into train/val shards under ``out_dir`` and write ``manifest.json``.

    ``vocab_size`` is the profile's; a tokenizer that disagrees is an error here rather than an
    out-of-range embedding index later. ``val_fraction`` > 0 also holds out the last fraction of
    every other book's characters (:func:`char_split`).
    """
    train_chars, val_chars = char_split(val_fraction)
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
    for split in ("train", "val"):
        writer = ShardWriter(out_dir, split=split, tokens_per_shard=tokens_per_shard, dtype=dtype)
        n_books = n_bytes = 0
        if split == "train":
            texts = iter_book_texts(books_parquet, exclude=val_ids, chars=train_chars)
        else:
            texts = iter_book_texts(books_parquet, include=val_ids)
            if val_fraction > 0:
                tails = iter_book_texts(books_parquet, exclude=val_ids, chars=val_chars)
                texts = itertools.chain(texts, tails)
        eot = np.asarray([eot_id], dtype=dtype)
        for batch, counts, batch_bytes in _batches_by_bytes(texts, batch_chars, piece_chars):
            encodings = iter(tok.encode_batch(batch, add_special_tokens=False))
            for n_pieces in counts:  # pieces of one book, in order, then <|endoftext|>
                for _ in range(n_pieces):
                    writer.write(np.asarray(next(encodings).ids, dtype=dtype))
                writer.write(eot)
            n_books += len(counts)
            n_bytes += batch_bytes
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
        "val_char_fraction": val_fraction,
        "splits": {s: {"tokens": tokens[s], "bytes": nbytes[s], "books": books[s]} for s in tokens},
        "shards": entries,
    }
    write_manifest(out_dir, manifest)
    stats = ShardStats(tokens, books, nbytes, len(entries), time.perf_counter() - t0)
    return manifest, stats
