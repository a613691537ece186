"""Losses against closed forms on hand-made numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_core.evaluate import bits_per_byte, perplexity
from llm_core.objectives import (
    DPOObjective,
    LMObjective,
    Objective,
    bradley_terry_loss,
    dpo_loss,
    lm_loss,
    masked_lm_loss,
    sequence_logprobs,
)


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def test_dpo_loss_matches_closed_form() -> None:
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    beta = 0.5
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: beta*((-10+11) - (-12+11.5)) = 0.5*1.5 = 0.75; pair 1: 0.5*((1) - (-1)) = 1.0
    expected = -(_log_sigmoid(0.75) + _log_sigmoid(1.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(chosen_r, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.25, -0.5]))
    assert not chosen_r.requires_grad
    # identical policy and reference: loss is log 2
    z = torch.zeros(3)
    assert dpo_loss(z, z, z, z, 0.1)[0].item() == pytest.approx(math.log(2))


def test_bradley_terry_loss() -> None:
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    expected = -(_log_sigmoid(1.0) + _log_sigmoid(-3.0)) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(expected, rel=1e-6)


def test_lm_loss_is_float32_cross_entropy_with_ignore() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -100
    ref = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, targets), ref)
    assert lm_loss(logits.bfloat16(), targets).dtype == torch.float32


def test_masked_lm_loss_and_sequence_logprobs() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    picked = [logp[0, 1], logp[0, 2], logp[1, 0]]
    assert masked_lm_loss(logits, targets, mask).item() == pytest.approx(
        -sum(p.item() for p in picked) / 3, rel=1e-6
    )
    torch.testing.assert_close(
        sequence_logprobs(logits, targets, mask), torch.stack([logp[0, 1] + logp[0, 2], logp[1, 0]])
    )
    assert masked_lm_loss(logits, targets, torch.zeros_like(mask)).item() == 0.0


class _Bigram(nn.Module):
    def __init__(self, vocab: int = 9) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, idx: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        return self.table(idx)


def test_lm_objective_accepts_tuples_and_masked_mappings() -> None:
    model = _Bigram()
    x, y = torch.randint(0, 9, (2, 6)), torch.randint(0, 9, (2, 6))
    objective = LMObjective()
    assert isinstance(objective, Objective)
    loss, metrics = objective(model, (x, y))
    torch.testing.assert_close(loss, lm_loss(model(x), y))
    assert set(metrics) == {"loss"} and not metrics["loss"].requires_grad
    mask = torch.ones_like(y)
    mask[:, :3] = 0
    masked, _ = objective(model, {"input_ids": x, "targets": y, "loss_mask": mask})
    torch.testing.assert_close(masked, lm_loss(model(x), y.masked_fill(mask == 0, -100)))


def test_dpo_objective_uses_reference_model() -> None:
    torch.manual_seed(2)
    policy, ref = _Bigram(), _Bigram()
    ids = torch.randint(0, 9, (3, 5))
    mask = torch.ones_like(ids)
    batch = {
        "chosen_ids": ids,
        "chosen_targets": ids.roll(-1, 1),
        "chosen_mask": mask,
        "rejected_ids": ids.flip(1),
        "rejected_targets": ids,
        "rejected_mask": mask,
    }
    loss, metrics = DPOObjective(beta=0.2, reference=ref)(policy, batch)
    lp = [
        sequence_logprobs(m(batch[f"{s}_ids"]), batch[f"{s}_targets"], mask)
        for m in (policy, ref)
        for s in ("chosen", "rejected")
    ]
    torch.testing.assert_close(loss, dpo_loss(*lp, beta=0.2)[0])
    assert 0.0 <= metrics["reward_accuracy"].item() <= 1.0
    loss.backward()
    assert policy.table.weight.grad is not None and ref.table.weight.grad is None


def test_bits_per_byte_and_perplexity() -> None:
    assert bits_per_byte(math.log(2), tokens=100, num_bytes=400) == pytest.approx(0.25)
    assert perplexity(math.log(5)) == pytest.approx(5)
    assert perplexity(1e4) == math.inf
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0, 10)
