"""Validation metrics for language models.

Loss per token depends on the tokenizer (a bigger vocabulary packs more text into each token), so
runs with different tokenizers are compared on *bits per byte* of the original UTF-8 text:
``bpb = mean_loss_nats / ln 2 * tokens / bytes``. The shard manifest records both counts per split.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from llm_core.objectives import _per_token_nll


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
            nll = _per_token_nll(logits, y, ignore_index=-100)
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
    ``val_bpb``. ``val_batches`` must be re-iterable (e.g. ``llm_core.data.EvalBatches``) so every
    evaluation sees the same tokens and the curve is comparable across steps."""

    def evaluator(model: nn.Module) -> dict[str, float]:
        m = evaluate_lm(model, val_batches, tokens_per_byte)
        return {"val_loss": m["loss"], "val_perplexity": m["perplexity"], "val_bpb": m["bpb"]}

    return evaluator
