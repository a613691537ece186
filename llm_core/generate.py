"""Autoregressive generation for :class:`llm_core.model.Transformer`: batched, cached, streaming.

One core loop (:func:`_decode`) serves both entry points:

* :func:`generate` takes one prompt or a batch of prompts of different lengths and returns the new
  tokens of every row. Prompts are *left padded* so that all rows end on the same column: one
  forward per step then advances every row, and the KV cache's per-row start offsets keep pad
  columns out of attention and start each row's positions at its first real token, so a padded
  row produces exactly what it would alone.
* :func:`stream` yields one prompt's tokens as they are produced (a chat UI, a CLI).

Sampling: temperature (0 means greedy), top-k, nucleus (top-p), and the CTRL/Hugging Face
repetition penalty. A row stops at its first stop token (which is not returned) and the loop ends
when every row has stopped or ``max_new_tokens`` is reached.

The context window is a hard limit of the model (RoPE tables and the cache are sized to it): a
prompt longer than ``context_length`` is refused with a ValueError. Generation *past* the window
continues with a sliding window over the last ``context_length`` tokens (as nanoGPT does); the KV
cache cannot slide (every cached key was rotated for its old position) so those steps recompute
the window, exactly as ``use_cache=False`` does, and both settings give the same tokens.

A call decodes with the weights as they were when it started: it snapshots them once in the
layout the CPU's matrix-vector kernels stream fastest (:class:`llm_core.decode.InferenceWeights`),
whether or not the cache is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from tokenizers import Tokenizer
from torch import Tensor

from llm_core.decode import InferenceWeights, KVCache
from llm_core.model import Transformer

__all__ = ["chat_prompt_ids", "chat_replies", "generate", "sample_next", "stream"]


def generate(
    model: Transformer,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Iterable[int] | int = (),
    use_cache: bool = True,
    seed: int | None = None,
    pad_id: int = 0,
    keep_stop: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt (prompt and stop token excluded), one list per row.

    ``prompt_ids`` is one prompt (``list[int]``) or a batch (``list[list[int]]``); either way the
    result is a list of rows. ``seed`` makes sampling reproducible (a private generator, the global
    RNG is untouched). ``pad_id`` only fills left padding: it is never attended to.
    ``keep_stop`` ends each stopped row with its stop token: RL trains on the decision to stop,
    so it must know which token ended the reply.
    """
    rows = _as_rows(prompt_ids)
    out: list[list[int]] = [[] for _ in rows]
    for tokens in _decode(
        model, rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, stop_ids=stop_ids, use_cache=use_cache,
        seed=seed, pad_id=pad_id, keep_stop=keep_stop,
    ):  # fmt: skip
        for row, tok in zip(out, tokens, strict=True):
            if tok is not None:
                row.append(tok)
    return out


