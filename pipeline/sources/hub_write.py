"""The part of the Hugging Face Hub's *write* API that ``create_repo`` and ``upload_folder`` use.

``scriptorium push`` uploads with the real ``huggingface_hub`` client; to test it end to end
(push, then ``from_pretrained`` through the same server) the mirror server answers the calls that
client (2.x) makes, and stores what it receives in the layout the read side serves
(``DIR/hf/models/<org>/<name>/``, ``DIR/hf/datasets/<org>/<name>/``):

* ``POST /api/repos/create`` ``{name, organization, type}``: makes the folder; 409 if it exists
  (``exist_ok=True`` ignores that, as with the Hub).
* ``POST /api/validate-yaml``: the README's metadata block must be a YAML mapping (400 if not).
* ``POST /api/{models|datasets}/{org}/{name}/preupload/{rev}``: each file's ``uploadMode``:
  ``lfs`` for what the Hub's default ``.gitattributes`` sends to LFS (the read side's rule,
  :func:`pipeline.sources.hub_mirror.describe_file`), else ``regular`` (inline in the commit);
  ``oid`` of the stored version, so the client skips unchanged files.
* ``POST /{org}/{name}.git/info/lfs/objects/batch`` (``/datasets/…`` for datasets): the git-LFS
  batch API, ``basic`` transfer: an ``upload`` action (``PUT /lfs-upload/{oid}``, sha256 and size
  checked) and a ``verify`` action (``POST /lfs-verify/{oid}``) per object not yet stored.
* ``POST /api/{models|datasets}/{org}/{name}/commit/{rev}``: the NDJSON commit (``header``,
  ``file`` base64, ``lfsFile`` by oid, ``deletedFile``, ``deletedFolder``), applied under a lock
  with one atomic rename per file; answers ``commitOid`` (the read side's commit id of the new
  content) and ``commitUrl``.

Only ``main`` exists (the read side has one revision). The Hub's newer Xet storage is not
spoken: ``huggingface_hub`` uses it whenever ``hf_xet`` is installed, so a client pushing here
sets ``HF_HUB_DISABLE_XET=1`` and uses git-LFS, which the Hub still accepts; the Xet token
endpoint answers 501 saying so. Every repository write (create, preupload, LFS batch, commit)
needs a bearer token (any value: this is a test server, not an identity provider; tokens are never
logged). The upload URLs the batch hands out are, like the Hub's presigned ones, not
authenticated: they accept only content whose sha256 is the URL's oid, and nothing reaches a
repository without an authenticated commit.

The routes are opt-in (``MirrorServer(root, routes=hub_write_routes(root))`` or
``scriptorium mirror serve DIR --writable``): the shared data mirror stays read-only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from pipeline.sources.hub_mirror import (
    DEFAULT_BRANCH,
    WRITE_STAMP,
    _raw_segments,
    describe_file,
    scan_repo,
    send_hub_error,
)
from pipeline.sources.mirror import MirrorRequestHandler, Route, resolve_under

__all__ = ["hub_write_routes"]

_KINDS = {"model": "models", "dataset": "datasets"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_OID = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
MAX_COMMIT_BYTES = 512 * 1024 * 1024  # base64 files arrive inline: refuse absurd commits


class _BodyError(Exception):
    """A request body that cannot be read (bad framing, too large)."""


def _read_body(request: MirrorRequestHandler, limit: int, sink: object = None) -> bytes:
    """The request body (Content-Length or chunked); written to ``sink`` if given, else returned."""
    chunks: list[bytes] = []
    total = 0

    def take(data: bytes) -> None:
        nonlocal total
        total += len(data)
        if total > limit:
            raise _BodyError(f"request body over {limit} bytes")
        if sink is not None:
            sink.write(data)  # type: ignore[attr-defined]
        else:
            chunks.append(data)

    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        while True:
            line = request.rfile.readline(1024).strip()
            try:
                size = int(line.split(b";")[0], 16)
            except ValueError as exc:
                raise _BodyError("malformed chunked body") from exc
            if size == 0:
                while request.rfile.readline(1024).strip():  # trailers
                    pass
                break
            remaining = size
            while remaining:
                data = request.rfile.read(min(_CHUNK, remaining))
                if not data:
                    raise _BodyError("truncated chunked body")
                take(data)
                remaining -= len(data)
            request.rfile.readline(8)  # the CRLF after each chunk
    else:
        length = request.headers.get("Content-Length", "0")
        if not length.isdigit():
            raise _BodyError("bad Content-Length")
        remaining = int(length)
        if remaining > limit:
            raise _BodyError(f"request body over {limit} bytes")
        while remaining:
            data = request.rfile.read(min(_CHUNK, remaining))
            if not data:
                raise _BodyError("truncated body")
            take(data)
            remaining -= len(data)
    return b"".join(chunks)


def _json_body(request: MirrorRequestHandler) -> dict[str, object] | None:
    """The JSON object body, or None after answering 400."""
    try:
        data = json.loads(_read_body(request, 16 * 1024 * 1024) or b"{}")
    except (_BodyError, ValueError) as exc:
        send_hub_error(request, "BadRequest", f"bad JSON body: {exc}", status=400)
        return None
    if not isinstance(data, dict):
        send_hub_error(request, "BadRequest", "the body must be a JSON object", status=400)
        return None
    return data


def _base_url(request: MirrorRequestHandler) -> str:
    host = request.headers.get("Host") or "{}:{}".format(*request.server.server_address[:2])
    return f"http://{host}"


class HubWriter:
    """The write handlers over one mirror root (``root/hf/...``)."""

    def __init__(self, root: Path) -> None:
        self.hf = root / "hf"
        self.lfs = self.hf / ".lfs"  # uploaded LFS objects until a commit takes them
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------- helpers
    def _authorized(self, request: MirrorRequestHandler) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:].strip():
            return True
        send_hub_error(request, "Unauthorized", "a token is required to write", status=401)
        return False

    def _repo_dir(
        self, request: MirrorRequestHandler, kind: str, org: str, name: str, revision: str | None
    ) -> Path | None:
        """The repository folder, or None after answering 404/400."""
        directory = None
        if _NAME.match(org) and _NAME.match(name):
            directory = resolve_under(self.hf / kind, f"{org}/{name}")
        if directory is None or not directory.is_dir():
            send_hub_error(request, "RepoNotFound", f"Repository not found: {kind}/{org}/{name}")
            return None
        if revision is not None and revision != DEFAULT_BRANCH:
            message = f"Invalid rev id: {revision} (this mirror holds only {DEFAULT_BRANCH})"
            send_hub_error(request, "RevisionNotFound", message)
            return None
        return directory

    # ----------------------------------------------------------------------------- create
    def create(self, request: MirrorRequestHandler, match: re.Match[str]) -> None:
        if not self._authorized(request):
            return
        data = _json_body(request)
        if data is None:
            return
        kind = _KINDS.get(str(data.get("type") or "model"))
        org, name = data.get("organization"), data.get("name")
        if kind is None:
            send_hub_error(request, "BadRequest", "only model and dataset repos", status=400)
            return
        if not (isinstance(org, str) and _NAME.match(org) and isinstance(name, str)):
            message = "name and organization are required (ORG/NAME; this mirror has no users)"
            send_hub_error(request, "BadRequest", message, status=400)
            return
        if not _NAME.match(name):
            send_hub_error(request, "BadRequest", f"invalid repository name {name!r}", status=400)
            return
        prefix = "" if kind == "models" else "datasets/"
        url = f"{_base_url(request)}/{prefix}{org}/{name}"
        directory = self.hf / kind / org / name
        with self._lock:
            if directory.exists():  # the Hub's 409 carries the url: exist_ok=True reads it
                message = "You already created this repo"
                headers = {"X-Error-Code": "RepoExists", "X-Error-Message": message}
                request.send_json({"error": message, "url": url}, 409, headers)
                return
            directory.mkdir(parents=True)
        request.send_json({"url": url, "name": f"{org}/{name}", "id": f"{org}/{name}"})

    # ----------------------------------------------------------------------------- preupload
    def api_post(self, request: MirrorRequestHandler, match: re.Match[str]) -> None:
        """``/api/{kind}/{org}/{name}/(preupload|commit)/{rev}``."""
        segments = _raw_segments(request, skip=1)  # kind, org, name, action, rev
        if len(segments) != 5 or segments[3] not in ("preupload", "commit"):
            send_hub_error(request, "NotFound", "no such write endpoint")
            return
        kind, org, name, action, revision = segments
        if not self._authorized(request):
            return
        directory = self._repo_dir(request, kind, org, name, revision)
        if directory is None:
            return
        if action == "preupload":
            self._preupload(request, directory)
        else:
            self._commit(request, kind, f"{org}/{name}", directory)

    def _preupload(self, request: MirrorRequestHandler, directory: Path) -> None:
        data = _json_body(request)
        if data is None:
            return
        files = data.get("files")
        if not isinstance(files, list):
            send_hub_error(request, "BadRequest", "files must be a list", status=400)
            return
        answer = []
        for entry in files:
            path, size = entry.get("path"), entry.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                send_hub_error(request, "BadRequest", "each file needs path and size", status=400)
                return
            lfs = describe_file_mode(path, size)
            stored = resolve_under(directory, path)
            oid = None
            if stored is not None and stored.is_file():
                existing = describe_file(stored, path)
                oid = existing.sha256 if existing.lfs else existing.blob_id
            answer.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        request.send_json({"files": answer, "commitOid": None})

    # ----------------------------------------------------------------------------- LFS
    def lfs_batch(self, request: MirrorRequestHandler, match: re.Match[str]) -> None:
        segments = _raw_segments(request, skip=0)
        kind = "datasets" if segments[0] == "datasets" else "models"
        first = 1 if kind == "datasets" else 0
        org, name = segments[first], segments[first + 1].removesuffix(".git")
        if not self._authorized(request):
            return
        if self._repo_dir(request, kind, org, name, None) is None:
            return
        data = _json_body(request)
        if data is None:
            return
        if data.get("operation") != "upload":
            send_hub_error(request, "BadRequest", "only the upload operation", status=400)
            return
        base = _base_url(request)
        objects = []
        for obj in data.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and _OID.match(oid) and isinstance(size, int)):
                objects.append(
                    {"oid": str(oid), "size": 0, "error": {"code": 422, "message": "bad oid"}}
                )
                continue
            entry: dict[str, object] = {"oid": oid, "size": size, "authenticated": True}
            if not (self.lfs / oid).is_file():
                entry["actions"] = {
                    "upload": {"href": f"{base}/lfs-upload/{oid}?size={size}"},
                    "verify": {"href": f"{base}/lfs-verify/{oid}"},
                }
            objects.append(entry)
        request.send_bytes(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            "application/vnd.git-lfs+json",
        )

    def lfs_upload(self, request: MirrorRequestHandler, match: re.Match[str]) -> None:
        """``PUT /lfs-upload/{oid}``: store the object if its sha256 and size match."""
        oid = match["oid"]
        size = request.query.get("size", [""])[-1]
        self.lfs.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self.lfs, prefix=".up-", delete=False) as tmp:

            class _Hashing:
                def write(self, data: bytes) -> None:
                    digest.update(data)
                    tmp.write(data)

            try:
                _read_body(request, 64 * 1024**3, sink=_Hashing())
            except _BodyError as exc:
                os.unlink(tmp.name)
                send_hub_error(request, "BadRequest", str(exc), status=400)
                return
            written = tmp.tell()
        if digest.hexdigest() != oid or (size.isdigit() and int(size) != written):
            os.unlink(tmp.name)
            message = f"content does not match oid {oid} / size {size}"
            send_hub_error(request, "BadRequest", message, status=400)
            return
        os.replace(tmp.name, self.lfs / oid)
        request.send_bytes(200, b"", "text/plain")

    def lfs_verify(self, request: MirrorRequestHandler, match: re.Match[str]) -> None:
        data = _json_body(request)
        if data is None:
            return
        stored = self.lfs / match["oid"]
        if not stored.is_file() or stored.stat().st_size != data.get("size"):
            send_hub_error(request, "EntryNotFound", "object not uploaded", status=404)
            return
        request.send_json({"success": True})

    # ----------------------------------------------------------------------------- commit
    def _commit(
        self, request: MirrorRequestHandler, kind: str, repo_id: str, directory: Path
    ) -> None:
        try:
            lines = _read_body(request, MAX_COMMIT_BYTES).splitlines()
            items = [json.loads(line) for line in lines if line.strip()]
        except (_BodyError, ValueError) as exc:
            send_hub_error(request, "BadRequest", f"bad NDJSON commit: {exc}", status=400)
            return
        staging = Path(tempfile.mkdtemp(dir=self.hf, prefix=".commit-"))
        try:
            writes, deletes, error = self._stage(items, directory, staging)
            if error:
                send_hub_error(request, "BadRequest", error, status=400)
                return
            with self._lock:
                for target in deletes:
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
                for staged, target in writes:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, target)
                # The read side re-indexes a repository whose stamp changed (hub_mirror.py).
                stamp = directory / WRITE_STAMP
                stamp.with_suffix(".tmp").write_text(uuid.uuid4().hex)
                os.replace(stamp.with_suffix(".tmp"), stamp)
                sha = scan_repo(repo_id, directory).sha
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        prefix = "" if kind == "models" else "datasets/"
        url = f"{_base_url(request)}/{prefix}{repo_id}/commit/{sha}"
        request.send_json({"success": True, "commitOid": sha, "commitUrl": url})

    def _stage(
        self, items: list[object], directory: Path, staging: Path
    ) -> tuple[list[tuple[Path, Path]], list[Path], str | None]:
        """Each operation's file in ``staging`` (nothing in the repository changes yet)."""
        writes: list[tuple[Path, Path]] = []
        deletes: list[Path] = []
        for n, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                return [], [], f"line {n + 1}: expected {{key, value}}"
            key, value = item["key"], item["value"]
            if key == "header":
                continue
            path = value.get("path")
            target = resolve_under(directory, path) if isinstance(path, str) else None
            if target is None or Path(path).name == WRITE_STAMP:
                return [], [], f"line {n + 1}: invalid path {path!r}"
            staged = staging / f"{n}"
            if key == "file":
                try:
                    staged.write_bytes(base64.b64decode(value.get("content", ""), validate=True))
                except (binascii.Error, ValueError):
                    return [], [], f"line {n + 1}: content is not base64"
                writes.append((staged, target))
            elif key == "lfsFile":
                oid = str(value.get("oid", ""))
                blob = self.lfs / oid
                if not _OID.match(oid) or not blob.is_file():
                    return [], [], f"line {n + 1}: LFS object {oid} was never uploaded"
                shutil.copyfile(blob, staged)
                writes.append((staged, target))
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(target)
            else:
                return [], [], f"line {n + 1}: unsupported operation {key!r}"
        return writes, deletes, None


