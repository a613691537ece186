"""Ranked preferences: the listwise and RRHF losses, eos pooling, and the ranking stages (RRHF,
reward-weighted SFT) learning a toy marker preference on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from llm_core.align import Preferences, collate_pairs, encode_pairs, pair_batches
from llm_core.checkpoint import load_weights
from llm_core.objectives import DPOObjective, RewardObjective, bradley_terry_loss
from llm_core.ranking import (
    NO_RESPONSE,
    ListwiseRewardObjective,
    Ranked,
    collate_ranked,
    encode_ranked,
    listwise_loss,
    ranked_row_problem,
    reward_weights,
    rrhf_rank_loss,
)
from llm_core.reward import RewardModel, eos_positions
from llm_core.sft import ChatSpecials, encode_conversations
from llm_core.stages import rrhf, weighted
from tests.llm_core.stages.helpers import write_pairs, write_tokenizer
from tests.llm_core.training_helpers import (
    MARKER,
    marker_pairs,
    save_tiny_lm,
    tiny_train_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def has_marker(prompts: list, replies: list[str]) -> list[float]:
    """The toy reward: 1 for a reply that holds the marker word, else 0."""
    return [float(MARKER in r) for r in replies]


# ------------------------------------------------------------------------------ losses
def test_listwise_loss_is_bradley_terry_at_k2() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(64, 2, generator=g)
    target = torch.randint(0, 5, (64, 2), generator=g).float()
    target[:, 1] = target[:, 0] + torch.where(torch.rand(64, generator=g) < 0.5, 1.0, -1.0)
    first_wins = target[:, 0] > target[:, 1]
    chosen = torch.where(first_wins, pred[:, 0], pred[:, 1])
    rejected = torch.where(first_wins, pred[:, 1], pred[:, 0])
    torch.testing.assert_close(listwise_loss(pred, target), bradley_terry_loss(chosen, rejected))


def test_listwise_loss_is_plackett_luce_and_ignores_padding_slots() -> None:
    pred = torch.tensor([[0.3, -1.0, 2.0]])
    target = torch.tensor([[2.0, 1.0, 3.0]])  # order: slot 2, slot 0, slot 1
    p = pred[0]
    expected = -(
        (p[2] - torch.logsumexp(p, 0)) + (p[0] - torch.logsumexp(p[torch.tensor([0, 1])], 0))
    )
    torch.testing.assert_close(listwise_loss(pred, target), expected)
    # A padded slot (not valid) changes nothing, wherever it sits and whatever it holds.
    padded = torch.tensor([[0.3, 9.0, -1.0, 2.0]], requires_grad=True)
    valid = torch.tensor([[True, False, True, True]])
    loss = listwise_loss(padded, torch.tensor([[2.0, 99.0, 1.0, 3.0]]), valid)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert padded.grad is not None and torch.isfinite(padded.grad).all()
    assert padded.grad[0, 1] == 0


def test_rrhf_hinge_and_reward_weights() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    target = torch.tensor([[3.0, 2.0, 1.0]])  # slot 2 is worst but most likely: 2 violations
    valid = torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(rrhf_rank_loss(logp, target, valid), torch.tensor(0.5 + 1.5))
    soft = reward_weights(target, valid, "softmax")
    torch.testing.assert_close(soft, torch.softmax(target, 1))
    adv = reward_weights(target, valid, "advantage", clip=1.0)
    assert adv[0, 0] == pytest.approx(1.0) and adv[0, 1] == 0 and adv[0, 2] == 0
    with pytest.raises(ValueError, match="weighting"):
        reward_weights(target, valid, "rank")


# ------------------------------------------------------------------------------ ranked rows
@pytest.mark.parametrize(
    ("texts", "scores", "reason"),
    [
        (["a", "b"], [1.0], "length_mismatch"),
        (["a", "b", ""], [1.0, 0.5, 0.2], "empty_text"),
        (["a", "b"], [1.0, 1.0], "all_equal_scores"),
        (["a", ""], [1.0, NO_RESPONSE], "too_few_responses"),
        (["a", "b"], [1.0, "high"], "non_numeric_score"),
        (["a", "b", ""], [1.0, 0.0, NO_RESPONSE], None),  # ragged: -100 is padding
    ],
)
def test_ranked_row_problems(texts: list, scores: list, reason: str | None) -> None:
    assert ranked_row_problem(texts, scores) == reason


def test_pairs_are_the_k2_case_and_ragged_groups_collate(chat_tok, tmp_path: Path) -> None:
    prefs = Preferences.from_records(marker_pairs(3, seed=0))
    pairs = Ranked.from_pairs(prefs.prompts, prefs.chosen, prefs.rejected)
    assert pairs.max_k == 2 and pairs.scores[0] == [1.0, 0.0]
    rows = [
        {"prompt": prefs.prompts[0], "text": ["x y", "z", "w", ""], "score": [3.0, 1, 2, -100]},
        *pairs.records()[1:],
    ]
    ranked = Ranked.from_records(rows)
    again = Ranked.read_parquet(ranked.write_parquet(tmp_path / "ranked.parquet"))
    assert again == ranked and [len(r) for r in again.responses] == [3, 2, 2]
    data = encode_ranked(chat_tok, ranked, 64)
    batch = collate_ranked(data, [0, 1], ChatSpecials.from_tokenizer(chat_tok).pad)
    assert batch["input_ids"].shape[0] == 5 and batch["scores"].shape == (2, 3)
    assert batch["valid"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["rows"][1, :2].tolist() == [3, 4]
    # The k = 2 pair loss through the batch layout is Bradley–Terry on the two rows.
    pred = torch.arange(5, dtype=torch.float32)[batch["rows"]]
    torch.testing.assert_close(
        listwise_loss(pred[1:], batch["scores"][1:], batch["valid"][1:]),
        bradley_terry_loss(torch.tensor([3.0]), torch.tensor([4.0])),
    )


def test_listwise_reward_objective_is_the_pairwise_one_on_pairs(chat_tok, tmp_path: Path) -> None:
    """A reward model's listwise loss on k = 2 groups equals RewardObjective's Bradley–Terry on
    the same pairs; on a k = 3 group it is the Plackett–Luce loss of the model's rewards."""
    rm = RewardModel(load_weights(save_tiny_lm(tmp_path / "lm", chat_tok.get_vocab_size())))
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # rewards far enough apart to matter
    prefs = Preferences.from_records(marker_pairs(6, seed=3))
    pad = ChatSpecials.from_tokenizer(chat_tok).pad
    pair_batch = collate_pairs(encode_pairs(chat_tok, prefs, 64), range(6), pad)
    ranked = Ranked.from_pairs(prefs.prompts, prefs.chosen, prefs.rejected)
    group_batch = collate_ranked(encode_ranked(chat_tok, ranked, 64), range(6), pad)
    with torch.no_grad():
        pairwise, _ = RewardObjective()(rm, pair_batch)
        listwise, m = ListwiseRewardObjective()(rm, group_batch)
    torch.testing.assert_close(listwise, pairwise)
    three = Ranked([prefs.prompts[0]], [[prefs.chosen[0], "b", prefs.rejected[0]]], [[2.0, 1, 0]])
    batch = collate_ranked(encode_ranked(chat_tok, three, 64), [0], pad)
    with torch.no_grad():
        loss, _ = ListwiseRewardObjective()(rm, batch)
        r = rm(batch["input_ids"], batch["lengths"])
    torch.testing.assert_close(loss, listwise_loss(r[None], torch.tensor([[2.0, 1.0, 0.0]])))


