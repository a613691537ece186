"""What the ranking methods (``rrhf``, ``weighted``) share: the ranked data they build, and the run.

The RRHF recipe (Yuan et al., 2023) needs ``k`` scored responses per prompt. No such file has to
be downloaded: for each distinct prompt of the preference pairs, the responses are the pairs'
own replies plus ``samples`` replies sampled from the SFT policy, and the reward model scores
them all. The result is written as ``out_dir/ranked/{train,val}.parquet`` in the ranked schema
(:class:`llm_core.ranking.Ranked`), the dropped rows to ``out_dir/ranked/rejects.parquet`` with a
``reason``, so the data a method was trained on can be read back and checked.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llm_core.align import IndexSampler, unique_prompts
from llm_core.data import atomic_write_bytes
from llm_core.generate import chat_replies
from llm_core.ranking import (
    NO_RESPONSE,
    Ranked,
    collate_ranked,
    encode_ranked,
    evaluate_ranked,
    ranked_batches,
    ranked_row_problem,
)
from llm_core.rl import RewardFn
from llm_core.sft import ChatSpecials
from llm_core.stages.alignment import Messages, RLHFConfig, aligned_result, read_preferences
from llm_core.stages.base import StageResult
from llm_core.stages.session import fit_and_save, save_chat_model, training_session


@dataclass(frozen=True, kw_only=True)
class RankedConfig(RLHFConfig):
    """The ranked data's knobs, shared by the ranking methods (each has its own block)."""

    samples: int = 2  # SFT-policy samples per prompt, added to the pairs' own replies
    dataset_responses: bool = True  # keep the pairs' chosen/rejected replies among the k
    prompts: int = 0  # distinct training prompts used; 0: all
    val_prompts: int = 32  # distinct held-out prompts for validation groups
    max_new_tokens: int = 64  # length of each sampled reply
    temperature: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")
        if not self.dataset_responses and self.samples < 2:
            raise ValueError("without dataset responses a group needs samples >= 2")


def group_responses(
    prompts: Sequence[Messages], replies: Sequence[Sequence[str]]
) -> tuple[list[Messages], list[list[str]]]:
    """Distinct prompts in first-seen order, each with the distinct replies given for it."""
    order = unique_prompts(prompts)
    keys = {json.dumps(p, sort_keys=True): i for i, p in enumerate(order)}
    grouped: list[list[str]] = [[] for _ in order]
    for p, rs in zip(prompts, replies, strict=True):
        msgs = [{"role": m["role"], "content": m["content"]} for m in p]
        bucket = grouped[keys[json.dumps(msgs, sort_keys=True)]]
        bucket.extend(r for r in rs if r not in bucket)
    return order, grouped


