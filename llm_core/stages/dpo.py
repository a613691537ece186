"""Direct Preference Optimisation of the SFT model on the preference pairs.

The reference is a frozen copy of the starting model, so the implicit reward of a reply is
``beta * (log pi(reply) - log ref(reply))``. Reports the reward-model win rate over SFT.

    python -m llm_core.stages.dpo --profile tiny \
        --train-path data/preference_pairs/train.parquet \
        --val-path data/preference_pairs/val.parquet --init-weights data/sft_weights \
        --tokenizer data/sft_weights/tokenizer.json --reward-model data/reward_model --out /tmp/dpo
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_core.align import evaluate_dpo, frozen_copy
from llm_core.objectives import DPOObjective
from llm_core.stages.alignment import RLHFConfig, aligned_result, pairs_session
from llm_core.stages.base import StageResult, module_main
from llm_core.stages.session import fit_and_save, save_chat_model

FINAL = ("val_reward_accuracy", "val_reward_margin", "val_logps_chosen", "val_logps_rejected")


@dataclass(frozen=True, kw_only=True)
class Config(RLHFConfig):
    """Profile section ``rlhf`` (and its ``dpo`` block, if any)."""

    METHOD = "dpo"

    beta: float = 0.1  # how hard the policy is held to the reference (SFT) model


def run(config: Config, callbacks: Sequence[Any] = ()) -> StageResult:
    cfg = config.train
    with pairs_session(config) as (s, pairs):
        objective = DPOObjective(beta=config.beta, reference=frozen_copy(s.model))
        evaluator = None
        if pairs.val_batches:
            evaluator = lambda m: evaluate_dpo(m, objective, pairs.val_batches)  # noqa: E731
        torch.manual_seed(cfg.seed)
        fit = fit_and_save(
            s.model,
            objective,
            cfg,
            pairs.sampler,
            info=s.info,
            out=config.out_dir,
            save=lambda m, o: save_chat_model(m, o, config.tokenizer),
            summary=lambda result, before: {
                "method": "dpo",
                "beta": config.beta,
                "train_pairs": len(pairs.train),
                "val_pairs": len(pairs.val),
                "truncated": pairs.train.truncated,
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
            **{k: summary.get(k) for k in ("beta", "train_pairs", "val_pairs")},
            **{k: final.get(k) for k in FINAL},
        },
    )


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