def describe_file_mode(path: str, size: int) -> bool:
    """Whether the Hub would keep ``path`` of ``size`` bytes in LFS (the read side's rule)."""
    from pipeline.sources.hub_mirror import LFS_MIN_BYTES, LFS_SUFFIXES

    return Path(path).suffix.lower() in LFS_SUFFIXES or size >= LFS_MIN_BYTES


def _validate_yaml(request: MirrorRequestHandler, match: re.Match[str]) -> None:
    """``POST /api/validate-yaml``: ``upload_folder`` checks a README's metadata block first."""
    import yaml

    data = _json_body(request)
    if data is None:
        return
    content = str(data.get("content") or "")
    block = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", content, re.DOTALL)
    try:
        meta = yaml.safe_load(block[1]) if block else {}
    except yaml.YAMLError as exc:
        request.send_json({"errors": [{"message": f"invalid YAML: {exc}"}]}, 400)
        return
    if meta is not None and not isinstance(meta, dict):
        request.send_json({"errors": [{"message": "metadata must be a YAML mapping"}]}, 400)
        return
    warnings = [] if meta else [{"message": "empty or missing metadata"}]
    request.send_json({"errors": [], "warnings": warnings})


def _no_xet(request: MirrorRequestHandler, match: re.Match[str]) -> None:
    message = "this mirror speaks git-LFS, not Xet: set HF_HUB_DISABLE_XET=1 to upload here"
    send_hub_error(request, "XetNotSupported", message, status=501)


