"""Two-process gloo DDP (via torchrun and the real CLI) matches one process on the same global
batch: the sampler hands each rank its half and DDP averages gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llm_core.checkpoint import load_state_dict
from llm_core.config import load_profile
from llm_core.model import Transformer
from llm_core.stages import pretrain
from tests.llm_core.stages.helpers import PRETRAIN_VOCAB, sample_tokenizer
from tests.llm_core.training_helpers import make_shards, tiny_model_config

REPO = Path(__file__).resolve().parents[2]


def _profile(path: Path) -> Path:
    mc = tiny_model_config(vocab=PRETRAIN_VOCAB).to_dict()
    profile = {
        "name": "ddp-test",
        "vocab_size": mc.pop("vocab_size"),
        "context_length": mc.pop("context_length"),
        "seed": 11,
        "model": mc,
        "pretrain": {
            "steps": 4,
            "batch_size": 4,
            "grad_accum": 2,
            "lr": 1e-2,
            "warmup_steps": 1,
            "eval_every": 2,
            "eval_batches": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "device": "cpu",
        },
    }
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    profile_path = _profile(tmp_path / "ddp.yaml")
    tokenizer = sample_tokenizer(tmp_path / "tokenizer.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "llm_core.stages.pretrain",
        "--shards-dir",
        str(shards),
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(tmp_path / "ddp"),
        "--profile",
        str(profile_path),
        "--device",
        "cpu",
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    headline = json.loads(proc.stdout.strip().splitlines()[-1])  # printed by rank 0 only
    assert headline["world_size"] == 2 and headline["steps"] == 4

    profile = load_profile(str(profile_path))
    config = pretrain.Config.from_profile(
        profile,
        {"shards_dir": shards, "tokenizer": tokenizer},
        out_dir=tmp_path / "single",
        device="cpu",
    )
    assert config.train.seed == profile["seed"] and config.train.steps == 4
    single = pretrain.run(config).train
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp_metrics["world_size"] == 2
    ddp_losses = [h["loss"] for h in ddp_metrics["history"]]
    single_losses = [h["loss"] for h in single.history]
    # Same weights, same global batch: the first loss agrees to float32 roundoff.
    assert ddp_losses[0] == pytest.approx(single_losses[0], abs=1e-6)
    assert ddp_losses == pytest.approx(single_losses, abs=2e-4)
    assert ddp_metrics["final_metrics"]["val_loss"] == pytest.approx(
        single.final_metrics["val_loss"], abs=2e-4
    )
    # Adam divides by sqrt(v): for near-zero gradients, summation-order roundoff (2x2 rows +
    # all-reduce vs 4 rows) moves single weights by up to ~lr, so compare the *update* as a whole.
    a, b = load_state_dict(tmp_path / "ddp"), load_state_dict(tmp_path / "single")
    torch.manual_seed(profile["seed"])
    init = Transformer(config.model).state_dict()
    assert a.keys() == b.keys() == init.keys()
    diff = sum(float((a[k] - b[k]).square().sum()) for k in a) ** 0.5
    update = sum(float((b[k] - init[k]).square().sum()) for k in a) ** 0.5
    assert update > 0.1 and diff / update < 1e-2, (diff, update)
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]


@pytest.mark.slow
def test_torchrun_two_ranks_train_for_minutes_with_muon(tmp_path: Path) -> None:
    """Muon and a time budget under DDP: both ranks stop at rank 0's planned step (broadcast, as
    each rank measures its own step time) and the WSD decay completes."""
    shards = make_shards(tmp_path / "shards")
    path = _profile(tmp_path / "ddp.yaml")
    profile = yaml.safe_load(path.read_text())
    profile["pretrain"].update(steps=0, minutes=0.05, optimizer="muon", schedule="wsd",
                               eval_every=0, checkpoint_every=0, grad_accum=1)  # fmt: skip
    path.write_text(yaml.safe_dump(profile))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llm_core.stages.pretrain", "--shards-dir", str(shards), "--tokenizer",
           str(sample_tokenizer(tmp_path / "tokenizer.json")), "--out", str(tmp_path / "ddp"),
           "--profile", str(path), "--device", "cpu", "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    steps = metrics["steps"]
    assert metrics["world_size"] == 2 and steps >= 2 and len(metrics["history"]) == steps
    assert metrics["history"][-1]["lr"] == pytest.approx(1e-2 * 0.1)  # the decay completed