def build_ranked(
    config: RankedConfig, split: str, reward_fn: RewardFn, policy: torch.nn.Module, tok: Any
) -> tuple[Ranked, list[dict[str, Any]]]:
    """One split's ranked rows (and the rejected ones, with a ``reason``): the pairs' replies
    and ``samples`` policy samples per distinct prompt, all scored by ``reward_fn``. An empty
    sample is a padding slot (score -100), not a response."""
    prefs = read_preferences(config.train_path if split == "train" else config.val_path)
    cap = config.prompts if split == "train" else config.val_prompts
    given = [[c, r] for c, r in zip(prefs.chosen, prefs.rejected, strict=True)]
    prompts, responses = group_responses(prefs.prompts, given)
    if cap:
        prompts, responses = prompts[:cap], responses[:cap]
    if not config.dataset_responses:
        responses = [[] for _ in prompts]
    if config.samples and prompts:
        repeated = [p for p in prompts for _ in range(config.samples)]
        sampled = chat_replies(
            policy,  # type: ignore[arg-type]
            tok,
            repeated,
            config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            seed=config.train.seed * 2 + (split == "val"),
        )
        for i, rs in enumerate(responses):
            rs.extend(sampled[i * config.samples : (i + 1) * config.samples])
    # Score every non-empty response in one call (the reward model batches them).
    pairs = [(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs if r.strip()]
    rewards = reward_fn([p for p, _ in pairs], [r for _, r in pairs]) if pairs else []
    scores = iter(np.asarray(rewards, dtype=np.float64).reshape(-1))
    kept, rejects = [], []
    for p, rs in zip(prompts, responses, strict=True):
        s = [float(next(scores)) if r.strip() else NO_RESPONSE for r in rs]
        problem = ranked_row_problem(rs, s)
        row = {"prompt": p, "text": rs, "score": s}
        (rejects if problem else kept).append({**row, "reason": problem} if problem else row)
    return Ranked.from_records(kept), rejects


def write_rejects(path: Any, rejects: list[dict[str, Any]]) -> None:
    """``rejects.parquet``: the dropped rows (prompt as JSON text) with their ``reason``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "split": [r["split"] for r in rejects],
            "prompt": [json.dumps(r["prompt"]) for r in rejects],
            "text": [list(r["text"]) for r in rejects],
            "score": [[float(x) for x in r["score"]] for r in rejects],
            "reason": [r["reason"] for r in rejects],
        },
        schema=pa.schema(
            [
                ("split", pa.string()),
                ("prompt", pa.string()),
                ("text", pa.list_(pa.string())),
                ("score", pa.list_(pa.float64())),
                ("reason", pa.string()),
            ]
        ),
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def ranked_stats(ranked: Ranked) -> dict[str, Any]:
    """Groups, responses per group and the mean best-minus-worst score gap."""
    if not len(ranked):
        return {"groups": 0}
    gaps = [max(s) - min(s) for s in ranked.scores]
    return {
        "groups": len(ranked),
        "responses_mean": float(np.mean([len(r) for r in ranked.responses])),
        "score_gap_mean": float(np.mean(gaps)),
        "best_score_mean": float(np.mean([max(s) for s in ranked.scores])),
        "score_mean": float(np.mean([x for s in ranked.scores for x in s])),
    }


def run_ranked(
    config: RankedConfig,
    objective: Any,
    method: str,
    own: dict[str, Any],
    callbacks: Sequence[Any] = (),
    reward_fn: RewardFn | None = None,
    final_keys: Sequence[str] = (),
) -> StageResult:
    """Build the ranked data with the starting (SFT) model, train it with ``objective`` on the
    groups (``batch_size`` groups per step) and report like every alignment stage."""
    cfg, out = config.train, config.out_dir
    reward_fn = reward_fn or config.reward_fn()
    with training_session(config.init_weights, config.tokenizer, cfg.device, cfg.seed) as s:
        tok = s.tokenizer
        assert tok is not None
        s.model.eval()
        data, rejects = {}, []
        for split in ("train", "val"):
            data[split], bad = build_ranked(config, split, reward_fn, s.model, tok)
            data[split].write_parquet(out / "ranked" / f"{split}.parquet")
            rejects += [{**r, "split": split} for r in bad]
        write_rejects(out / "ranked" / "rejects.parquet", rejects)
        if not len(data["train"]):
            raise ValueError(
                f"{out / 'ranked'}: no trainable ranked groups (see its rejects.parquet)"
            )
        s.model.train()
        ctx = s.model.config.context_length
        pad = ChatSpecials.from_tokenizer(tok).pad
        train, val = encode_ranked(tok, data["train"], ctx), encode_ranked(tok, data["val"], ctx)
        sampler = IndexSampler(
            len(train),
            cfg.batch_size,
            lambda index: collate_ranked(train, index, pad),
            seed=cfg.seed,
            rank=s.info.rank,
            world_size=s.info.world_size,
        )
        evaluator: Callable[[Any], dict[str, float]] | None = None
        if len(val) and cfg.eval_batches > 0:
            batches = ranked_batches(val, cfg.batch_size, pad, cfg.eval_batches)
            evaluator = lambda m: evaluate_ranked(m, objective, batches)  # noqa: E731
        torch.manual_seed(cfg.seed)
        fit = fit_and_save(
            s.model,
            objective,
            cfg,
            sampler,
            info=s.info,
            out=out,
            save=lambda m, o: save_chat_model(m, o, config.tokenizer),
            summary=lambda result, before: {
                "method": method,
                **own,
                "samples": config.samples,
                "ranked_train": ranked_stats(data["train"]),
                "ranked_val": ranked_stats(data["val"]),
                "ranked_rejects": len(rejects),
                "val_before": {k: before.get(k) for k in final_keys},
                "model_config": s.model.config.to_dict(),
                "init_weights": str(config.init_weights),
            },
            evaluator=evaluator,
            callbacks=callbacks,
            resume=config.resume,
        )
    final = fit.train.final_metrics
    return aligned_result(
        config,
        fit,
        callbacks,
        lambda summary: {
            **own,
            "ranked_groups": (summary.get("ranked_train") or {}).get("groups"),
            "ranked_rejects": summary.get("ranked_rejects"),
            **{k: final.get(k) for k in final_keys},
        },
    )
