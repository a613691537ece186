"""Cleaned books -> shards: split by book, EOT after each book, manifest consistent with files."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from llm_core.data import TokenShards, read_manifest
from llm_core.tokenizer import train_bpe
from pipeline.text.shards import encode_books_to_shards, split_val_books


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["whale", "sea", "ship", "captain", "harpoon", "deck", "storm", "oil", "the", "a"]
    rows = []
    for i in range(1, 9):
        text = " ".join(rng.choice(words, size=3000)) + f"\nBook {i} ends.\n"
        rows.append({"id": i * 10, "title": f"Book {i}", "text": text})
    books = tmp_path / "books.parquet"
    pl.DataFrame(rows).write_parquet(books)
    tok = train_bpe((r["text"] for r in rows), vocab_size=300)
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    return books, tok_path, tok, rows


def test_split_is_deterministic_and_holds_out_at_least_one() -> None:
    ids = list(range(1, 50))
    a = split_val_books(ids, 3, seed=7)
    assert a == split_val_books(reversed(ids), 3, seed=7)
    assert len(a) == 3 and a <= set(ids)
    assert split_val_books(ids, 3, seed=8) != a
    assert len(split_val_books([1, 2], 5, seed=0)) == 1
    assert split_val_books([1], 1, seed=0) == set()


def test_shards_round_trip_books_with_eot(tmp_path, corpus) -> None:
    books, tok_path, tok, rows = corpus
    out = tmp_path / "shards"
    val = {30}
    manifest, stats = encode_books_to_shards(
        books, tok_path, out, tokens_per_shard=2000, val_ids=val, vocab_size=300
    )
    assert read_manifest(out) == json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16"
    assert manifest["splits"]["val"]["books"] == 1
    assert manifest["splits"]["train"]["books"] == len(rows) - 1
    for entry in manifest["shards"]:
        arr = np.load(out / entry["file"], mmap_mode="r")
        assert arr.shape[0] == entry["tokens"] <= 2000
        assert int(arr.max()) < 300
    # The val split decodes back to exactly the held-out book followed by <|endoftext|>.
    val_tokens = np.concatenate(
        [np.load(out / e["file"]) for e in manifest["shards"] if e["split"] == "val"]
    )
    assert val_tokens[-1] == manifest["eot_id"]
    assert tok.decode(val_tokens[:-1].tolist(), skip_special_tokens=False) == rows[2]["text"]
    assert manifest["splits"]["val"]["bytes"] == len(rows[2]["text"].encode())
    train = TokenShards(out, "train")
    assert len(train) == manifest["splits"]["train"]["tokens"]
    # Every train book ends with EOT: the count of EOT tokens equals the number of books.
    train_tokens = np.concatenate(
        [np.load(out / e["file"]) for e in manifest["shards"] if e["split"] == "train"]
    )
    assert int((train_tokens == manifest["eot_id"]).sum()) == len(rows) - 1


def test_vocab_mismatch_is_an_error(tmp_path, corpus) -> None:
    books, tok_path, _, _ = corpus
    with pytest.raises(ValueError, match="vocab_size"):
        encode_books_to_shards(
            books, tok_path, tmp_path / "s", tokens_per_shard=100, val_ids=set(), vocab_size=100
        )


def test_split_for_encoding_gives_identical_tokens(corpus) -> None:
    from pipeline.text.shards import split_for_encoding

    _, _, tok, rows = corpus
    text = "\n".join(
        ["  indented line", "", "\n\nParagraph after blank lines.", "   ", "Last line."] * 400
    )
    for sample in (text, rows[0]["text"], "no newline at all " * 500):
        pieces = split_for_encoding(sample, 300)
        assert "".join(pieces) == sample
        whole = tok.encode(sample, add_special_tokens=False).ids
        joined = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
        assert joined == whole


def test_val_fraction_splits_every_book_by_characters(tmp_path) -> None:
    """``val_fraction``: the last fraction of each book's characters is the val split (the one-
    story corpus of the verdict profile), the rest is train; nothing is lost or duplicated."""
    import json

    import polars as pl

    from llm_core.tokenizer import train_bpe
    from pipeline.text.shards import char_split, encode_books_to_shards, iter_book_texts

    text = "".join(f"Line {i} of the story, with some words.\n" for i in range(200))
    books = tmp_path / "books.parquet"
    pl.DataFrame({"id": [-1], "text": [text]}).write_parquet(books)
    train_chars, val_chars = char_split(0.1)
    assert train_chars == (0.0, 0.9) and val_chars == (0.9, 1.0)
    head = next(iter_book_texts(books, chars=train_chars))[1]
    tail = next(iter_book_texts(books, chars=val_chars))[1]
    assert head + tail == text and len(head) == int(0.9 * len(text))
    tok = train_bpe([head], 300)
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    manifest, _ = encode_books_to_shards(
        books,
        tmp_path / "tok" / "tokenizer.json",
        tmp_path / "shards",
        tokens_per_shard=4096,
        val_ids=set(),
        vocab_size=300,
        val_fraction=0.1,
    )
    splits = json.loads((tmp_path / "shards" / "manifest.json").read_text())["splits"]
    assert manifest["val_char_fraction"] == 0.1
    assert splits["train"]["bytes"] == len(head.encode()) and splits["val"]["bytes"] == len(
        tail.encode()
    )
    assert splits["val"]["tokens"] > 0
    with pytest.raises(ValueError, match="val_fraction"):
        char_split(1.0)


@pytest.mark.parametrize("val_fraction", [0.0, 0.1])
def test_chunks_do_not_change_the_shards(tmp_path, corpus, val_fraction) -> None:
    """The fan-out's plan/encode/merge: chunks of 3 books give the same shards, byte for byte,
    as one pass, with fixed-size shards cut across chunk boundaries."""
    books, tok_path, _, _ = corpus
    kw = dict(tokens_per_shard=1500, val_ids={30, 70}, vocab_size=300, val_fraction=val_fraction)
    whole, _ = encode_books_to_shards(books, tok_path, tmp_path / "whole", **kw)
    chunked, _ = encode_books_to_shards(books, tok_path, tmp_path / "chunked", chunk_books=3, **kw)
    assert chunked == whole and len(whole["shards"]) > 3
    for entry in whole["shards"]:
        a = (tmp_path / "whole" / entry["file"]).read_bytes()
        assert a == (tmp_path / "chunked" / entry["file"]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "chunked").iterdir() if p.suffix != ".npy") == [
        "manifest.json"
    ]


def test_streamed_shards_are_what_shardwriter_writes(tmp_path) -> None:
    """The merge's streaming writer and ``ShardWriter`` give the same files and entries."""
    from llm_core.data.shards import ShardWriter
    from pipeline.text.shard_files import write_split

    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 60_000, size=n, dtype=np.uint16) for n in (5, 1234, 0, 777, 4000)]
    total = sum(len(p) for p in parts)
    (tmp_path / "a").mkdir()
    ours = write_split(tmp_path / "a", "train", parts, total, 1000, np.dtype(np.uint16))
    with ShardWriter(tmp_path / "b", split="train", tokens_per_shard=1000, dtype="uint16") as w:
        for p in parts:
            w.write(p)
    assert ours == w.close() and len(ours) == 7
    for e in ours:
        assert (tmp_path / "a" / e["file"]).read_bytes() == (
            tmp_path / "b" / e["file"]
        ).read_bytes()
