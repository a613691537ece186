"""GRPO and best-of-n on a tiny model with toy rewards of the reply text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from llm_core.align import frozen_copy
from llm_core.checkpoint import load_weights
from llm_core.objectives import GRPOObjective
from llm_core.rl import (
    GroupRollouts,
    GRPOConfig,
    RolloutSampler,
    group_advantages,
    sample_best_of_n,
)
from llm_core.stages import best_of_n, grpo
from tests.llm_core.stages.helpers import prompt_pairs, write_pairs
from tests.llm_core.training_helpers import WORDS, save_tiny_lm, tiny_train_config

PROMPTS = [[{"role": "user", "content": f"Tell me about the {w}."}] for w in WORDS]

pytestmark = pytest.mark.usefixtures("one_thread")


def count_e(prompts: list, replies: list[str]) -> list[float]:
    """A toy reward any policy can learn: how many letters ``e`` the reply has."""
    assert len(prompts) == len(replies)
    return [float(r.count("e")) for r in replies]


@pytest.fixture(scope="module")
def files(chat_tok, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rl")
    (root / "tok.json").write_text(chat_tok.to_str())
    return save_tiny_lm(root / "sft", chat_tok.get_vocab_size()), root / "tok.json"


def pair_files(root: Path, train: list, val: list) -> dict[str, Path]:
    """Preference splits whose distinct prompts are ``train`` and ``val``, in order."""
    return {
        "train_path": write_pairs(root / "train.parquet", prompt_pairs(train)),
        "val_path": write_pairs(root / "val.parquet", prompt_pairs(val)),
    }


def rlhf_inputs(files: tuple[Path, Path], root: Path, train: list, val: list) -> dict:
    """The alignment stages' inputs; ``reward_model`` is never read (``reward_fn`` is given and
    the win rate is off)."""
    init, tok = files
    return {
        **pair_files(root, train, val),
        "init_weights": init,
        "tokenizer": tok,
        "reward_model": root / "no_reward_model",
        "win_rate_prompts": 0,
    }


def test_group_advantages() -> None:
    adv = group_advantages(np.array([1.0, 3.0, 2.0, 2.0, 0.0, 4.0]), 2)
    np.testing.assert_allclose(adv, [-1, 1, 0, 0, -1, 1])  # the equal group carries no signal
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    assert GRPOConfig.from_dict({"group_size": 3, "lr": 1.0}).group_size == 3


def test_rollout_sampler_repeats_each_rollout_and_resumes() -> None:
    s = RolloutSampler(20, 3, updates_per_rollout=2, grad_accum=2, seed=1)
    batches = [s.next_batch() for _ in range(8)]  # 4 optimiser steps of 2 micro-batches
    assert [int(b["rollout"]) for b in batches] == [0, 1, 0, 1, 2, 3, 2, 3]
    assert [int(b["keep_from"]) for b in batches] == [0, 0, 0, 0, 2, 2, 2, 2]
    assert batches[0]["prompt_index"].tolist() == batches[2]["prompt_index"].tolist()
    assert batches[0]["prompt_index"].tolist() != batches[1]["prompt_index"].tolist()
    again = RolloutSampler(20, 3, updates_per_rollout=2, grad_accum=2, seed=1)
    again.load_state_dict({**s.state_dict(), "step": 5})
    assert again.next_batch()["prompt_index"].tolist() == batches[5]["prompt_index"].tolist()


def test_first_update_is_a_pure_policy_gradient(chat_tok, files) -> None:
    """Policy == reference and ratio == 1 at the first update: KL is 0 and, advantages being
    zero-mean per group, so is the loss; its gradient is still the policy gradient."""
    model = load_weights(files[0])
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=6)
    obj = GRPOObjective(GroupRollouts(frozen_copy(model), chat_tok, PROMPTS, count_e, cfg, seed=0))
    batch = {"prompt_index": torch.tensor([0, 5]), "rollout": torch.tensor(0)}
    batch["keep_from"] = torch.tensor(0)
    loss, m = obj(model, batch)
    assert abs(loss.item()) < 1e-6 and float(m["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m["clip_frac"]) == 0.0 and 1 <= float(m["reply_len"]) <= 6
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    # The same rollout id reuses the samples (μ > 1); a new one samples again; rollouts before
    # ``keep_from`` are forgotten.
    ro = obj._cache[0]
    obj(model, batch)
    assert obj._cache[0] is ro and len(obj.history) == 1
    obj(model, {**batch, "rollout": torch.tensor(1)})
    assert len(obj.history) == 2 and set(obj._cache) == {0, 1}
    obj(model, {**batch, "rollout": torch.tensor(0)})
    assert len(obj.history) == 2  # rollout 0 is still cached (grad_accum > 1)
    obj(model, {**batch, "rollout": torch.tensor(2), "keep_from": torch.tensor(2)})
    assert set(obj._cache) == {2} and len(obj.history) == 3


def test_grpo_stage_raises_a_toy_reward_with_bounded_kl(files, tmp_path: Path) -> None:
    cfg = tiny_train_config(
        steps=30, batch_size=1, lr=1e-2, warmup_steps=0, eval_every=0, checkpoint_every=0
    )
    grpo_cfg = GRPOConfig(
        group_size=8, prompts_per_step=4, max_new_tokens=8, kl_coef=0.1, eval_prompts=8
    )
    config = grpo.Config(
        out_dir=tmp_path / "grpo",
        train=cfg,
        grpo=grpo_cfg,
        **rlhf_inputs(files, tmp_path / "pairs", PROMPTS[:16], PROMPTS[16:]),
    )
    run = grpo.run(config, reward_fn=count_e)
    s = run.summary
    assert s["reward_last"] > s["reward_first"] + 2.0, s
    assert s["val_reward_after"] > s["val_reward_before"]
    assert 0.0 <= s["kl_last"] < 3.0, s  # the penalty holds the policy near the reference
    assert len(s["rollouts"]) == 30 and s["method"] == "grpo" and run.train.tokens_seen > 0
    assert s["train_prompts"] == 16 and "win_rate" not in s
    written = json.loads((tmp_path / "grpo" / "metrics.json").read_text())
    assert written["grpo"]["group_size"] == 8 and written["reward_last"] == s["reward_last"]
    assert (tmp_path / "grpo" / "model.safetensors").exists()


def test_best_of_n_keeps_the_highest_reward_sample(chat_tok, files) -> None:
    model = load_weights(files[0])
    picks = sample_best_of_n(
        model, chat_tok, PROMPTS[:5], count_e, n=4, max_new_tokens=8, temperature=1.0, seed=3
    )
    assert picks.rewards.shape == (5, 4)
    for cands, rewards, winner in zip(picks.candidates, picks.rewards, picks.winners, strict=True):
        np.testing.assert_allclose(rewards, count_e([None] * 4, cands))
        assert winner.count("e") == max(c.count("e") for c in cands)
    assert len(set(picks.candidates[0])) > 1  # sampled, not greedy


def test_best_of_n_stage_fine_tunes_on_the_winners(files, tmp_path: Path) -> None:
    cfg = tiny_train_config(steps=6, batch_size=4, eval_every=3, checkpoint_every=3)
    config = best_of_n.Config(
        out_dir=tmp_path / "bon",
        train=cfg,
        n=4,
        max_new_tokens=8,
        **rlhf_inputs(files, tmp_path / "pairs", PROMPTS[:12], PROMPTS[12:16]),
    )
    run = best_of_n.run(config, reward_fn=count_e)
    s = json.loads((tmp_path / "bon" / "metrics.json").read_text())
    assert s["method"] == "best_of_n" and s["n"] == 4 and s["steps"] == 6
    assert s["train_prompts"] == 12
    assert s["winner_reward_mean"] >= s["sample_reward_mean"]
    winners = pl.read_parquet(tmp_path / "bon" / "best_of_n" / "train.parquet")
    assert winners.height == s["winners"] <= 12
    assert winners["messages"].list.last().struct.field("role").unique().to_list() == ["assistant"]
    assert run.train.steps == 6 and (tmp_path / "bon" / "model.safetensors").exists()
    val = pl.read_parquet(tmp_path / "bon" / "best_of_n" / "val.parquet")
    assert val.height <= 4 and run.summary["winners"] == s["winners"]
