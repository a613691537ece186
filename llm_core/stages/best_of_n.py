"""Best-of-n (rejection sampling), then SFT on the winners.

The SFT model answers every prompt ``n`` times; the reward model keeps the best reply of each;
the winners become ``out_dir/best_of_n/{train,val}.parquet`` (``messages`` rows) and the SFT
stage fine-tunes the same model on them. Reports the reward-model win rate over SFT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_core.align import unique_prompts
from llm_core.checkpoint import load_weights
from llm_core.rl import RewardFn, sample_best_of_n, write_conversations
from llm_core.stages import sft
from llm_core.stages.alignment import RLHFConfig, aligned_result, read_preferences
from llm_core.stages.base import StageResult, module_main, write_metrics
from llm_core.stages.session import FitResult
from llm_core.tokenizer import load_tokenizer
from llm_core.trainer import resolve_device

SUMMARY = ("n", "winners", "empty_winners", "sample_reward_mean", "winner_reward_mean")


@dataclass(frozen=True, kw_only=True)
class Config(RLHFConfig):
    """Profile section ``rlhf`` with its ``best_of_n`` block."""

    METHOD = "best_of_n"

    n: int = 4  # samples per prompt; the reward model keeps the best
    prompts: int = 0  # training prompts sampled (distinct prompts of the train pairs); 0: all
    val_prompts: int = 16
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    packing: bool = True  # of the SFT on the winners


def run(
    config: Config, callbacks: Sequence[Any] = (), reward_fn: RewardFn | None = None
) -> StageResult:
    """Sample, keep the reward model's (or ``reward_fn``'s) best reply per prompt, fine-tune."""
    cfg, out = config.train, config.out_dir
    prompts = unique_prompts(read_preferences(config.train_path).prompts)
    prompts = prompts[: config.prompts] if config.prompts else prompts
    held_out = config.held_out_prompts(config.val_prompts)
    reward_fn = reward_fn or config.reward_fn()
    tok = load_tokenizer(config.tokenizer)
    policy = load_weights(config.init_weights, device=resolve_device(cfg.device)).eval()
    picks = {}
    for split, split_prompts, seed in (("train", prompts, 0), ("val", held_out, 1)):
        picks[split] = sample_best_of_n(
            policy,
            tok,
            split_prompts,
            reward_fn,
            n=config.n,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            seed=cfg.seed * 2 + seed,
        )
        write_conversations(out / "best_of_n" / f"{split}.parquet", picks[split].conversations())
    del policy
    if not picks["train"].conversations():
        raise ValueError("best-of-n: every winning reply is empty; nothing to fine-tune on")
    fit = sft.fine_tune(
        sft.Config(
            out_dir=out,
            train=cfg,
            profile=config.profile,
            resume=config.resume,
            train_path=out / "best_of_n" / "train.parquet",
            val_path=out / "best_of_n" / "val.parquet",
            init_weights=config.init_weights,
            tokenizer=config.tokenizer,
            packing=config.packing,
        ),
        callbacks,
    )
    summary = fit.summary
    if summary:
        t = picks["train"]
        best = t.rewards[np.arange(len(t.prompts)), t.best] if len(t.prompts) else np.zeros(0)
        summary = {
            **summary,
            "method": "best_of_n",
            "n": config.n,
            "train_prompts": len(t.prompts),
            "winners": len(t.conversations()),
            "empty_winners": len(t.prompts) - len(t.conversations()),
            "sample_reward_mean": float(t.rewards.mean()) if t.rewards.size else None,
            "winner_reward_mean": float(best.mean()) if best.size else None,
        }
        write_metrics(out, summary)
    fit = FitResult(fit.train, summary)
    return aligned_result(config, fit, callbacks, lambda s: {k: s.get(k) for k in SUMMARY})


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
