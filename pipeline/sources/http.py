"""A polite, fault-tolerant HTTP client for bulk downloads.

Project Gutenberg (and any mirror we point at) asks robots to identify themselves and to keep the
request rate low; a 75,000-book crawl also meets every kind of transient failure (5xx, 429,
connection resets, bodies cut short). This module centralises that politeness and resilience so the
data stages only say *what* to fetch:

* a User-Agent naming Scriptorium and a contact URL,
* a thread-safe token bucket shared by all worker threads (requests per second),
* bounded retries with exponential backoff and jitter, honouring ``Retry-After``,
* detection of truncated bodies (bytes received != ``Content-Length``); a body whose length
  nothing vouches for (no ``Content-Length``, not chunked) is reported ``verified=False``,
* limits against hostile servers: a byte cap counted on the *decoded* bytes (a gzip bomb is
  stopped at the cap, not after it), a total deadline per attempt (``timeout_s`` alone is per
  read, so a server dripping a byte a second would never trip it), and redirects followed only
  within the same site unless a host is allowed explicitly,
* atomic writes (temp file in the same directory, fsync, ``os.replace``) so a crash never leaves a
  half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import os
import random
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

DEFAULT_USER_AGENT = (
    "Scriptorium/0.1 (LLM data pipeline; +https://github.com/scriptorium-llm/scriptorium)"
)
TEMP_SUFFIX = ".part"  # never ends in the final extension: a crash leaves no plausible-looking file
_CHUNK = 1 << 16
# The largest plain-text books on gutenberg.org are a few tens of MB; 512 MiB is far above any real
# download of this project and far below what fills a disk or RAM.
DEFAULT_MAX_BYTES = 512 << 20
# Per attempt, whatever the server does: 512 MiB at 1 MB/s fits; an endless drip does not.
DEFAULT_DEADLINE_S = 900.0
MAX_REDIRECTS = 5
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_BAD_URL = (
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
)


class HttpError(Exception):
    """Base class of download errors; always names the URL and how many attempts were made."""

    def __init__(self, url: str, message: str, attempts: int = 1) -> None:
        super().__init__(f"GET {url}: {message}")
        self.url = url
        self.attempts = attempts


class NotFound(HttpError):
    """The server answered 404/410: the resource does not exist, so retrying is pointless."""


class RetryableError(HttpError):
    """A transient failure (5xx, 429, timeout, reset, truncated body) worth another attempt."""

    def __init__(self, url: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(url, message)
        self.retry_after = retry_after


class TruncatedBody(RetryableError):
    """The connection closed before ``Content-Length`` bytes arrived."""


class DownloadFailed(HttpError):
    """A request failed permanently: a non-retryable status, or retries exhausted."""


class TooLarge(DownloadFailed):
    """The body (counted after ``Content-Encoding`` decoding) exceeded the download's byte cap."""


class RedirectRefused(DownloadFailed):
    """A redirect to another site (or from https to http) that the client was not allowed."""


class TokenBucket:
    """Thread-safe token bucket: at most ``rate`` acquisitions per second, bursts up to ``burst``.

    Each caller *reserves* a token under the lock and sleeps off any deficit outside it, so waiting
    threads are served in arrival order and never busy-spin. ``rate <= 0`` disables limiting.
    """

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping as long as needed; returns the seconds slept."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait


