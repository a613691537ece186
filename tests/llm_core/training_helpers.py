"""Small shard corpora and model configs shared by the llm_core training tests."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from llm_core.checkpoint import save_weights
from llm_core.config import ModelConfig, TrainConfig
from llm_core.data import ShardWriter, write_manifest
from llm_core.model import Transformer
from llm_core.tokenizer import train_bpe

VOCAB = 64
SEQ = 16


def tiny_model_config(vocab: int = VOCAB, seq: int = SEQ) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        context_length=seq,
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        d_model=32,
        ffn_hidden=64,
    )


def tiny_train_config(**overrides: object) -> TrainConfig:
    base: dict[str, object] = dict(
        steps=8,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        eval_every=4,
        eval_batches=2,
        checkpoint_every=3,
        log_every=2,
        seed=7,
        device="cpu",
    )
    base.update(overrides)
    return TrainConfig.from_dict(base)


def corpus(n: int, vocab: int = VOCAB, period: int = 97, seed: int = 0) -> np.ndarray:
    """A learnable stream: a fixed random phrase of ``period`` tokens repeated, so a tiny model
    can memorise it and the loss falls fast."""
    phrase = np.random.default_rng(seed).integers(0, vocab, size=period)
    return np.resize(phrase, n).astype(np.int64)


def make_shards(
    root: Path,
    *,
    train_tokens: int = 6000,
    val_tokens: int = 1500,
    tokens_per_shard: int = 1024,
    vocab: int = VOCAB,
) -> Path:
    """Write a train+val shard directory with this project's own writer."""
    data = corpus(train_tokens + val_tokens, vocab)
    parts = {"train": data[:train_tokens], "val": data[train_tokens:]}
    shards: list[dict[str, object]] = []
    splits: dict[str, dict[str, int]] = {}
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    for split, tokens in parts.items():
        writer = ShardWriter(root, split=split, tokens_per_shard=tokens_per_shard, dtype=dtype)
        for chunk in np.array_split(tokens, 7):  # uneven writes cross shard boundaries
            writer.write(chunk)
        shards += writer.close()
        splits[split] = {"tokens": int(tokens.size), "bytes": int(tokens.size) * 4, "books": 1}
    write_manifest(
        root,
        {
            "format": "scriptorium-shards/1",
            "dtype": dtype,
            "vocab_size": vocab,
            "eot_id": 0,
            "tokenizer_sha256": "0" * 64,
            "tokens_per_shard": tokens_per_shard,
            "splits": splits,
            "shards": shards,
        },
    )
    return root


# ------------------------------------------------------------------------------ chat / alignment
# A small vocabulary of words, a marker word that makes a reply "preferred", and a BPE trained on
# them: enough for reward models, DPO and RL to learn something real in seconds.
WORDS = [
    "the",
    "a",
    "sea",
    "ship",
    "king",
    "queen",
    "river",
    "stone",
    "bread",
    "light",
    "house",
    "tree",
    "garden",
    "road",
    "winter",
    "summer",
    "old",
    "young",
    "small",
    "large",
    "green",
    "blue",
    "quiet",
    "loud",
]
MARKER = "banana"


def chat_tokenizer(vocab: int = 300) -> Tokenizer:
    """A byte-level BPE with the reserved chat tokens, trained on ``WORDS`` and prompts."""
    text = [" ".join([*WORDS, MARKER, "Tell me about the"])] * 50
    return train_bpe(text, vocab, min_frequency=1)


def save_tiny_lm(out: Path, vocab: int, ctx: int = 64, seed: int = 0) -> Path:
    """A random tiny Transformer written with ``save_weights`` (stands in for sft_weights)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab, ctx, n_layer=2, n_head=2, n_kv_head=1, d_model=32, ffn_hidden=64)
    save_weights(Transformer(cfg), out)
    return out


def marker_pairs(n: int, seed: int) -> list[dict[str, object]]:
    """Preference pairs whose chosen reply contains ``MARKER`` and whose rejected one does not."""
    rng = random.Random(seed)

    def reply(marker: bool) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        if marker:
            words.insert(rng.randint(0, len(words)), MARKER)
        return " ".join(words)

    return [
        {
            "prompt": [{"role": "user", "content": f"Tell me about the {rng.choice(WORDS)}."}],
            "chosen": reply(True),
            "rejected": reply(False),
        }
        for _ in range(n)
    ]
