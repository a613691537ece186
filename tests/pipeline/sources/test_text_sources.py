"""The profile's ``text_sources``: parsing, fetching (inline, local file, URL through the files
mirror) and their union with the Gutenberg books in ``clean_books`` (one rejects table, a
``source`` column)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import polars as pl
import pytest

from pipeline.sources.mirror import MirrorServer
from pipeline.sources.text_sources import parse_text_sources, text_source_books
from pipeline.text.clean import clean_books

VERDICT_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/"
    "01_main-chapter-code/the-verdict.txt"
)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("a.txt", "must be a list"),
        ([{"id": "x"}], "exactly one of path, url, text"),
        ([{"id": "x", "path": "a", "url": "https://h/a"}], "exactly one of"),
        ([{"id": "x", "url": "ftp://h/a"}], "not http(s)"),
        ([{"id": "x", "text": "t", "colour": 1}], "unknown key(s) ['colour']"),
        ([{"id": "bad id", "text": "t"}], "id 'bad id'"),
        ([{"id": "x", "text": "t"}, {"id": "x", "text": "u"}], "duplicate id(s) ['x']"),
        ([{"id": "x", "path": "a", "repeat": 3}], "repeat must be"),
    ],
)
def test_bad_entries_are_refused_by_name(entries, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_text_sources(entries)


def test_inline_and_local_sources(tmp_path: Path) -> None:
    local = tmp_path / "notes.txt"
    local.write_text("My own notes about the sea.\n")
    sources = parse_text_sources(
        [
            {"id": "toy", "text": "the cat likes milk .\n", "repeat": 3},
            {"id": "notes", "path": "notes.txt", "title": "Notes"},
        ]
    )
    manifest, catalog = text_source_books(sources, tmp_path / "dest", base_dir=tmp_path)
    assert manifest["id"].to_list() == [-1, -2] and set(manifest["status"]) == {"ok"}
    assert Path(manifest["path"][0]).read_text() == "the cat likes milk .\n" * 3
    assert manifest["path"][1] == str(local)
    assert catalog["source"].to_list() == ["toy", "notes"]
    assert catalog["title"].to_list() == ["toy", "Notes"]
    missing = parse_text_sources([{"id": "gone", "path": "nowhere.txt"}])
    with pytest.raises(FileNotFoundError, match="text source 'gone'"):
        text_source_books(missing, tmp_path / "dest", base_dir=tmp_path)


def test_verdict_url_through_the_files_mirror_and_clean_books(
    mirror_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The story, fetched by its real URL through the mirror (sha256-pinned), cleaned with a book
    that is too short: both outcomes in the same two tables, each row naming its source."""
    story = (
        mirror_dir / "files" / "raw.githubusercontent.com" / VERDICT_URL.split(".com/", 1)[1]
    ).read_bytes()
    sha = hashlib.sha256(story).hexdigest()
    with MirrorServer(mirror_dir) as server:
        monkeypatch.setenv("SCRIPTORIUM_FILES_MIRROR", f"{server.url}/files")
        sources = parse_text_sources(
            [
                {"id": "verdict", "url": VERDICT_URL, "sha256": sha, "title": "The Verdict"},
                {"id": "tiny", "text": "Too short to keep."},
            ]
        )
        manifest, catalog = text_source_books(sources, tmp_path / "dest", base_dir=tmp_path)
        wrong = parse_text_sources([{"id": "v2", "url": VERDICT_URL, "sha256": "0" * 64}])
        with pytest.raises(RuntimeError, match="text source 'v2'"):
            text_source_books(wrong, tmp_path / "dest2", base_dir=tmp_path)
    assert Path(manifest["path"][0]).read_bytes() == story
    out = tmp_path / "clean"
    clean_books(
        manifest,
        catalog,
        out,
        languages=["en"],
        min_chars=1000,
        near_duplicate_threshold=0.8,
        workers=1,
    )
    books = pl.read_parquet(out / "books.parquet")
    rejects = pl.read_parquet(out / "rejects.parquet")
    assert books.select("id", "source", "title").rows() == [(-1, "verdict", "The Verdict")]
    assert books["text"][0].startswith("I HAD always thought Jack Gisburn")
    assert rejects.select("id", "reason", "source").rows() == [(-2, "too_short", "tiny")]
