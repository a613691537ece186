"""The mirror's Hub API driven by the real ``huggingface_hub`` client, and pipeline.sources.hub.

Nothing is mocked: a MirrorServer serves the real data mirror, and ``snapshot_download`` /
``hf_hub_download`` / ``HfApi`` talk to it over loopback HTTP with the endpoint passed explicitly.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from pipeline.sources.hub import (
    HubDownloadError,
    download_dataset_files,
    download_url,
    resolve_plain_url,
)
from pipeline.sources.hub_mirror import git_blob_id
from pipeline.sources.mirror import Fault, MirrorServer
from pipeline.text.adapters import adapt_source, load_sft_sources

pytestmark = pytest.mark.mirror

REPO = Path(__file__).resolve().parents[3]
ALPACA = "tatsu-lab/alpaca"
ALPACA_FILE = "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet"
DOLLY = "databricks/databricks-dolly-15k"
DOLLY_FILE = "databricks-dolly-15k.jsonl"
RASBT_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "01_main-chapter-code/instruction-data.json"
)


@pytest.fixture(autouse=True)
def _isolated_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No saved token or user cache may leak into a test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("SCRIPTORIUM_FILES_MIRROR", raising=False)


@pytest.fixture
def hub(mirror_dir: Path) -> Iterator[MirrorServer]:
    with MirrorServer(mirror_dir) as server:
        yield server


def _hf(mirror_dir: Path, repo_id: str, path: str) -> Path:
    return mirror_dir / "hf" / "datasets" / repo_id / path


def _resolve_gets(server: MirrorServer) -> list[str]:
    return [p for p in server.faults.requested_paths("GET") if "/resolve/" in p]


def test_snapshot_download_then_served_from_cache(
    hub: MirrorServer, mirror_dir: Path, tmp_path: Path
) -> None:
    files = download_dataset_files(ALPACA, "main", ["data/*.parquet"], tmp_path, endpoint=hub.url)
    assert [f.name for f in files] == [Path(ALPACA_FILE).name]
    assert files[0].read_bytes() == _hf(mirror_dir, ALPACA, ALPACA_FILE).read_bytes()
    sha = HfApi(endpoint=hub.url, token=False).dataset_info(ALPACA).sha
    assert sha is not None and f"/snapshots/{sha}/" in files[0].as_posix()
    assert _resolve_gets(hub) == [f"/datasets/{ALPACA}/resolve/{sha}/{ALPACA_FILE}"]

    hub.faults.clear_log()
    again = download_dataset_files(ALPACA, "main", ["data/*.parquet"], tmp_path, endpoint=hub.url)
    assert again == files
    # Only the branch -> commit look-up; no tree listing, HEAD or file GET is repeated.
    assert [(r.method, r.path) for r in hub.faults.log] == [
        ("GET", f"/api/datasets/{ALPACA}/revision/main")
    ]

    hub.faults.clear_log()
    pinned = download_dataset_files(ALPACA, sha, ["data/*.parquet"], tmp_path, endpoint=hub.url)
    assert pinned == files and hub.faults.log == []  # a commit sha needs no request at all


def test_patterns_select_files_and_commit_is_deterministic(
    hub: MirrorServer, mirror_dir: Path, tmp_path: Path
) -> None:
    train = download_dataset_files(
        "openai/gsm8k", "main", ["main/train-*"], tmp_path, endpoint=hub.url
    )
    assert [f.name for f in train] == ["train-00000-of-00001.parquet"]
    both = download_dataset_files("openai/gsm8k", "main", ["main/*"], tmp_path, endpoint=hub.url)
    assert [f.name for f in both] == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    assert sum(p.endswith("/main/train-00000-of-00001.parquet") for p in _resolve_gets(hub)) == 1
    with MirrorServer(mirror_dir) as other:  # a fresh server (and index) gives the same commit
        api = HfApi(endpoint=other.url, token=False)
        first = HfApi(endpoint=hub.url, token=False).dataset_info("openai/gsm8k").sha
        assert first is not None and api.dataset_info("openai/gsm8k").sha == first
    with pytest.raises(HubDownloadError, match=r"no file matches \['\*\.csv'\]"):
        download_dataset_files("openai/gsm8k", "main", ["*.csv"], tmp_path, endpoint=hub.url)


def test_hf_endpoint_set_after_import_is_used(
    hub: MirrorServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # huggingface_hub read HF_ENDPOINT when it was imported; hub.py reads it per call.
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    with caplog.at_level(logging.DEBUG):
        files = download_dataset_files(DOLLY, "main", [DOLLY_FILE], tmp_path, token="hf_SeCrEt")
    assert [f.name for f in files] == [DOLLY_FILE]
    assert hub.faults.requested_paths()[0] == f"/api/datasets/{DOLLY}/revision/main"
    assert "hf_SeCrEt" not in caplog.text


def test_repo_info_and_tree_listing(hub: MirrorServer, mirror_dir: Path) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    info = api.dataset_info("nyu-mll/blimp", files_metadata=True)
    assert info.id == "nyu-mll/blimp" and info.sha and len(info.sha) == 40
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert len(siblings) == 6
    sibling = siblings["anaphor_gender_agreement/train-00000-of-00001.parquet"]
    local = _hf(mirror_dir, "nyu-mll/blimp", sibling.rfilename)
    assert sibling.size == local.stat().st_size
    assert (
        sibling.lfs is not None
        and sibling.lfs.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    )
    assert api.dataset_info("nyu-mll/blimp", revision=info.sha).sha == info.sha

    top = list(api.list_repo_tree("nyu-mll/blimp", repo_type="dataset"))
    assert {type(e).__name__ for e in top} == {"RepoFolder"} and len(top) == 6
    deep = list(api.list_repo_tree("nyu-mll/blimp", repo_type="dataset", recursive=True))
    assert sum(type(e).__name__ == "RepoFile" for e in deep) == 6
    inside = list(
        api.list_repo_tree("nyu-mll/blimp", "wh_questions_object_gap", repo_type="dataset")
    )
    assert [e.path for e in inside] == ["wh_questions_object_gap/train-00000-of-00001.parquet"]


def test_resolve_headers_head_and_range(hub: MirrorServer, mirror_dir: Path) -> None:
    sha = HfApi(endpoint=hub.url, token=False).dataset_info(DOLLY).sha
    url = f"{hub.url}/datasets/{DOLLY}/resolve/main/{DOLLY_FILE}"
    body = _hf(mirror_dir, DOLLY, DOLLY_FILE).read_bytes()

    head = requests.head(url, timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["X-Repo-Commit"] == sha
    assert head.headers["ETag"] == f'"{git_blob_id(body)}"'  # a git file: its blob id
    assert head.headers["Content-Length"] == str(len(body))
    assert "X-Linked-Etag" not in head.headers

    part = requests.get(url, headers={"Range": "bytes=10-109"}, timeout=5)
    assert part.status_code == 206 and part.content == body[10:110]
    assert part.headers["Content-Range"] == f"bytes 10-109/{len(body)}"

    parquet = requests.head(f"{hub.url}/datasets/{ALPACA}/resolve/main/{ALPACA_FILE}", timeout=5)
    digest = hashlib.sha256(_hf(mirror_dir, ALPACA, ALPACA_FILE).read_bytes()).hexdigest()
    assert parquet.headers["X-Linked-Etag"] == parquet.headers["ETag"] == f'"{digest}"'  # LFS


def test_client_range_reads(hub: MirrorServer, mirror_dir: Path) -> None:
    """HfFileSystem reads a byte window with a Range GET on the resolve URL."""
    body = _hf(mirror_dir, DOLLY, DOLLY_FILE).read_bytes()
    fs = HfFileSystem(endpoint=hub.url, token=False, skip_instance_cache=True)
    with fs.open(f"datasets/{DOLLY}/{DOLLY_FILE}", "rb", block_size=1024) as handle:
        handle.seek(100)
        assert handle.read(50) == body[100:150]
    ranged = [r for r in hub.faults.log if r.range is not None]
    assert ranged and all(r.status == 206 and "/resolve/main/" in r.path for r in ranged)


def test_truncated_download_is_retried(hub: MirrorServer, mirror_dir: Path, tmp_path: Path) -> None:
    path = f"/datasets/{DOLLY}/resolve/main/{DOLLY_FILE}"
    # The HEAD takes the harmless stall; the GET's body is cut halfway (the client, finding no
    # complete 10 MiB chunk written, starts over rather than resuming with a Range).
    hub.faults.add(path, Fault("stall", seconds=0), Fault("truncate", fraction=0.5))
    local = hf_hub_download(
        DOLLY, DOLLY_FILE, repo_type="dataset", cache_dir=tmp_path, endpoint=hub.url, token=False
    )
    assert Path(local).read_bytes() == _hf(mirror_dir, DOLLY, DOLLY_FILE).read_bytes()
    gets = [r.fault for r in hub.faults.log if r.method == "GET" and r.path == path]
    assert gets == ["truncate", None] and hub.faults.pending() == 0


def test_unknown_repo_revision_and_file(hub: MirrorServer, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(
            "acme/no-such-data",
            repo_type="dataset",
            cache_dir=tmp_path,
            endpoint=hub.url,
            token=False,
        )
    with pytest.raises(RepositoryNotFoundError):
        download_dataset_files("acme/no-such-data", "main", ["*"], tmp_path, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        download_dataset_files(DOLLY, "v9.9", ["*"], tmp_path, endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(
            DOLLY,
            "missing.jsonl",
            repo_type="dataset",
            cache_dir=tmp_path,
            endpoint=hub.url,
            token=False,
        )
    with pytest.raises(RepositoryNotFoundError):  # models are not mirrored: a clean 404
        HfApi(endpoint=hub.url, token=False).model_info("gpt2")
    missing = requests.head(f"{hub.url}/datasets/{DOLLY}/resolve/main/nope.json", timeout=5)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    assert len(missing.headers["X-Repo-Commit"]) == 40  # lets the client cache the miss


def test_hub_routes_only_where_the_mirror_has_hf(tmp_path: Path) -> None:
    with MirrorServer(tmp_path) as server:
        assert not any(r.name.startswith("hub") for r in server.routes)
        response = requests.get(f"{server.url}/api/datasets/{DOLLY}", timeout=5)
        assert response.status_code == 404 and "X-Error-Code" not in response.headers


def test_plain_url_through_the_files_mirror(
    hub: MirrorServer, mirror_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_plain_url(RASBT_URL) == RASBT_URL  # no mirror configured: unchanged
    monkeypatch.setenv("SCRIPTORIUM_FILES_MIRROR", f"{hub.url}/files/")
    mirrored = resolve_plain_url(RASBT_URL)
    assert mirrored == f"{hub.url}/files/" + RASBT_URL.removeprefix("https://")
    with pytest.raises(ValueError, match="http"):
        resolve_plain_url("file:///etc/passwd")

    local = mirror_dir / "files" / RASBT_URL.removeprefix("https://")
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    dest = download_url(RASBT_URL, tmp_path / "rasbt.json", sha256=digest)
    assert dest.read_bytes() == local.read_bytes()
    hub.faults.clear_log()
    assert download_url(RASBT_URL, dest, sha256=digest) == dest and hub.faults.log == []
    with pytest.raises(HubDownloadError, match="does not match"):
        download_url(RASBT_URL, tmp_path / "bad.json", sha256="0" * 64)
    assert not (tmp_path / "bad.json").exists()


def test_every_configured_source_downloads_and_adapts(
    hub: MirrorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default config end to end: download through the mirror, then convert."""
    monkeypatch.setenv("SCRIPTORIUM_FILES_MIRROR", f"{hub.url}/files")
    for source in load_sft_sources(REPO / "configs" / "sft_sources.yaml"):
        if source.repo is not None:
            assert source.revision is not None
            files = download_dataset_files(
                source.repo, source.revision, source.patterns, tmp_path / "hf", endpoint=hub.url
            )
        else:
            assert source.url is not None
            dest = tmp_path / "files" / source.id / Path(source.url).name
            files = [download_url(source.url, dest, sha256=source.sha256)]
        rows, _ = adapt_source(source, files)
        assert rows.height > 0, source.id
