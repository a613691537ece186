"""The mirror server against hostile requests and a hostile served folder (SECURITY.md 9, 10)."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from pipeline.sources.mirror import MirrorServer, header_value, resolve_under


def _crafted_root(tmp_path: Path) -> tuple[Path, Path]:
    """A mirror folder whose files and Hub repository hold symlinks leading out of it."""
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:secret\n")
    root = tmp_path / "mirror"
    site = root / "files" / "example.com"
    site.mkdir(parents=True)
    (site / "ok.txt").write_text("fine\n")
    (site / "passwd").symlink_to(secret)
    (site / "etc").symlink_to(secret.parent, target_is_directory=True)
    repo = root / "hf" / "datasets" / "org" / "data"
    repo.mkdir(parents=True)
    (repo / "train.json").write_text(json.dumps([{"a": 1}]))
    (repo / "leak.txt").symlink_to(secret)
    (root / "gutenberg").mkdir()
    return root, secret


def test_symlinks_out_of_the_served_folder_are_not_followed(tmp_path: Path) -> None:
    root, secret = _crafted_root(tmp_path)
    with MirrorServer(root) as server:
        assert requests.get(f"{server.url}/files/example.com/ok.txt", timeout=5).text == "fine\n"
        for path in ("/files/example.com/passwd", "/files/example.com/etc/passwd"):
            r = requests.get(server.url + path, timeout=5)
            assert r.status_code == 404 and "secret" not in r.text, path
        info = requests.get(f"{server.url}/api/datasets/org/data", timeout=5).json()
        assert [s["rfilename"] for s in info["siblings"]] == ["train.json"]
        leak = requests.get(f"{server.url}/datasets/org/data/resolve/main/leak.txt", timeout=5)
        assert leak.status_code == 404 and "secret" not in leak.text
    assert resolve_under(root / "files", "example.com/passwd") is None
    assert resolve_under(root / "files", "example.com/ok.txt") is not None
    assert secret.read_text().startswith("root")  # still there: only serving was refused


def test_crlf_in_a_hub_path_cannot_inject_headers(tmp_path: Path) -> None:
    root, _ = _crafted_root(tmp_path)
    with MirrorServer(root) as server:
        url = f"{server.url}/datasets/org/data/resolve/main/x%0d%0aSet-Cookie:%20pwned=1%0d%0a"
        r = requests.get(url, timeout=5)
        assert r.status_code == 404
        assert "Set-Cookie" not in r.headers and "pwned" not in r.cookies
        assert "pwned=1" in r.headers["X-Error-Message"]  # the text survives, on one line
    assert header_value("a\r\nB: c\x00\x7f") == "aB: c"
