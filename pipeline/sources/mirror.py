"""The project's mirror server: serves a local data mirror over loopback HTTP in upstream URL layouts.

The download code is only trustworthy if it runs unchanged against something that behaves like
the real sites, including their failures. This server serves ``root/gutenberg/<path>`` at
``/<path>`` (gutenberg.org's layout), ``root/files/<host>/<path>`` at ``/files/<host>/<path>``
and, when ``root/hf/datasets`` exists, the Hugging Face Hub API
(:mod:`pipeline.sources.hub_mirror`), with the HTTP details clients rely on (Content-Length, ETag, Last-Modified, HEAD, Range), and a
:class:`FaultPlan` that injects 5xx/429/404 answers, connection resets, truncated bodies and stalls
per URL path, logging every request so tests can assert what was (not) fetched.

Routing is a table of :class:`Route` objects tried in order; more sites (e.g. a test's own fake
API) are added by passing ``routes=`` or calling :meth:`MirrorServer.add_route`, which puts them
ahead of the catch-all Gutenberg route.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

import requests

log = logging.getLogger(__name__)

FAULT_KINDS = frozenset({"500", "503", "429", "404", "reset", "truncate", "stall", "drip"})
_STATUS_FAULTS = {"500": 500, "503": 503, "429": 429, "404": 404}
_CHUNK = 1 << 16
_CONTENT_TYPES = {
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".parquet": "application/vnd.apache.parquet",
    ".gz": "application/gzip",
}


@dataclass(frozen=True)
class Fault:
    """One injected fault, consumed by one request to its path.

    kinds: ``"500"``/``"503"``/``"429"``/``"404"`` answer that status (``retry_after`` adds a
    ``Retry-After`` header); ``"reset"`` closes the connection with a TCP RST and no response;
    ``"truncate"`` sends the full ``Content-Length`` header but only ``fraction`` of the body, then
    closes; ``"stall"`` waits ``seconds`` before answering normally; ``"drip"`` sends ``fraction`` of
    the body, waits ``seconds``, then the rest (to catch a client mid-write).
    """

    kind: str
    seconds: float = 1.0
    fraction: float = 0.5
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; expected one of {sorted(FAULT_KINDS)}"
            )


@dataclass(frozen=True)
class RequestRecord:
    """One served request: method, decoded URL path, status (None for a reset), injected fault."""

    method: str
    path: str
    status: int | None
    fault: str | None = None
    user_agent: str | None = None
    range: str | None = None


class FaultPlan:
    """Thread-safe per-path fault queues plus the request log."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Fault]] = {}
        self._log: list[RequestRecord] = []
        self._lock = threading.Lock()

    def add(self, path: str, *faults: Fault | str) -> FaultPlan:
        """Queue faults for ``path`` (e.g. ``"/cache/epub/4/pg4.txt"``); returns self for chaining."""
        parsed = [f if isinstance(f, Fault) else Fault(f) for f in faults]
        with self._lock:
            self._queues.setdefault(path, deque()).extend(parsed)
        return self

    def take(self, path: str) -> Fault | None:
        """Pop the next fault for ``path``, if any."""
        with self._lock:
            queue = self._queues.get(path)
            return queue.popleft() if queue else None

    def pending(self) -> int:
        """Faults not yet consumed (tests assert 0 to prove every fault was exercised)."""
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def record(self, entry: RequestRecord) -> None:
        with self._lock:
            self._log.append(entry)

    @property
    def log(self) -> list[RequestRecord]:
        """A snapshot of every request served so far, in completion order."""
        with self._lock:
            return list(self._log)

    def requested_paths(self, method: str | None = "GET") -> list[str]:
        """Paths requested (with repeats), optionally only for one method."""
        return [r.path for r in self.log if method is None or r.method == method]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()


RouteHandler = Callable[["MirrorRequestHandler", "re.Match[str]"], None]


@dataclass(frozen=True)
class Route:
    """A URL pattern (matched against the decoded path) and the handler that serves it."""

    name: str
    pattern: re.Pattern[str]
    handler: RouteHandler
    methods: frozenset[str] = frozenset({"GET", "HEAD"})


