"""Reward model: the SFT model's transformer plus a scalar head, Bradley–Terry on the pairs.

Optionally mixed with the next-token loss on the chosen reply (``lm_loss_weight``). The summary
gives held-out pairwise accuracy before and after, the reward margin and calibration (ECE).

    python -m llm_core.stages.reward --profile tiny \
        --train-path data/preference_pairs/train.parquet \
        --val-path data/preference_pairs/val.parquet --init-weights data/sft_weights \
        --tokenizer data/sft_weights/tokenizer.json --out /tmp/reward
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_core.data import atomic_write_bytes
from llm_core.evaluate import wilson_interval
from llm_core.objectives import RewardObjective
from llm_core.reward import (
    POOLINGS,
    RewardModel,
    load_reward_model,
    make_reward_evaluator,
    pair_margins,
    reliability_diagram,
    save_reward_model,
    score_replies,
)
from llm_core.sft import ChatSpecials
from llm_core.stages.alignment import PairsConfig, pairs_session, read_preferences
from llm_core.stages.base import Markdown, StageResult, module_main
from llm_core.stages.session import fit_and_save
from llm_core.trainer import resolve_device


@dataclass(frozen=True, kw_only=True)
class Config(PairsConfig):
    """Profile section ``reward_train``."""

    SECTION = "reward_train"

    pooling: str = "last"  # the hidden state(s) the scalar head reads: one of POOLINGS
    lm_loss_weight: float = 0.0  # > 0 adds this times the next-token loss on the chosen reply
    ece_bins: int = 10  # confidence bins of the calibration error and the reliability diagram

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"reward pooling {self.pooling!r} is not one of {list(POOLINGS)}")
        if self.ece_bins < 1:
            raise ValueError(f"ece_bins must be >= 1, got {self.ece_bins}")


def examples(config: Config, n: int = 3) -> dict[str, str]:
    """Rewards of the first held-out pairs, chosen against rejected, for a glance at the model."""
    from llm_core.tokenizer import load_tokenizer

    pairs = read_preferences(config.val_path).head(n)
    model, tok = load_reward_model(config.out_dir), load_tokenizer(config.tokenizer)
    rc = score_replies(model, tok, pairs.prompts, pairs.chosen)
    rr = score_replies(model, tok, pairs.prompts, pairs.rejected)
    return {
        p[-1]["content"][:200]: f"chosen {c:+.3f} vs rejected {r:+.3f}"
        for p, c, r in zip(pairs.prompts, rc, rr, strict=True)
    }


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    acc, n = summary.get("val_accuracy"), int(summary.get("val_pairs") or 0)
    return {
        "val_accuracy": acc,
        "val_accuracy_ci95": wilson_interval(acc * n, n) if acc is not None and n else None,
        **{
            k: summary.get(k)
            for k in (
                "val_accuracy_before",
                "val_margin",
                "val_ece",
                "ece_bins",
                "pooling",
                "lm_loss_weight",
            )  # fmt: skip
        },
        "train_pairs": summary.get("train_pairs"),
        "val_pairs": summary.get("val_pairs"),
    }


def run(config: Config, callbacks: Sequence[Any] = ()) -> StageResult:
    """Train a reward model on the train pairs, backbone initialised from ``init_weights``;
    write ``model.safetensors``, ``config.json``, ``tokenizer.json``, ``checkpoints/`` and
    ``metrics.json`` into ``out_dir``."""
    cfg = config.train
    with pairs_session(config) as (s, pairs):
        torch.manual_seed(cfg.seed)  # the head's init
        sp = ChatSpecials.from_tokenizer(s.tokenizer)
        model = RewardModel(s.model, config.pooling, (sp.end, sp.eot), sp.assistant)
        model = model.to(s.info.device)
        evaluator = None
        if pairs.val_batches:
            evaluator = make_reward_evaluator(pairs.val_batches, config.ece_bins)

        def save(m: nn.Module, o: Path) -> None:
            save_reward_model(m, o)  # type: ignore[arg-type]
            atomic_write_bytes(o / "tokenizer.json", config.tokenizer.read_bytes())

        def summary(result: Any, before: dict[str, float]) -> dict[str, Any]:
            after = (result.eval_history or [{}])[-1]
            return {
                "method": "reward",
                "pooling": config.pooling,
                "lm_loss_weight": config.lm_loss_weight,
                "ece_bins": config.ece_bins,
                "val_accuracy_before": before.get("val_reward_accuracy"),
                "val_accuracy": after.get("val_reward_accuracy"),
                "val_margin": after.get("val_reward_margin"),
                "val_ece": after.get("val_ece"),
                "train_pairs": len(pairs.train),
                "val_pairs": len(pairs.val),
                "truncated": pairs.train.truncated,
                "model_config": model.config.to_dict(),
                "init_weights": str(config.init_weights),
            }

        fit = fit_and_save(
            model,
            RewardObjective(config.lm_loss_weight),
            cfg,
            pairs.sampler,
            info=s.info,
            out=config.out_dir,
            save=save,
            summary=summary,
            evaluator=evaluator,
            callbacks=callbacks,
            resume=config.resume,
        )
        val_batches = pairs.val_batches
    result = StageResult(fit.train, config.out_dir, fit.summary, samples_key="val_pair_rewards")
    if fit.summary:
        result.figures = figures(fit.summary)
        result.samples = examples(config)
        if val_batches:
            png = reliability(config, val_batches)
            result.artifacts.append(png)
            result.figures["reliability_diagram"] = Markdown(
                f"![reliability diagram](data:image/png;base64,"
                f"{base64.b64encode(png.read_bytes()).decode()})"
            )
    return result


def reliability(config: Config, batches: Sequence[Any]) -> Path:
    """The saved model's reliability diagram on the held-out pairs, ``out_dir/reliability.png``
    (MLflow keeps it under ``evaluation/``; the asset's metadata shows it inline)."""
    model = load_reward_model(config.out_dir, device=resolve_device(config.train.device))
    margins = pair_margins(model, batches)
    return reliability_diagram(margins, config.out_dir / "reliability.png", config.ece_bins)


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
