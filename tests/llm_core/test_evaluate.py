"""Evaluation metrics: Wilson intervals and win rates, log-likelihood scoring of continuations,
held-out bits per byte and the assistant-token loss."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from llm_core.evaluate import (
    binomial_accuracy,
    bits_per_byte,
    choice_logprobs,
    evaluate_assistant_loss,
    evaluate_heldout,
    multiple_choice,
    reward_win_rate,
    score_continuations,
    wilson_interval,
)
from llm_core.model import Transformer
from llm_core.tokenizer import train_bpe
from tests.llm_core.training_helpers import make_shards, tiny_model_config


def test_wilson_interval_matches_the_textbook_value() -> None:
    # 8 of 10: Wilson 95% interval is (0.4902, 0.9433) (e.g. Newcombe 1998, table I method 3).
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)


def test_wilson_interval_stays_inside_the_unit_interval_at_the_extremes() -> None:
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.0 < hi < 0.2
    lo, hi = wilson_interval(20, 20)
    assert 0.8 < lo < 1.0 and hi == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    for n in range(1, 60):  # the estimate lies inside its own interval, rounding included
        for k in (0, 1, n - 1, n):
            lo, hi = wilson_interval(k, n)
            assert lo <= k / n <= hi
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_binomial_accuracy() -> None:
    r = binomial_accuracy(3, 4)
    assert r["accuracy"] == 0.75 and r["correct"] == 3 and r["n"] == 4
    assert r["ci95"][0] < 0.75 < r["ci95"][1]


def test_reward_win_rate_counts_ties_as_half() -> None:
    a = np.array([1.0, 2.0, 0.5, 3.0])
    b = np.array([0.0, 2.0, 1.0, 1.0])
    r = reward_win_rate(a, b)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == pytest.approx(2.5 / 4)
    lo, hi = r["ci95"]
    assert lo < r["win_rate"] < hi
    # Swapping the sides mirrors the result: win rate becomes its complement.
    swapped = reward_win_rate(b, a)
    assert swapped["win_rate"] == pytest.approx(1 - r["win_rate"])
    assert swapped["wins"] == r["losses"]


def test_reward_win_rate_tie_tolerance() -> None:
    a, b = np.array([1.0, 2.0 + 1e-9, 3.0]), np.array([1.0 + 1e-9, 2.0, 2.0])
    exact = reward_win_rate(a, b)
    assert (exact["wins"], exact["ties"], exact["losses"]) == (2, 0, 1)
    loose = reward_win_rate(a, b, tie_tolerance=1e-6)
    assert (loose["wins"], loose["ties"], loose["losses"]) == (1, 2, 0)


def test_reward_win_rate_rejects_mismatched_or_non_finite_input() -> None:
    with pytest.raises(ValueError, match="rewards_a has 2"):
        reward_win_rate(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        reward_win_rate(np.array([np.nan]), np.array([0.0]))


# ------------------------------------------------------------------------------ scoring
PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog while the farmer sleeps in the barn.",
    "It was a dark and stormy night; the rain fell in torrents, except at occasional intervals.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
    "The old man looked at the sea and said that the fish would come back in the morning.",
] * 4
SENTENCE = "The old man looked at the sea and said that the fish would come back in the morning."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(PARAGRAPHS, vocab_size=300, min_frequency=1)


def tiny_transformer(vocab: int, context_length: int = 32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_model_config(vocab, context_length))


def test_log_likelihood_picks_the_memorised_continuation(tok: Tokenizer) -> None:
    torch.set_num_threads(1)
    model = tiny_transformer(tok.get_vocab_size(), context_length=64)
    ids = torch.tensor([[0, *tok.encode(SENTENCE).ids]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(50):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    context = [0, *tok.encode("The old man looked at the sea and said").ids]  # as trained
    right = tok.encode(" that the fish would come back").ids
    wrong = tok.encode(" the lazy dog jumps over the fox").ids
    picked = multiple_choice(model, [context, context], [[wrong, right], [right, wrong]])
    assert picked.tolist() == [1, 0]
    scores = score_continuations(model, [context, context], [right, wrong])
    assert scores.logprob[0] > scores.logprob[1]
    # Greedy decoding reproduces the memorised text, not the other.
    assert scores.greedy[0] and not scores.greedy[1]
    assert scores.tokens.tolist() == [len(right), len(wrong)]


def test_scores_do_not_depend_on_batch_composition_or_padding(tok: Tokenizer) -> None:
    model = tiny_transformer(tok.get_vocab_size(), context_length=16, seed=3)
    items = [tok.encode(p).ids for p in PARAGRAPHS[:4]]
    contexts = [ids[:-3] for ids in items]
    conts = [ids[-3:] for ids in items]
    together = score_continuations(model, contexts, conts, batch_size=4)
    alone = [
        score_continuations(model, [c], [t], batch_size=1)
        for c, t in zip(contexts, conts, strict=True)
    ]
    np.testing.assert_allclose(together.logprob, [a.logprob[0] for a in alone], rtol=1e-5)
    # Paragraphs are longer than the 16-token window: contexts were cut on the left.
    assert together.truncated == sum(len(c) + 3 > 17 for c in contexts) > 0
    # By hand for the first item: the same window through a plain forward pass.
    seq = torch.tensor([(contexts[0] + conts[0])[-17:]])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[:, :-1]), dim=-1)[0]
    by_hand = sum(float(logp[16 - 3 + j, conts[0][j]]) for j in range(3))
    assert together.logprob[0] == pytest.approx(by_hand, rel=1e-5)


def test_score_continuations_rejects_empty_items(tok: Tokenizer) -> None:
    model = tiny_transformer(tok.get_vocab_size())
    with pytest.raises(ValueError, match="item 1"):
        score_continuations(model, [[1], []], [[2], [3]])


def test_bits_per_byte_on_held_out_shards_by_hand(tmp_path: Path) -> None:
    """A model with all-zero embeddings predicts the uniform distribution: the loss is ln(V) per
    token, so bpb = log2(V) * tokens / bytes, whatever the tokens are."""
    vocab, seq = 64, 8
    make_shards(tmp_path, train_tokens=200, val_tokens=100, vocab=vocab)  # bytes = 4 * tokens
    model = tiny_transformer(vocab, context_length=seq)
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # tied: the LM head is zero too, every logit is 0
    out = evaluate_heldout(model, tmp_path, batch_size=2, num_batches=3)
    assert out["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert out["bpb"] == pytest.approx(math.log2(vocab) * 100 / 400, rel=1e-6)  # = 1.5
    assert out["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert out["tokens"] == 3 * 2 * seq and out["batches"] == 3
    assert bits_per_byte(out["loss"], 100, 400) == pytest.approx(out["bpb"])


def test_assistant_loss_counts_only_reply_tokens(tok: Tokenizer) -> None:
    model = tiny_transformer(tok.get_vocab_size(), context_length=64)
    convs = [
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there."}],
        [{"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Bye."}],
    ]
    out = evaluate_assistant_loss(model, tok, convs, batch_size=2, num_batches=1)
    reply_tokens = sum(len(tok.encode(c[1]["content"]).ids) + 1 for c in convs)  # + <|end|>
    assert out["tokens"] == reply_tokens and out["conversations"] == 2
    assert math.isfinite(out["loss"]) and out["perplexity"] == pytest.approx(math.exp(out["loss"]))


def test_choice_logprobs_one_forward_per_context_equals_scoring_each_option() -> None:
    """The single-token fast path (LM head at the last position only) gives the same log p as
    scoring every (context, option) pair, also for contexts cut to the window; multi-token
    options take the pairwise path."""
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(50, 16)).eval()
    rng = np.random.default_rng(0)
    contexts = [rng.integers(1, 50, size=n).tolist() for n in (3, 9, 16, 20, 1)]
    options = [[7], [11], [13], [42]]
    fast = choice_logprobs(model, contexts, options, batch_size=2)
    assert fast.logprob.shape == (5, 4) and fast.truncated == 1  # the 20-token context
    for i, ctx in enumerate(contexts):
        ref = score_continuations(model, [ctx[-16:]] * 4, options).logprob
        np.testing.assert_allclose(fast.logprob[i], ref, rtol=1e-5, atol=1e-5)
    assert fast.picked.tolist() == fast.logprob.argmax(axis=1).tolist()
    slow = choice_logprobs(model, contexts[:2], [[7, 8], [11]], batch_size=2)
    ref = score_continuations(model, [contexts[0]], [[7, 8]]).logprob[0]
    assert slow.logprob[0, 0] == pytest.approx(ref, abs=1e-5)
