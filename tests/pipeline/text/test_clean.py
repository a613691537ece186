"""The cleaning stage end to end: every reject reason on small synthetic books, then the mirror."""

from __future__ import annotations

import hashlib
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.text import clean_chunks
from pipeline.text.boilerplate import find_boilerplate
from pipeline.text.clean import CleanStats, clean_books
from tests.conftest import MirrorBooks
from tests.pipeline.text.test_boilerplate import marker_span

ENGLISH = (  # function words (half the text, so it reads as English) and content words
    "the of and to a in that was he it with as his on be at by had not but from they which you "
    "were her she there would their we him been has when who will no if out so said what"
)
CONTENT = (
    "house river man woman road night morning garden letter horse village window door friend "
    "father mother child king ship sea storm lamp bread winter summer church field hill town "
    "book hand face voice heart fire water stone tree bird dog cart mill market doctor judge"
)
FRENCH = (
    "Il était tard dans la soirée quand le vieil homme revint à la maison, et il était si "
    "fatigué qu'il ne pouvait pas dire un mot. Nous lui avons donné une chaise près du feu. "
)


def english(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    function, content = ENGLISH.split(), CONTENT.split()
    words = [rng.choice(function if rng.random() < 0.5 else content) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 11]) for i in range(0, n_words, 11)]
    paras = ["\n".join(lines[i : i + 6]) for i in range(0, len(lines), 6)]
    return "\n\n".join(p[0].upper() + p[1:] + "." for p in paras)


def pg_file(title: str, body: str) -> str:
    return (
        f"The Project Gutenberg EBook of {title}\n\nTitle: {title}\n\nLanguage: English\n\n"
        f"*** START OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n\n"
        f"Produced by A. Volunteer\n\n\n{body}\n\n\n"
        f"End of the Project Gutenberg EBook of {title}\n\n"
        f"*** END OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n"
        "*** START: FULL LICENSE ***\n\nTHE FULL PROJECT GUTENBERG LICENSE\n"
    )


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[pl.DataFrame, pl.DataFrame, dict[int, str]]:
    a = english(6000, 1)
    chapters = a.split("\n\n")
    files: dict[int, bytes] = {
        1: pg_file("Alpha", a).replace("\n", "\r\n").encode(),
        2: pg_file("Alpha Reissued", a).encode(),  # exact duplicate body
        3: pg_file("Alpha Abridged", "\n\n".join(chapters[:-8])).encode(),  # contained in 1
        4: pg_file("Gamma", FRENCH * 60).encode(),
        5: pg_file("Tiny", "Just a few words here.").encode(),
        7: pg_file("Café Stories", english(4000, 7) + "\n\nA café.").encode("cp1252"),
        8: b"\x00\x01binary junk\x00",
        10: pg_file("Beta", english(5000, 10)).encode(),
        11: pg_file("Uncatalogued", english(3000, 11)).encode(),
    }
    books = tmp_path / "books"
    books.mkdir()
    for book_id, data in files.items():
        (books / f"{book_id}.txt").write_bytes(data)
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    manifest = pl.DataFrame(
        {
            "id": ids,
            "path": [str(books / f"{i}.txt") for i in ids],
            "status": ["missing" if i == 6 else "ok" for i in ids],
            "error": ["HTTP 404" if i == 6 else None for i in ids],
        }
    )
    catalog = pl.DataFrame(
        {
            "id": ids[:-1],
            "title": [f"Book {i}" for i in ids[:-1]],
            "authors": ["Doe, Jane"] * 10,
            "languages": [["fr"] if i == 4 else ["en"] for i in ids[:-1]],
        }
    )
    return manifest, catalog, {1: a}


def run(corpus, out: Path, workers: int = 2, chunk_books: int | None = None) -> CleanStats:
    manifest, catalog, _ = corpus
    return clean_books(
        manifest,
        catalog,
        out,
        languages=["en"],
        min_chars=500,
        near_duplicate_threshold=0.8,
        workers=workers,
        chunk_books=chunk_books,
    )


def test_chunks_do_not_change_the_result(corpus, tmp_path: Path) -> None:
    """The fan-out's map/reduce: one chunk per book (the exact and the near-duplicate then sit in
    other chunks than the books they repeat) gives the same files, byte for byte."""
    whole = run(corpus, tmp_path / "whole", workers=1)
    chunked = run(corpus, tmp_path / "chunked", workers=1, chunk_books=1)
    for name in ("books.parquet", "rejects.parquet"):
        a, b = tmp_path / "whole" / name, tmp_path / "chunked" / name
        assert a.read_bytes() == b.read_bytes(), name
    assert chunked.rejected == whole.rejected
    assert {"exact_duplicate", "near_duplicate"} <= set(whole.rejected)
    assert (chunked.books_kept, chunked.bytes_in, chunked.bytes_out) == (
        whole.books_kept,
        whole.bytes_in,
        whole.bytes_out,
    )


