"""Cleaned books -> ``.npy`` token shards, streaming with bounded memory, in fan-out steps.

Plan (:func:`plan_shard_chunks`: the books of each split cut into chunks), map
(:func:`encode_chunk`: a chunk's books read from ``books.parquet`` one row group at a time,
encoded in batches of newline-safe pieces by tiktoken or ``Tokenizer.encode_batch``, ids appended
to a raw part file) and reduce (:func:`merge_parts`: the parts, in plan order, streamed into
fixed-size shards by :mod:`.shard_files` + ``manifest.json``). ``<|endoftext|>`` follows every
book so the model learns where documents end and packed windows can still be told apart. Peak
memory is one batch of text (map) or one block of ids (reduce), whatever the corpus or shard
size, and the shards do not depend on the chunking. Nothing here imports torch: a data-stage
process stays at the import floor of NumPy, pyarrow and the tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from llm_core.data.shards import write_manifest
from llm_core.tokenizer import EOT, file_sha256, load_tokenizer
from pipeline.text.fast_bpe import FastEncoder, fast_encoder
from pipeline.text.shard_files import write_split

SHARD_FORMAT = "scriptorium-shards/1"
ENCODERS = ("auto", "tokenizers")


def encoder_name(fast: FastEncoder | None) -> str:
    return "tokenizers" if fast is None else "tiktoken"


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
    for group in range(pf.num_row_groups):
        if include is not None:  # a sample or the held-out books: skip groups holding none
            ids = pf.read_row_group(group, columns=["id"]).column(0).to_pylist()
            if include.isdisjoint(ids):
                continue
        for batch in pf.iter_batches(
            batch_size=batch_rows, row_groups=[group], columns=["id", "text"]
        ):
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


@dataclass(frozen=True)
class TrainingSample:
    """Which books the tokenizer trains on, and how many characters that is."""

    ids: set[int] | None  # None: every book not held out
    chars: int  # characters in the sample (the last book is cut to the budget)
    corpus_chars: int  # characters of every book that is not held out
    books: int


def tokenizer_sample(
    books_parquet: str | Path,
    *,
    exclude: set[int],
    max_chars: int | None,
    seed: int,
    fraction: float = 1.0,
) -> TrainingSample:
    """A bounded, seeded sample of books for tokenizer training (``tokenizer.max_chars``).

    Large-scale recipes train the tokenizer on a few hundred MB to a few GB of text, not the whole
    corpus: BPE statistics converge long before, and the trainer's time and memory grow with the
    text it sees. Books are taken in the order of a seeded hash of their id (ranked like
    :func:`split_val_books`, so a book's place does not move as the corpus grows) until ``max_chars``
    characters (of the ``fraction`` of each book in train) are reached. Only the ``id`` and
    ``n_chars`` columns are read here.
    """
    table = pq.read_table(books_parquet, columns=["id", "n_chars"])
    rows = [
        (int(i), int(n * fraction))
        for i, n in zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)
        if int(i) not in exclude
    ]
    corpus = sum(n for _, n in rows)
    if max_chars is None or corpus <= max_chars:
        return TrainingSample(None, corpus, corpus, len(rows))
    if max_chars <= 0:
        raise ValueError(f"profile `tokenizer.max_chars` must be positive, got {max_chars}")
    ranked = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:sample:{r[0]}".encode()).digest())
    chosen: set[int] = set()
    total = 0
    for book_id, n in ranked:
        if total >= max_chars:
            break
        chosen.add(book_id)
        total += n
    return TrainingSample(chosen, min(total, max_chars), corpus, len(chosen))


def budgeted(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """``texts`` until ``max_chars`` characters have been yielded (the last one cut short)."""
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def _safe_cut(text: str, i: int) -> bool:
    """Whether a cut before ``text[i]`` cannot change the tokens: a lone newline between two
    non-space characters."""
    return text[i - 1] == "\n" and not text[i].isspace() and not text[i - 2].isspace()


def split_for_encoding(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ~``max_chars`` that encode to exactly the same tokens.

    Cuts fall just after a newline that stands alone between two non-space characters: there the
    GPT-2 pre-tokeniser always ends a pre-token (the newline is one) and BPE never merges across
    pre-tokens, so concatenating the pieces' ids equals encoding the whole text. A newline after
    another whitespace is no such place: in ``":\n\n\"Hi"`` the whole text splits ``\n`` +
    ``\n``, a piece ending ``":\n\n"`` would give one ``\n\n`` token. Pieces bound the
    tokenizer's per-call memory (a 3 MB book otherwise holds ~1 GB of Encoding state) and give
    the encoder's threads more items to share out.
    """
    pieces, start, n = [], 0, len(text)
    while n - start > max_chars:
        cut = start + max_chars
        while cut > start + max_chars // 2 and not _safe_cut(text, cut):
            cut -= 1
        if cut <= start + max_chars // 2:  # no safe cut nearby: keep the piece whole (rare)
            cut = text.find("\n", start + max_chars)
            while cut != -1 and cut + 1 < n and not _safe_cut(text, cut + 1):
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
    encoder: str = "tokenizers"

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardChunk:
    """One sharding step's books: ``ids`` (in file order) of ``split``, the ``chars`` range of
    each text (whole books, or the train head / val tail under ``val_fraction``)."""

    split: str
    ids: tuple[int, ...]
    chars: tuple[float, float] = (0.0, 1.0)

    def to_list(self) -> list[Any]:
        return [self.split, list(self.ids), list(self.chars)]

    @classmethod
    def from_list(cls, v: list[Any]) -> ShardChunk:
        return cls(str(v[0]), tuple(int(i) for i in v[1]), (float(v[2][0]), float(v[2][1])))


def plan_shard_chunks(
    books_parquet: str | Path,
    *,
    val_ids: set[int],
    val_fraction: float = 0.0,
    chunk_books: int | None = None,
) -> list[ShardChunk]:
    """The books of each split cut into chunks of at most ``chunk_books`` (one per split part by
    default), in the order their tokens go into the shards: train; then val (the held-out books,
    then under ``val_fraction`` every other book's tail). Only the ``id`` column is read."""
    if chunk_books is not None and chunk_books < 1:
        raise ValueError(f"chunk_books must be >= 1, got {chunk_books}")
    train_chars, val_chars = char_split(val_fraction)
    ids = [int(i) for i in pq.read_table(books_parquet, columns=["id"]).column(0).to_pylist()]
    rest = [i for i in ids if i not in val_ids]
    streams = [("train", rest, train_chars), ("val", [i for i in ids if i in val_ids], (0.0, 1.0))]
    if val_fraction > 0:
        streams.append(("val", rest, val_chars))
    chunks = []
    for split, members, chars in streams:
        size = max(len(members), 1) if chunk_books is None else chunk_books
        for a in range(0, len(members), size):
            chunks.append(ShardChunk(split, tuple(members[a : a + size]), chars))
    return chunks


def _check_tokenizer(tokenizer_path: str | Path, vocab_size: int) -> Any:
    tok = load_tokenizer(tokenizer_path)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {tok.get_vocab_size()} tokens, more than the "
            f"profile's vocab_size={vocab_size}"
        )
    return tok


