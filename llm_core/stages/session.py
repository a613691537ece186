"""The parts of a run that every stage shares: process group, starting model, fit, save, metrics.

:func:`training_session` joins (or creates) the ``torchrun`` process group and yields the
starting model: the weights a fine-tuning stage starts from, or a fresh model for pretraining.
:func:`fit_and_save` trains with the one :class:`~llm_core.trainer.Trainer` and, on rank 0,
saves the weights and writes ``metrics.json``. Stages differ only in their data, objective and
summary, which they pass in.
"""

from __future__ import annotations

import contextlib
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
from llm_core.config import ModelConfig, TrainConfig
from llm_core.data import atomic_write_bytes
from llm_core.model import Transformer
from llm_core.objectives import Objective
from llm_core.stages.base import write_metrics
from llm_core.tokenizer import load_tokenizer
from llm_core.trainer import (
    DistInfo,
    Evaluator,
    SamplerLike,
    Trainer,
    TrainResult,
    init_distributed,
)


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """The ``messages`` column of an SFT parquet file (``[{role, content}, ...]`` per row)."""
    table = pq.read_table(path, columns=["messages"])
    return table.column("messages").to_pylist()


@dataclass
class Session:
    """One run's process group, tokenizer (None when the stage has none) and starting model."""

    info: DistInfo
    tokenizer: Tokenizer | None
    model: Transformer


@contextlib.contextmanager
def training_session(
    init: str | Path | ModelConfig, tokenizer_path: str | Path | None, device: str, seed: int
) -> Iterator[Session]:
    """The process group, tokenizer and starting model of one run.

    ``init`` is a weights folder (fine-tuning stages) or a :class:`ModelConfig` (pretraining:
    a fresh model, seeded so every rank starts from the same weights). Joins the torchrun
    process group, or creates it and tears it down again. Refuses a tokenizer whose vocabulary
    does not fit the model (a retrained tokenizer would silently scramble every id).
    """
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        tok = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
        if isinstance(init, ModelConfig):
            torch.manual_seed(seed)  # identical init on every rank (DDP also broadcasts)
            model = Transformer(init).to(info.device)
        else:
            model = load_weights(init, device=info.device)
        if tok is not None and tok.get_vocab_size() > model.config.vocab_size:
            raise ValueError(
                f"{tokenizer_path}: vocabulary of {tok.get_vocab_size()} does not fit the "
                f"model's {model.config.vocab_size} (was the tokenizer retrained?)"
            )
        yield Session(info, tok, model)
        if info.distributed:
            dist.barrier()
    finally:
        if owns_group and info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def save_chat_model(model: nn.Module, out: Path, tokenizer_path: str | Path) -> None:
    """Weights plus the tokenizer, so the folder is all ``scriptorium chat`` needs."""
    save_weights(model, out)
    atomic_write_bytes(out / "tokenizer.json", Path(tokenizer_path).read_bytes())


@dataclass
class FitResult:
    """The trainer's result plus the summary written to ``metrics.json`` (empty off rank 0)."""

    train: TrainResult
    summary: dict[str, Any]


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
    evaluate_start: bool = True,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
) -> FitResult:
    """Train with the one :class:`~llm_core.trainer.Trainer`, then (rank 0) save and summarise.

    With ``evaluate_start`` the evaluator first runs on the *starting* model, so a summary can
    say what the run changed; ``summary(result, before)`` adds the stage's own fields to the
    common ones (the trainer's result, parameters, device, world size, train config) in
    ``out/metrics.json``.
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
    before = trainer.evaluate() if evaluator is not None and evaluate_start else {}
    result = trainer.fit(resume=resume)
    final = trainer.parallel.export()  # FSDP: the full weights gathered to rank 0 (all ranks call)
    written: dict[str, Any] = {}
    if info.is_main:
        assert final is not None
        save(final, out)
        num_params = getattr(final, "num_params", None)
        written = {
            **result.to_dict(),
            "num_params": num_params() if callable(num_params) else None,
            "world_size": info.world_size,
            "device": str(info.device),
            "train_config": train_cfg.to_dict(),
            **summary(result, before),
        }
        write_metrics(out, written)
    return FitResult(result, written)
