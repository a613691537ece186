"""safetensors weights with tied embeddings, pickle refusal, atomic checkpoints, RNG state."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from llm_core.checkpoint import (
    NonFiniteWeightsError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
    save_weights,
)
from llm_core.model import Transformer
from tests.llm_core.training_helpers import tiny_model_config


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_model_config())


def test_weights_round_trip_with_tied_embeddings(tmp_path: Path) -> None:
    model = _model()
    assert model.lm_head.weight is model.tok_emb.weight
    save_weights(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert ("lm_head.weight" in keys) != ("tok_emb.weight" in keys)  # stored once
    loaded = load_weights(tmp_path)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # still tied after loading
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(idx), loaded(idx))
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_refuses_pickled_weights(tmp_path: Path) -> None:
    torch.save(_model().state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load pickled"):
        load_weights(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pickled \['pytorch_model.bin'\]"):
        load_weights(tmp_path)
    with pytest.raises(ValueError, match="refusing"):
        load_weights(tmp_path / "model.pt")


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpts = tmp_path / "checkpoints"
    assert latest_checkpoint(ckpts) is None
    for step in (2, 4, 6, 8):
        model(torch.randint(0, 64, (2, 8))).sum().backward()
        opt.step()
        save_checkpoint(
            ckpts,
            step,
            model,
            opt,
            {"step": step},
            {"step": step * 10},
            capture_rng_state(),
            {"note": "x"},
            keep_last=2,
        )
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000006", "step_00000008"]
    (ckpts / ".tmp-step_00000010-crashed").mkdir()  # a crashed save is ignored
    latest = latest_checkpoint(ckpts)
    assert latest == ckpts / "step_00000008"

    fresh = _model(seed=99)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = load_checkpoint(latest, fresh, fresh_opt)
    assert (state.step, state.sampler_state, state.extra) == (8, {"step": 80}, {"note": "x"})
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    assert fresh.lm_head.weight is fresh.tok_emb.weight
    a, b = opt.state_dict()["state"][0], fresh_opt.state_dict()["state"][0]
    assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])


def test_refuses_to_checkpoint_nan_weights(tmp_path: Path) -> None:
    model = _model()
    good = save_checkpoint(tmp_path, 1, model, None, None, None, None)
    with torch.no_grad():
        model.blocks[0].mlp.down.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="not finite"):
        save_checkpoint(tmp_path, 2, model, None, None, None, None)
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])