def test_every_reason_and_the_outputs(corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stats = run(corpus, out)
    assert sorted(p.name for p in out.iterdir()) == ["books.parquet", "rejects.parquet"]
    books = pl.read_parquet(out / "books.parquet")
    rejects = pl.read_parquet(out / "rejects.parquet")
    assert books.columns == [
        "id",
        "title",
        "authors",
        "language",
        "text",
        "n_chars",
        "sha256",
        "source",
    ]
    assert rejects.columns == ["id", "reason", "detail", "source"]
    assert set(books["source"]) == {"gutenberg"} and set(rejects["source"]) == {"gutenberg"}
    assert books["id"].to_list() == [1, 7, 10, 11]
    reasons = dict(rejects.select("id", "reason").iter_rows())
    assert reasons == {
        2: "exact_duplicate",
        3: "near_duplicate",
        4: "language_mismatch",
        5: "too_short",
        6: "not_downloaded",
        8: "decode_error",
        9: "read_error",
    }
    detail = dict(rejects.select("id", "detail").iter_rows())
    assert detail[2] == "same text as 1"
    assert detail[3].startswith("near-duplicate of 1: containment 1.000")
    assert "detected fr" in detail[4] and "expected en" in detail[4]
    assert "HTTP 404" in detail[6]

    row = books.row(0, named=True)
    assert row["text"] == corpus[2][1]  # header, credits, footer and licence gone; CRLF -> LF
    assert row["title"] == "Book 1" and row["language"] == "en"
    assert books.filter(pl.col("id") == 11)["title"].to_list() == [None]
    for r in books.iter_rows(named=True):
        assert r["n_chars"] == len(r["text"])
        assert r["sha256"] == hashlib.sha256(r["text"].encode()).hexdigest()
        assert find_boilerplate(r["text"]) == []
    assert "café" in books.filter(pl.col("id") == 7)["text"].item()

    assert stats.books_in == 11 and stats.books_kept == 4 and stats.books_rejected == 7
    assert stats.rejected["near_duplicate"] == 1
    assert stats.encodings == {"cp1252": 1, "utf-8": 7}  # the binary file has none
    assert stats.bytes_out == sum(len(t.encode()) for t in books["text"])
    assert stats.bytes_in > stats.bytes_out > 0 and stats.seconds > 0 and stats.mb_per_s > 0
    assert set(stats.to_dict()) >= {"books_in", "rejected", "encodings", "mb_per_s"}
    assert "4/11 books kept" in str(stats)


def test_workers_do_not_change_the_result(corpus, tmp_path: Path) -> None:
    run(corpus, tmp_path / "one", workers=1)
    run(corpus, tmp_path / "two", workers=2)
    for name in ("books.parquet", "rejects.parquet"):
        one = pl.read_parquet(tmp_path / "one" / name)
        two = pl.read_parquet(tmp_path / "two" / name)
        assert one.equals(two)


def test_broken_worker_pool_falls_back_to_in_process(corpus, tmp_path: Path, monkeypatch) -> None:
    class BrokenPool:
        def __enter__(self) -> BrokenPool:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def submit(self, *args: object, **kwargs: object) -> None:
            raise BrokenProcessPool("no workers here")

    monkeypatch.setattr(clean_chunks, "process_pool", lambda workers: BrokenPool())
    run(corpus, tmp_path / "broken", workers=2)
    run(corpus, tmp_path / "one", workers=1)
    for name in ("books.parquet", "rejects.parquet"):
        assert pl.read_parquet(tmp_path / "broken" / name).equals(
            pl.read_parquet(tmp_path / "one" / name)
        )


def test_rerun_replaces_outputs(corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(corpus, out)
    (out / "books.parquet").write_bytes(b"stale")
    run(corpus, out, workers=1)
    assert pl.read_parquet(out / "books.parquet").height == 4
    assert sorted(p.name for p in out.iterdir()) == ["books.parquet", "rejects.parquet"]


def test_single_book_nothing_dropped(tmp_path: Path) -> None:
    books = tmp_path / "b.txt"
    books.write_text(pg_file("Solo", english(2000, 3)))
    manifest = pl.DataFrame({"id": [1], "path": [str(books)], "status": ["ok"]})
    catalog = pl.DataFrame({"id": [1], "title": ["Solo"], "authors": ["X"], "languages": [["en"]]})
    stats = clean_books(
        manifest, catalog, tmp_path / "o", languages=["en"], min_chars=100,
        near_duplicate_threshold=0.8, workers=1,
    )  # fmt: skip
    assert stats.books_kept == 1 and stats.rejected == {}
    assert pl.read_parquet(tmp_path / "o" / "rejects.parquet").height == 0


# ----------------------------------------------------------------------------------- mirror
PAIRS = [(42, 43), (33, 25344), (1342, 42671), (521, 70841)]
HARD_NEGATIVES = [1524, 2264, 2265]


def mirror_inputs(mirror_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    epub = mirror_dir / "gutenberg" / "cache" / "epub"
    raw = pl.read_csv(epub / "feeds" / "pg_catalog.csv", infer_schema=False)
    catalog = raw.select(
        pl.col("Text#").cast(pl.Int64).alias("id"),
        pl.col("Title").alias("title"),
        pl.col("Authors").alias("authors"),
        pl.col("Language").str.split("; ").alias("languages"),
    )
    ids = catalog["id"].to_list()
    manifest = pl.DataFrame(
        {"id": ids, "path": [str(epub / str(i) / f"pg{i}.txt") for i in ids], "status": "ok"}
    )
    return manifest, catalog


@pytest.mark.mirror
@pytest.mark.slow
def test_mirror_clean(mirror_dir: Path, mirror_books: MirrorBooks, tmp_path: Path) -> None:
    manifest, catalog = mirror_inputs(mirror_dir)
    stats = clean_books(
        manifest, catalog, tmp_path, languages=["en"], min_chars=2000,
        near_duplicate_threshold=0.8, workers=2,
    )  # fmt: skip
    print(f"\nmirror clean: {stats}")
    books = pl.read_parquet(tmp_path / "books.parquet")
    rejects = pl.read_parquet(tmp_path / "rejects.parquet")
    kept = set(books["id"].to_list())
    reason = dict(rejects.select("id", "reason").iter_rows())
    detail = dict(rejects.select("id", "detail").iter_rows())
    # Every book of the mirror is either kept or rejected with one reason.
    assert sorted(kept | set(reason)) == mirror_books.ids and not kept & set(reason)

    dirty = {i: find_boilerplate(t)[:2] for i, t in books.select("id", "text").iter_rows()}
    assert not {i: h for i, h in dirty.items() if h}
    for phrase in (r"project\s+gutenberg", r"gutenberg\.org", r"start of th(e|is) project",
                   r"small print!", r"\be-?texts?\b"):  # fmt: skip
        assert not books["text"].str.contains(f"(?i){phrase}").any(), phrase
    assert set(books["language"].to_list()) == {"en"}

    foreign = catalog.filter(pl.col("languages").list.first() != "en")["id"].to_list()
    assert sorted(foreign) == mirror_books.not_in_language("en")
    assert all(reason.get(i) == "language_mismatch" for i in foreign)
    assert {i for i, r in reason.items() if r == "language_mismatch"} == set(foreign)

    for a, b in PAIRS:
        assert len({a, b} & kept) == 1, (a, b)
        dropped, keeper = (b, a) if a in kept else (a, b)
        assert reason[dropped] == "near_duplicate"
        assert detail[dropped].startswith(f"near-duplicate of {keeper}:")
    assert 1 in kept
    for i in (3, 5):
        assert reason[i] == "near_duplicate" and detail[i].startswith("near-duplicate of 1:")
    assert reason[4] in {"too_short", "near_duplicate"}  # Gettysburg: 1.6k chars of text
    assert set(HARD_NEGATIVES) <= kept

    epub = mirror_dir / "gutenberg" / "cache" / "epub"
    short = {}
    for book_id, text in books.select("id", "text").iter_rows():
        raw = (epub / str(book_id) / f"pg{book_id}.txt").read_bytes().decode("utf-8-sig")
        span = marker_span(raw.replace("\r\n", "\n"))
        if span is not None and len(text) < 0.95 * len(span):
            short[book_id] = round(len(text) / len(span), 3)
    assert not short
    # The outcome: every English book is kept except the documented duplicates (one of each
    # PAIR, and 3 and 5 inside 1) and the Gettysburg Address (too short, or inside 1).
    dropped = {a if a not in kept else b for a, b in PAIRS} | {3, 4, 5}
    english_rejected = {i: r for i, r in reason.items() if i not in foreign}
    assert english_rejected == {i: reason[i] for i in dropped}
    assert set(english_rejected.values()) <= {"near_duplicate", "exact_duplicate", "too_short"}
    assert kept == set(mirror_books.in_language("en")) - dropped
    assert stats.books_kept == len(kept) and stats.books_rejected == len(reason)
