"""Shared fixtures. Tests that need the real data mirror skip cleanly where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mirror_dir() -> Path:
    env = os.environ.get("SCRIPTORIUM_TEST_MIRROR")
    return Path(env) if env else REPO.parent / "shared" / "mirror"


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    """``../shared/mirror`` (or ``$SCRIPTORIUM_TEST_MIRROR``); skips the test where it is absent."""
    path = _mirror_dir()
    if not (path / "gutenberg" / "cache" / "epub" / "feeds" / "pg_catalog.csv").exists():
        pytest.skip(f"data mirror not found at {path} (set SCRIPTORIUM_TEST_MIRROR)")
    return path
