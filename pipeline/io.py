"""Small file helpers every asset shares: atomic writes, hashing, sizes and data versions.

Atomic means: write a temp file in the destination folder, flush and fsync it, then ``os.replace``
it over the target, so a reader (or a rerun after a kill) sees the old file or the new one, never
half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

# One implementation, shared with llm_core (it also fsyncs the directory); re-exported here.
from llm_core.data import atomic_write_bytes  # noqa: F401
from llm_core.data.shards import fsync_dir


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(df: pl.DataFrame, path: str | Path) -> None:
    """Parquet through a temp file that is fsynced before the rename (and the folder after it),
    so a power cut leaves the old file or the complete new one, never an empty or torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            df.write_parquet(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def version_hash(*parts: Any) -> str:
    """A short, stable hash of configs and upstream versions: an asset's data version."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def files_hash(paths: Iterable[str | Path]) -> str:
    """Content hash over several files (name + sha256 each), in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:16]
