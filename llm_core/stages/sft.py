"""Supervised fine-tuning: chat conversations + starting weights in, a chat model out.

Loss falls on assistant tokens only (``<|end|>`` included); conversations are packed with
block-diagonal attention (``packing``) or padded. Before the first step the *starting* model is
evaluated on the same validation conversations, so the summary says how much SFT changed the
loss. The folder written holds ``tokenizer.json`` too: it is all ``scriptorium chat`` needs.

    python -m llm_core.stages.sft --profile tiny --train-path data/sft_mixture/train.parquet \
        --val-path data/sft_mixture/val.parquet --init-weights data/pretrained_weights \
        --tokenizer data/bpe_tokenizer/tokenizer.json --out /tmp/sft
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_core.objectives import SFTObjective
from llm_core.sft import (
    ChatDataset,
    ChatSpecials,
    SFTEvalBatches,
    SFTSampler,
    encode_conversations,
    make_sft_evaluator,
)
from llm_core.stages.base import StageConfig, StageResult, module_main
from llm_core.stages.samples import chat_answers
from llm_core.stages.session import (
    FitResult,
    fit_and_save,
    read_conversations,
    save_chat_model,
    training_session,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(StageConfig):
    """Profile section ``sft_train``."""

    SECTION = "sft_train"
    INPUTS = ("train_path", "val_path", "init_weights", "tokenizer")

    train_path: Path
    val_path: Path
    init_weights: Path
    tokenizer: Path
    packing: bool = True  # several conversations per row (block-diagonal attention); False pads


def data_stats(data: ChatDataset) -> dict[str, Any]:
    lengths = data.lengths()
    return {
        "conversations": len(data),
        "tokens": int(lengths.sum()),
        "supervised_tokens": data.supervised_tokens,
        "mean_tokens": float(lengths.mean()) if len(data) else 0.0,
        "truncated": data.truncated,
    }


def fine_tune(config: Config, callbacks: Sequence[Any] = ()) -> FitResult:
    """Fine-tune ``config.init_weights`` on the conversations of ``config.train_path``.

    The sequence length is the model's context; longer conversations are truncated so that each
    keeps at least one supervised token. Used by :func:`run` and by the best-of-n stage.
    """
    cfg = config.train
    with training_session(config.init_weights, config.tokenizer, cfg.device, cfg.seed) as s:
        info, tok, model = s.info, s.tokenizer, s.model
        assert tok is not None
        pad = ChatSpecials.from_tokenizer(tok).pad
        seq_len = model.config.context_length
        train = encode_conversations(
            tok, read_conversations(config.train_path), max_tokens=seq_len + 1
        )
        val = encode_conversations(tok, read_conversations(config.val_path), max_tokens=seq_len + 1)
        sampler = SFTSampler(
            train,
            cfg.batch_size,
            seq_len,
            pad,
            packing=config.packing,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        evaluator = None
        if len(val) and cfg.eval_batches > 0:
            batches = SFTEvalBatches(
                val,
                cfg.batch_size,
                seq_len,
                pad,
                packing=config.packing,
                max_batches=cfg.eval_batches,
                rank=info.rank,
                world_size=info.world_size,
            )
            evaluator = make_sft_evaluator(batches)
        elif info.is_main:
            log.warning("no validation conversations in %s: validation disabled", config.val_path)
        torch.manual_seed(cfg.seed)
        return fit_and_save(
            model,
            SFTObjective(),
            cfg,
            sampler,
            info=info,
            out=config.out_dir,
            save=lambda m, o: save_chat_model(m, o, config.tokenizer),
            summary=lambda result, before: {
                # The starting point, on the same conversations: what SFT is measured against.
                "val_loss_before": before.get("val_loss"),
                "val_loss_after": (result.eval_history or [{}])[-1].get("val_loss"),
                "packing": config.packing,
                "seq_len": seq_len,
                "train_data": data_stats(train),
                "val_data": data_stats(val),
                "model_config": model.config.to_dict(),
                "init_weights": str(config.init_weights),
            },
            evaluator=evaluator,
            callbacks=callbacks,
            resume=config.resume,
        )


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The SFT figures: the loss before and its change, and what the data held."""
    before, after = summary.get("val_loss_before"), summary.get("val_loss_after")
    data = summary.get("train_data", {})
    return {
        "val_loss_pretrained": before,
        "val_loss_change": after - before if before is not None and after is not None else None,
        "packing": summary.get("packing"),
        "train_conversations": data.get("conversations"),
        "train_supervised_tokens": data.get("supervised_tokens"),
        "train_truncated": data.get("truncated"),
        "val_conversations": summary.get("val_data", {}).get("conversations"),
    }


def run(config: Config, callbacks: Sequence[Any] = ()) -> StageResult:
    fit = fine_tune(config, callbacks)
    result = StageResult(fit.train, config.out_dir, fit.summary, samples_key="answers")
    if fit.summary:
        result.figures = figures(fit.summary)
        result.samples = chat_answers(config.out_dir, config.tokenizer)
    return result


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
