"""The tiktoken sharding path gives the same shards as ``tokenizers``; the tokenizer's sample."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from llm_core.tokenizer import train_bpe, train_words
from pipeline.text.encoding import decode_text
from pipeline.text.fast_bpe import fast_encoder, mergeable_ranks
from pipeline.text.shards import (
    budgeted,
    encode_books_to_shards,
    iter_book_texts,
    tokenizer_sample,
)


@pytest.fixture(scope="module")
def mirror_corpus(tmp_path_factory, mirror_dir, mirror_books):
    """Real PG text in several scripts (English, other Latin-script, Chinese), cut to 150 KB."""
    epub = mirror_dir / "gutenberg" / "cache" / "epub"
    chosen = mirror_books.in_language("en")[:4] + mirror_books.not_in_language("en")[:2]
    chosen += mirror_books.in_language("zh")[:1]
    rows = []
    for book_id in chosen:
        text = decode_text((epub / str(book_id) / f"pg{book_id}.txt").read_bytes()).text
        rows.append({"id": book_id, "text": text[:150_000], "n_chars": len(text[:150_000])})
    tmp = tmp_path_factory.mktemp("fast_bpe")
    books = tmp / "books.parquet"
    pl.DataFrame(rows).write_parquet(books, row_group_size=2)
    tok = train_bpe((r["text"] for r in rows[1:]), vocab_size=1500)  # book 0 is unseen
    tok.save(str(tmp / "tokenizer.json"))
    return books, tmp / "tokenizer.json", tok, rows


def test_tiktoken_shards_are_identical_to_tokenizers(tmp_path, mirror_corpus) -> None:
    books, tok_path, tok, rows = mirror_corpus
    results = {}
    for encoder in ("auto", "tokenizers"):
        manifest, stats = encode_books_to_shards(
            books,
            tok_path,
            tmp_path / encoder,
            tokens_per_shard=50_000,
            val_ids={rows[0]["id"]},
            vocab_size=1500,
            piece_chars=8192,  # many pieces per book: cuts and piece order are exercised
            encoder=encoder,
        )
        results[encoder] = (manifest, stats)
    assert results["auto"][1].encoder == "tiktoken"
    assert results["tokenizers"][1].encoder == "tokenizers"
    fast, slow = results["auto"][0], results["tokenizers"][0]
    assert [s["sha256"] for s in fast["shards"]] == [s["sha256"] for s in slow["shards"]]
    assert fast["splits"] == slow["splits"] and len(fast["shards"]) > 2
    # and both are the tokenizer's own encoding of each book, <|endoftext|> after each
    train = np.concatenate(
        [np.load(tmp_path / "auto" / s["file"]) for s in fast["shards"] if s["split"] == "train"]
    )
    expected = []
    for r in rows[1:]:
        expected += tok.encode(r["text"], add_special_tokens=False).ids + [fast["eot_id"]]
    assert train.tolist() == expected


def test_fast_path_only_where_exact(tmp_path, mirror_corpus) -> None:
    _, tok_path, tok, rows = mirror_corpus
    ranks = mergeable_ranks(tok_path)
    assert ranks is not None and len(ranks) == tok.get_vocab_size() - 6  # all but the specials
    words = train_words([rows[1]["text"]], vocab_size=500)
    words.save(str(tmp_path / "words.json"))
    assert mergeable_ranks(tmp_path / "words.json") is None
    # A tokenizer file whose merges no longer create ids in order is refused too.
    spec = json.loads(tok_path.read_text())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    (tmp_path / "reordered.json").write_text(json.dumps(spec))
    assert mergeable_ranks(tmp_path / "reordered.json") is None
    # The per-batch spot check catches a reference that disagrees.
    fast = fast_encoder(tok_path, words, threads=1)
    assert fast is not None
    with pytest.raises(RuntimeError, match="disagree"):
        fast.check(rows[1]["text"])


def test_tokenizer_sample_is_bounded_seeded_and_stable(mirror_corpus) -> None:
    books, _, _, rows = mirror_corpus
    total = sum(r["n_chars"] for r in rows[1:])
    held = {rows[0]["id"]}
    everything = tokenizer_sample(books, exclude=held, max_chars=None, seed=1)
    assert everything.ids is None and everything.chars == everything.corpus_chars == total
    assert tokenizer_sample(books, exclude=held, max_chars=10**12, seed=1).ids is None
    a = tokenizer_sample(books, exclude=held, max_chars=200_000, seed=1)
    assert a == tokenizer_sample(books, exclude=held, max_chars=200_000, seed=1)
    assert a.chars == 200_000 and a.corpus_chars == total and rows[0]["id"] not in a.ids
    assert 2 <= a.books == len(a.ids) < len(rows) - 1
    assert tokenizer_sample(books, exclude=held, max_chars=200_000, seed=2).ids != a.ids
    texts = [t for _, t in iter_book_texts(books, include=a.ids)]
    assert len(texts) == a.books
    assert sum(len(t) for t in budgeted(texts, a.chars)) == a.chars
    with pytest.raises(ValueError, match="max_chars"):
        tokenizer_sample(books, exclude=held, max_chars=0, seed=1)
