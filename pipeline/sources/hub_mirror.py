"""The Hugging Face Hub API, as far as ``huggingface_hub`` needs it to download dataset repositories.

The SFT sources are fetched with the real ``huggingface_hub.snapshot_download`` so that caching,
pinned revisions and error handling are the library's, not ours. To test that code unchanged, the
mirror server answers the Hub endpoints the client (2.x) calls, from ``DIR/hf/datasets/<org>/<name>/``:

* ``GET /api/datasets/{org}/{name}[/revision/{rev}]``: repository info; ``sha`` (the commit the
  client pins every later request to) and ``siblings`` (``?blobs=true`` adds sizes and LFS data).
* ``GET /api/datasets/{org}/{name}/tree/{rev}[/{path}]``: the tree listing ``snapshot_download``
  filters with ``allow_patterns`` (``?recursive=true`` descends; directories are listed too).
* ``GET|HEAD /datasets/{org}/{name}/resolve/{rev}/{path}``: the file, answered directly (as the Hub
  does for files kept in git; no redirect, so the client's ``Location`` falls back to the request
  URL) with the headers ``get_hf_file_metadata`` reads: ``X-Repo-Commit``, ``ETag`` (git blob id, or
  the sha256 for LFS-like files, which also get ``X-Linked-Etag``/``X-Linked-Size``) and
  ``Content-Length``; ``Range`` and HEAD come from :meth:`MirrorRequestHandler.send_file`.
* 404s carry the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) that ``hf_raise_for_status`` maps to ``RepositoryNotFoundError``,
  ``RevisionNotFoundError`` and ``EntryNotFoundError``; a missing file's 404 also carries
  ``X-Repo-Commit`` so the client can cache the miss, as with the Hub.

Each repository has one revision, ``main``, whose commit sha is a hash of the repository id and of
every file's path, size and sha256: deterministic across machines, and it changes whenever the
mirrored data does, so a stale client cache can never be mistaken for the current one. Model
repositories are served the same way from ``DIR/hf/models/<org>/<name>/`` where that folder exists
(``/api/models/…``, ``/{org}/{name}/resolve/…``: what ``from_pretrained`` fetches; the opt-in
write API of :mod:`pipeline.sources.hub_write` stores pushed models there). Spaces, and models
where there is no such folder, answer ``RepoNotFound`` rather than falling through to the
Gutenberg catch-all route.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.sources.mirror import MirrorRequestHandler, Route, resolve_under

DEFAULT_BRANCH = "main"
# What the Hub's default .gitattributes sends to LFS among the formats datasets use; big files too.
LFS_SUFFIXES = frozenset({".parquet", ".arrow", ".gz", ".zip", ".zst", ".bz2", ".xz", ".tar"})
# ... and among model weights (the same .gitattributes), so a pushed model takes the LFS path.
LFS_SUFFIXES |= {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx"}
LFS_MIN_BYTES = 10 * 1024 * 1024
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
_CHUNK = 1 << 20


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a file's ``oid``/``blobId``."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of a mirrored repository, with the ids the Hub would report for it."""

    path: str  # repository-relative, "/"-separated
    local: Path
    size: int
    sha256: str
    blob_id: str  # git blob id of the content, or of the LFS pointer for LFS files
    lfs: bool
    pointer_size: int | None = None

    @property
    def etag(self) -> str:
        """The Hub's ETag: the git blob id, or the content sha256 for LFS files."""
        return self.sha256 if self.lfs else self.blob_id

    def lfs_info(self, sha_key: str) -> dict[str, object] | None:
        if not self.lfs:
            return None
        return {sha_key: self.sha256, "size": self.size, "pointerSize": self.pointer_size}

    def tree_entry(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "type": "file",
            "oid": self.blob_id,
            "size": self.size,
            "path": self.path,
        }
        if self.lfs:
            entry["lfs"] = self.lfs_info("oid")
        return entry

    def sibling(self, blobs: bool) -> dict[str, object]:
        if not blobs:
            return {"rfilename": self.path}
        sibling: dict[str, object] = {
            "rfilename": self.path,
            "size": self.size,
            "blobId": self.blob_id,
        }
        if self.lfs:
            sibling["lfs"] = self.lfs_info("sha256")
        return sibling


def describe_file(local: Path, path: str) -> HubFile:
    """Hash ``local`` once, streaming (sha256 and git blob id), and classify it as LFS-like."""
    size = local.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\x00" % size, usedforsecurity=False)
    with local.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            sha256.update(chunk)
            blob.update(chunk)
    digest = sha256.hexdigest()
    if local.suffix.lower() in LFS_SUFFIXES or size >= LFS_MIN_BYTES:
        pointer = _LFS_POINTER.format(sha256=digest, size=size).encode()
        return HubFile(path, local, size, digest, git_blob_id(pointer), True, len(pointer))
    return HubFile(path, local, size, digest, blob.hexdigest(), False)


