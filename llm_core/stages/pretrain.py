"""Pretraining: token shards in, a fresh decoder-only model out (``model.safetensors``).

``TrainConfig.batch_size`` is the *global* micro-batch (sequences per forward pass, summed over
ranks), so changing the number of processes changes speed, not the optimisation trajectory.

    python -m llm_core.stages.pretrain --profile tiny --shards-dir data/token_shards \
        --tokenizer data/bpe_tokenizer/tokenizer.json --out /tmp/run
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_core.checkpoint import save_weights
from llm_core.config import ModelConfig, model_config_from_profile
from llm_core.data import TokenShards, read_manifest
from llm_core.data.lm import EvalBatches, RandomWindowSampler
from llm_core.evaluate import make_lm_evaluator
from llm_core.objectives import LMObjective
from llm_core.stages.base import StageConfig, StageResult, module_main
from llm_core.stages.samples import sample_continuations
from llm_core.stages.session import fit_and_save, training_session

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(StageConfig):
    """Profile section ``pretrain``; the model shape is the profile's ``model`` section plus its
    ``vocab_size`` and ``context_length``."""

    SECTION = "pretrain"
    INPUTS = ("shards_dir", "tokenizer")

    shards_dir: Path
    tokenizer: Path
    model: ModelConfig

    @classmethod
    def profile_fields(cls, profile: Mapping[str, Any], section: Mapping[str, Any]) -> dict:
        return {"model": model_config_from_profile(dict(profile))}

    def model_config(self) -> dict[str, Any]:
        return self.model.to_dict()


def run(config: Config, callbacks: Sequence[Any] = ()) -> StageResult:
    """Pretrain a fresh ``Transformer`` on ``config.shards_dir``; write ``model.safetensors``,
    ``config.json``, ``checkpoints/`` and ``metrics.json`` into ``config.out_dir``."""
    cfg, shards = config.train, config.shards_dir
    manifest = read_manifest(shards)
    if int(manifest["vocab_size"]) > config.model.vocab_size:
        raise ValueError(
            f"{shards / 'manifest.json'}: shards use vocab_size {manifest['vocab_size']} but "
            f"the model has only {config.model.vocab_size}"
        )
    seq_len = config.model.context_length
    with training_session(config.model, config.tokenizer, cfg.device, cfg.seed) as s:
        info = s.info
        sampler = RandomWindowSampler(
            TokenShards(shards, "train"),
            cfg.batch_size,
            seq_len,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        evaluator = None
        val_split = manifest["splits"].get("val")
        if val_split and int(val_split["tokens"]) > 0 and cfg.eval_batches > 0:
            val = TokenShards(shards, "val")
            batches = EvalBatches(
                val,
                cfg.batch_size,
                seq_len,
                cfg.eval_batches,
                rank=info.rank,
                world_size=info.world_size,
            )
            evaluator = make_lm_evaluator(batches, val.tokens_per_byte)
        elif info.is_main:
            log.warning("no usable 'val' split in %s: validation disabled", shards)
        if info.is_main:
            log.info("model: %.2fM params on %s x%d", s.model.num_params() / 1e6, info.device,
                     info.world_size)  # fmt: skip
        fit = fit_and_save(
            s.model,
            LMObjective(),
            cfg,
            sampler,
            info=info,
            out=config.out_dir,
            save=save_weights,
            summary=lambda result, before: {
                "model_config": config.model.to_dict(),
                "shards": {
                    "dir": str(shards),
                    "tokenizer_sha256": manifest.get("tokenizer_sha256"),
                },
            },
            evaluator=evaluator,
            evaluate_start=False,
            callbacks=callbacks,
            resume=config.resume,
        )
    result = StageResult(fit.train, config.out_dir, fit.summary)
    if info.is_main:
        result.figures = {"final_val_bpb": fit.train.final_metrics.get("val_bpb")}
        result.samples = sample_continuations(config.out_dir, config.tokenizer)
    return result


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
