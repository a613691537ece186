"""Downloads against hostile servers on loopback (SECURITY.md items 4, 5 and 6).

Each server here misbehaves on purpose: an endless body, a one-byte drip, a gzip bomb, a redirect
to another service, a body that ends early without a length, a Hub endpoint that collects tokens.
The client must stop at its cap or deadline, refuse the redirect, mark the book unverified and
keep the token to itself; each test fails against the client as it was before these limits.
"""

from __future__ import annotations

import contextlib
import gzip
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.sources import gutenberg as pg
from pipeline.sources.http import (
    DEFAULT_MAX_BYTES,
    DownloadFailed,
    PoliteClient,
    RedirectRefused,
    TooLarge,
    same_site,
)
from pipeline.sources.hub import download_dataset_files, token_allowed
from pipeline.text.adapters.registry import SftSource

Handler = Callable[[BaseHTTPRequestHandler], None]


class HostileServer:
    """A loopback HTTP server whose every GET is answered by ``handler``; records requests."""

    def __init__(self, handler: Handler) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stopping = threading.Event()
        outer = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.requests.append((self.path, dict(self.headers)))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    handler(self)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fast() -> Iterator[Callable[..., PoliteClient]]:
    clients: list[PoliteClient] = []

    def make(**kw: object) -> PoliteClient:
        args: dict[str, object] = {"requests_per_second": 0, "max_retries": 0, "timeout_s": 3.0}
        client = PoliteClient(**{**args, **kw})  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def _no_files(directory: Path) -> bool:
    return not directory.exists() or not any(directory.iterdir())


# ---------------------------------------------------------------------------------- item 4
def test_endless_chunked_body_stops_at_the_byte_cap(fast, tmp_path: Path) -> None:
    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        block = b"x" * 65536
        frame = b"%x\r\n%s\r\n" % (len(block), block)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # ~ unbounded for the client
            h.wfile.write(frame)

    with HostileServer(endless) as server:
        start = time.monotonic()
        with pytest.raises(TooLarge, match="cap of 1048576"):
            fast(max_bytes=1 << 20).download(f"{server.url}/big.txt", tmp_path / "d" / "b.txt")
        assert time.monotonic() - start < 5
    assert _no_files(tmp_path / "d")  # no final file, no temp file
    assert DEFAULT_MAX_BYTES >= 256 << 20  # the default stays far above any real book


def test_one_byte_drip_hits_the_total_deadline(fast, tmp_path: Path) -> None:
    def drip(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for _ in range(60):  # 6 s of drip, each read well inside timeout_s
            if server.stopping.wait(0.1):
                return
            h.wfile.write(b"x")
            h.wfile.flush()

    with HostileServer(drip) as server:
        start = time.monotonic()
        with pytest.raises(DownloadFailed, match="deadline"):
            fast(timeout_s=3.0, deadline_s=1.0).download(f"{server.url}/b.txt", tmp_path / "b.txt")
        assert time.monotonic() - start < 3.0
    assert _no_files(tmp_path)


def test_gzip_bomb_is_counted_decompressed(fast, tmp_path: Path) -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    assert len(bomb) < 200_000

    def gz(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(bomb)))
        h.end_headers()
        h.wfile.write(bomb)

    with HostileServer(gz) as server, pytest.raises(TooLarge, match="decoded"):
        fast(max_bytes=4 << 20).download(f"{server.url}/b.txt", tmp_path / "b.txt")
    assert _no_files(tmp_path)


def test_catalog_gzip_bomb_is_refused_bounded(tmp_path: Path) -> None:
    header = b"Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves\n"
    bomb = gzip.compress(header + b"1,Text,2000,a,en,b,c,d,e\n" * (2 << 20), compresslevel=9)
    with pytest.raises(pg.CatalogFormatError, match="more than 1048576 bytes"):
        pg.parse_catalog(bomb, max_bytes=1 << 20)
    path = tmp_path / "pg_catalog.csv"
    path.write_bytes(bomb)
    with pytest.raises(pg.CatalogFormatError, match="refused"):
        pg.parse_catalog(path, max_bytes=1 << 20)
    assert pg.MAX_CATALOG_BYTES < 1 << 30  # the 1 GB bomb of the report is refused by default
    small = gzip.compress(header + b"1,Text,2000,a,en,b,c,d,e\n")
    assert pg.parse_catalog(small)["id"].to_list() == [1]


