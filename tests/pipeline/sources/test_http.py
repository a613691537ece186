"""PoliteClient against a real MirrorServer with injected faults (no HTTP mocks)."""

from __future__ import annotations

import email.utils
import hashlib
import re
import threading
import time
from pathlib import Path

import pytest

from pipeline.sources.http import (
    DownloadFailed,
    NotFound,
    PoliteClient,
    TokenBucket,
    atomic_write_bytes,
    parse_retry_after,
    remove_stale_temp_files,
    sha256_file,
)
from pipeline.sources.mirror import Fault, MirrorServer, Route
from tests.pipeline.sources.conftest import book_path, fixture_book_bytes

BOOK = 1001


def _get_count(server: MirrorServer, path: str) -> int:
    return server.faults.requested_paths().count(path)


def test_token_bucket_limits_rate_across_threads() -> None:
    bucket = TokenBucket(rate=20.0)
    start = time.monotonic()
    threads = [
        threading.Thread(target=lambda: [bucket.acquire() for _ in range(3)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 12 tokens at 20/s with a burst of 1: the last waits ~11/20 s.
    assert 0.5 <= time.monotonic() - start < 3.0


def test_token_bucket_disabled_when_rate_is_zero() -> None:
    bucket = TokenBucket(rate=0)
    assert all(bucket.acquire() == 0.0 for _ in range(100))


def test_backoff_is_exponential_jittered_and_capped() -> None:
    client = PoliteClient(backoff_s=1.0, max_backoff_s=8.0, seed=1)
    for attempt, step in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = {client.backoff_delay(attempt) for _ in range(20)}
        assert all(step / 2 <= d <= step for d in delays)
        assert len(delays) > 1  # jitter
    assert client.backoff_delay(1, retry_after=5.0) == 5.0  # Retry-After wins when longer
    assert client.backoff_delay(1, retry_after=500.0) == 8.0  # but is capped


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (parse_retry_after(future) or 0) <= 30
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_download_ok_identifies_itself(
    mirror: MirrorServer, client: PoliteClient, tmp_path: Path
) -> None:
    dest = tmp_path / "sub" / "book.txt"
    result = client.download(f"{mirror.url}{book_path(BOOK)}", dest)
    expected = fixture_book_bytes(BOOK)
    assert dest.read_bytes() == expected
    assert (result.bytes, result.sha256, result.attempts) == (
        len(expected),
        hashlib.sha256(expected).hexdigest(),
        1,
    )
    agent = mirror.faults.log[-1].user_agent or ""
    assert "Scriptorium" in agent and re.search(r"\+https?://", agent)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["book.txt"]


@pytest.mark.parametrize(
    "fault",
    [
        Fault("500"),
        Fault("503"),
        Fault("429"),
        Fault("reset"),
        Fault("truncate"),
        Fault("truncate", fraction=0.0),
    ],
    ids=["500", "503", "429", "reset", "truncate", "truncate-empty"],
)
def test_transient_fault_is_retried(
    mirror: MirrorServer, client: PoliteClient, tmp_path: Path, fault: Fault
) -> None:
    mirror.faults.add(book_path(BOOK), fault)
    result = client.download(f"{mirror.url}{book_path(BOOK)}", tmp_path / "b.txt")
    assert result.attempts == 2
    assert (tmp_path / "b.txt").read_bytes() == fixture_book_bytes(BOOK)
    assert mirror.faults.pending() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]


def test_stall_times_out_then_succeeds(mirror: MirrorServer, tmp_path: Path) -> None:
    mirror.faults.add(book_path(BOOK), Fault("stall", seconds=1.5))
    with PoliteClient(requests_per_second=0, max_retries=2, timeout_s=0.5, backoff_s=0.01) as fast:
        start = time.monotonic()
        result = fast.download(f"{mirror.url}{book_path(BOOK)}", tmp_path / "b.txt")
    assert result.attempts == 2
    assert time.monotonic() - start < 1.5  # gave up on the stalled request instead of waiting
    assert (tmp_path / "b.txt").read_bytes() == fixture_book_bytes(BOOK)


def test_slow_body_within_timeout_is_fine(
    mirror: MirrorServer, client: PoliteClient, tmp_path: Path
) -> None:
    mirror.faults.add(book_path(BOOK), Fault("drip", seconds=0.2))
    result = client.download(f"{mirror.url}{book_path(BOOK)}", tmp_path / "b.txt")
    assert result.attempts == 1
    assert (tmp_path / "b.txt").read_bytes() == fixture_book_bytes(BOOK)


def test_retry_after_is_honoured(mirror: MirrorServer, tmp_path: Path) -> None:
    mirror.faults.add(book_path(BOOK), Fault("429", retry_after=1))
    start = time.monotonic()
    with PoliteClient(requests_per_second=0, backoff_s=0.01, max_backoff_s=5.0) as polite:
        result = polite.download(f"{mirror.url}{book_path(BOOK)}", tmp_path / "b.txt")
    assert result.attempts == 2
    assert time.monotonic() - start >= 1.0  # waited for Retry-After, not the 10 ms backoff


def test_404_is_not_retried(mirror: MirrorServer, client: PoliteClient, tmp_path: Path) -> None:
    url = f"{mirror.url}{book_path(1006)}"
    with pytest.raises(NotFound, match=re.escape(url)) as info:
        client.download(url, tmp_path / "1006.txt")
    assert info.value.attempts == 1
    assert _get_count(mirror, book_path(1006)) == 1
    assert list(tmp_path.iterdir()) == []


def test_injected_404_on_existing_path(
    mirror: MirrorServer, client: PoliteClient, tmp_path: Path
) -> None:
    mirror.faults.add(book_path(BOOK), "404")
    with pytest.raises(NotFound):
        client.download(f"{mirror.url}{book_path(BOOK)}", tmp_path / "b.txt")
    assert _get_count(mirror, book_path(BOOK)) == 1


def test_retries_are_bounded_and_failure_names_url(
    mirror: MirrorServer, client: PoliteClient, tmp_path: Path
) -> None:
    url = f"{mirror.url}{book_path(BOOK)}"
    mirror.faults.add(book_path(BOOK), *["truncate"] * 5)
    dest = tmp_path / "b.txt"
    dest.write_bytes(b"previous good copy")
    with pytest.raises(DownloadFailed, match="truncated") as info:
        client.download(url, dest)
    assert url in str(info.value)
    assert info.value.attempts == 3  # max_retries=2 -> 3 attempts
    assert _get_count(mirror, book_path(BOOK)) == 3
    assert dest.read_bytes() == b"previous good copy"  # a failed download never clobbers
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]  # and leaves no temp file


def test_non_retryable_status_fails_fast(
    fixture_root: Path, client: PoliteClient, tmp_path: Path
) -> None:
    forbidden = Route(
        "forbidden", re.compile(r"^/private/"), lambda req, match: req.send_text(403, "no\n")
    )
    with MirrorServer(fixture_root, routes=[forbidden]) as server:
        with pytest.raises(DownloadFailed, match="HTTP 403") as info:
            client.download(f"{server.url}/private/x.txt", tmp_path / "x.txt")
        assert info.value.attempts == 1
        assert server.faults.requested_paths() == ["/private/x.txt"]


def test_connection_refused_is_retried_then_fails(tmp_path: Path) -> None:
    with MirrorServer(tmp_path) as server:
        url = f"{server.url}/x.txt"
    with (
        PoliteClient(requests_per_second=0, max_retries=1, timeout_s=1, backoff_s=0.01) as fast,
        pytest.raises(DownloadFailed, match="connection error") as info,
    ):
        fast.download(url, tmp_path / "x.txt")
    assert info.value.attempts == 2


def test_invalid_url_is_not_retried(client: PoliteClient, tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed, match="invalid URL") as info:
        client.download("ftp://example.invalid/x.txt", tmp_path / "x.txt")
    assert info.value.attempts == 1


def test_atomic_helpers(tmp_path: Path) -> None:
    target = tmp_path / "m.parquet"
    atomic_write_bytes(target, b"abc")
    atomic_write_bytes(target, b"abcd")
    assert target.read_bytes() == b"abcd"
    assert sha256_file(target) == hashlib.sha256(b"abcd").hexdigest()
    (tmp_path / ".m.parquet.x1y2.part").write_bytes(b"partial")
    (tmp_path / ".84.txt.k_9z.part").write_bytes(b"another writer's")
    assert remove_stale_temp_files(tmp_path, {"m.parquet", "85.txt"}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".84.txt.k_9z.part", "m.parquet"]
    assert remove_stale_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]
