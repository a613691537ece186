"""Fixtures for the download-side tests: a real MirrorServer on loopback over tests/fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.sources.http import PoliteClient
from pipeline.sources.mirror import MirrorServer

FIXTURE_ROOT = Path(__file__).resolve().parents[2] / "fixtures"
FIXTURE_BOOK_IDS = [1001, 1002, 1003, 1004, 1007, 1008]


def fixture_book_bytes(book_id: int) -> bytes:
    """The exact bytes the fixture mirror serves for ``book_id``."""
    return (
        FIXTURE_ROOT / "gutenberg" / "cache" / "epub" / str(book_id) / f"pg{book_id}.txt"
    ).read_bytes()


def book_path(book_id: int) -> str:
    """URL path of a book on a gutenberg.org-layout server (the FaultPlan key)."""
    return f"/cache/epub/{book_id}/pg{book_id}.txt"


@pytest.fixture
def fixture_root() -> Path:
    """Mirror root holding ``gutenberg/`` and ``files/`` in the upstream layouts."""
    return FIXTURE_ROOT


@pytest.fixture
def mirror(fixture_root: Path) -> Iterator[MirrorServer]:
    """A fresh server (empty FaultPlan and request log) per test."""
    with MirrorServer(fixture_root) as server:
        yield server


@pytest.fixture
def fast_download() -> dict[str, Any]:
    """download_books keyword arguments with test-sized timeouts and backoffs."""
    return {
        "concurrency": 2,
        "requests_per_second": 0,
        "max_retries": 2,
        "timeout_s": 5.0,
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
    }


@pytest.fixture
def client() -> Iterator[PoliteClient]:
    """A client with tiny backoffs; tests needing short timeouts build their own."""
    with PoliteClient(
        requests_per_second=0, max_retries=2, timeout_s=5.0, backoff_s=0.01, max_backoff_s=0.05
    ) as http:
        yield http
