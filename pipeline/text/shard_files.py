"""The sharding reduce's writer: part files -> fixed-size ``.npy`` shards, streamed.

``llm_core.data.shards.ShardWriter`` buffers a whole shard and concatenates it before
``np.save`` (twice the shard in memory: 400 MB at gpt2-124m's 100 M-token shards). The merge
knows every shard's length in advance (the parts' token counts are known), so it writes the
``.npy`` header first and then streams blocks of the parts through, hashing (SHA-256, CRC-32) on
the way: one block in memory. The files and manifest entries are byte for byte what
``ShardWriter`` writes for the same tokens (a test compares them); the same temp-name, fsync and
``os.replace`` discipline keeps a reader from seeing half a shard.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from llm_core.data.shards import fsync_dir

BLOCK_TOKENS = 16 << 20


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    """What ``np.save`` writes before the data of a 1-D ``dtype`` array of ``n`` items."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def write_split(
    out_dir: Path,
    split: str,
    sources: Iterable[np.ndarray],
    total: int,
    tokens_per_shard: int,
    dtype: np.dtype,
) -> list[dict[str, Any]]:
    """Write the ``total`` tokens of ``sources`` (arrays of ``dtype``, in order) as
    ``{split}_NNNNN.npy`` shards of ``tokens_per_shard`` (the last one shorter); returns the
    manifest entries (file, split, tokens, sha256, crc32)."""
    if tokens_per_shard <= 0:
        raise ValueError(f"tokens_per_shard must be positive, got {tokens_per_shard}")
    entries: list[dict[str, Any]] = []
    blocks = (
        src[a : a + BLOCK_TOKENS] for src in sources for a in range(0, len(src), BLOCK_TOKENS)
    )
    pending = np.empty(0, dtype=dtype)
    written = 0
    while written < total:
        n = min(tokens_per_shard, total - written)
        name = f"{split}_{len(entries):05d}.npy"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
        sha, crc, left = hashlib.sha256(), 0, n
        try:
            with os.fdopen(fd, "wb") as fh:
                for data in [_npy_header(dtype, n)]:
                    fh.write(data)
                    sha.update(data)
                    crc = zlib.crc32(data, crc)
                while left:
                    if not len(pending):
                        pending = np.ascontiguousarray(next(blocks), dtype=dtype)
                    take, pending = pending[:left], pending[left:]
                    data = take.tobytes()
                    fh.write(data)
                    sha.update(data)
                    crc = zlib.crc32(data, crc)
                    left -= len(take)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out_dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(out_dir)
        entries.append(
            {"file": name, "split": split, "tokens": n, "sha256": sha.hexdigest(), "crc32": crc}
        )
        written += n
    return entries
