"""Evaluation metrics for language models: held-out loss, zero-shot scoring, proportions.

Loss per token depends on the tokenizer (a bigger vocabulary packs more text into each token), so
runs with different tokenizers are compared on *bits per byte* of the original UTF-8 text:
``bpb = mean_loss_nats / ln 2 * tokens / bytes``. The shard manifest records both counts per split.

Zero-shot benchmarks are scored by log-likelihood (:func:`score_continuations`): the model reads a
context and we sum ``log p`` of a continuation's tokens. Multiple choice picks the option with the
highest total log-probability (:func:`multiple_choice`), as the BLiMP paper's "simple LM method"
does for minimal pairs; LAMBADA asks whether greedy decoding reproduces every token of the last
word (:attr:`ContinuationScores.greedy`, the ``acc`` of lm-evaluation-harness).

Proportions (accuracies, win rates) carry a Wilson 95% interval, since the item counts of the
small profiles make a bare percentage misleading.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import nn

from llm_core.data import TokenShards
from llm_core.data.lm import EvalBatches
from llm_core.objectives import per_token_nll


def bits_per_byte(mean_loss_nats: float, tokens: int, num_bytes: int) -> float:
    """Convert a mean per-token loss in nats into bits per UTF-8 byte of source text."""
    if tokens <= 0 or num_bytes <= 0:
        raise ValueError(f"tokens ({tokens}) and bytes ({num_bytes}) must be positive")
    return mean_loss_nats / math.log(2) * tokens / num_bytes


def perplexity(mean_loss_nats: float) -> float:
    """``exp(loss)``, capped so a diverged model reports ``inf`` instead of overflowing."""
    return math.exp(mean_loss_nats) if mean_loss_nats < 700 else float("inf")


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    val_iter: Iterable[tuple[torch.Tensor, torch.Tensor]],
    tokens_per_byte: float | None,
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Token-weighted mean next-token loss over ``val_iter``, with perplexity and bits per byte.

    Under ``torch.distributed`` each rank evaluates its slice and the sums are all-reduced, so every
    rank returns the same numbers as a single process over the whole set. The model's train/eval
    mode is restored afterwards.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dev)  # [sum of nll, token count]
    ctx = (
        torch.autocast(dev.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        for x, y in val_iter:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with ctx:
                logits = model(x)
            nll = per_token_nll(logits, y, ignore_index=-100)
            valid = y != -100
            total[0] += nll[valid].double().sum()
            total[1] += valid.sum()
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    if total[1] == 0:
        raise ValueError("evaluate_lm: the validation iterator produced no tokens")
    loss = float(total[0] / total[1])
    bpb = loss / math.log(2) * tokens_per_byte if tokens_per_byte else float("nan")
    return {"loss": loss, "perplexity": perplexity(loss), "bpb": bpb, "tokens": float(total[1])}


def make_lm_evaluator(
    val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    tokens_per_byte: float | None,
) -> Callable[[nn.Module], dict[str, float]]:
    """An ``evaluator(model)`` for the trainer reporting ``val_loss``, ``val_perplexity`` and
    ``val_bpb``. ``val_batches`` must be re-iterable (e.g. ``llm_core.data.lm.EvalBatches``) so every
    evaluation sees the same tokens and the curve is comparable across steps."""

    def evaluator(model: nn.Module) -> dict[str, float]:
        m = evaluate_lm(model, val_batches, tokens_per_byte)
        return {"val_loss": m["loss"], "val_perplexity": m["perplexity"], "val_bpb": m["bpb"]}

    return evaluator


def evaluate_heldout(
    model: nn.Module,
    shards_dir: str | Path,
    *,
    batch_size: int,
    num_batches: int,
    split: str = "val",
) -> dict[str, float]:
    """Loss, perplexity and bits per byte on the held-out books of a shard directory.

    The same windows as pretraining's validation (:class:`~llm_core.data.lm.EvalBatches`: the first
    ``num_batches`` batches of consecutive ``context_length`` windows), so the figure for the base
    model matches its last ``val_bpb`` and every later stage is measured on identical tokens.
    """
    shards = TokenShards(shards_dir, split)
    seq_len = int(model.config.context_length)  # type: ignore[union-attr]
    if shards.vocab_size > int(model.config.vocab_size):  # type: ignore[union-attr]
        raise ValueError(
            f"{shards_dir}: shards use vocab_size {shards.vocab_size}, more than the model's "
            f"{model.config.vocab_size}"  # type: ignore[union-attr]
        )
    batches = EvalBatches(shards, batch_size, seq_len, num_batches)
    out = evaluate_lm(model, batches, shards.tokens_per_byte)
    return {**out, "batches": float(len(batches))}


def evaluate_assistant_loss(
    model: nn.Module,
    tokenizer: Tokenizer,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    *,
    batch_size: int,
    num_batches: int,
) -> dict[str, float]:
    """Mean loss on the assistant tokens of ``conversations``, as SFT's validation measures it.

    Same encoding (truncated to the model's window), the same packed batches in file order and
    the same :func:`~llm_core.sft.evaluate_sft`, so a base model and its fine-tuned descendants
    are compared on exactly the tokens ``sft_weights`` reported as ``val_loss``.
    """
    from llm_core.sft import ChatSpecials, SFTEvalBatches, encode_conversations, evaluate_sft

    seq_len = int(model.config.context_length)  # type: ignore[union-attr]
    data = encode_conversations(tokenizer, conversations, max_tokens=seq_len + 1)
    if len(data) == 0:
        raise ValueError("evaluate_assistant_loss: no conversations to score")
    pad = ChatSpecials.from_tokenizer(tokenizer).pad
    batches = SFTEvalBatches(data, batch_size, seq_len, pad, max_batches=num_batches)
    out = evaluate_sft(model, batches)
    return {**out, "perplexity": perplexity(out["loss"]), "conversations": float(len(data))}


# ------------------------------------------------------------------------------ log-likelihood
@dataclass(frozen=True)
class ContinuationScores:
    """Per item: total ``log p`` of the continuation, its token count, and whether greedy
    decoding would have produced every continuation token (``greedy``)."""

    logprob: np.ndarray  # float64 [N], natural log
    tokens: np.ndarray  # int64 [N]
    greedy: np.ndarray  # bool [N]
    truncated: int  # items whose context was cut on the left to fit the model's window

    @property
    def mean_logprob(self) -> np.ndarray:
        """Per-token mean ``log p``: compares continuations of different lengths."""
        return self.logprob / self.tokens


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> ContinuationScores:
    """Log-likelihood of each ``continuations[i]`` given ``contexts[i]`` (token ids).

    Each item is one sequence ``context + continuation``; a sequence longer than the model's
    window keeps its last ``context_length + 1`` tokens (the context is cut on the left, the
    continuation never). Items are sorted by length and right-padded per batch: the model is
    causal, so padding after a sequence cannot change the logits of the tokens before it.
    A context must hold at least one token (the first continuation token needs something to be
    predicted from; use ``<|endoftext|>`` to score a sentence on its own).
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    window = int(model.config.context_length)  # type: ignore[union-attr]
    seqs: list[list[int]] = []
    starts: list[int] = []  # index in the target row of the first continuation token
    truncated = 0
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        if not ctx or not cont:
            raise ValueError(f"item {i}: context and continuation must both be non-empty")
        if len(cont) > window:
            raise ValueError(
                f"item {i}: continuation of {len(cont)} tokens exceeds the window of {window}"
            )
        seq = [*ctx, *cont]
        if len(seq) > window + 1:
            seq, truncated = seq[-(window + 1) :], truncated + 1
        seqs.append(seq)
        starts.append(len(seq) - 1 - len(cont))
    n = len(seqs)
    logprob = np.zeros(n, dtype=np.float64)
    greedy = np.zeros(n, dtype=bool)
    tokens = np.array([len(c) for c in continuations], dtype=np.int64)
    if n == 0:
        return ContinuationScores(logprob, tokens, greedy, truncated)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    order = sorted(range(n), key=lambda i: -len(seqs[i]))
    was_training = model.training
    model.eval()
    try:
        for b in range(0, n, batch_size):
            idx = order[b : b + batch_size]
            width = max(len(seqs[i]) for i in idx) - 1
            x = torch.zeros(len(idx), width, dtype=torch.long)
            y = torch.full((len(idx), width), -100, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.bool)
            for row, i in enumerate(idx):
                s = torch.tensor(seqs[i], dtype=torch.long)
                x[row, : len(s) - 1], y[row, : len(s) - 1] = s[:-1], s[1:]
                mask[row, starts[i] : len(s) - 1] = True
            x, y, mask = x.to(dev), y.to(dev), mask.to(dev)
            logits = model(x)
            nll = per_token_nll(logits, y, ignore_index=-100)
            hit = (logits.argmax(dim=-1) == y) | ~mask
            lp = -(nll.double() * mask).sum(dim=-1)
            for row, i in enumerate(idx):
                logprob[i] = float(lp[row])
                greedy[i] = bool(hit[row].all())
    finally:
        model.train(was_training)
    return ContinuationScores(logprob, tokens, greedy, truncated)


def multiple_choice(
    model: nn.Module,
    contexts: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """Index of the option with the highest total ``log p`` given its context, per item.

    Total (not per-token) log-probability is the right comparison for minimal pairs such as
    BLiMP, whose two sentences differ in a word or two; ties go to the first option.
    """
    flat_ctx = [ctx for ctx, opts in zip(contexts, options, strict=True) for _ in opts]
    flat_opt = [o for opts in options for o in opts]
    scores = score_continuations(model, flat_ctx, flat_opt, batch_size=batch_size).logprob
    out, k = np.zeros(len(options), dtype=np.int64), 0
    for i, opts in enumerate(options):
        out[i] = int(np.argmax(scores[k : k + len(opts)]))
        k += len(opts)
    return out


@dataclass(frozen=True)
class ChoiceScores:
    """Per item, the total ``log p`` of each of the shared options after its context."""

    logprob: np.ndarray  # float64 [N, K], natural log
    truncated: int  # contexts cut on the left to fit the model's window

    @property
    def picked(self) -> np.ndarray:
        """Index of the most likely option per item (ties go to the first)."""
        return self.logprob.argmax(axis=1) if self.logprob.size else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def choice_logprobs(
    model: nn.Module,
    contexts: Sequence[Sequence[int]],
    options: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
) -> ChoiceScores:
    """``log p(option | context)`` for every context and each of the same ``options``.

    Multiple-choice letters (MMLU's `` A``..`` D``) are one token each under any BPE, so the
    common case needs one forward per context and reads the options' log-probabilities at its
    last position, instead of one forward per (context, option) pair. Options of several tokens
    fall back to :func:`score_continuations`. A context longer than the window keeps its last
    ``context_length`` tokens.
    """
    if not options or any(not o for o in options):
        raise ValueError("choice_logprobs: need at least one option, each non-empty")
    if any(len(o) > 1 for o in options):
        flat = score_continuations(
            model,
            [c for c in contexts for _ in options],
            [o for _ in contexts for o in options],
            batch_size=batch_size,
        )
        return ChoiceScores(flat.logprob.reshape(len(contexts), len(options)), flat.truncated)
    window = int(model.config.context_length)  # type: ignore[union-attr]
    if any(not c for c in contexts):
        raise ValueError("choice_logprobs: every context must hold at least one token")
    seqs = [list(c[-window:]) for c in contexts]
    truncated = sum(len(c) > window for c in contexts)
    ids = torch.tensor([o[0] for o in options], dtype=torch.long)
    out = np.zeros((len(seqs), len(options)), dtype=np.float64)
    dev = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = len(seqs[idx[0]])
            x = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):  # right padding: causal, so it cannot change the rest
                x[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            rows = torch.arange(len(idx), device=dev)
            last = torch.tensor([len(seqs[i]) - 1 for i in idx], device=dev)
            head = getattr(model, "lm_head", None)
            if head is not None:  # the LM head at the last position only, not at every one
                logits = head(model(x.to(dev), return_hidden=True)[rows, last]).float()
            else:
                logits = model(x.to(dev))[rows, last]
            lp = torch.log_softmax(logits.double(), dim=-1)[:, ids.to(dev)]
            out[idx] = lp.cpu().numpy()
    finally:
        model.train(was_training)
    return ChoiceScores(out, truncated)


# ------------------------------------------------------------------------------ proportions
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to zero
    width at 0% or 100%, which matters for the small item counts of the tiny and demo profiles.
    ``successes`` may be fractional (a tie counted as half a win). ``n == 0`` gives ``(nan, nan)``:
    no items, no interval, rather than a made-up one.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes ({successes}) <= n ({n})")
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp to [0, 1] and around p: rounding must not leave p a hair outside its own interval.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def binomial_accuracy(correct: int, n: int) -> dict[str, Any]:
    """``{"accuracy", "correct", "n", "ci95"}`` with a Wilson 95% interval (NaN when ``n == 0``)."""
    acc = correct / n if n else float("nan")
    return {
        "accuracy": acc,
        "correct": int(correct),
        "n": int(n),
        "ci95": wilson_interval(correct, n),
    }


# Rewards closer than this are a tie: the same reply scored in two differently composed batches
# differs in the last float bits, which must not turn into a win.
REWARD_TIE_TOLERANCE = 1e-5


def reward_win_rate(
    rewards_a: np.ndarray, rewards_b: np.ndarray, *, tie_tolerance: float = 0.0
) -> dict[str, Any]:
    """How often reply A beats reply B on the same prompt, judged by per-reply rewards.

    ``rewards_a[i]`` and ``rewards_b[i]`` score two replies to prompt ``i``. A win is
    ``a - b > tie_tolerance``; ties (``|a - b| <= tie_tolerance``, exact equality by default)
    count half, so two identical policies sit at 0.5 rather than 0. A small tolerance keeps two
    identical replies a tie when they were scored in different batches (float sums then differ
    in the last bits). Returns ``win_rate``, ``wins``, ``ties``, ``losses``, ``n`` and ``ci95``
    (Wilson interval on ``wins + ties / 2`` out of ``n``). Pairs with a non-finite reward are an
    error: a NaN would silently count as a loss.
    """
    a = np.asarray(rewards_a, dtype=np.float64).reshape(-1)
    b = np.asarray(rewards_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"rewards_a has {a.size} values but rewards_b has {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("reward_win_rate: rewards must be finite")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    diff = a - b
    wins, ties = int((diff > tie_tolerance).sum()), int((np.abs(diff) <= tie_tolerance).sum())
    n = int(a.size)
    score = wins + 0.5 * ties
    return {
        "win_rate": score / n if n else float("nan"),
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
        "ci95": wilson_interval(score, n),
    }
