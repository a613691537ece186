"""The shared training loop: learning, exact resume, NaN handling, bf16, schedule, pretrain I/O."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from llm_core.checkpoint import latest_checkpoint, load_checkpoint, load_weights
from llm_core.config import TrainConfig
from llm_core.data import TokenShards
from llm_core.data.lm import EvalBatches, RandomWindowSampler
from llm_core.evaluate import make_lm_evaluator
from llm_core.model import Transformer
from llm_core.objectives import LMObjective, Metrics
from llm_core.stages import pretrain
from llm_core.stages.samples import SAMPLE_PROMPTS
from llm_core.trainer import NonFiniteLossError, Trainer, build_optimizer, lr_at
from tests.llm_core.stages.helpers import PRETRAIN_VOCAB, sample_tokenizer
from tests.llm_core.training_helpers import SEQ, make_shards, tiny_model_config, tiny_train_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


class Recorder:
    """Collects callback traffic; optionally "crashes" the process at a given step."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[int] = []
        self.crash_at = crash_at

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, metrics))
        if step == self.crash_at:
            raise KeyboardInterrupt(f"simulated crash at step {step}")

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.evals.append((step, metrics))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append(step)


def _trainer(
    shards: Path,
    cfg: TrainConfig,
    out: Path | None,
    objective: Any = None,
    callbacks: tuple[Any, ...] = (),
    init_seed: int | None = None,
) -> tuple[Trainer, Transformer]:
    torch.manual_seed(cfg.seed if init_seed is None else init_seed)
    model = Transformer(tiny_model_config())
    sampler = RandomWindowSampler(TokenShards(shards, "train"), cfg.batch_size, SEQ, seed=cfg.seed)
    val = TokenShards(shards, "val")
    evaluator = make_lm_evaluator(
        EvalBatches(val, cfg.batch_size, SEQ, cfg.eval_batches), val.tokens_per_byte
    )
    trainer = Trainer(
        model,
        objective or LMObjective(),
        cfg,
        sampler,
        evaluator=evaluator,
        out_dir=out,
        callbacks=callbacks,
    )
    return trainer, model


def test_loss_falls_when_overfitting(shards: Path) -> None:
    cfg = tiny_train_config(steps=40, batch_size=8, lr=1e-2, eval_every=20, log_every=10)
    rec = Recorder()
    trainer, _ = _trainer(shards, cfg, None, callbacks=(rec,))
    result = trainer.fit()
    losses = [h["loss"] for h in result.history]
    assert losses[0] == pytest.approx(math.log(64), abs=0.3)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert [s for s, _ in rec.metrics] == [10, 20, 30, 40]
    assert [s for s, _ in rec.evals] == [20, 40]
    assert rec.evals[-1][1]["val_loss"] < rec.evals[0][1]["val_loss"]
    first = rec.metrics[0][1]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(first)
    assert first["tokens_per_s"] > 0 and 0 < first["mfu"] < 1
    assert result.tokens_seen == 40 * 8 * SEQ and result.steps == 40
    val = rec.evals[-1][1]
    assert val["val_bpb"] == pytest.approx(val["val_loss"] / math.log(2) * 0.25)


def test_resume_is_bit_exact(shards: Path, tmp_path: Path) -> None:
    cfg = tiny_train_config(steps=8, grad_accum=2, checkpoint_every=3, log_every=1)
    unbroken, model_a = _trainer(shards, cfg, tmp_path / "a")
    unbroken.fit()

    crashing, _ = _trainer(shards, cfg, tmp_path / "b", callbacks=(Recorder(crash_at=5),))
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_00000003"

    # A fresh "process": different init weights and RNG, all replaced from the checkpoint.
    resumed, model_b = _trainer(shards, cfg, tmp_path / "b", init_seed=123)
    result = resumed.fit(resume=True)
    assert result.resumed_from == 3 and result.steps == 8
    for (name, a), b in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in result.history] == [h["loss"] for h in unbroken.history]


class NanAt:
    """An LM objective that returns NaN at a chosen step (1-based), as a diverging run would."""

    def __init__(self, step: int, grad_accum: int = 1) -> None:
        self.calls, self.bad_call = 0, (step - 1) * grad_accum
        self.inner = LMObjective()

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Metrics]:
        loss, metrics = self.inner(model, batch)
        self.calls += 1
        if self.calls > self.bad_call:
            loss = loss * float("nan")
        return loss, metrics


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shards: Path, tmp_path: Path) -> None:
    cfg = tiny_train_config(steps=10, checkpoint_every=2)
    trainer, model = _trainer(shards, cfg, tmp_path, objective=NanAt(6))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 6") as err:
        trainer.fit()
    good = tmp_path / "checkpoints" / "step_00000004"
    assert err.value.step == 6 and err.value.last_checkpoint == good
    assert latest_checkpoint(tmp_path / "checkpoints") == good
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no step was taken
    restored = Transformer(tiny_model_config())
    load_checkpoint(good, restored)
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_bf16_autocast_runs(shards: Path) -> None:
    cfg = tiny_train_config(steps=6, dtype="bfloat16", lr=1e-2)
    trainer, model = _trainer(shards, cfg, None)
    result = trainer.fit()
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert model.tok_emb.weight.dtype == torch.float32  # master weights stay fp32
    assert math.isfinite(result.final_metrics["val_loss"])
    with pytest.raises(ValueError, match="dtype"):
        _trainer(shards, tiny_train_config(dtype="float16"), None)


def test_schedule_and_optimizer_groups() -> None:
    cfg = tiny_train_config(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    opt = build_optimizer(Transformer(tiny_model_config()), cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert decay["fused"] is True


def test_pretrain_stage_writes_outputs_and_resumes(shards: Path, tmp_path: Path) -> None:
    # The samples step encodes fixed prompts with the tokenizer: the model must cover its ids.
    model = tiny_model_config(vocab=PRETRAIN_VOCAB)
    config = pretrain.Config(
        out_dir=tmp_path / "out",
        train=tiny_train_config(steps=4, checkpoint_every=2, eval_every=2),
        shards_dir=shards,
        tokenizer=sample_tokenizer(tmp_path / "tokenizer.json"),
        model=model,
    )
    out = config.out_dir
    rec = Recorder()
    run = pretrain.run(config, callbacks=[rec])
    result = run.train
    assert rec.checkpoints == [2, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["history"]) == 4
    assert metrics["final_metrics"]["val_bpb"] == pytest.approx(result.final_metrics["val_bpb"])
    assert run.summary["final_metrics"] == metrics["final_metrics"] and run.out_dir == out
    assert run.figures["final_val_bpb"] == pytest.approx(result.final_metrics["val_bpb"])
    assert set(run.samples) == set(SAMPLE_PROMPTS)
    assert load_weights(out).config == model
    longer = replace(config, train=TrainConfig.from_dict({**config.train.to_dict(), "steps": 6}))
    again = pretrain.run(replace(longer, resume=True)).train
    assert again.resumed_from == 4 and again.steps == 6 and len(again.history) == 6
    with pytest.raises(ValueError, match="vocab_size"):
        pretrain.run(replace(config, out_dir=tmp_path / "x", model=tiny_model_config(vocab=32)))