def resolve_under(base: Path, relative: str) -> Path | None:
    """``base/relative`` if it stays inside ``base``, else None (path traversal refused).

    The name is checked (no ``..``, empty, backslash or NUL segment) and so is where it leads:
    a symlink inside the served folder that points out of it (``files/x/passwd`` ->
    ``/etc/passwd``) resolves outside ``base`` and is refused like ``..``.
    """
    parts = relative.split("/")
    if any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        return None
    candidate = base.joinpath(*parts)
    try:
        inside = candidate.resolve().is_relative_to(base.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return candidate if inside else None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_value(value: object) -> str:
    """A header value with every control character (CR, LF, NUL ...) removed: a request path or
    file name echoed into a header can then never start a header or a body of its own."""
    return _CONTROL.sub("", str(value))


def static_route(name: str, prefix: str, base: Path) -> Route:
    """A route serving files under ``base`` at ``{prefix}<path>``."""
    pattern = re.compile("^" + re.escape(prefix) + r"(?P<path>.+)$")

    def handler(request: MirrorRequestHandler, match: re.Match[str]) -> None:
        request.send_file(resolve_under(base, match["path"]))

    return Route(name, pattern, handler)


def default_routes(root: Path) -> list[Route]:
    """Plain-URL files, the Hub API when ``root/hf/datasets`` exists, then the gutenberg.org layout."""
    routes = [static_route("files", "/files/", root / "files")]
    if (root / "hf" / "datasets").is_dir() or (root / "hf" / "models").is_dir():
        from pipeline.sources.hub_mirror import hub_routes  # imports this module: import it late

        routes.extend(hub_routes(root / "hf" / "datasets"))
    return [*routes, static_route("gutenberg", "/", root / "gutenberg")]


class RangeNotSatisfiable(Exception):
    """A Range header that selects no byte of the resource."""


def parse_byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Inclusive ``(start, end)`` for a single ``bytes=`` range; None means serve the whole file.

    Multi-range and malformed headers are ignored (RFC 9110 allows answering 200 with the whole
    representation); ranges starting past the end raise :class:`RangeNotSatisfiable`.
    """
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or (not match[1] and not match[2]):
        return None
    if not match[1]:
        suffix = int(match[2])
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - suffix), size - 1
    start = int(match[1])
    end = int(match[2]) if match[2] else size - 1
    if match[2] and end < start:
        return None  # syntactically invalid: ignore
    if start >= size:
        raise RangeNotSatisfiable(header)
    return start, min(end, size - 1)


def content_type_for(path: Path) -> str:
    return _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


class MirrorRequestHandler(BaseHTTPRequestHandler):
    """Dispatches each request through the route table, applying any queued fault first."""

    protocol_version = "HTTP/1.1"  # keep-alive, like real CDNs; every response sets Content-Length
    server: _HTTPServer
    _recorded = True  # requests rejected before dispatch (e.g. 501) are not logged

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    # POST/PUT reach only routes that accept them (the opt-in Hub write API,
    # pipeline.sources.hub_write); every other route answers 405.
    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: object) -> None:
        log.debug("mirror: " + format, *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._record(code)  # before any byte goes out: a client never sees an unlogged response
        super().send_response(code, message)

    def _record(self, status: int | None) -> None:
        if not self._recorded:
            self._recorded = True
            kind = self._fault.kind if self._fault else None
            agent, byte_range = self.headers.get("User-Agent"), self.headers.get("Range")
            record = RequestRecord(self.command, self.url_path, status, kind, agent, byte_range)
            self.server.mirror.faults.record(record)

    # ----------------------------------------------------------------------------- dispatch
    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.url_path = unquote(split.path)
        self.query = parse_qs(split.query)
        self._recorded = False
        self._body_fault: Fault | None = None
        self._fault = self.server.mirror.faults.take(self.url_path)
        try:
            if self._fault is None or self._apply_fault(self._fault):
                self._route()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its timeout during a stall)
        finally:
            self._record(None)  # no response was sent (reset, or the client went away)

    def _apply_fault(self, fault: Fault) -> bool:
        """Carry out ``fault``; True when the request should then be routed normally."""
        if fault.kind in _STATUS_FAULTS:
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = str(int(fault.retry_after))
            self.send_text(_STATUS_FAULTS[fault.kind], f"injected fault {fault.kind}\n", headers)
            return False
        if fault.kind == "reset":
            self._record(None)
            # SO_LINGER(on, 0): the close sends RST instead of FIN, like a dropped connection.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return False
        if fault.kind == "stall":
            self.server.mirror.stopping.wait(fault.seconds)
            return True
        self._body_fault = fault  # truncate / drip act while the body is written
        return True

    def _route(self) -> None:
        """The first route whose pattern matches owns the path (405 if it refuses the method)."""
        for route in self.server.mirror.routes:
            match = route.pattern.match(self.url_path)
            if match is None:
                continue
            if self.command in route.methods:
                route.handler(self, match)
            else:
                allow = ", ".join(sorted(route.methods))
                self.send_text(405, f"method {self.command} not allowed\n", {"Allow": allow})
            return
        self.send_text(404, "not found\n")

    # ----------------------------------------------------------------------------- responses
    def send_text(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, text.encode(), "text/plain; charset=utf-8", headers)

    def send_json(
        self, obj: object, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def send_bytes(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        """A complete in-memory response (the body is omitted for HEAD)."""
        length = {"Content-Type": content_type, "Content-Length": str(len(body))}
        self._start_response(status, {**length, **(headers or {})})
        if self.command != "HEAD":
            self._write_body([body], len(body))

    def send_file(self, path: Path | None, headers: dict[str, str] | None = None) -> None:
        """Serve a file with validators and single-range support; 404 when it is not a file."""
        if path is None or not path.is_file():
            self.send_text(404, "not found\n")
            return
        stat = path.stat()
        size = stat.st_size
        etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
        common = {
            "ETag": etag,
            "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes",
            **(headers or {}),
        }
        if etag in self.headers.get("If-None-Match", ""):
            self._start_response(304, {**common, "Content-Length": "0"})
            return
        try:
            byte_range = parse_byte_range(self.headers.get("Range"), size)
        except RangeNotSatisfiable:
            self.send_text(416, "range not satisfiable\n", {"Content-Range": f"bytes */{size}"})
            return
        start, end = byte_range if byte_range else (0, size - 1)
        length = end - start + 1
        first = {"Content-Type": content_type_for(path), "Content-Length": str(length)}
        if byte_range:
            first["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._start_response(206 if byte_range else 200, {**first, **common})
        if self.command == "HEAD" or length <= 0:
            return
        with path.open("rb") as handle:
            handle.seek(start)
            self._write_body(_read_chunks(handle, length), length)

    def _start_response(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(header_value(key), header_value(value))
        self.end_headers()

    def _write_body(self, chunks: Iterable[bytes], length: int) -> None:
        """Write ``length`` bytes of body, honouring a pending truncate/drip fault."""
        fault = self._body_fault
        cut = int(length * fault.fraction) if fault else length
        sent = 0
        for chunk in chunks:
            if fault and cut < sent + len(chunk):
                self.wfile.write(chunk[: cut - sent])
                self.wfile.flush()
                if fault.kind == "truncate":
                    self.close_connection = True  # the client sees EOF before Content-Length
                    return
                self.server.mirror.stopping.wait(fault.seconds)
                chunk = chunk[cut - sent :]
                sent = cut
                fault = None
            self.wfile.write(chunk)
            sent += len(chunk)


def _read_chunks(handle: BinaryIO, remaining: int) -> Iterable[bytes]:
    while remaining > 0:
        chunk = handle.read(min(_CHUNK, remaining))
        if not chunk:
            return
        remaining -= len(chunk)
        yield chunk


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], mirror: MirrorServer) -> None:
        self.mirror = mirror
        super().__init__(address, MirrorRequestHandler)

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("mirror: error serving %s", client_address, exc_info=True)


class MirrorServer:
    """Serve ``root`` over HTTP; a context manager that runs the server in a daemon thread.

    The socket is bound in the constructor, so :attr:`url` is known (``port=0`` picks a free
    port) before :meth:`start`.
    """

    def __init__(
        self,
        root: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultPlan | None = None,
        routes: Sequence[Route] = (),
    ) -> None:
        self.root = Path(root)
        self.faults = faults if faults is not None else FaultPlan()
        self.routes: tuple[Route, ...] = (*routes, *default_routes(self.root))
        self.stopping = threading.Event()  # wakes stalled handlers on shutdown
        self._httpd = _HTTPServer((host, port), self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add_route(self, route: Route) -> None:
        """Register a route ahead of the built-in ones (tuple swap: safe while serving)."""
        self.routes = (route, *self.routes)

    def start(self) -> MirrorServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"mirror-{self.url}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> MirrorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until_up(url: str, timeout: float = 30.0, interval: float = 0.1) -> None:
    """Block until ``url`` answers any HTTP response; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            requests.head(url, timeout=max(0.1, min(2.0, timeout)))
            return
        except requests.RequestException as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer within {timeout}s (last error: {last_error})")
        time.sleep(interval)
