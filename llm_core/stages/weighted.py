"""Reward-weighted learning: SFT on ``k`` scored responses per prompt, each weighted by its reward.

The groups are RRHF's (:mod:`llm_core.stages.ranked`: the pairs' replies and SFT-policy samples,
scored by the reward model). Each response's per-token NLL is weighted by a function of its
reward within the group: ``softmax`` of ``reward / temperature`` (the weights sum to one, so a
group teaches its best replies most), or ``advantage``: the standardised reward clipped to
``[0, clip]`` (below-average replies are ignored). Reports the reward-model win rate over SFT.

    python -m llm_core.stages.weighted --profile demo \
        --train-path data/preference_pairs/train.parquet \
        --val-path data/preference_pairs/val.parquet --init-weights data/sft_weights \
        --tokenizer data/sft_weights/tokenizer.json --reward-model data/reward_model \
        --out /tmp/weighted
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_core.ranking import WEIGHTINGS, WeightedObjective
from llm_core.rl import RewardFn
from llm_core.stages.base import StageResult, module_main
from llm_core.stages.ranked import RankedConfig, run_ranked

FINAL = ("val_loss", "val_nll", "val_weight_max", "val_order_accuracy")


@dataclass(frozen=True, kw_only=True)
class Config(RankedConfig):
    """Profile section ``rlhf`` with its ``weighted`` block."""

    METHOD = "weighted"

    weighting: str = "softmax"  # softmax | advantage
    weight_temperature: float = 1.0  # softmax: reward / temperature
    weight_clip: float = 2.0  # advantage: the standardised reward clipped to [0, clip]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {self.weighting!r} is not one of {list(WEIGHTINGS)}")


def run(
    config: Config, callbacks: Sequence[Any] = (), reward_fn: RewardFn | None = None
) -> StageResult:
    """Reward-weighted SFT of ``init_weights`` on ranked groups scored by the reward model."""
    own = {
        "weighting": config.weighting,
        "weight_temperature": config.weight_temperature,
        "weight_clip": config.weight_clip,
    }
    objective = WeightedObjective(config.weighting, config.weight_temperature, config.weight_clip)
    return run_ranked(config, objective, "weighted", own, callbacks, reward_fn, FINAL)


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