def encode_chunk(
    books_parquet: str | Path,
    tokenizer_path: str | Path,
    parts_dir: str | Path,
    key: str,
    chunk: ShardChunk,
    *,
    vocab_size: int,
    batch_chars: int = 4 << 20,
    piece_chars: int = 64 << 10,
    encoder: str = "auto",
) -> dict[str, Any]:
    """Encode one chunk's books into ``parts_dir/<key>.bin`` (raw ids, ``<|endoftext|>`` after
    each book), streaming: one batch of text in memory. Returns (and writes as ``<key>.json``)
    the part's split, token/book/byte counts and the encoder used.

    ``encoder``: ``auto`` encodes with tiktoken when that reproduces the tokenizer exactly
    (:mod:`.fast_bpe`; every batch is spot-checked), else, and with ``tokenizers``, with
    ``Tokenizer.encode_batch``; the ids are the same either way.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"profile `shards.encoder` {encoder!r} is not one of {list(ENCODERS)}")
    tok = _check_tokenizer(tokenizer_path, vocab_size)
    dtype = shard_dtype(vocab_size)
    eot = np.asarray([tok.token_to_id(EOT)], dtype=dtype)
    threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    fast = fast_encoder(tokenizer_path, tok, threads) if encoder == "auto" else None

    def encode(batch: list[str]) -> list[list[int]] | list[Any]:
        if fast is None:
            return [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]
        fast.check(batch[0])
        return fast.encode_batch(batch)

    parts = Path(parts_dir)
    parts.mkdir(parents=True, exist_ok=True)
    path, tmp = parts / f"{key}.bin", parts / f".{key}.bin.tmp"
    tokens = books = nbytes = 0
    texts = iter_book_texts(books_parquet, include=set(chunk.ids), chars=chunk.chars)
    with open(tmp, "wb") as fh:
        for batch, counts, batch_bytes in _batches_by_bytes(texts, batch_chars, piece_chars):
            encodings = iter(encode(batch))
            for n_pieces in counts:  # pieces of one book, in order, then <|endoftext|>
                ids = [np.asarray(next(encodings), dtype=dtype) for _ in range(n_pieces)]
                book = np.concatenate([*ids, eot])
                fh.write(book.tobytes())
                tokens += book.size
            books += len(counts)
            nbytes += batch_bytes
    os.replace(tmp, path)
    result = {"key": key, "split": chunk.split, "tokens": tokens, "books": books,
              "bytes": nbytes, "encoder": encoder_name(fast)}  # fmt: skip
    (parts / f"{key}.json").write_text(json.dumps(result))
    return result


class _blocks:  # noqa: N801 - an array-like view of a part file, read one block at a time
    """A part file as ``len()`` and slices, each slice read from disk (never mapped)."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        self.n = path.stat().st_size // dtype.itemsize

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(self.n)
        return np.fromfile(
            self.path, dtype=self.dtype, count=stop - start, offset=start * self.dtype.itemsize
        )