def hub_write_routes(root: Path) -> list[Route]:
    """The write routes over ``root`` (placed ahead of the read routes by MirrorServer)."""
    writer = HubWriter(root)
    post, put = frozenset({"POST"}), frozenset({"PUT"})
    lfs_batch = r"^/(?:datasets/)?[^/]+/[^/]+\.git/info/lfs/objects/batch$"
    return [
        Route("hub-create", re.compile(r"^/api/repos/create$"), writer.create, post),
        Route("hub-validate-yaml", re.compile(r"^/api/validate-yaml$"), _validate_yaml, post),
        Route(
            "hub-xet-token",
            re.compile(r"^/api/(?:models|datasets)/[^/]+/[^/]+/xet-write-token/"),
            _no_xet,
            frozenset({"GET", "POST"}),
        ),
        Route(
            "hub-write",
            re.compile(r"^/api/(?:models|datasets)/[^/]+/[^/]+/(?:preupload|commit)/"),
            writer.api_post,
            post,
        ),
        Route("hub-lfs-batch", re.compile(lfs_batch), writer.lfs_batch, post),
        Route(
            "hub-lfs-upload",
            re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"),
            writer.lfs_upload,
            put,
        ),
        Route(
            "hub-lfs-verify",
            re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$"),
            writer.lfs_verify,
            post,
        ),
    ]
