"""Reward model: pooling over padded rows, save/load, scoring with the chat template, the
Bradley–Terry objective with LM mixing, calibration metrics, and learning a marker preference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_core.align import Preferences, collate_pairs, encode_pairs
from llm_core.checkpoint import load_weights
from llm_core.objectives import RewardObjective, bradley_terry_loss, masked_lm_loss
from llm_core.reward import (
    RewardModel,
    calibration_bins,
    expected_calibration_error,
    load_reward_model,
    reliability_diagram,
    reward_metrics,
    save_reward_model,
    score_replies,
)
from llm_core.sft import ChatSpecials
from llm_core.stages import reward
from llm_core.tokenizer import render_chat
from tests.llm_core.stages.helpers import write_pairs, write_tokenizer
from tests.llm_core.training_helpers import (
    marker_pairs,
    save_tiny_lm,
    tiny_train_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm_dir(chat_tok, tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("sft") / "w", chat_tok.get_vocab_size())


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_pooling_ignores_right_padding(lm_dir: Path, pooling: str) -> None:
    model = RewardModel(load_weights(lm_dir), pooling).eval()
    rows = [torch.tensor([5, 9, 2, 33, 17]), torch.tensor([40, 3]), torch.tensor([12, 12, 7])]
    alone = torch.stack([model(r[None], torch.tensor([len(r)]))[0] for r in rows])
    padded = torch.full((3, 5), 1, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    batch = model(padded, torch.tensor([5, 2, 3]))
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    assert batch.dtype == torch.float32 and batch.shape == (3,)
    with pytest.raises(ValueError, match="lengths"):
        model(padded, torch.tensor([5, 0, 3]))


def test_save_and_load_round_trip(lm_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RewardModel(load_weights(lm_dir), "max")
    save_reward_model(model, tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["pooling"] == "max" and cfg["d_model"] == 32 and cfg["vocab_size"] == 300
    loaded = load_reward_model(tmp_path / "rm")
    ids = torch.randint(0, 300, (2, 7))
    lengths = torch.tensor([7, 4])
    torch.testing.assert_close(loaded(ids, lengths), model.eval()(ids, lengths))
    assert loaded.backbone.lm_head.weight is loaded.backbone.tok_emb.weight  # still tied
    with pytest.raises(ValueError, match="pooling"):
        load_reward_model(lm_dir)  # a plain LM folder is not a reward model
    with pytest.raises(ValueError, match="pooling must be"):
        RewardModel(load_weights(lm_dir), "first")


def test_score_replies_renders_the_chat_template_and_cuts_prompts_on_the_left(
    chat_tok, lm_dir: Path
) -> None:
    torch.manual_seed(1)
    model = RewardModel(load_weights(lm_dir), "last").eval()
    prompts = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me."}],
        [{"role": "user", "content": "the sea " * 80}],  # longer than the 64-token context
    ]
    replies = ["the old king", "a small ship"]
    scores = score_replies(model, chat_tok, prompts, replies, batch_size=1)
    for p, r, s in zip(prompts, replies, scores, strict=True):
        ids = chat_tok.encode(render_chat([*p, {"role": "assistant", "content": r}])).ids[-64:]
        with torch.no_grad():
            expected = model(torch.tensor([ids]), torch.tensor([len(ids)]))[0].item()
        assert s == pytest.approx(expected, abs=1e-5)
    assert np.allclose(
        score_replies(model, chat_tok, prompts, replies, batch_size=2), scores, atol=1e-5
    )
    assert score_replies(model, chat_tok, [], []).shape == (0,)
    with pytest.raises(ValueError, match="must end with a user turn"):
        score_replies(model, chat_tok, [[{"role": "assistant", "content": "hi"}]], ["x"])


def test_objective_is_bradley_terry_plus_weighted_lm_loss(chat_tok, lm_dir: Path) -> None:
    torch.manual_seed(2)
    model = RewardModel(load_weights(lm_dir), "mean")
    data = encode_pairs(chat_tok, Preferences.from_records(marker_pairs(3, seed=0)), 64)
    batch = collate_pairs(data, [0, 1, 2], ChatSpecials.from_tokenizer(chat_tok).pad)
    loss, metrics = RewardObjective(lm_loss_weight=0.5)(model, batch)
    rc = model(batch["chosen_ids"], batch["chosen_lengths"])
    rr = model(batch["rejected_ids"], batch["rejected_lengths"])
    lm = masked_lm_loss(
        model.backbone(batch["chosen_ids"]), batch["chosen_targets"], batch["chosen_mask"]
    )
    torch.testing.assert_close(loss, bradley_terry_loss(rc, rr) + 0.5 * lm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        metrics["reward_margin"], (rc - rr).mean().detach(), atol=1e-5, rtol=0
    )
    plain, m0 = RewardObjective()(model, batch)
    torch.testing.assert_close(plain, bradley_terry_loss(rc, rr), rtol=1e-4, atol=1e-5)
    assert "lm_loss" not in m0 and "lm_loss" in metrics


def test_calibration_metrics_on_hand_made_margins() -> None:
    # Ties: confidence 0.5, half right -> perfectly calibrated, accuracy one half.
    assert expected_calibration_error(np.zeros(4)) == pytest.approx(0.0)
    # Confident and always right: |1 - σ(8)| per pair.
    assert expected_calibration_error(np.full(5, 8.0)) == pytest.approx(1 / (1 + math.e**8))
    # Confident and right half the time: confidence σ(3) ≈ 0.953, accuracy 0.5.
    sig3 = 1 / (1 + math.exp(-3))
    assert expected_calibration_error(np.array([3.0, -3.0])) == pytest.approx(sig3 - 0.5)
    m = reward_metrics(np.array([2.0, -1.0, 0.0, 4.0]))
    assert m["accuracy"] == pytest.approx(2.5 / 4) and m["margin"] == pytest.approx(1.25)
    assert m["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-np.array([2.0, -1.0, 0.0, 4.0])))))
    assert m["pairs"] == 4
    with pytest.raises(ValueError, match="no pairs"):
        reward_metrics(np.zeros(0))


def test_calibration_bins_and_the_reliability_diagram(tmp_path: Path) -> None:
    margins = np.array([0.1, -0.2, 3.0, 3.2, -4.0, 0.0])
    bins = calibration_bins(margins, n_bins=5)
    assert len(bins) == 5 and sum(b["count"] for b in bins) == 6
    assert bins[0]["lo"] == 0.5 and bins[-1]["hi"] == pytest.approx(1.0)
    # One bin: ECE is |overall accuracy - mean confidence|.
    conf = 1 / (1 + np.exp(-np.abs(margins)))
    expected = abs((3 + 0.5) / 6 - conf.mean())
    assert expected_calibration_error(margins, n_bins=1) == pytest.approx(expected)
    assert expected_calibration_error(margins, n_bins=20) != pytest.approx(expected)
    png = reliability_diagram(margins, tmp_path / "reliability.png", n_bins=5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="n_bins"):
        calibration_bins(margins, n_bins=0)


@pytest.mark.parametrize(("pooling", "lm_loss_weight"), [("eos", 0.0), ("average", 0.5)])
def test_reward_model_learns_a_marker_preference(
    chat_tok, lm_dir: Path, tmp_path: Path, pooling: str, lm_loss_weight: float
) -> None:
    """Replies containing the marker word are preferred: ≥ 90% held-out pairwise accuracy."""
    val_rows = marker_pairs(60, seed=2)
    val = Preferences.from_records(val_rows)
    seen: list[dict[str, float]] = []

    class Spy:
        def on_eval(self, step: int, metrics: dict[str, float]) -> None:
            seen.append(metrics)

    config = reward.Config(
        out_dir=tmp_path / "rm",
        train=tiny_train_config(
            steps=40, batch_size=8, eval_every=20, eval_batches=10, checkpoint_every=20
        ),
        train_path=write_pairs(tmp_path / "pairs" / "train.parquet", marker_pairs(200, seed=1)),
        val_path=write_pairs(tmp_path / "pairs" / "val.parquet", val_rows),
        init_weights=lm_dir,
        tokenizer=write_tokenizer(chat_tok, tmp_path / "tok.json"),
        pooling=pooling,
        lm_loss_weight=lm_loss_weight,
    )
    run = reward.run(config, callbacks=[Spy()])
    s = run.summary
    assert s["val_accuracy"] >= 0.9 > s["val_accuracy_before"]
    assert s["val_margin"] > 0 and 0 <= s["val_ece"] < 0.5
    assert set(seen[-1]) == {"val_loss", "val_reward_accuracy", "val_reward_margin", "val_ece"}
    written = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert written["method"] == "reward" and written["pooling"] == pooling
    assert run.figures["val_accuracy"] == s["val_accuracy"] and 0 < len(run.samples) <= 3
    # The saved model scores held-out chosen replies above rejected ones, as trained.
    rm = load_reward_model(tmp_path / "rm")
    assert rm.pooling == pooling
    rc = score_replies(rm, chat_tok, val.prompts, val.chosen)
    rr = score_replies(rm, chat_tok, val.prompts, val.rejected)
    assert reward_metrics(rc - rr)["accuracy"] == pytest.approx(s["val_accuracy"])
    # The reliability diagram of the held-out pairs: a file for MLflow, inline in the figures.
    assert run.artifacts == [tmp_path / "rm" / "reliability.png"]
    assert run.figures["reliability_diagram"].startswith("![reliability diagram](data:image/png")