# ------------------------------------------------------------------------------ eos pooling
def test_eos_pooling_reads_the_reply_end(chat_tok, tmp_path: Path) -> None:
    """``eos`` equals ``last`` on a whole reply row (it ends at the reply's ``<|end|>``) and
    differs on a row truncated inside a later turn, where ``last`` reads a token of that turn."""
    sp = ChatSpecials.from_tokenizer(chat_tok)
    conv = [
        {"role": "user", "content": "Tell me about the river."},
        {"role": "assistant", "content": "the river is long"},
        {"role": "user", "content": "Tell me about the city and the tower and the bridge."},
    ]
    whole = encode_conversations(chat_tok, [conv[:2]], max_tokens=None).get(0)[0]
    both = encode_conversations(chat_tok, [conv, conv[:2]], max_tokens=None)
    ids_long = both.get(0)[0]
    cut = len(whole) + 4  # the reply, its <|end|>, then part of the next user turn
    truncated = ids_long[:cut]
    assert whole[-1] == sp.end and truncated[-1] != sp.end
    width = max(len(whole), len(truncated))
    ids = torch.full((2, width), sp.pad, dtype=torch.long)
    ids[0, : len(whole)] = torch.from_numpy(whole.astype(np.int64))
    ids[1, : len(truncated)] = torch.from_numpy(truncated.astype(np.int64))
    lengths = torch.tensor([len(whole), len(truncated)])
    pos = eos_positions(ids, lengths, (sp.end, sp.eot), sp.assistant)
    assert pos.tolist() == [len(whole) - 1, len(whole) - 1]
    backbone = load_weights(save_tiny_lm(tmp_path / "lm", chat_tok.get_vocab_size()))
    last = RewardModel(backbone, "last").eval()
    eos = RewardModel(backbone, "eos", (sp.end, sp.eot), sp.assistant).eval()
    head = last.head.state_dict()
    eos.head.load_state_dict(head)
    with torch.no_grad():
        r_last, r_eos = last(ids, lengths), eos(ids, lengths)
    assert r_eos[0] == pytest.approx(float(r_last[0]), abs=1e-6)  # untruncated: the same
    assert abs(float(r_eos[1] - r_last[1])) > 1e-4  # truncated past the reply: not the same
    # The truncated row's eos reward is the whole row's: its reply is all it reads.
    assert r_eos[1] == pytest.approx(float(r_eos[0]), abs=1e-5)
    # A reply cut before its end has no end token: eos falls back to the last real token.
    cut_reply = ids[:1, : len(whole) - 2]
    n = torch.tensor([len(whole) - 2])
    assert eos_positions(cut_reply, n, (sp.end, sp.eot), sp.assistant).item() == len(whole) - 3
    with pytest.raises(ValueError, match="end_ids"):
        RewardModel(backbone, "eos")


