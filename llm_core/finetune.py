"""Supervised fine-tuning entry point: chat conversations + pretrained weights in, chat model out.

``run_sft`` is to SFT what :func:`llm_core.pretrain.run_pretraining` is to pretraining: the
pipeline calls it from a Dagster Pipes subprocess (``pipeline.train_child``), it works
single-process and under ``torchrun`` (only rank 0 writes), and it reuses the one
:class:`~llm_core.trainer.Trainer` (resume, bf16, checkpoints, callbacks) with
:class:`~llm_core.sft.SFTObjective` and :class:`~llm_core.sft.SFTSampler` plugged in.

Before the first step the *pretrained* model is evaluated on the same validation conversations,
so the summary can say how much SFT changed the loss on assistant tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import nn

from llm_core.checkpoint import load_weights, save_weights
from llm_core.config import TrainConfig
from llm_core.data import atomic_write_bytes
from llm_core.model import Transformer
from llm_core.objectives import Objective
from llm_core.pretrain import write_metrics
from llm_core.sft import (
    ChatDataset,
    ChatSpecials,
    SFTEvalBatches,
    SFTObjective,
    SFTSampler,
    encode_conversations,
    make_sft_evaluator,
)
from llm_core.tokenizer import load_tokenizer
from llm_core.trainer import (
    DistInfo,
    Evaluator,
    SamplerLike,
    Trainer,
    TrainResult,
    init_distributed,
)

log = logging.getLogger(__name__)


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """The ``messages`` column of an SFT parquet file (``[{role, content}, ...]`` per row)."""
    table = pq.read_table(path, columns=["messages"])
    return table.column("messages").to_pylist()


@dataclass
class FinetuneRun:
    """What a fine-tuning run produced (SFT, reward model, DPO, GRPO …): the trainer's result
    plus the summary written to ``metrics.json`` (empty on ranks other than 0)."""

    result: TrainResult
    summary: dict[str, Any]


# ------------------------------------------------------------------------------ shared run parts
@contextlib.contextmanager
def training_session(
    init_weights: str | Path, tokenizer_path: str | Path, device: str
) -> Iterator[tuple[DistInfo, Tokenizer, Transformer]]:
    """The process group, tokenizer and starting model of one run that starts from a checkpoint.

    Joins the torchrun process group (or creates it, and then tears it down again), and refuses
    a tokenizer whose vocabulary does not fit the model (a retrained tokenizer would silently
    scramble every id).
    """
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        tok = load_tokenizer(tokenizer_path)
        model = load_weights(init_weights, device=info.device)
        if tok.get_vocab_size() > model.config.vocab_size:
            raise ValueError(
                f"{tokenizer_path}: vocabulary of {tok.get_vocab_size()} does not fit the "
                f"model's {model.config.vocab_size} (was the tokenizer retrained?)"
            )
        yield info, tok, model
        if info.distributed:
            dist.barrier()
    finally:
        if owns_group and info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def save_chat_model(model: nn.Module, out: Path, tokenizer_path: str | Path) -> None:
    """Weights plus the tokenizer, so the folder is all ``scriptorium chat`` needs."""
    save_weights(model, out)
    atomic_write_bytes(out / "tokenizer.json", Path(tokenizer_path).read_bytes())


def fit_and_save(
    model: nn.Module,
    objective: Objective,
    train_cfg: TrainConfig,
    sampler: SamplerLike,
    *,
    info: DistInfo,
    out: Path,
    save: Callable[[nn.Module, Path], Any],
    summary: Callable[[TrainResult, dict[str, float]], dict[str, Any]],
    evaluator: Evaluator | None = None,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
) -> FinetuneRun:
    """Train with the one :class:`~llm_core.trainer.Trainer`, then (rank 0) save and summarise.

    The evaluator first runs on the *starting* model, so a summary can say what the run changed;
    ``summary(result, before)`` adds the stage's own fields to the common ones (the trainer's
    result, parameters, device, world size, train config) in ``out/metrics.json``.
    """
    trainer = Trainer(
        model,
        objective,
        train_cfg,
        sampler,
        evaluator=evaluator,
        out_dir=out,
        callbacks=callbacks,
        dist_info=info,
    )
    before = trainer.evaluate() if evaluator is not None else {}
    result = trainer.fit(resume=resume)
    written: dict[str, Any] = {}
    if info.is_main:
        save(model, out)
        num_params = getattr(model, "num_params", None)
        written = {
            **result.to_dict(),
            "num_params": num_params() if callable(num_params) else None,
            "world_size": info.world_size,
            "device": str(info.device),
            "train_config": train_cfg.to_dict(),
            **summary(result, before),
        }
        write_metrics(out, written)
    return FinetuneRun(result, written)


def _data_stats(data: ChatDataset) -> dict[str, Any]:
    lengths = data.lengths()
    return {
        "conversations": len(data),
        "tokens": int(lengths.sum()),
        "supervised_tokens": data.supervised_tokens,
        "mean_tokens": float(lengths.mean()) if len(data) else 0.0,
        "truncated": data.truncated,
    }


def run_sft(
    train_path: str | Path,
    val_path: str | Path,
    init_weights: str | Path,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    train_cfg: TrainConfig,
    *,
    packing: bool = True,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    device: str | None = None,
) -> FinetuneRun:
    """Fine-tune the weights in ``init_weights`` on the conversations of ``train_path``.

    Writes ``out_dir/model.safetensors``, ``config.json``, ``tokenizer.json`` (so the folder is
    all ``scriptorium chat`` needs), ``checkpoints/`` and ``metrics.json``. The sequence length is
    the model's context; longer conversations are truncated so that each keeps at least one
    supervised token. ``resume=True`` continues from ``out_dir/checkpoints``.
    """
    out = Path(out_dir)
    with training_session(init_weights, tokenizer_path, device or train_cfg.device) as (
        info,
        tok,
        model,
    ):
        specials = ChatSpecials.from_tokenizer(tok)
        seq_len = model.config.context_length
        train = encode_conversations(tok, read_conversations(train_path), max_tokens=seq_len + 1)
        val = encode_conversations(tok, read_conversations(val_path), max_tokens=seq_len + 1)
        sampler = SFTSampler(
            train,
            train_cfg.batch_size,
            seq_len,
            specials.pad,
            packing=packing,
            seed=train_cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        evaluator = None
        if len(val) and train_cfg.eval_batches > 0:
            batches = SFTEvalBatches(
                val,
                train_cfg.batch_size,
                seq_len,
                specials.pad,
                packing=packing,
                max_batches=train_cfg.eval_batches,
                rank=info.rank,
                world_size=info.world_size,
            )
            evaluator = make_sft_evaluator(batches)
        elif info.is_main:
            log.warning("no validation conversations in %s: validation disabled", val_path)
        torch.manual_seed(train_cfg.seed)

        def summary(result: TrainResult, before: dict[str, float]) -> dict[str, Any]:
            # The starting point, on the same conversations: what SFT is measured against.
            return {
                "val_loss_before": before.get("val_loss"),
                "val_loss_after": (result.eval_history or [{}])[-1].get("val_loss"),
                "packing": packing,
                "seq_len": seq_len,
                "train_data": _data_stats(train),
                "val_data": _data_stats(val),
                "model_config": model.config.to_dict(),
                "init_weights": str(init_weights),
            }

        return fit_and_save(
            model,
            SFTObjective(),
            train_cfg,
            sampler,
            info=info,
            out=out,
            save=lambda m, o: save_chat_model(m, o, tokenizer_path),
            summary=summary,
            evaluator=evaluator,
            callbacks=callbacks,
            resume=resume,
        )
