"""FSDP (``train.parallel: fsdp``, PyTorch's ``fully_shard``) on two gloo ranks trains like one
process on the same global batch, and its checkpoints are the one format: they resume under
FSDP exactly and load into a plain model and optimiser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llm_core.checkpoint import latest_checkpoint, load_checkpoint, load_config, load_state_dict
from llm_core.config import TrainConfig
from llm_core.distributed import Parallel, check_parallel
from llm_core.model import Transformer
from llm_core.trainer import build_optimizer
from tests.llm_core.distributed_helpers import PretrainSetup


def test_parallel_modes_are_checked() -> None:
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(steps=1, batch_size=1, parallel="zero3")
    with pytest.raises(ValueError, match="muon"):
        check_parallel("fsdp", "muon")
    check_parallel("ddp", "muon")
    model = torch.nn.Linear(2, 2)  # one process: nothing to wrap or shard
    par = Parallel.wrap(model, "fsdp", distributed=False, device=torch.device("cpu"))
    assert par.module is model and par.export() is model and not par.is_fsdp


@pytest.mark.slow
def test_fsdp_two_ranks_resume_train_and_save_like_one_process(tmp_path: Path) -> None:
    """One torchrun run covers FSDP's whole path: it resumes (sharded) from the one-process
    run's step-2 checkpoint, trains steps 3-4 on two ranks with gradient accumulation, writes its
    step-4 checkpoint and final weights (gathered), and matches the one-process run throughout."""
    setup = PretrainSetup(tmp_path, parallel="fsdp")
    single = setup.single(tmp_path / "single").train  # the reference; DDP matches it (test_ddp)
    fsdp_out = tmp_path / "fsdp"
    shutil.copytree(
        tmp_path / "single" / "checkpoints" / "step_00000002",
        fsdp_out / "checkpoints" / "step_00000002",
    )
    fsdp = setup.torchrun(fsdp_out, "--resume")
    assert fsdp["world_size"] == 2 and fsdp["train_config"]["parallel"] == "fsdp"
    assert fsdp["resumed_from"] == 2 and fsdp["steps"] == 4
    fsdp_losses = [h["loss"] for h in fsdp["history"]]
    single_losses = [h["loss"] for h in single.history]
    # Same weights, optimiser state and global batch: sharding changes only the summation order
    # (DDP's tolerance in test_ddp.py). Steps 1-2 are the checkpoint's own history.
    assert fsdp_losses == pytest.approx(single_losses, abs=2e-4)
    assert fsdp["final_metrics"]["val_loss"] == pytest.approx(
        single.final_metrics["val_loss"], abs=2e-4
    )
    # The final weights were gathered from the shards into one ordinary file.
    a, b = load_state_dict(fsdp_out), load_state_dict(tmp_path / "single")
    assert a.keys() == b.keys()
    diff = sum(float((a[k] - b[k]).square().sum()) for k in a) ** 0.5
    norm = sum(float(b[k].square().sum()) for k in a) ** 0.5
    assert diff / norm < 1e-3, (diff, norm)

    # Its step-4 checkpoint is a plain one: it loads into an unsharded model and optimiser, and
    # holds the same optimiser state as the one-process run's.
    ckpt = latest_checkpoint(fsdp_out / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000004"
    cfg = TrainConfig.from_dict(fsdp["train_config"])
    plain = Transformer(load_config(tmp_path / "single"))
    optimizer = build_optimizer(plain, cfg, torch.device("cpu"))
    assert load_checkpoint(ckpt, plain, optimizer).step == 4
    ref = torch.load(
        tmp_path / "single" / "checkpoints" / "step_00000004" / "optimizer.pt", weights_only=True
    )
    ours = optimizer.state_dict()
    assert ours["state"].keys() == ref["state"].keys()
    for i, state in ref["state"].items():
        assert float(ours["state"][i]["step"]) == float(state["step"]) == 4
        moment = state["exp_avg_sq"]
        assert torch.allclose(ours["state"][i]["exp_avg_sq"], moment, rtol=1e-2, atol=1e-9)