# ------------------------------------------------------------------------------ the stages
def _stage_config(module, chat_tok, tmp_path: Path, **knobs):
    init = save_tiny_lm(tmp_path / "sft", chat_tok.get_vocab_size())
    return module.Config(
        out_dir=tmp_path / "out",
        train=tiny_train_config(steps=20, batch_size=8, eval_every=10, eval_batches=2),
        train_path=write_pairs(tmp_path / "pairs" / "train.parquet", marker_pairs(48, seed=1)),
        val_path=write_pairs(tmp_path / "pairs" / "val.parquet", marker_pairs(32, seed=2)),
        init_weights=init,
        tokenizer=write_tokenizer(chat_tok, tmp_path / "tok.json"),
        reward_model=tmp_path / "no_reward_model",  # never loaded: reward_fn is given
        win_rate_prompts=0,
        samples=1,
        max_new_tokens=8,
        val_prompts=32,
        **knobs,
    )


def _marker_preference(chat_tok, config) -> tuple[float, float]:
    """How much more the aligned model favours each held-out chosen (marker) reply over its
    rejected one than the starting model does: DPO's implicit-reward accuracy and mean margin
    (``beta = 1``), i.e. the gain in ``log p(chosen) − log p(rejected)``."""
    val = Preferences.read_parquet(config.val_path)
    pad = ChatSpecials.from_tokenizer(chat_tok).pad
    batch = pair_batches(encode_pairs(chat_tok, val, 64), len(val), pad)[0]
    ref = load_weights(config.init_weights)
    with torch.no_grad():
        _, m = DPOObjective(beta=1.0, reference=ref)(load_weights(config.out_dir), batch)
    return float(m["reward_accuracy"]), float(m["reward_margin"])


@pytest.mark.parametrize(
    ("module", "knobs", "keys"),
    [
        (rrhf, {"sft_weight": 1.0}, ("val_rank_loss", "val_order_accuracy")),
        (weighted, {"weighting": "softmax"}, ("val_nll", "val_order_accuracy")),
    ],
)
def test_ranking_stage_learns_the_marker_preference(
    chat_tok, tmp_path: Path, module, knobs, keys
) -> None:
    config = _stage_config(module, chat_tok, tmp_path, **knobs)
    run = module.run(config, reward_fn=has_marker)
    s = json.loads((config.out_dir / "metrics.json").read_text())
    assert s["method"] == module.__name__.rsplit(".", 1)[-1] and "win_rate" not in s
    assert s["ranked_train"]["groups"] == len(Ranked.read_parquet(config.out_dir / "ranked" /
                                                                  "train.parquet"))  # fmt: skip
    assert s["ranked_train"]["responses_mean"] >= 2.0  # the pair's replies (+ a sample)
    final = run.train.final_metrics
    assert final["val_order_accuracy"] > s["val_before"]["val_order_accuracy"], s
    assert all(run.figures[k] == final[k] for k in keys)
    # Held-out groups: the model now orders the responses as the toy reward does (the marker
    # reply first), and prefers the marker reply of each held-out pair more than it did.
    assert final["val_order_accuracy"] >= 0.8
    accuracy, margin = _marker_preference(chat_tok, config)
    assert accuracy >= 0.65 and margin > 0, (accuracy, margin)
    rejects = pq.read_table(config.out_dir / "ranked" / "rejects.parquet").to_pylist()
    assert len(rejects) == s["ranked_rejects"]
    assert {r["reason"] for r in rejects} <= {"all_equal_scores", "too_few_responses"}
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (config.out_dir / name).exists()
