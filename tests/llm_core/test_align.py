"""Preference pairs as batches (template, masks, left truncation, resumable sampling) and DPO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_core.align import (
    IndexSampler,
    Preferences,
    collate_pairs,
    encode_pairs,
    pair_batches,
    unique_prompts,
)
from llm_core.checkpoint import load_weights
from llm_core.objectives import DPOObjective, dpo_loss, sequence_logprobs
from llm_core.sft import ChatSpecials, truncate_left
from llm_core.stages import dpo
from llm_core.tokenizer import render_chat
from tests.llm_core.stages.helpers import write_pairs, write_tokenizer
from tests.llm_core.training_helpers import (
    marker_pairs,
    save_tiny_lm,
    tiny_train_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me about the sea."},
    {"role": "assistant", "content": "the sea is large"},
    {"role": "user", "content": "And the king?"},
]


def test_pairs_use_the_sft_template_and_supervise_only_the_final_reply(chat_tok) -> None:
    prefs = Preferences([DIALOGUE], ["the old king"], ["a tree"])
    data = encode_pairs(chat_tok, prefs, max_tokens=64)
    sp = ChatSpecials.from_tokenizer(chat_tok)
    batch = collate_pairs(data, [0], sp.pad)
    for side, reply in (("chosen", "the old king"), ("rejected", "a tree")):
        ids = chat_tok.encode(render_chat([*DIALOGUE, {"role": "assistant", "content": reply}])).ids
        n = int(batch[f"{side}_lengths"][0])
        assert batch[f"{side}_ids"][0, :n].tolist() == ids
        assert (batch[f"{side}_ids"][0, n:] == sp.pad).all()
        assert batch[f"{side}_targets"][0, : n - 1].tolist() == ids[1:]
        # Supervised targets: the final reply and its <|end|>, not the earlier assistant turn.
        targets = batch[f"{side}_targets"][0][batch[f"{side}_mask"][0]].tolist()
        assert targets == [*chat_tok.encode(reply).ids, sp.end]
    # Both sides share one width so they can share a forward pass.
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape


def test_truncate_left_keeps_the_reply_and_the_nearest_prompt() -> None:
    ids = np.arange(20)
    mask = np.zeros(20, dtype=bool)
    mask[15:] = True  # reply at 15..19, its <|assistant|> token at 14
    kept, kmask = truncate_left(ids, mask, 8)
    assert kept.tolist() == list(range(12, 20)) and kmask.sum() == 5
    long_mask = np.zeros(20, dtype=bool)
    long_mask[6:] = True  # a 14-token reply in an 8-token window: its start, after some prompt
    kept, kmask = truncate_left(ids, long_mask, 8)
    assert kept.tolist() == list(range(3, 11)) and kmask.any()
    assert truncate_left(ids, mask, 30)[0] is ids


def test_index_sampler_is_seeded_resumable_and_split_across_ranks() -> None:
    one = IndexSampler(10, 4, lambda i: i.tolist(), seed=3)
    batches = [one.next_batch() for _ in range(6)]  # 24 items: every item at least twice
    assert sorted(batches[0] + batches[1] + batches[2][:2]) == list(range(10))
    again = IndexSampler(10, 4, lambda i: i.tolist(), seed=3)
    again.load_state_dict({**one.state_dict(), "step": 3})
    assert [again.next_batch() for _ in range(3)] == batches[3:]
    halves = [
        IndexSampler(10, 4, lambda i: i.tolist(), seed=3, rank=r, world_size=2) for r in (0, 1)
    ]
    assert halves[0].next_batch() + halves[1].next_batch() == batches[0]
    with pytest.raises(ValueError, match="mismatch on seed"):
        again.load_state_dict({**one.state_dict(), "seed": 4})


def test_preferences_validate_and_dedupe() -> None:
    rows = marker_pairs(3, seed=0)
    prefs = Preferences.from_records(rows)
    assert len(prefs) == 3 and prefs.chosen[0] == rows[0]["chosen"]
    with pytest.raises(ValueError, match="one chosen and one rejected"):
        Preferences(prefs.prompts, prefs.chosen[:2], prefs.rejected)
    assert unique_prompts([DIALOGUE, DIALOGUE[:2], list(DIALOGUE)]) == [DIALOGUE, DIALOGUE[:2]]


def test_dpo_objective_logs_log_probs_and_implicit_rewards(chat_tok, tmp_path: Path) -> None:
    policy = load_weights(save_tiny_lm(tmp_path / "p", chat_tok.get_vocab_size(), seed=1))
    ref = load_weights(save_tiny_lm(tmp_path / "r", chat_tok.get_vocab_size(), seed=2))
    data = encode_pairs(chat_tok, Preferences.from_records(marker_pairs(4, seed=0)), 64)
    batch = collate_pairs(data, range(4), ChatSpecials.from_tokenizer(chat_tok).pad)
    loss, m = DPOObjective(beta=0.3, reference=ref)(policy, batch)
    lp = [
        sequence_logprobs(model(batch[f"{s}_ids"]), batch[f"{s}_targets"], batch[f"{s}_mask"])
        for model in (policy, ref)
        for s in ("chosen", "rejected")
    ]
    torch.testing.assert_close(loss, dpo_loss(*lp, beta=0.3)[0])
    torch.testing.assert_close(m["logps_chosen"], lp[0].mean().detach())
    torch.testing.assert_close(m["logps_rejected"], lp[1].mean().detach())
    torch.testing.assert_close(m["rewards_chosen"], 0.3 * (lp[0] - lp[2]).mean().detach())
    torch.testing.assert_close(m["reward_margin"], m["rewards_chosen"] - m["rewards_rejected"])


def test_dpo_learns_the_marker_preference(chat_tok, tmp_path: Path) -> None:
    init = save_tiny_lm(tmp_path / "sft", chat_tok.get_vocab_size())
    val_rows = marker_pairs(40, seed=2)
    val = Preferences.from_records(val_rows)
    config = dpo.Config(
        out_dir=tmp_path / "dpo",
        train=tiny_train_config(steps=20, batch_size=8, eval_every=10, eval_batches=5),
        train_path=write_pairs(tmp_path / "pairs" / "train.parquet", marker_pairs(200, seed=1)),
        val_path=write_pairs(tmp_path / "pairs" / "val.parquet", val_rows),
        init_weights=init,
        tokenizer=write_tokenizer(chat_tok, tmp_path / "tok.json"),
        reward_model=tmp_path / "no_reward_model",  # never loaded: the win rate is off
        win_rate_prompts=0,
        beta=0.1,
    )
    run = dpo.run(config)
    final = run.train.final_metrics
    assert final["val_reward_accuracy"] >= 0.9 and final["val_reward_margin"] > 0
    assert final["val_loss"] < np.log(2)  # below the loss of policy == reference
    summary = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    assert summary["method"] == "dpo" and summary["beta"] == 0.1 and summary["train_pairs"] == 200
    assert run.summary["val_pairs"] == summary["val_pairs"] == 40 and "win_rate" not in summary
    assert run.figures["val_reward_accuracy"] == final["val_reward_accuracy"]
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "dpo" / name).exists()
    # The saved policy prefers the chosen replies more than the reference does.
    policy, ref = load_weights(tmp_path / "dpo"), load_weights(init)
    batch = pair_batches(
        encode_pairs(chat_tok, val, 64), 40, ChatSpecials.from_tokenizer(chat_tok).pad
    )[0]
    with torch.no_grad():
        _, m = DPOObjective(beta=0.1, reference=ref)(policy, batch)
    assert float(m["reward_accuracy"]) == pytest.approx(final["val_reward_accuracy"])
