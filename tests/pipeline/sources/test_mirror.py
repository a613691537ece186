"""MirrorServer HTTP semantics, fault injection and the ``scriptorium mirror`` CLI."""

from __future__ import annotations

import email.utils
import http.client
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from pipeline.sources.mirror import (
    Fault,
    MirrorServer,
    RangeNotSatisfiable,
    Route,
    parse_byte_range,
    wait_until_up,
)
from tests.pipeline.sources.conftest import book_path, fixture_book_bytes

REPO = Path(__file__).resolve().parents[3]
SCRIPTORIUM = REPO / ".venv" / "bin" / "scriptorium"
BOOK = 1002


def _raw_get(url: str, path: str) -> tuple[int, bytes]:
    """A request with the path sent verbatim (requests would normalise ``..``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_serves_book_with_headers(mirror: MirrorServer) -> None:
    response = requests.get(f"{mirror.url}{book_path(BOOK)}", timeout=5)
    body = fixture_book_bytes(BOOK)
    assert response.status_code == 200
    assert response.content == body
    assert response.headers["Content-Length"] == str(len(body))
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.headers["Accept-Ranges"] == "bytes"
    assert email.utils.parsedate_to_datetime(response.headers["Last-Modified"])
    etag = response.headers["ETag"]
    again = requests.get(
        f"{mirror.url}{book_path(BOOK)}", headers={"If-None-Match": etag}, timeout=5
    )
    assert again.status_code == 304 and again.content == b""


def test_head_has_headers_and_no_body(mirror: MirrorServer) -> None:
    response = requests.head(f"{mirror.url}{book_path(BOOK)}", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(fixture_book_bytes(BOOK)))
    assert response.content == b""


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=10-", 10, None),
        ("bytes=-5", -5, None),
        ("bytes=3-100000", 3, None),
    ],
)
def test_range_requests(mirror: MirrorServer, header: str, start: int, end: int | None) -> None:
    body = fixture_book_bytes(BOOK)
    expected = body[start : end + 1] if end is not None else body[start:]
    response = requests.get(f"{mirror.url}{book_path(BOOK)}", headers={"Range": header}, timeout=5)
    assert response.status_code == 206
    assert response.content == expected
    first = start % len(body)
    assert (
        response.headers["Content-Range"]
        == f"bytes {first}-{first + len(expected) - 1}/{len(body)}"
    )


def test_unsatisfiable_range_is_416(mirror: MirrorServer) -> None:
    size = len(fixture_book_bytes(BOOK))
    response = requests.get(
        f"{mirror.url}{book_path(BOOK)}", headers={"Range": f"bytes={size}-"}, timeout=5
    )
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{size}"


def test_parse_byte_range_edge_cases() -> None:
    assert parse_byte_range(None, 10) is None
    assert parse_byte_range("bytes=0-1,4-5", 10) is None  # multi-range: whole file
    assert parse_byte_range("items=0-1", 10) is None
    assert parse_byte_range("bytes=5-2", 10) is None
    assert parse_byte_range("bytes=-20", 10) == (0, 9)
    for bad in ("bytes=10-", "bytes=-0", "bytes=10-20"):
        with pytest.raises(RangeNotSatisfiable):
            parse_byte_range(bad, 10)


def test_catalog_and_files_routes(mirror: MirrorServer, fixture_root: Path) -> None:
    feeds = fixture_root / "gutenberg" / "cache" / "epub" / "feeds"
    csv_response = requests.get(f"{mirror.url}/cache/epub/feeds/pg_catalog.csv", timeout=5)
    assert csv_response.content == (feeds / "pg_catalog.csv").read_bytes()
    assert csv_response.headers["Content-Type"].startswith("text/csv")
    gz_response = requests.get(f"{mirror.url}/cache/epub/feeds/pg_catalog.csv.gz", timeout=5)
    assert gz_response.content == (feeds / "pg_catalog.csv.gz").read_bytes()  # not decoded
    assert gz_response.headers["Content-Type"] == "application/gzip"
    plain = requests.get(f"{mirror.url}/files/example.org/data/hello.json", timeout=5)
    assert plain.json() == {"greeting": "hello from the plain-URL mirror"}


@pytest.mark.parametrize(
    "path",
    [
        "/cache/epub/9999/pg9999.txt",
        "/cache/epub/1001",
        "/cache/epub/1001/",
        "/files/nowhere.org/x",
    ],
)
def test_unknown_paths_are_404(mirror: MirrorServer, path: str) -> None:
    assert requests.get(f"{mirror.url}{path}", timeout=5).status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/cache/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/cache/epub/..%2f..%2f..%2fsecret.txt",
        "/files/..%2fsecret.txt",
        "/files/../../secret.txt",
        "//etc/passwd",
    ],
)
def test_path_traversal_is_refused(tmp_path: Path, path: str) -> None:
    (tmp_path / "secret.txt").write_text("top secret")
    (tmp_path / "gutenberg").mkdir()
    (tmp_path / "files").mkdir()
    with MirrorServer(tmp_path) as server:
        status, body = _raw_get(server.url, path)
    assert status == 404
    assert b"secret" not in body


def test_fault_plan_kinds_and_request_log(mirror: MirrorServer) -> None:
    url = f"{mirror.url}{book_path(BOOK)}"
    mirror.faults.add(
        book_path(BOOK), "500", Fault("503", retry_after=7), "404", "reset", "truncate"
    )
    assert requests.get(url, timeout=5).status_code == 500
    response = requests.get(url, timeout=5)
    assert (response.status_code, response.headers["Retry-After"]) == (503, "7")
    assert requests.get(url, timeout=5).status_code == 404
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url, timeout=5)
    assert requests.get(url, timeout=5).content == fixture_book_bytes(BOOK)
    assert mirror.faults.pending() == 0
    log = [(r.path, r.status, r.fault) for r in mirror.faults.log]
    assert log == [
        (book_path(BOOK), 500, "500"),
        (book_path(BOOK), 503, "503"),
        (book_path(BOOK), 404, "404"),
        (book_path(BOOK), None, "reset"),
        (book_path(BOOK), 200, "truncate"),
        (book_path(BOOK), 200, None),
    ]


def test_stall_delays_response(mirror: MirrorServer) -> None:
    mirror.faults.add(book_path(BOOK), Fault("stall", seconds=0.4))
    start = time.monotonic()
    assert requests.get(f"{mirror.url}{book_path(BOOK)}", timeout=5).status_code == 200
    assert time.monotonic() - start >= 0.4


def test_unknown_fault_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("teapot")


def test_routes_are_extensible(fixture_root: Path) -> None:
    api = Route(
        "api",
        re.compile(r"^/api/datasets/(?P<org>[^/]+)/(?P<name>[^/]+)$"),
        lambda req, m: req.send_json({"id": f"{m['org']}/{m['name']}", "q": req.query}),
        methods=frozenset({"GET"}),
    )
    with MirrorServer(fixture_root) as server:
        server.add_route(api)
        response = requests.get(f"{server.url}/api/datasets/acme/data?rev=main", timeout=5)
        assert response.json() == {"id": "acme/data", "q": {"rev": ["main"]}}
        assert requests.head(f"{server.url}/api/datasets/acme/data", timeout=5).status_code == 405
        assert requests.get(f"{server.url}{book_path(BOOK)}", timeout=5).status_code == 200


def test_wait_until_up(mirror: MirrorServer, tmp_path: Path) -> None:
    wait_until_up(mirror.url, timeout=2)
    with MirrorServer(tmp_path) as stopped:
        url = stopped.url
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=re.escape(url)):
        wait_until_up(url, timeout=0.3)
    assert time.monotonic() - start < 3


def _scriptorium(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTORIUM), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.mirror
def test_cli_serves_the_real_mirror(mirror_dir: Path) -> None:
    if not SCRIPTORIUM.exists():
        pytest.skip("scriptorium console script not installed (pip install -e .)")
    command = [str(SCRIPTORIUM), "mirror", "serve", str(mirror_dir), "--port", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            assert match, f"no URL in the server's first line {line!r}"
            url, port = match[0], match[1]
            assert _scriptorium("mirror", "wait", "--port", port, "--timeout", "10").returncode == 0
            book = mirror_dir / "gutenberg" / "cache" / "epub" / "4" / "pg4.txt"
            response = requests.get(f"{url}/cache/epub/4/pg4.txt", timeout=5)
            assert response.content == book.read_bytes()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_cli_wait_times_out_and_serve_rejects_missing_dir(tmp_path: Path) -> None:
    with MirrorServer(tmp_path) as stopped:
        port = str(urlsplit(stopped.url).port)
    from pipeline.cli import main

    assert main(["mirror", "wait", "--port", port, "--timeout", "0.3"]) == 1
    assert main(["mirror", "serve", str(tmp_path / "absent"), "--port", "0"]) == 2
    with MirrorServer(tmp_path) as busy:
        busy_port = str(urlsplit(busy.url).port)
        assert main(["mirror", "serve", str(tmp_path), "--port", busy_port]) == 1


def test_cli_help_lists_mirror() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0 and "mirror" in result.stdout
