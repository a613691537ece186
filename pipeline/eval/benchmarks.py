"""Scoring one model on the benchmarks: plain functions of (model, tokenizer, items).

* BLiMP: each minimal pair scores both sentences from ``<|endoftext|>`` (the document separator
  the model saw in pretraining) and counts a hit when the grammatical one has the higher total
  log-probability (the BLiMP paper's "simple LM method"); chance is 50%.
* LAMBADA: the passage is the context and the last word (with its leading space) the target; a
  hit is greedy decoding reproducing every token of the word, which is lm-evaluation-harness's
  ``lambada_openai`` accuracy (GPT-2's paper reports the same task, with extra stop-word
  filtering we do not apply). Also reported: the target's perplexity, ``exp(-mean log p(word))``.
  Passages longer than the model's window keep their last tokens.
* GSM8K (chat stages only): the question as a single user turn, a greedy reply, and exact match of
  the reply's final number with the reference after ``####``.
* Generations: replies to a fixed prompt set, with the sampling settings stored beside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from tokenizers import Tokenizer
from torch import nn

from llm_core.evaluate import binomial_accuracy, multiple_choice, score_continuations
from llm_core.generate import chat_replies
from llm_core.stages.samples import CHAT_PROMPTS
from llm_core.tokenizer import EOT
from pipeline.eval.sets import final_number

# Fixed prompts answered by every stage, so reruns and stages can be read side by side.
GENERATION_PROMPTS: tuple[str, ...] = ("What is the biggest animal in the world?", *CHAT_PROMPTS)
EXAMPLES = 3  # items quoted in the report per benchmark


def _encode(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def blimp_scores(
    model: nn.Module, tok: Tokenizer, items: pl.DataFrame, *, batch_size: int
) -> dict[str, Any]:
    """Accuracy overall and per phenomenon on BLiMP minimal pairs (chance 0.5)."""
    window = int(model.config.context_length)  # type: ignore[union-attr]
    good, bad = _encode(tok, items["good"].to_list()), _encode(tok, items["bad"].to_list())
    fits = np.array(
        [0 < len(g) <= window and 0 < len(b) <= window for g, b in zip(good, bad, strict=True)]
    )
    kept = np.flatnonzero(fits)
    eot = tok.token_to_id(EOT)
    picked = multiple_choice(
        model, [[eot]] * len(kept), [[good[i], bad[i]] for i in kept], batch_size=batch_size
    )
    correct = picked == 0
    phenomena = np.asarray(items["phenomenon"].to_list(), dtype=object)[kept]
    per = {
        ph: binomial_accuracy(int(correct[phenomena == ph].sum()), int((phenomena == ph).sum()))
        for ph in sorted(set(phenomena.tolist()))
    }
    accs = [p["accuracy"] for p in per.values()]
    return {
        **binomial_accuracy(int(correct.sum()), len(kept)),
        "chance": 0.5,
        "macro_accuracy": float(np.mean(accs)) if accs else float("nan"),
        "per_phenomenon": per,
        "skipped_too_long": int((~fits).sum()),
        "method": "total log-prob of each sentence after <|endoftext|>; higher must be the good one",
    }


def lambada_scores(
    model: nn.Module, tok: Tokenizer, items: pl.DataFrame, *, batch_size: int
) -> dict[str, Any]:
    """Last-word accuracy (greedy exact match of every target token) and target perplexity."""
    contexts = _encode(tok, items["context"].to_list())
    targets = _encode(tok, items["target"].to_list())
    scores = score_continuations(model, contexts, targets, batch_size=batch_size)
    mean_lp = float(scores.logprob.mean()) if len(targets) else float("nan")
    hits = scores.greedy
    examples = [
        {"context_end": c[-120:], "target": t, "greedy_hit": bool(h)}
        for c, t, h in zip(
            items["context"].head(EXAMPLES),
            items["target"].head(EXAMPLES),
            hits[:EXAMPLES],
            strict=False,
        )
    ]
    return {
        **binomial_accuracy(int(hits.sum()), len(targets)),
        "chance": 0.0,
        "target_perplexity": math.exp(-mean_lp) if mean_lp > -700 else float("inf"),
        "mean_target_tokens": float(scores.tokens.mean()) if len(targets) else float("nan"),
        "contexts_truncated": scores.truncated,
        "method": "greedy decoding must reproduce every token of the last word (lm-eval-harness acc)",
        "examples": examples,
    }


def gsm8k_scores(
    model: nn.Module,
    tok: Tokenizer,
    items: pl.DataFrame,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """Exact match of the final number of a greedy reply with the reference answer."""
    prompts = [[{"role": "user", "content": q}] for q in items["question"].to_list()]
    replies = chat_replies(
        model, tok, prompts, max_new_tokens, temperature=0.0, batch_size=batch_size
    )
    refs = items["reference"].to_list()
    predicted = [final_number(r) for r in replies]
    correct = [
        p is not None and math.isclose(p, ref, abs_tol=1e-6)
        for p, ref in zip(predicted, refs, strict=True)
    ]
    examples = [
        {"question": q, "reply": r, "predicted": p, "reference": ref}
        for q, r, p, ref in list(zip(items["question"], replies, predicted, refs, strict=True))[
            :EXAMPLES
        ]
    ]
    return {
        **binomial_accuracy(sum(correct), len(correct)),
        "chance": 0.0,
        "no_number": sum(p is None for p in predicted),
        "max_new_tokens": max_new_tokens,
        "method": "greedy reply; its number after '####', else its last number, must equal the reference",
        "examples": examples,
    }


def generations(
    model: nn.Module,
    tok: Tokenizer,
    prompts: Sequence[str] = GENERATION_PROMPTS,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    """Replies to the fixed prompts, with the settings that produced them."""
    replies = chat_replies(
        model,
        tok,
        [[{"role": "user", "content": p}] for p in prompts],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        batch_size=batch_size,
    )
    return {
        "settings": {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "seed": seed,
            "batch_size": batch_size,
            "template": "chat (single user turn)",
        },
        "samples": [{"prompt": p, "reply": r} for p, r in zip(prompts, replies, strict=True)],
    }