def merge_parts(
    parts_dir: str | Path,
    parts: list[dict[str, Any]],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    tokens_per_shard: int,
    val_ids: set[int],
    vocab_size: int,
    val_fraction: float = 0.0,
    started: float | None = None,
) -> tuple[dict[str, Any], ShardStats]:
    """The reduce: the parts (in plan order) cut into fixed-size train/val shards + the
    manifest, exactly as one pass over all books would write them. Reads each part in blocks."""
    tok = _check_tokenizer(tokenizer_path, vocab_size)
    dtype = shard_dtype(vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.npy"):
        stale.unlink()
    t0 = time.perf_counter() if started is None else started
    entries: list[dict[str, Any]] = []
    tokens: dict[str, int] = {}
    books: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for split in ("train", "val"):
        mine = [p for p in parts if p["split"] == split]
        files = [Path(parts_dir) / f"{part['key']}.bin" for part in mine]
        split_entries = write_split(
            out_dir,
            split,
            (_blocks(f, dtype) for f in files),
            sum(part["tokens"] for part in mine),
            tokens_per_shard,
            dtype,
        )
        entries.extend(split_entries)
        tokens[split] = sum(e["tokens"] for e in split_entries)
        books[split] = sum(p["books"] for p in mine)
        nbytes[split] = sum(p["bytes"] for p in mine)
    manifest = {
        "format": SHARD_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eot_id": tok.token_to_id(EOT),
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "tokens_per_shard": tokens_per_shard,
        "val_book_ids": sorted(val_ids),
        "val_char_fraction": val_fraction,
        "splits": {s: {"tokens": tokens[s], "bytes": nbytes[s], "books": books[s]} for s in tokens},
        "shards": entries,
    }
    write_manifest(out_dir, manifest)
    used = sorted({p["encoder"] for p in parts}) or ["tokenizers"]
    stats = ShardStats(
        tokens, books, nbytes, len(entries), time.perf_counter() - t0, "+".join(used)
    )
    return manifest, stats


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
    encoder: str = "auto",
    chunk_books: int | None = None,
) -> tuple[dict[str, Any], ShardStats]:
    """Encode every book into train/val shards under ``out_dir`` and write ``manifest.json``.

    ``vocab_size`` is the profile's; a tokenizer that disagrees is an error here rather than an
    out-of-range embedding index later. ``val_fraction`` > 0 also holds out the last fraction of
    every other book's characters (:func:`char_split`). Plan, encode each chunk
    (:func:`encode_chunk`), merge (:func:`merge_parts`), all in this process; the asset runs the
    same functions as separate steps. The shards do not depend on ``chunk_books``.
    """
    t0 = time.perf_counter()
    _check_tokenizer(tokenizer_path, vocab_size)
    parts_dir = Path(out_dir) / f".parts.{os.getpid()}"
    try:
        parts = [
            encode_chunk(
                books_parquet,
                tokenizer_path,
                parts_dir,
                f"part_{k:05d}",
                chunk,
                vocab_size=vocab_size,
                batch_chars=batch_chars,
                piece_chars=piece_chars,
                encoder=encoder,
            )
            for k, chunk in enumerate(
                plan_shard_chunks(
                    books_parquet,
                    val_ids=val_ids,
                    val_fraction=val_fraction,
                    chunk_books=chunk_books,
                )  # fmt: skip
            )
        ]
        return merge_parts(
            parts_dir,
            parts,
            tokenizer_path,
            out_dir,
            tokens_per_shard=tokens_per_shard,
            val_ids=val_ids,
            vocab_size=vocab_size,
            val_fraction=val_fraction,
            started=t0,
        )
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