@dataclass(frozen=True)
class HubRepo:
    """A mirrored dataset repository: its files (sorted by path) and its one commit."""

    repo_id: str
    files: dict[str, HubFile]
    sha: str
    last_modified: str

    def has_revision(self, revision: str) -> bool:
        """``main`` or the commit sha itself; anything else is an unknown revision."""
        return revision in (DEFAULT_BRANCH, self.sha)

    def folders(self) -> list[str]:
        """Every directory that holds a file, as repository-relative paths."""
        found: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return sorted(found)

    def info(self, blobs: bool) -> dict[str, object]:
        """The JSON body of ``/api/datasets/{repo_id}``, with the fields DatasetInfo parses."""
        org = self.repo_id.split("/", 1)[0]
        return {
            "_id": self.sha[:24],
            "id": self.repo_id,
            "author": org,
            "sha": self.sha,
            "lastModified": self.last_modified,
            "createdAt": self.last_modified,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "usedStorage": sum(f.size for f in self.files.values()),
            "siblings": [f.sibling(blobs) for f in self.files.values()],
        }

    def tree(self, under: str, recursive: bool) -> list[dict[str, object]] | None:
        """Tree entries below folder ``under`` ("" for the root); None when it is no folder."""
        folders = self.folders()
        if under and under not in folders:
            return None
        prefix = f"{under}/" if under else ""

        def listed(path: str) -> bool:
            rest = path[len(prefix) :]
            return path.startswith(prefix) and bool(rest) and (recursive or "/" not in rest)

        entries: list[dict[str, object]] = [
            {"type": "directory", "oid": self._tree_id(folder), "size": 0, "path": folder}
            for folder in folders
            if listed(folder)
        ]
        entries.extend(f.tree_entry() for path, f in self.files.items() if listed(path))
        return entries

    def _tree_id(self, folder: str) -> str:
        """A stable stand-in for a git tree id: a hash of the blob ids below ``folder``."""
        digest = hashlib.sha1(folder.encode(), usedforsecurity=False)
        for path, f in self.files.items():
            if path.startswith(f"{folder}/"):
                digest.update(f"{path}\0{f.blob_id}\n".encode())
        return digest.hexdigest()


