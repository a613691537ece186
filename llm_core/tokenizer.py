"""Tokenizers: training from a stream, the reserved special tokens and the chat template.

Two kinds (the profile's ``tokenizer.kind``): byte-level ``bpe`` (every corpus; exact
round-trips) and ``word`` (a word-level vocabulary with an unknown token, for toy corpora whose
vocabulary a learner should be able to read: "I", "like", "coffee", ".").

The special tokens are reserved when the tokenizer is *trained*, so later stages (SFT chat turns,
alignment) never resize the embedding matrix. Ids are fixed: ``<|endoftext|>`` is 0, the rest
follow in ``SPECIAL_TOKENS`` order, then the 256 byte symbols, then the merges.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOT, PAD, SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# The word-level tokenizer's unknown word; it follows the chat specials (id 6).
UNK = "<|unk|>"
KINDS = ("bpe", "word")

# Smallest useful vocabulary: the specials, the 256 byte symbols and a few merges.
MIN_VOCAB = len(SPECIAL_TOKENS) + 256 + 1


def text_chunks(texts: Iterable[str], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Yield bounded pieces of each text, cut at a newline where one is near.

    The trainer sees a stream of ~1 MB strings rather than one string per (possibly huge) book,
    which bounds memory without changing the statistics: BPE pre-tokenises on whitespace anyway.
    """
    for text in texts:
        start, n = 0, len(text)
        while start < n:
            end = min(start + chunk_chars, n)
            if end < n:
                cut = text.rfind("\n", start + chunk_chars // 2, end)
                end = cut + 1 if cut > 0 else end
            yield text[start:end]
            start = end


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with GPT-2's pre-tokenisation regex and exact decoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, length: int | None = None
) -> Tokenizer:
    """Train byte-level BPE on a stream of texts (never materialised as one string)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum of {MIN_VOCAB}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text_chunks(texts), trainer=trainer, length=length)
    for i, special in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(special) != i:
            raise RuntimeError(f"special token {special} did not get id {i}")
    return tok


def train_words(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 1) -> Tokenizer:
    """A word-level tokenizer: words and punctuation (``Whitespace`` pre-tokenisation) seen at
    least ``min_frequency`` times, the most frequent first up to ``vocab_size``; every other word
    becomes ``<|unk|>``. Decoding joins words with single spaces, so it round-trips text written
    with spaces around punctuation ("I like tea ."), which is how the toy corpus is written."""
    specials = [*SPECIAL_TOKENS, UNK]
    if vocab_size <= len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room beside the {len(specials)} specials"
        )
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        show_progress=False,
    )
    tok.train_from_iterator(text_chunks(texts), trainer=trainer)
    for i, special in enumerate(specials):
        if tok.token_to_id(special) != i:
            raise RuntimeError(f"special token {special} did not get id {i}")
    return tok


def train_tokenizer(
    kind: str, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
) -> Tokenizer:
    """Train the profile's ``tokenizer.kind`` (``bpe`` or ``word``)."""
    if kind == "bpe":
        return train_bpe(texts, vocab_size, min_frequency=min_frequency)
    if kind == "word":
        return train_words(texts, vocab_size, min_frequency=min_frequency)
    raise ValueError(f"profile `tokenizer.kind` {kind!r} is not one of {list(KINDS)}")


def tokenizer_kind(tok: Tokenizer) -> str:
    """``word`` for a word-level tokenizer, else ``bpe``."""
    return "word" if isinstance(tok.model, models.WordLevel) else "bpe"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json``; errors name the file and say which specials are missing."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    tok = Tokenizer.from_file(str(path))
    missing = [s for s in SPECIAL_TOKENS if tok.token_to_id(s) is None]
    if missing:
        raise ValueError(f"tokenizer {path} lacks reserved special tokens {missing}")
    return tok


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class HeldOutStats:
    """How well the tokenizer compresses text it never saw, and whether it round-trips."""

    n_texts: int
    n_bytes: int
    n_tokens: int
    roundtrip_exact: bool
    first_mismatch: int | None  # index of the first text that did not round-trip

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(self.n_tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_texts": self.n_texts,
            "n_bytes": self.n_bytes,
            "n_tokens": self.n_tokens,
            "bytes_per_token": self.bytes_per_token,
            "roundtrip_exact": self.roundtrip_exact,
        }


def held_out_stats(tok: Tokenizer, texts: Sequence[str]) -> HeldOutStats:
    """Bytes per token and exact decode(encode(x)) == x on held-out texts.

    A word-level tokenizer round-trips when decoding gives the text's words joined by single
    spaces (it keeps no whitespace and maps unseen words to ``<|unk|>``)."""
    n_bytes = n_tokens = 0
    first_mismatch = None
    words = tokenizer_kind(tok) == "word"
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False).ids
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
        expected = text
        if words:
            assert tok.pre_tokenizer is not None
            expected = " ".join(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text))
        if first_mismatch is None and tok.decode(ids, skip_special_tokens=False) != expected:
            first_mismatch = i
    return HeldOutStats(len(texts), n_bytes, n_tokens, first_mismatch is None, first_mismatch)


def timed_train(
    texts: Iterable[str], vocab_size: int, *, kind: str = "bpe", **kw: Any
) -> tuple[Tokenizer, float]:
    t0 = time.perf_counter()
    tok = train_tokenizer(kind, texts, vocab_size, **kw)
    return tok, time.perf_counter() - t0


# --- chat template -------------------------------------------------------------------------------


def render_chat(messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """Render ``[{role, content}]`` as ``<|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>``.

    With ``add_generation_prompt`` the string ends with ``<|assistant|>`` so the model writes the
    reply. The same template is exported as Jinja for Hugging Face (see ``interop``).
    """
    parts = []
    for m in messages:
        role = m.get("role")
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown chat role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
        parts.append(f"{ROLE_TOKENS[role]}{m.get('content', '')}{END}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)