def stream(
    model: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Iterable[int] | int = (),
    use_cache: bool = True,
    seed: int | None = None,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced (same arguments as generate)."""
    if prompt_ids and not isinstance(prompt_ids[0], int):
        raise TypeError("stream() takes a single prompt (list[int]); use generate() for batches")
    for (tok,) in _decode(
        model, _as_rows(prompt_ids), max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, stop_ids=stop_ids,
        use_cache=use_cache, seed=seed, pad_id=0,
    ):  # fmt: skip
        if tok is None:
            return
        yield tok


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from ``logits`` [B, V] (float): argmax when ``temperature == 0``.

    top-k keeps the k largest logits; top-p keeps the smallest set of tokens whose probability
    mass reaches p (always at least the most likely one). Both filters apply after temperature.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------- core


def _as_rows(prompt_ids: Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty")
    if isinstance(prompt_ids[0], int):
        return [list(prompt_ids)]  # type: ignore[arg-type]
    return [list(r) for r in prompt_ids]  # type: ignore[union-attr]


def _validate(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def _penalize(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style repetition penalty: push every already-seen token's logit toward "less likely"."""
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


@torch.inference_mode()
def _decode(
    model: Transformer,
    rows: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    stop_ids: Iterable[int] | int,
    use_cache: bool,
    seed: int | None,
    pad_id: int,
    keep_stop: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token, or None for a row that has stopped (its stop token
    itself is yielded only with ``keep_stop``)."""
    _validate(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    cfg = model.config
    ctx = cfg.context_length
    device = model.tok_emb.weight.device
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    width = max(lengths)
    if width > ctx:
        raise ValueError(
            f"prompt of {width} tokens exceeds the model's context_length={ctx}; truncate it"
        )
    for r in (*rows, [pad_id]):
        if min(r) < 0 or max(r) >= cfg.vocab_size:
            raise ValueError(f"token ids (and pad_id) must be in [0, {cfg.vocab_size})")
    if max_new_tokens == 0:
        return

    b = len(rows)
    seq = torch.full((b, width + max_new_tokens), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        seq[i, width - len(r) : width] = torch.tensor(r, dtype=torch.long)
    start = torch.tensor([width - n for n in lengths], dtype=torch.long, device=device)
    stops = torch.tensor(
        [stop_ids] if isinstance(stop_ids, int) else sorted(set(stop_ids)),
        dtype=torch.long,
        device=device,
    )
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    seen: Tensor | None = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(b, cfg.vocab_size, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            seen[i, r] = True
    done = torch.zeros(b, dtype=torch.bool, device=device)

    cache: KVCache | None = None
    if use_cache:
        cache = model.new_kv_cache(b, max_len=min(ctx, width + max_new_tokens), start=start)
    weights = InferenceWeights(model)  # the weights as they are now, laid out for decoding
    cur = width  # columns filled so far
    for _ in range(max_new_tokens):
        with weights.installed():  # around the forward only: never across a yield
            if cache is not None and cur <= cache.max_len:
                # Prefill (first step) or one cached decode step; only the last position's logits.
                h = model.hidden_states(seq[:, cache.pos : cur], kv_cache=cache)[:, -1]
            else:
                h = _window_hidden(model, seq[:, :cur], start)
            logits = model.lm_head(h).float()
        if seen is not None:
            logits = _penalize(logits, seen, repetition_penalty)
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        hit_stop = torch.isin(nxt, stops) if stops.numel() else torch.zeros_like(done)
        emitted = ~done if keep_stop else ~(done | hit_stop)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        yield [int(t) if e else None for t, e in zip(nxt.tolist(), emitted.tolist(), strict=True)]
        done |= hit_stop
        if bool(done.all()):
            return
        seq[:, cur] = nxt
        cur += 1
        if seen is not None:
            seen[torch.arange(b, device=device), nxt] = True


def _window_hidden(model: Transformer, seq: Tensor, start: Tensor) -> Tensor:
    """Last-position hidden state without a cache, over the last ``context_length`` columns.

    Left padding is expressed as two "documents" per row (pads, then the real tokens), which gives
    exactly the cached path's mask and row-relative positions.
    """
    ctx = model.config.context_length
    offset = max(0, seq.shape[1] - ctx)
    window = seq[:, offset:]
    start = (start - offset).clamp_min(0)
    doc_ids = None
    if bool((start > 0).any()):
        cols = torch.arange(window.shape[1], device=window.device)
        doc_ids = (cols[None, :] >= start[:, None]).long()
    return model.hidden_states(window, doc_ids=doc_ids)[:, -1]


# ---------------------------------------------------------------------------------------- chat


def chat_prompt_ids(
    tokenizer: Tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]], max_len: int
) -> list[list[int]]:
    """Each chat prompt in the template (ending in ``<|assistant|>``), keeping its last
    ``max_len`` tokens: the oldest context goes first, the question being answered stays."""
    from llm_core.sft import encode_prompt

    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return [encode_prompt(tokenizer, p)[-max_len:] for p in prompts]


def chat_replies(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """The assistant's reply to each chat prompt (``[{role, content}, ...]`` ending in a user
    turn), decoded without special tokens and stripped.

    Prompts are rendered with the SFT chat template and keep at most ``context_length -
    max_new_tokens`` tokens (never fewer than half the context), so a reply normally fits the
    window. Generation runs in left-padded batches of ``batch_size`` and stops a row at
    ``<|end|>`` or ``<|endoftext|>``. ``temperature=0`` is greedy; otherwise batch ``j`` samples
    with seed ``seed + j``, so results are reproducible for a given ``batch_size``.
    """
    from llm_core.sft import ChatSpecials

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sp = ChatSpecials.from_tokenizer(tokenizer)
    ctx = model.config.context_length
    ids = chat_prompt_ids(tokenizer, prompts, max(ctx - max_new_tokens, ctx // 2))
    replies: list[str] = []
    for j, i in enumerate(range(0, len(ids), batch_size)):
        new = generate(
            model,
            ids[i : i + batch_size],
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            stop_ids=(sp.end, sp.eot),
            seed=seed + j,
            pad_id=sp.pad,
        )
        replies += [tokenizer.decode(r, skip_special_tokens=True).strip() for r in new]
    return replies