def test_redirect_to_another_service_is_refused_unless_allowed(fast, tmp_path: Path) -> None:
    def target(h: BaseHTTPRequestHandler) -> None:
        body = b"secret internal page"
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    with HostileServer(target) as inner:

        def redirect(h: BaseHTTPRequestHandler) -> None:
            where = f"{inner.url}/admin" if h.path == "/away" else "/b.txt"
            if h.path == "/b.txt":
                return target(h)
            h.send_response(302)
            h.send_header("Location", where)
            h.send_header("Content-Length", "0")
            h.end_headers()

        with HostileServer(redirect) as outer:
            with pytest.raises(RedirectRefused, match="another site"):
                fast().download(f"{outer.url}/away", tmp_path / "a.txt")
            assert inner.requests == []  # never contacted
            # A redirect within the same site is followed.
            assert fast().download(f"{outer.url}/here", tmp_path / "h.txt").bytes == 20
            # An explicitly allowed host is followed.
            port = inner.url.rsplit(":", 1)[1]
            allowed = fast(allowed_redirect_hosts=[f"127.0.0.1:{port}"])
            assert allowed.download(f"{outer.url}/away", tmp_path / "a.txt").bytes == 20
    assert same_site("https://www.gutenberg.org/x", "https://aleph.gutenberg.org/y")
    assert not same_site("https://www.gutenberg.org/x", "https://evil.example/y")
    with pytest.raises(RedirectRefused, match="https to"):
        fast().check_redirect("u", "https://www.gutenberg.org/a", "http://www.gutenberg.org/b")


# ---------------------------------------------------------------------------------- item 5
def test_body_without_length_cut_early_is_unverified(tmp_path: Path) -> None:
    whole = (
        b"The Project Gutenberg eBook\n\nText.\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
    )

    def no_length(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")  # body delimited by the close: no length at all
        h.end_headers()
        h.wfile.write(whole if "/1/" in h.path else whole[:30])  # book 2 is cut short
        h.close_connection = True

    with HostileServer(no_length) as server:
        manifest = pg.download_books(
            [1, 2], server.url, tmp_path / "books", requests_per_second=0, max_retries=0
        )
    status = dict(zip(manifest["id"].to_list(), manifest["status"].to_list(), strict=True))
    assert status == {1: "ok", 2: "unverified"}
    assert "end marker" in manifest.filter(manifest["id"] == 2)["error"][0]
    # An unverified row is not reused: the next run requests the book again.
    assert pg._previous_ok_rows(manifest).keys() == {1}


# ---------------------------------------------------------------------------------- item 6
def _hub_404(h: BaseHTTPRequestHandler) -> None:
    body = b'{"error": "no"}'
    h.send_response(404)
    h.send_header("Content-Type", "application/json")
    h.send_header("X-Error-Code", "RepoNotFound")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _auth_headers(server: HostileServer) -> list[str]:
    return [v for _, hs in server.requests for k, v in hs.items() if k.lower() == "authorization"]


def test_hf_token_is_not_sent_to_a_plain_http_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    monkeypatch.delenv("SCRIPTORIUM_HF_TOKEN_HOSTS", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with HostileServer(_hub_404) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(Exception):  # noqa: B017 (the Hub's own not-found error)
            download_dataset_files("org/data", "main", ["*.json"], tmp_path / "c")
        # The Dagster sensor's revision lookup goes through the same rule.
        from pipeline.automation import source_revision

        with pytest.raises(Exception):  # noqa: B017
            source_revision(SftSource("s", "alpaca", "CC0", repo="org/data", revision="main"))
        assert len(server.requests) >= 2 and _auth_headers(server) == []
        # Listed explicitly, the same endpoint does get it (the test can see a sent token).
        monkeypatch.setenv("SCRIPTORIUM_HF_TOKEN_HOSTS", "127.0.0.1")
        with pytest.raises(Exception):  # noqa: B017
            source_revision(SftSource("s", "alpaca", "CC0", repo="org/data", revision="main"))
        assert _auth_headers(server) == ["Bearer hf_secret_token_value"]
    monkeypatch.delenv("SCRIPTORIUM_HF_TOKEN_HOSTS")
    assert token_allowed(None) and token_allowed("https://hub.example.org")
    assert not token_allowed("https://127.0.0.1:8443") and not token_allowed("http://hub.example")