@dataclass(frozen=True)
class DownloadResult:
    """What :meth:`PoliteClient.download` wrote: final path, size, SHA-256 and attempts used.

    ``verified`` says whether the server vouched for the body's end: a ``Content-Length`` that
    matched, or a chunked body that ended with its terminating chunk. A body delimited only by
    the connection closing may have been cut short, and callers should check it another way.
    """

    url: str
    path: Path
    bytes: int
    sha256: str
    attempts: int
    verified: bool = True


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class PoliteClient:
    """HTTP GET with politeness and retries; safe to share between threads.

    ``requests.Session`` is not documented as thread-safe, so each thread gets its own session
    (created lazily, all closed by :meth:`close`) while the rate limit is shared by all of them.
    ``max_retries`` counts retries after the first attempt, so at most ``max_retries + 1``
    requests are made per URL. ``max_bytes`` caps each body (decoded bytes; ``download`` can
    override it per call), ``deadline_s`` bounds each attempt's wall time, and redirects are
    followed only to the same site (:func:`same_site`) or to ``allowed_redirect_hosts``
    (``host`` or ``host:port``).
    """

    def __init__(
        self,
        *,
        requests_per_second: float = 2.0,
        max_retries: int = 4,
        timeout_s: float = 30.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        user_agent: str = DEFAULT_USER_AGENT,
        seed: int | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        deadline_s: float = DEFAULT_DEADLINE_S,
        allowed_redirect_hosts: Collection[str] = (),
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_bytes <= 0 or deadline_s <= 0:
            raise ValueError(
                f"max_bytes and deadline_s must be positive: {max_bytes}, {deadline_s}"
            )
        self.max_bytes = int(max_bytes)
        self.deadline_s = float(deadline_s)
        self.allowed_redirect_hosts = frozenset(h.lower() for h in allowed_redirect_hosts)
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.user_agent = user_agent
        self.limiter = TokenBucket(requests_per_second)
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def __enter__(self) -> PoliteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every per-thread session (their pooled connections)."""
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self.user_agent
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before retry number ``attempt`` (1-based): "equal jitter" exponential backoff.

        Half the exponential step is fixed and half random, so synchronised workers spread out
        without ever retrying immediately. A server's ``Retry-After`` wins when it is longer
        (capped at ``max_backoff_s`` so one bad header cannot stall a crawl for hours).
        """
        step = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
        with self._random_lock:
            delay = step / 2 + self._random.uniform(0, step / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay

    def download(
        self, url: str, dest: Path | str, *, max_bytes: int | None = None
    ) -> DownloadResult:
        """Fetch ``url`` into ``dest`` atomically, retrying transient failures.

        Raises :class:`NotFound` (404/410, not retried) or :class:`DownloadFailed` (including
        :class:`TooLarge` past ``max_bytes`` and :class:`RedirectRefused`); on any error no file
        appears at ``dest`` and no temp file is left behind.
        """
        dest = Path(dest)
        cap = self.max_bytes if max_bytes is None else int(max_bytes)
        attempt = 0
        while True:
            attempt += 1
            try:
                size, digest, verified = self._fetch_once(url, dest, cap)
                return DownloadResult(url, dest, size, digest, attempt, verified)
            except NotFound as exc:
                exc.attempts = attempt
                raise
            except RetryableError as exc:
                if attempt > self.max_retries:
                    raise DownloadFailed(
                        url,
                        f"gave up after {attempt} attempts; last error: {_reason(exc)}",
                        attempt,
                    ) from exc
                time.sleep(self.backoff_delay(attempt, exc.retry_after))
            except DownloadFailed as exc:
                exc.attempts = attempt
                raise

    def _fetch_once(self, url: str, dest: Path, max_bytes: int) -> tuple[int, str, bool]:
        """One attempt: request, check status, stream to a temp file, verify length, publish."""
        self.limiter.acquire()
        deadline = time.monotonic() + self.deadline_s
        response = self._get_following_redirects(url)
        with response:
            _check_status(url, response)
            with atomic_writer(dest) as handle:
                verified = _stream_body(url, response, handle, max_bytes, deadline)
        return handle.size, handle.hexdigest(), verified

    def _get(self, url: str, current: str) -> requests.Response:
        try:
            return self._session().get(
                current, stream=True, timeout=self.timeout_s, allow_redirects=False
            )
        except requests.Timeout as exc:
            raise RetryableError(url, f"timed out after {self.timeout_s}s ({exc})") from exc
        except _BAD_URL as exc:
            raise DownloadFailed(url, f"invalid URL ({exc})") from exc
        except requests.RequestException as exc:
            raise RetryableError(url, f"connection error ({exc})") from exc

    def _get_following_redirects(self, url: str) -> requests.Response:
        """GET ``url``, following at most :data:`MAX_REDIRECTS` redirects this client allows.

        requests would follow any ``Location`` (another host, an internal address, https to
        http); here every hop is checked before it is requested.
        """
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            response = self._get(url, current)
            if not response.is_redirect:
                return response
            target = urljoin(current, response.headers["Location"])
            response.close()
            self.check_redirect(url, current, target)
            current = target
        raise DownloadFailed(url, f"more than {MAX_REDIRECTS} redirects")

    def check_redirect(self, url: str, current: str, target: str) -> None:
        """Raise :class:`RedirectRefused` unless ``current`` may redirect to ``target``."""
        src, dst = urlsplit(current), urlsplit(target)
        if dst.scheme not in ("http", "https") or not dst.hostname:
            raise RedirectRefused(url, f"redirect to a non-http(s) URL refused: {target!r}")
        if src.scheme == "https" and dst.scheme != "https":
            raise RedirectRefused(url, f"redirect from https to {target!r} refused")
        host = dst.hostname.lower()
        allowed = {host, f"{host}:{dst.port}"} & self.allowed_redirect_hosts
        if not allowed and not same_site(current, target):
            raise RedirectRefused(
                url,
                f"redirect to another site refused: {target!r} (allow the host explicitly "
                "with allowed_redirect_hosts)",
            )


def _is_address(host: str) -> bool:
    """An IP literal or a single-label name (``localhost``): no registrable domain to share."""
    if "." not in host or ":" in host:
        return True
    return host.replace(".", "").isdigit()


def same_site(a: str, b: str) -> bool:
    """Whether URLs ``a`` and ``b`` belong to one site.

    Names share a site when their last two labels match (``www.gutenberg.org`` and
    ``aleph.gutenberg.org``); an IP address or ``localhost`` only with itself on the same port,
    because another port on the same machine is another service.
    """
    x, y = urlsplit(a), urlsplit(b)
    hx, hy = (x.hostname or "").lower(), (y.hostname or "").lower()
    if not hx or not hy:
        return False
    if _is_address(hx) or _is_address(hy):
        return hx == hy and (x.port, x.scheme) == (y.port, y.scheme)
    return hx.split(".")[-2:] == hy.split(".")[-2:]


def _reason(exc: HttpError) -> str:
    """The error text without the repeated ``GET url:`` prefix."""
    return str(exc).split(": ", 1)[-1]


def _check_status(url: str, response: requests.Response) -> None:
    status = response.status_code
    if status == 200:
        return
    if status in (404, 410):
        raise NotFound(url, f"HTTP {status} (not found)")
    if status in _RETRYABLE_STATUS or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise RetryableError(url, f"HTTP {status} {response.reason}", retry_after)
    raise DownloadFailed(url, f"HTTP {status} {response.reason} (not retryable)")


def _stream_body(
    url: str, response: requests.Response, handle: _HashingFile, max_bytes: int, deadline: float
) -> bool:
    """Copy the body to ``handle``, turning every mid-body failure into a retryable error.

    ``read1`` returns whatever has arrived, so the deadline and the byte cap are checked after
    every read, however slowly the server drips; the cap counts decoded bytes, so a small gzip
    body cannot expand past it. A ``Content-Length`` larger than the cap is refused before any
    byte is read. The length check uses the bytes pulled off the wire (``raw.tell()``), not the
    decoded bytes, so it stays correct under ``Content-Encoding: gzip``. Returns whether the
    body's end was vouched for (see :class:`DownloadResult`).
    """
    expected = response.headers.get("Content-Length")
    declared = int(expected) if expected is not None and expected.isdigit() else None
    encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
    if declared is not None and declared > max_bytes and not encoded:
        raise TooLarge(url, f"Content-Length {declared} exceeds the cap of {max_bytes} bytes")
    raw = response.raw
    try:
        while chunk := raw.read1(_CHUNK, decode_content=True):
            handle.write(chunk)
            if handle.size > max_bytes:
                raise TooLarge(url, f"body exceeds the cap of {max_bytes} bytes (decoded)")
            if time.monotonic() > deadline:
                raise RetryableError(
                    url, f"download exceeded its deadline after {handle.size} bytes"
                )
    except urllib3.exceptions.ProtocolError as exc:
        raise TruncatedBody(url, f"truncated body: connection closed early ({exc})") from exc
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise RetryableError(url, f"error while reading body ({exc})") from exc
    received = raw.tell()
    if declared is not None and received != declared:
        raise TruncatedBody(url, f"truncated body: got {received} of {expected} bytes")
    chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
    return declared is not None or chunked


class _HashingFile:
    """A binary file wrapper that hashes and counts what is written through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._raw.write(data)
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@contextlib.contextmanager
def atomic_writer(dest: Path) -> Iterator[_HashingFile]:
    """Write to a hidden temp file beside ``dest`` and ``os.replace`` it into place on success.

    The temp name (``.{name}.XXXX.part``) never ends in ``dest``'s suffix, so readers globbing for
    finished files never see a partial one, even after ``kill -9``. On error the temp file is
    removed. The data is fsynced before the rename so a power cut cannot publish an empty file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            wrapper = _HashingFile(raw)
            yield wrapper
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    """Atomically replace ``dest`` with ``data`` (same temp-file discipline as downloads)."""
    with atomic_writer(dest) as handle:
        handle.write(data)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: Path, names: Collection[str] | None = None) -> int:
    """Delete temp files left by killed writers in ``directory``; returns how many were removed.

    With ``names``, only temp files of those final names (e.g. ``{"84.txt"}``) are touched, so
    several processes downloading disjoint sets into one directory cannot delete each other's
    in-flight files. Without it, no other writer may be active in the directory.
    """
    if not directory.is_dir():
        return 0
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
                continue
            # ".{final name}.{random}.part" -> final name (mkstemp's random part has no dots)
            final = entry.name[1 : -len(TEMP_SUFFIX)].rsplit(".", 1)[0]
            if (names is None or final in names) and entry.is_file():
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks (hashlib releases the GIL, so threads scale)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
