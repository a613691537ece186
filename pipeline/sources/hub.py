"""Downloads of SFT source data: Hugging Face Hub dataset files and plain URLs.

Hub data goes through ``huggingface_hub.snapshot_download`` so pinned revisions, the content-
addressed cache (a second run makes one API call, or none for a commit sha) and the Hub's error
types are the library's. Only data files are fetched, by pattern: dataset loading scripts are never
downloaded, let alone run (there is no ``trust_remote_code`` anywhere in this path).

Endpoints are resolved per call rather than at import: ``huggingface_hub`` reads ``HF_ENDPOINT``
once, when it is imported, so setting it later (as tests and the Makefile's mirror do) only takes
effect because the endpoint is passed explicitly here. Plain URLs are rewritten onto
``$SCRIPTORIUM_FILES_MIRROR/<host>/<path>`` when that variable is set, the same layout the mirror
server serves at ``/files/``.

``HF_TOKEN`` goes only where it is safe: the default endpoint (https://huggingface.co), another
https endpoint that is not on this machine, or a host listed in ``$SCRIPTORIUM_HF_TOKEN_HOSTS``
(comma-separated ``host`` or ``host:port``). A plain-http or loopback endpoint (a local mirror,
or whatever ``HF_ENDPOINT`` was pointed at) never receives it by default: over http anyone on
the path reads it, and a mirror has no use for it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.sources.http import DEFAULT_MAX_BYTES, PoliteClient, sha256_file

log = logging.getLogger(__name__)

FILES_MIRROR_ENV = "SCRIPTORIUM_FILES_MIRROR"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
HF_TOKEN_ENV = "HF_TOKEN"
TOKEN_HOSTS_ENV = "SCRIPTORIUM_HF_TOKEN_HOSTS"
# Loading scripts are code; an SFT source is data. Never fetch one, whatever the patterns say.
CODE_PATTERNS = ("*.py",)


class HubDownloadError(RuntimeError):
    """A dataset download that produced no usable files (names the repo, revision and patterns)."""


def hub_endpoint(endpoint: str | None = None) -> str | None:
    """``endpoint``, else ``$HF_ENDPOINT`` read now (not at import), else None (huggingface.co)."""
    value = endpoint or os.environ.get(HF_ENDPOINT_ENV) or None
    return value.rstrip("/") if value else None


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_allowed(endpoint: str | None) -> bool:
    """Whether a Hub token may be sent to ``endpoint`` (None: huggingface.co, always https)."""
    if endpoint is None:
        return True
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    listed = {h.strip().lower() for h in os.environ.get(TOKEN_HOSTS_ENV, "").split(",")}
    if host and (host in listed or f"{host}:{parts.port}" in listed):
        return True
    return parts.scheme == "https" and bool(host) and not _is_loopback(host)


def hub_token(endpoint: str | None, token: str | None = None) -> str | bool:
    """The token to send to ``endpoint``: the argument, else ``$HF_TOKEN``, else False.

    False (rather than None) stops ``huggingface_hub`` from sending a token saved by
    ``hf auth login`` to whatever endpoint is configured, e.g. a local mirror. A token is also
    withheld (False, with a warning) from an endpoint :func:`token_allowed` refuses.
    """
    value = token or os.environ.get(HF_TOKEN_ENV) or False
    if value and not token_allowed(endpoint):
        log.warning(
            "not sending HF_TOKEN to %s (plain http or loopback); list its host in $%s to allow it",
            endpoint,
            TOKEN_HOSTS_ENV,
        )
        return False
    return value


def download_dataset_files(
    repo_id: str,
    revision: str,
    patterns: Sequence[str],
    cache_dir: Path | str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    max_workers: int = 4,
) -> list[Path]:
    """Fetch the files of dataset ``repo_id`` at ``revision`` matching ``patterns``; sorted paths.

    ``revision`` is required so a run is reproducible (a commit sha also skips the API call on a
    warm cache). The paths point into the ``huggingface_hub`` cache under ``cache_dir`` and must
    be treated as read-only. The token is never logged.

    Raises ``huggingface_hub`` errors (``RepositoryNotFoundError``, ``RevisionNotFoundError``...)
    as they are, and :class:`HubDownloadError` when no file matches ``patterns``.
    """
    # Imported here: huggingface_hub is heavy, and most commands never download a dataset.
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    if not revision:
        raise ValueError(f"{repo_id}: a revision (branch, tag or commit sha) is required")
    patterns = list(patterns)
    if not patterns:
        raise ValueError(f"{repo_id}: at least one file pattern is required")
    url = hub_endpoint(endpoint)
    log.info(
        "fetching dataset %s@%s %s from %s", repo_id, revision, patterns, url or "huggingface.co"
    )
    snapshot = Path(
        snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            cache_dir=str(cache_dir),
            allow_patterns=patterns,
            ignore_patterns=list(CODE_PATTERNS),
            endpoint=url,
            token=hub_token(url, token),
            max_workers=max_workers,
        )
    )
    # The snapshot folder may hold files fetched earlier with other patterns: filter again, with
    # the library's own matching rule.
    on_disk = {p.relative_to(snapshot).as_posix(): p for p in snapshot.rglob("*") if p.is_file()}
    kept = filter_repo_objects(on_disk, allow_patterns=patterns, ignore_patterns=CODE_PATTERNS)
    files = sorted(on_disk[name] for name in kept)
    if not files:
        raise HubDownloadError(
            f"dataset {repo_id}@{revision}: no file matches {patterns} (snapshot {snapshot})"
        )
    return files


def resolve_plain_url(url: str) -> str:
    """``https://{host}/{path}`` -> ``$SCRIPTORIUM_FILES_MIRROR/{host}/{path}`` when that is set.

    Without the variable the URL is returned unchanged. Query strings are kept; only http(s) URLs
    are accepted, so a typo in a config cannot turn into a local file read.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    mirror = os.environ.get(FILES_MIRROR_ENV)
    if not mirror:
        return url
    query = f"?{parts.query}" if parts.query else ""
    return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}{query}"


def download_url(
    url: str,
    dest: Path | str,
    *,
    sha256: str | None = None,
    client: PoliteClient | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Download ``url`` (through the files mirror when configured) to ``dest``; returns ``dest``.

    An existing ``dest`` is reused (writes are atomic, so it is complete) unless ``sha256`` is
    given and differs, which forces a fresh download; a download whose sha256 differs from the
    expected one is removed and raises :class:`HubDownloadError`, because a changed upstream
    file silently changes the training mix. ``max_bytes`` caps the body (decoded bytes).
    """
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    source = resolve_plain_url(url)
    log.info("fetching %s%s", url, f" via {source}" if source != url else "")
    owned = client is None
    http = client if client is not None else PoliteClient()
    try:
        result = http.download(source, dest, max_bytes=max_bytes)
    finally:
        if owned:
            http.close()
    if sha256 is not None and result.sha256 != sha256:
        dest.unlink(missing_ok=True)
        raise HubDownloadError(f"{url}: sha256 {result.sha256} does not match expected {sha256}")
    return dest
