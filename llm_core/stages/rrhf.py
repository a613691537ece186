"""RRHF: rank responses with human (here: reward-model) feedback, Yuan et al. (2023).

For each distinct prompt of the preference pairs, ``k`` responses (the pairs' own replies and
samples of the SFT policy) are scored by the reward model (:mod:`llm_core.stages.ranked`). The
loss is a hinge on their length-normalised log-probabilities, so that a worse response is never
more likely than a better one, plus the SFT loss on each group's best response. No reference
model and no online sampling: as cheap per step as SFT on ``k`` replies. Reports the reward-model
win rate over SFT like every alignment stage.

    python -m llm_core.stages.rrhf --profile demo \
        --train-path data/preference_pairs/train.parquet \
        --val-path data/preference_pairs/val.parquet --init-weights data/sft_weights \
        --tokenizer data/sft_weights/tokenizer.json --reward-model data/reward_model \
        --out /tmp/rrhf
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_core.ranking import RRHFObjective
from llm_core.rl import RewardFn
from llm_core.stages.base import StageResult, module_main
from llm_core.stages.ranked import RankedConfig, run_ranked

FINAL = ("val_rank_loss", "val_sft_loss", "val_order_accuracy", "val_best_logp")


@dataclass(frozen=True, kw_only=True)
class Config(RankedConfig):
    """Profile section ``rlhf`` with its ``rrhf`` block."""

    METHOD = "rrhf"

    sft_weight: float = 1.0  # weight of the SFT loss on each group's best response


def run(
    config: Config, callbacks: Sequence[Any] = (), reward_fn: RewardFn | None = None
) -> StageResult:
    """RRHF of ``init_weights`` on ranked groups scored by the reward model (or ``reward_fn``)."""
    return run_ranked(
        config,
        RRHFObjective(config.sft_weight),
        "rrhf",
        {"sft_weight": config.sft_weight},
        callbacks,
        reward_fn,
        FINAL,
    )


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
