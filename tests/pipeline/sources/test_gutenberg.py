"""Catalog parsing, book selection and resumable downloads against a real loopback mirror."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from pipeline.sources.gutenberg import (
    MANIFEST_SCHEMA,
    CatalogFormatError,
    CatalogRules,
    DownloadFailuresError,
    book_url,
    catalog_url,
    check_failures,
    download_books,
    parse_catalog,
    read_manifest,
    select_books,
    write_manifest,
)
from pipeline.sources.mirror import Fault, MirrorServer
from tests.conftest import MirrorBooks
from tests.pipeline.sources.conftest import FIXTURE_BOOK_IDS, book_path, fixture_book_bytes

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def catalog(fixture_root: Path) -> pl.DataFrame:
    return parse_catalog(fixture_root / "gutenberg" / "cache" / "epub" / "feeds" / "pg_catalog.csv")


def _visible_txt(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".txt"))


# ------------------------------------------------------------------------------------- catalog
def test_urls() -> None:
    assert catalog_url() == "https://www.gutenberg.org/cache/epub/feeds/pg_catalog.csv"
    assert book_url("http://127.0.0.1:8765/", 84) == "http://127.0.0.1:8765/cache/epub/84/pg84.txt"


def test_parse_fixture_catalog(catalog: pl.DataFrame, fixture_root: Path) -> None:
    assert catalog.columns == [
        "id", "type", "issued", "title", "languages", "authors", "subjects", "locc", "bookshelves",
    ]  # fmt: skip
    assert catalog.schema["id"] == pl.Int64
    assert catalog.schema["languages"] == pl.List(pl.String)
    rows = {r["id"]: r for r in catalog.iter_rows(named=True)}
    assert rows[1002]["title"] == "A Treatise on Bees\nWith Notes on Their Keeping"
    assert rows[1004]["languages"] == ["en", "fr"]
    assert rows[1008]["title"] == '"Red Sky at Night": Weather Sayings'
    assert rows[1008]["authors"] == ""  # empty fields are "" not null
    feeds = fixture_root / "gutenberg" / "cache" / "epub" / "feeds"
    gz = feeds / "pg_catalog.csv.gz"
    assert parse_catalog(gz).equals(catalog)
    assert parse_catalog(gzip.decompress(gz.read_bytes())).equals(catalog)


def test_bad_header_names_file_and_missing_columns(tmp_path: Path) -> None:
    bad = tmp_path / "catalog.csv"
    bad.write_text("Text#,Type,Title\n1,Text,x\n")
    with pytest.raises(CatalogFormatError, match="catalog.csv") as info:
        parse_catalog(bad)
    assert "Bookshelves" in str(info.value) and "Language" in str(info.value)


def test_non_numeric_id_is_rejected() -> None:
    data = (
        b"Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves\nabc,Text,,,en,,,,\n"
    )
    with pytest.raises(CatalogFormatError, match="abc"):
        parse_catalog(data)


@pytest.mark.mirror
def test_parse_real_mirror_catalog(mirror_dir: Path, mirror_books: MirrorBooks) -> None:
    feeds = mirror_dir / "gutenberg" / "cache" / "epub" / "feeds"
    df = parse_catalog(feeds / "pg_catalog.csv")
    assert df["id"].to_list() == sorted(mirror_books.catalog)  # every row, as the csv module reads
    assert df["id"].is_unique().all() and df["id"].is_sorted()
    multi_line = df.filter(pl.col("title").str.contains("\n"))["id"].to_list()
    assert multi_line == [4, 1080, 1228, 15399]
    assert set(df["type"]) == {"Text"}
    langs = {r["id"]: r["languages"] for r in df.select("id", "languages").iter_rows(named=True)}
    assert langs[23825] == ["zh"] and langs[2000] == ["es"] and langs[11] == ["en"]
    assert langs == {i: list(codes) for i, codes in mirror_books.catalog.items()}
    assert parse_catalog(feeds / "pg_catalog.csv.gz").equals(df)


@pytest.mark.mirror
def test_tiny_profile_selection_on_real_catalog(
    mirror_dir: Path, mirror_books: MirrorBooks
) -> None:
    profile = yaml.safe_load((REPO / "configs" / "profiles" / "tiny.yaml").read_text())
    rules = CatalogRules.from_mapping(profile["catalog"])
    df = parse_catalog(mirror_dir / "gutenberg" / "cache" / "epub" / "feeds" / "pg_catalog.csv")
    assert select_books(df, rules)["id"].to_list() == [4, 11, 41, 46, 1952, 17192, 68283]
    english = select_books(df, CatalogRules())  # the defaults: English texts
    assert english["id"].to_list() == mirror_books.in_language("en")


# ------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (CatalogRules(), [1001, 1002, 1004, 1006, 1008]),
        (CatalogRules(languages=["fr"]), [1003, 1004]),
        (CatalogRules(languages=[], types=[]), [1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008]),
        (CatalogRules(types=["Sound"]), [1005]),
        (CatalogRules(ids=[1008, 1003, 1001]), [1001, 1008]),
        (CatalogRules(exclude_ids=[1002, 1006]), [1001, 1004, 1008]),
        (CatalogRules(bookshelves=["SCIENCE", "nothing"]), [1002, 1008]),
        (CatalogRules(subjects=["bees", "proverbs"]), [1002, 1008]),
        (CatalogRules(max_books=2), [1001, 1002]),
        (CatalogRules(max_books=0), []),
    ],
)
def test_select_books(catalog: pl.DataFrame, rules: CatalogRules, expected: list[int]) -> None:
    assert select_books(catalog, rules)["id"].to_list() == expected


def test_select_books_is_deterministic(catalog: pl.DataFrame) -> None:
    rules = CatalogRules(languages=[], types=[], max_books=3)
    shuffled = catalog.sample(fraction=1.0, shuffle=True, seed=7)
    assert select_books(shuffled, rules).equals(select_books(catalog, rules))


def test_rules_from_mapping_rejects_typos() -> None:
    with pytest.raises(ValueError, match="bookshelfs"):
        CatalogRules.from_mapping({"bookshelfs": ["x"]})
    with pytest.raises(ValueError, match="max_books"):
        CatalogRules(max_books=-1)


# ------------------------------------------------------------------------------------- download
def test_download_books_ok(
    mirror: MirrorServer, tmp_path: Path, fast_download: dict[str, Any]
) -> None:
    manifest = download_books(FIXTURE_BOOK_IDS, mirror.url, tmp_path, **fast_download)
    assert manifest.schema == pl.Schema(MANIFEST_SCHEMA)
    assert manifest["id"].to_list() == FIXTURE_BOOK_IDS
    assert set(manifest["status"]) == {"ok"}
    for row in manifest.iter_rows(named=True):
        data = fixture_book_bytes(row["id"])
        assert Path(row["path"]).read_bytes() == data  # raw bytes as served (BOM, CRLF kept)
        assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["bytes"] == len(data)
        assert row["url"] == book_url(mirror.url, row["id"]) and row["attempts"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == _visible_txt(tmp_path)  # no temp files
    write_manifest(manifest, tmp_path / "manifest.parquet")
    assert read_manifest(tmp_path / "manifest.parquet").equals(manifest)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_download_under_faults(
    mirror: MirrorServer, tmp_path: Path, fast_download: dict[str, Any]
) -> None:
    plan = mirror.faults
    plan.add(book_path(1001), "500", "500")
    plan.add(book_path(1002), "reset")
    plan.add(book_path(1003), "truncate", Fault("503", retry_after=0))
    plan.add(book_path(1004), Fault("stall", seconds=1.5))
    plan.add(book_path(1007), "404")
    plan.add(book_path(1008), *["500"] * 3)  # more than max_retries=2 allows
    ids = [*FIXTURE_BOOK_IDS, 1006]  # 1006 has no file upstream
    manifest = download_books(ids, mirror.url, tmp_path, **{**fast_download, "timeout_s": 0.5})
    assert plan.pending() == 0
    status = dict(manifest.select("id", "status").iter_rows())
    assert status == {1001: "ok", 1002: "ok", 1003: "ok", 1004: "ok", 1006: "missing",
                      1007: "missing", 1008: "failed"}  # fmt: skip
    for row in manifest.iter_rows(named=True):
        if row["status"] == "ok":
            assert Path(row["path"]).read_bytes() == fixture_book_bytes(row["id"])
            assert row["error"] is None
        else:  # recorded with an error that names the URL, and no file
            assert row["url"] in row["error"] and not Path(row["path"]).exists()
    attempts = dict(manifest.select("id", "attempts").iter_rows())
    assert attempts == {1001: 3, 1002: 2, 1003: 3, 1004: 2, 1006: 1, 1007: 1, 1008: 3}
    assert _visible_txt(tmp_path) == ["1001.txt", "1002.txt", "1003.txt", "1004.txt"]
    with pytest.raises(DownloadFailuresError, match="1008"):
        check_failures(manifest, max_failure_fraction=0.1)
    check_failures(manifest, max_failure_fraction=0.2)  # 1/7 failed; 404s do not count


def test_check_failures_edge_cases() -> None:
    check_failures(pl.DataFrame(schema=MANIFEST_SCHEMA), 0.0)
    rows = [{"id": i, "status": "failed" if i < 60 else "ok", "error": f"e{i}"} for i in range(100)]
    manifest = pl.DataFrame(rows)
    with pytest.raises(DownloadFailuresError, match=r"60 of 100 .*10 more") as info:
        check_failures(manifest, 0.5)
    assert "e0" in str(info.value)


def test_rerun_fetches_only_missing_or_damaged(
    mirror: MirrorServer, tmp_path: Path, fast_download: dict[str, Any]
) -> None:
    mirror.faults.add(book_path(1008), *["500"] * 3)
    ids = [*FIXTURE_BOOK_IDS, 1006]
    first = download_books(ids, mirror.url, tmp_path, **fast_download)
    write_manifest(first, tmp_path / "manifest.parquet")
    damaged = tmp_path / "1002.txt"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF  # same size, different content: only the hash can tell
    damaged.write_bytes(bytes(data))
    (tmp_path / "1003.txt").unlink()
    (tmp_path / "1004.txt").write_bytes(b"short")
    mirror.faults.clear_log()

    second = download_books(
        ids, mirror.url, tmp_path, previous_manifest=tmp_path / "manifest.parquet", **fast_download
    )
    requested = sorted(mirror.faults.requested_paths())
    assert requested == sorted(book_path(i) for i in (1002, 1003, 1004, 1006, 1008))
    status = dict(second.select("id", "status").iter_rows())
    assert status == {i: "ok" for i in FIXTURE_BOOK_IDS} | {1006: "missing"}
    attempts = dict(second.select("id", "attempts").iter_rows())
    assert attempts[1001] == 0 and attempts[1007] == 0  # reused, not requested
    for book_id in FIXTURE_BOOK_IDS:
        assert (tmp_path / f"{book_id}.txt").read_bytes() == fixture_book_bytes(book_id)

    mirror.faults.clear_log()
    third = download_books(ids, mirror.url, tmp_path, previous_manifest=second, **fast_download)
    assert mirror.faults.requested_paths() == [book_path(1006)]  # only the 404 is retried
    assert third.drop("attempts").equals(second.drop("attempts"))


_CHILD = """
import sys
from pipeline.sources.gutenberg import download_books
download_books([1001, 1002], sys.argv[1], sys.argv[2], concurrency=1, requests_per_second=0,
               max_retries=0, timeout_s=30)
"""


def test_kill_mid_download_leaves_no_partial_file(
    mirror: MirrorServer, tmp_path: Path, fast_download: dict[str, Any]
) -> None:
    books = tmp_path / "books"
    mirror.faults.add(book_path(1002), Fault("drip", seconds=30, fraction=0.5))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, mirror.url, str(books)], cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while not list(books.glob(".1002.txt.*.part")):
            assert child.poll() is None and time.monotonic() < deadline, "child never reached 1002"
            time.sleep(0.02)
        child.kill()  # SIGKILL while 1002's body is half-sent: no cleanup code runs
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _visible_txt(books) == ["1001.txt"]
    assert list(books.glob(".1002.txt.*.part"))  # the partial exists only under a temp name

    other_batch = books / ".9999.txt.inflight.part"  # another process's in-flight download
    other_batch.write_bytes(b"half")
    manifest = download_books([1001, 1002], mirror.url, books, **fast_download)
    assert set(manifest["status"]) == {"ok"}
    assert (books / "1002.txt").read_bytes() == fixture_book_bytes(1002)
    names = sorted(p.name for p in books.iterdir())
    assert names == [other_batch.name, "1001.txt", "1002.txt"]  # own leftovers cleaned, not others'
