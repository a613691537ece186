"""Schedules (cosine, warmup-stable-decay) and runs sized in minutes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from llm_core.data import TokenShards
from llm_core.data.lm import EvalBatches, RandomWindowSampler
from llm_core.evaluate import make_lm_evaluator
from llm_core.model import Transformer
from llm_core.objectives import LMObjective
from llm_core.schedule import StepPlan, decay_start, lr_at, lr_factor
from llm_core.stages import pretrain
from llm_core.trainer import Trainer
from tests.llm_core.stages.helpers import PRETRAIN_VOCAB, sample_tokenizer
from tests.llm_core.training_helpers import SEQ, make_shards, tiny_model_config, tiny_train_config


def test_wsd_curve() -> None:
    cfg = tiny_train_config(
        steps=100, warmup_steps=10, lr=2.0, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2
    )
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup
    assert decay_start(100, cfg) == 80 and f[10:80] == [1.0] * 70  # stable at the peak
    assert f[80] == pytest.approx(1 - 0.9 / 20) and f[99] == pytest.approx(0.1)  # linear decay
    assert all(a > b for a, b in zip(f[80:], f[81:], strict=False))
    assert lr_at(50, cfg) == 2.0 and lr_factor(500, cfg) == pytest.approx(0.1)
    # the stable phase does not depend on the length; only where the decay starts does
    assert [lr_factor(s, cfg, 1000) for s in range(80)] == f[:80]
    assert decay_start(5, tiny_train_config(warmup_steps=10, schedule="wsd")) == 10
    cos = tiny_train_config(steps=100, warmup_steps=10, lr=2.0, min_lr_ratio=0.1)
    assert lr_factor(55, cos) == pytest.approx(0.55) and lr_at(55, cos) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="schedule"):
        tiny_train_config(schedule="linear")
    with pytest.raises(ValueError, match="minutes"):
        tiny_train_config(minutes=0)


def test_step_plan_fits_the_budget_and_freezes_at_the_decay() -> None:
    cfg = tiny_train_config(
        steps=0, minutes=1.0, warmup_steps=5, schedule="wsd", decay_fraction=0.25
    )
    plan = StepPlan.from_config(cfg)
    # 0.5 s per update: 120 fit in the minute; the decay (last 30) starts at 90
    for step in range(1, 91):
        total = plan.update(step, 0.5 * step, step)
        assert total == 120 and plan.frozen == (step >= 90)
    assert plan.update(100, 100.0, 100) == 120  # slower steps later do not move the end
    state = plan.state_dict(session_s=61.0)
    again = StepPlan.from_config(cfg)
    again.load_state_dict(state)
    assert (again.total, again.frozen, again.elapsed_s) == (120, True, 61.0)
    capped = StepPlan.from_config(tiny_train_config(steps=50, minutes=1.0, schedule="wsd"))
    assert capped.update(3, 1.5, 3) == 50  # steps > 0 caps a budget that would allow 120
    cosine = StepPlan.from_config(tiny_train_config(steps=0, minutes=1.0, warmup_steps=2))
    assert cosine.update(4, 2.0, 4) == 120 and not cosine.frozen
    assert cosine.update(5, 2.5, 5) == 120 and cosine.frozen  # fixed after PROBE_STEPS
    fixed = StepPlan.from_config(tiny_train_config(steps=7))
    fixed.load_state_dict(state)  # a run sized in steps keeps cfg.steps
    assert fixed.update(3, 100.0, 3) == 7 and fixed.frozen


def test_trainer_trains_for_minutes(tmp_path: Path) -> None:
    """A 2-second budget: the run ends near it, decays to the floor, and says how many steps."""
    shards = make_shards(tmp_path / "shards")
    cfg = tiny_train_config(steps=0, minutes=2 / 60, schedule="wsd", warmup_steps=2,
                            decay_fraction=0.3, eval_every=0, checkpoint_every=0, log_every=5)  # fmt: skip
    sampler = RandomWindowSampler(TokenShards(shards, "train"), 4, SEQ, seed=cfg.seed)
    val = TokenShards(shards, "val")
    evaluator = make_lm_evaluator(EvalBatches(val, 4, SEQ, 2), val.tokens_per_byte)
    seen: list[dict[str, float]] = []

    class Rec:
        def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
            seen.append(metrics)

    trainer = Trainer(Transformer(tiny_model_config()), LMObjective(), cfg, sampler,
                      evaluator=evaluator, callbacks=[Rec()])  # fmt: skip
    result = trainer.fit()
    assert result.steps >= 4 and result.steps == trainer.plan.total and trainer.plan.frozen
    assert 1.0 < result.wall_time_s < 6.0  # the budget, plus the final evaluation
    lrs = [h["lr"] for h in result.history]
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio) and max(lrs) == cfg.lr
    assert seen[-1]["planned_steps"] == result.steps and "val_bpb" in result.final_metrics


def test_pretrain_stage_for_minutes_resumes_with_its_plan(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    config = pretrain.Config(
        out_dir=tmp_path / "out",
        train=tiny_train_config(
            steps=0,
            minutes=1.5 / 60,
            schedule="wsd",
            optimizer="muon",
            checkpoint_every=10,
            eval_every=0,
        ),  # fmt: skip
        shards_dir=shards,
        tokenizer=sample_tokenizer(tmp_path / "tokenizer.json"),
        model=tiny_model_config(vocab=PRETRAIN_VOCAB),
    )
    run = pretrain.run(config)
    steps = run.train.steps
    last = tmp_path / "out" / "checkpoints" / f"step_{steps:08d}"
    ckpt = json.loads((last / "trainer_state.json").read_text())
    plan = ckpt["extra"]["step_plan"]
    assert plan["total"] == steps and plan["frozen"] and plan["elapsed_s"] > 1.0
    again = pretrain.run(replace(config, resume=True))
    assert again.train.resumed_from == steps and again.train.steps == steps  # nothing left to do