def scan_repo(repo_id: str, directory: Path) -> HubRepo:
    """Index every regular file under ``directory`` (hidden paths skipped) and derive the commit."""
    files: dict[str, HubFile] = {}
    newest = 0.0
    real_root = directory.resolve()
    for local in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = local.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if not local.resolve().is_relative_to(real_root):  # a symlink out of the repository
            continue
        files[relative.as_posix()] = describe_file(local, relative.as_posix())
        newest = max(newest, local.stat().st_mtime)
    commit = hashlib.sha1(f"{repo_id}\n".encode(), usedforsecurity=False)
    for f in files.values():
        commit.update(f"{f.path}\t{f.size}\t{f.sha256}\n".encode())
    stamp = datetime.fromtimestamp(newest, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return HubRepo(repo_id, files, commit.hexdigest(), stamp)


# Written by the opt-in write API (pipeline.sources.hub_write) after each commit: a repository
# whose stamp changed is indexed again. Hidden, so never listed as a file of the repository.
WRITE_STAMP = ".hub-write"


def _write_stamp(directory: Path) -> str:
    try:
        return (directory / WRITE_STAMP).read_text()
    except OSError:
        return ""


class HubDatasets:
    """Thread-safe, lazily built index of ``<root>/<org>/<name>`` repositories.

    Each repository is hashed once per server, on first request (only the repositories a test
    or run touches are ever hashed), and again only after a write through the opt-in write API
    changed its :data:`WRITE_STAMP`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._repos: dict[str, tuple[str, HubRepo]] = {}
        self._lock = threading.Lock()

    def repo(self, org: str, name: str) -> HubRepo | None:
        """The repository ``org/name``, or None when the mirror does not hold it."""
        if org.startswith(".") or name.startswith("."):
            return None
        directory = resolve_under(self.root, f"{org}/{name}")
        if directory is None or not directory.is_dir():
            return None
        repo_id = f"{org}/{name}"
        stamp = _write_stamp(directory)
        with self._lock:
            cached = self._repos.get(repo_id)
            if cached is None or cached[0] != stamp:
                self._repos[repo_id] = (stamp, scan_repo(repo_id, directory))
            return self._repos[repo_id][1]


def _raw_segments(request: MirrorRequestHandler, skip: int) -> list[str]:
    """Path segments of the raw request target, each percent-decoded on its own.

    The client quotes revisions with ``safe=""`` (``refs%2Fpr%2F1``), so splitting the decoded
    path would cut such a revision in two.
    """
    raw = urlsplit(request.path).path
    return [unquote(s) for s in raw.split("/")[1 + skip :]]


def _header_safe(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def send_hub_error(
    request: MirrorRequestHandler,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    status: int = 404,
) -> None:
    """A Hub-style error: JSON body plus the X-Error-* headers ``hf_raise_for_status`` reads."""
    safe = _header_safe(message)
    extra = {"X-Error-Code": code, "X-Error-Message": safe, **(headers or {})}
    request.send_json({"error": message}, status, extra)


def _flag(request: MirrorRequestHandler, name: str) -> bool:
    return request.query.get(name, [""])[-1].lower() in ("1", "true")


class HubApi:
    """Route handlers over one :class:`HubDatasets` index of ``kind`` repositories: ``datasets``
    (``/api/datasets/…``, ``/datasets/{org}/{name}/resolve/…``) or ``models`` (``/api/models/…``,
    ``/{org}/{name}/resolve/…``, the Hub's URLs for models)."""

    def __init__(self, datasets: HubDatasets, kind: str = "datasets") -> None:
        self.datasets = datasets
        self.kind = kind

    def _repo_at(
        self, request: MirrorRequestHandler, org: str, name: str, revision: str
    ) -> HubRepo | None:
        """The repository if it and ``revision`` exist; otherwise sends the 404 and returns None."""
        repo = self.datasets.repo(org, name)
        if repo is None:
            message = f"Repository not found: {self.kind}/{org}/{name}"
            send_hub_error(request, "RepoNotFound", message)
        elif not repo.has_revision(revision):
            message = f"Invalid rev id: {revision} ({self.kind}/{repo.repo_id})"
            send_hub_error(request, "RevisionNotFound", message)
        else:
            return repo
        return None

    def api(self, request: MirrorRequestHandler, match: re.Match[str]) -> None:
        """``/api/datasets/{org}/{name}`` + ``""`` | ``/revision/{rev}`` | ``/tree/{rev}[/{path}]``."""
        segments = _raw_segments(request, skip=2)
        if len(segments) < 2:
            send_hub_error(request, "RepoNotFound", "Repository not found")
            return
        org, name, rest = segments[0], segments[1], segments[2:]
        if not rest or rest == [""]:
            rest = ["revision", DEFAULT_BRANCH]
        if rest[0] == "revision" and len(rest) == 2:
            repo = self._repo_at(request, org, name, rest[1])
            if repo is not None:
                request.send_json(repo.info(blobs=_flag(request, "blobs")))
        elif rest[0] == "tree" and len(rest) >= 2:
            repo = self._repo_at(request, org, name, rest[1])
            if repo is None:
                return
            under = "/".join(rest[2:]).strip("/")
            entries = repo.tree(under, recursive=_flag(request, "recursive"))
            if entries is None:
                send_hub_error(
                    request,
                    "EntryNotFound",
                    f"{under} does not exist on {rest[1]}",
                    {"X-Repo-Commit": repo.sha},
                )
            else:
                request.send_json(entries)
        else:
            request.send_json({"error": "Sorry, we can't find the page you are looking for."}, 404)

    def resolve(self, request: MirrorRequestHandler, match: re.Match[str]) -> None:
        """``[/datasets]/{org}/{name}/resolve/{rev}/{path}``: the file with the Hub's headers."""
        segments = _raw_segments(request, skip=1 if self.kind == "datasets" else 0)
        if len(segments) < 5 or segments[2] != "resolve" or not segments[4]:
            request.send_text(404, "not found\n")
            return
        org, name, revision = segments[0], segments[1], segments[3]
        path = "/".join(segments[4:])
        repo = self._repo_at(request, org, name, revision)
        if repo is None:
            return
        hub_file = repo.files.get(path)
        if hub_file is None:
            send_hub_error(
                request,
                "EntryNotFound",
                f"{path} does not exist on {revision}",
                {"X-Repo-Commit": repo.sha},
            )
            return
        headers = {"ETag": f'"{hub_file.etag}"', "X-Repo-Commit": repo.sha}
        if hub_file.lfs:
            headers["X-Linked-Etag"] = f'"{hub_file.sha256}"'
            headers["X-Linked-Size"] = str(hub_file.size)
        request.send_file(hub_file.local, headers)


def _not_mirrored(request: MirrorRequestHandler, match: re.Match[str]) -> None:
    send_hub_error(request, "RepoNotFound", "This repository type is not mirrored here")


def hub_routes(datasets_root: Path) -> list[Route]:
    """Routes serving ``datasets_root`` (``DIR/hf/datasets``) through the Hub API, and its
    sibling ``DIR/hf/models`` where that exists."""
    api = HubApi(HubDatasets(datasets_root))
    get = frozenset({"GET"})
    routes = [
        Route("hub-api", re.compile(r"^/api/datasets/"), api.api, get),
        Route("hub-resolve", re.compile(r"^/datasets/"), api.resolve),
    ]
    models_root = datasets_root.parent / "models"
    if models_root.is_dir():
        models = HubApi(HubDatasets(models_root), kind="models")
        routes += [
            Route("hub-model-api", re.compile(r"^/api/models/"), models.api, get),
            Route("hub-model-resolve", re.compile(r"^/[^/]+/[^/]+/resolve/"), models.resolve),
        ]
    return [
        *routes,
        Route("hub-not-mirrored", re.compile(r"^/api/(?:models|spaces)/"), _not_mirrored, get),
        Route("hub-model-resolve", re.compile(r"^/[^/]+/[^/]+/resolve/"), _not_mirrored),
    ]
