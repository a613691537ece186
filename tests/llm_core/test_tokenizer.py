"""Byte-level BPE: reserved specials at fixed ids, exact round-trip, streamed training."""

from __future__ import annotations

import pytest

from llm_core.tokenizer import (
    ASSISTANT,
    END,
    EOT,
    SPECIAL_TOKENS,
    held_out_stats,
    load_tokenizer,
    render_chat,
    text_chunks,
    train_bpe,
)

CORPUS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 40,
    "Call me Ishmael. Some years ago—never mind how long precisely—having little money.\n" * 40,
    "Alice was beginning to get very tired of sitting by her sister on the bank.\n" * 40,
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(iter(CORPUS), vocab_size=400, min_frequency=2)


def test_specials_have_fixed_ids(tok) -> None:
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.get_vocab_size() <= 400


def test_roundtrip_is_exact_on_unseen_text(tok) -> None:
    held = ["Ünïcödé “quotes” — and\ttabs\r\n  double  spaces 🙂 中文", "\n\n\nTHE END\n"]
    stats = held_out_stats(tok, held)
    assert stats.roundtrip_exact
    assert stats.n_bytes == sum(len(t.encode()) for t in held)
    assert stats.bytes_per_token > 0


def test_specials_encode_to_single_tokens(tok) -> None:
    text = render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[-1] == tok.token_to_id(ASSISTANT)
    assert tok.token_to_id(END) in ids
    assert tok.encode(EOT).ids == [0]


def test_chunks_bound_size_and_keep_all_text() -> None:
    text = ("line of text\n" * 10000) + "tail"
    pieces = list(text_chunks([text], chunk_chars=1000))
    assert "".join(pieces) == text
    assert max(len(p) for p in pieces) <= 1000


def test_vocab_too_small_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(iter(CORPUS), vocab_size=100)


def test_load_tokenizer_errors_name_the_file(tmp_path, tok) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).get_vocab_size() == tok.get_vocab_size()


def test_render_chat_rejects_unknown_roles() -> None:
    with pytest.raises(ValueError, match="unknown chat role"):
        render_chat([{"role": "robot", "content": "x"}])


def test_word_tokenizer_reads_as_words() -> None:
    """``tokenizer.kind: word``: the chat specials keep their ids, ``<|unk|>`` follows them, the
    vocabulary is the corpus's words, and decoding joins words with single spaces."""
    from llm_core.tokenizer import (
        SPECIAL_TOKENS,
        UNK,
        held_out_stats,
        render_chat,
        tokenizer_kind,
        train_tokenizer,
    )

    tok = train_tokenizer(
        "word", ["the cat likes milk .\nthe dog likes bones ."], 64, min_frequency=1
    )
    assert tokenizer_kind(tok) == "word"
    assert [tok.token_to_id(t) for t in (*SPECIAL_TOKENS, UNK)] == list(range(7))
    assert tok.get_vocab_size() == 7 + 7  # the, cat, dog, likes, milk, bones, .
    enc = tok.encode("the cat likes bones.", add_special_tokens=False)
    assert enc.tokens == ["the", "cat", "likes", "bones", "."]
    assert tok.decode(enc.ids) == "the cat likes bones ."
    assert tok.encode("the cow", add_special_tokens=False).tokens == ["the", UNK]
    chat = render_chat([{"role": "user", "content": "the cat ?"}], add_generation_prompt=True)
    assert tok.encode(chat, add_special_tokens=False).tokens[0] == "<|user|>"
    assert held_out_stats(tok, ["the dog likes milk."]).roundtrip_exact  # words, single spaces
    assert not held_out_stats(tok, ["the cow likes milk ."]).roundtrip_exact  # an unknown word
    with pytest.raises(ValueError, match="tokenizer.kind"):
        train_tokenizer("chars", ["x"], 64)
