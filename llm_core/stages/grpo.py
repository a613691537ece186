"""GRPO: online RL of the SFT model against the reward model, on the pairs' distinct prompts.

Replies are sampled in groups per prompt; advantages are relative to the group; the clipped
objective is held to the frozen starting model by a k3 KL penalty (:mod:`llm_core.rl`).
Reports the reward-model win rate over SFT, like every alignment stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_core.align import frozen_copy, unique_prompts
from llm_core.objectives import GRPOObjective
from llm_core.rl import (
    GroupRollouts,
    GRPOConfig,
    RewardFn,
    RolloutSampler,
    make_policy_reward_evaluator,
    window_mean,
)
from llm_core.stages.alignment import RLHFConfig, aligned_result, read_preferences
from llm_core.stages.base import StageResult, module_main
from llm_core.stages.session import fit_and_save, save_chat_model, training_session

SUMMARY = ("reward_first", "reward_last", "kl_last", "reply_len_last", "val_reward_before",
           "val_reward_after")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Config(RLHFConfig):
    """Profile section ``rlhf`` with its ``grpo`` block; GRPO's own knobs are ``grpo``'s."""

    METHOD = "grpo"
    NESTED = {"grpo": GRPOConfig}

    grpo: GRPOConfig = field(default_factory=GRPOConfig)


def run(
    config: Config, callbacks: Sequence[Any] = (), reward_fn: RewardFn | None = None
) -> StageResult:
    """GRPO of ``init_weights`` against the reward model (or ``reward_fn``, any
    ``(prompts, replies) -> rewards``); ``val_reward`` is the mean reward of greedy replies to
    the first ``grpo.eval_prompts`` held-out prompts, before and after."""
    cfg, grpo = config.train, config.grpo
    prompts = unique_prompts(read_preferences(config.train_path).prompts)
    if not prompts:
        raise ValueError(f"{config.train_path}: no training prompts for GRPO")
    held_out = unique_prompts(read_preferences(config.val_path).prompts)[: grpo.eval_prompts]
    reward_fn = reward_fn or config.reward_fn()
    with training_session(config.init_weights, config.tokenizer, cfg.device, cfg.seed) as s:
        tok, info = s.tokenizer, s.info
        assert tok is not None
        objective = GRPOObjective(
            GroupRollouts(frozen_copy(s.model), tok, prompts, reward_fn, grpo, seed=cfg.seed)
        )
        sampler = RolloutSampler(
            len(prompts),
            grpo.prompts_per_step,
            updates_per_rollout=grpo.updates_per_rollout,
            grad_accum=cfg.grad_accum,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        evaluator = None
        if held_out:
            evaluator = make_policy_reward_evaluator(tok, held_out, reward_fn, grpo.max_new_tokens)

        def summary(result: Any, before: dict[str, float]) -> dict[str, Any]:
            hist = objective.history
            return {
                "method": "grpo",
                "grpo": dataclasses.asdict(grpo),
                "reward_first": window_mean(hist, "reward_mean", last=False),
                "reward_last": window_mean(hist, "reward_mean", last=True),
                "reply_len_last": window_mean(hist, "reply_len", last=True),
                "kl_last": result.final_metrics.get("kl"),
                "val_reward_before": before.get("val_reward"),
                "val_reward_after": (result.eval_history or [{}])[-1].get("val_reward"),
                "rollouts": hist,
                "train_prompts": len(prompts),
                "model_config": s.model.config.to_dict(),
                "init_weights": str(config.init_weights),
            }

        fit = fit_and_save(
            s.model,
            objective,
            cfg,
            sampler,
            info=info,
            out=config.out_dir,
            save=lambda m, o: save_chat_model(m, o, config.tokenizer),
            summary=summary,
            evaluator=evaluator,
            callbacks=callbacks,
            resume=config.resume,
        )
    return aligned_result(config, fit, callbacks, lambda s: {k: s.get(k) for k in SUMMARY})


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
