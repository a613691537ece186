"""Parquet I/O of the cleaning stage: the books schema, candidate files, the exact verifier, the
final streaming copy.

Apart from :mod:`.clean` so the fan-out steps (:mod:`.clean_chunks`) and the in-process
:func:`.clean.clean_books` share one implementation of each file format.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.text.clean_worker import BookOutcome
from pipeline.text.dedup import Similarity, exact_similarity, shingle_hashes

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
DEFAULT_SOURCE = "gutenberg"
# Candidates (temp files): uncompressed, a few books per row group, so re-reading one book to
# verify a near-duplicate pair is cheap. books.parquet: zstd, row groups of up to 256 books or
# 64 MB of text, cut at exact book counts so the layout does not depend on how the books were
# split into chunks.
CANDIDATE_GROUP_BOOKS = 4
CANDIDATE_GROUP_BYTES = 8 << 20
ROW_GROUP_BOOKS = 256
ROW_GROUP_BYTES = 64 << 20
COMPRESSION = "zstd"


# Arrow arrays are assembled from buffers: ``pa.array`` on Python objects converts ``str`` at
# ~60 MB/s and imports pandas on first use (0.3 s), both larger than the rest of the write.
def int64_array(values: Sequence[int]) -> pa.Array:
    return pa.Array.from_buffers(
        pa.int64(), len(values), [None, pa.py_buffer(np.asarray(values, dtype=np.int64))]
    )


def bool_array(values: Sequence[bool]) -> pa.Array:
    bits = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])


def string_array(values: Sequence[str | bytes | None]) -> pa.Array:
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


def parquet_writer(path: Path, compression: str = COMPRESSION) -> pq.ParquetWriter:
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


class CandidateWriter:
    """Streams kept texts to a parquet file in small row groups; remembers where each id is.

    Texts arrive as UTF-8 bytes and go into the Arrow string column without a conversion.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = parquet_writer(path, compression="none")
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
            int64_array(col) if field.type == pa.int64() else string_array(col)
            for field, col in zip(BOOKS_SCHEMA, columns, strict=True)
        ]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=BOOKS_SCHEMA))
        self.groups += 1
        self._rows, self._bytes = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.close()


class ExactVerifier:
    """``verify(id_a, id_b)`` for dedup: exact shingle sets recomputed from the candidate files.

    ``location``: id -> (index into ``paths``, row group, row). Holds a handful of shingle
    arrays (LRU), never the corpus.
    """

    def __init__(
        self, paths: Sequence[Path], location: dict[int, tuple[int, int, int]], cache: int = 6
    ) -> None:
        self._paths = list(paths)
        self._files: dict[int, pq.ParquetFile] = {}
        self._location = location
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._size = cache
        self.calls = 0

    def _shingles(self, book_id: int) -> np.ndarray:
        if book_id in self._cache:
            self._cache.move_to_end(book_id)
            return self._cache[book_id]
        f, group, row = self._location[book_id]
        if f not in self._files:
            self._files[f] = pq.ParquetFile(self._paths[f])
        text = self._files[f].read_row_group(group, columns=["text"]).column(0)[row].as_py()
        shingles = shingle_hashes(text)
        self._cache[book_id] = shingles
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return shingles

    def __call__(self, a: int, b: int) -> Similarity:
        self.calls += 1
        return exact_similarity(self._shingles(a), self._shingles(b))

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def copy_without(sources: Sequence[Path], dst: Path, drop: set[int]) -> None:
    """Stream the candidate files ``sources`` (in order) into ``dst`` without the ``drop`` ids,
    compressing and coalescing the small candidate row groups into row groups of exactly
    ``ROW_GROUP_BOOKS`` books, or fewer where ``ROW_GROUP_BYTES`` of text is reached first; at
    most one output row group (plus one candidate group) is held in memory."""
    pending: list[pa.Table] = []
    rows = size = 0
    with parquet_writer(dst) as writer:
        for src in sources:
            reader = pq.ParquetFile(src)
            for g in range(reader.num_row_groups):
                table = reader.read_row_group(g)
                if drop:
                    keep = [i not in drop for i in table.column("id").to_pylist()]
                    table = table.filter(bool_array(keep))
                sizes = pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False)
                start = 0
                for i, n in enumerate(sizes):  # cut at the book that fills a group
                    rows, size = rows + 1, size + int(n)
                    if rows >= ROW_GROUP_BOOKS or size >= ROW_GROUP_BYTES:
                        pending.append(table.slice(start, i + 1 - start))
                        writer.write_table(pa.concat_tables(pending), row_group_size=rows)
                        pending, rows, size, start = [], 0, 0, i + 1
                if start < table.num_rows:
                    pending.append(table.slice(start))
            reader.close()
        if rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=rows)
