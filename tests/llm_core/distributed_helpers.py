"""The pretrain stage run for real by the multi-process tests: ``torchrun`` (standalone, or one
agent per "node" with a rendezvous on loopback) against one in-process reference run.

Every run uses the same tiny model, shards, tokenizer and profile, so the same global batch:
``batch_size`` is global and the sampler hands each rank its slice.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from llm_core.config import load_profile
from llm_core.stages import pretrain
from tests.llm_core.stages.helpers import PRETRAIN_VOCAB, sample_tokenizer
from tests.llm_core.training_helpers import make_shards, tiny_model_config

REPO = Path(__file__).resolve().parents[2]
STAGE = "llm_core.stages.pretrain"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PretrainSetup:
    """Shards, tokenizer and a profile under ``root``; runs of the pretrain stage on them."""

    def __init__(self, root: Path, **train: Any) -> None:
        self.root = root
        self.shards = make_shards(root / "shards")
        self.tokenizer = sample_tokenizer(root / "tokenizer.json")
        mc = tiny_model_config(vocab=PRETRAIN_VOCAB).to_dict()
        section = {
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
            **train,
        }
        profile = {
            "name": "dist-test",
            "vocab_size": mc.pop("vocab_size"),
            "context_length": mc.pop("context_length"),
            "seed": 11,
            "model": mc,
            "pretrain": section,
        }
        self.profile = root / "profile.yaml"
        self.profile.write_text(yaml.safe_dump(profile))

    def stage_args(self, out: Path, *extra: str) -> list[str]:
        """The stage's CLI arguments after ``-m llm_core.stages.pretrain``."""
        return [
            "--shards-dir", str(self.shards), "--tokenizer", str(self.tokenizer),
            "--out", str(out), "--profile", str(self.profile), "--device", "cpu",
            "--log-level", "WARNING", *extra,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def torchrun(self, out: Path, *extra: str, nproc: int = 2) -> dict[str, Any]:
        """``torchrun --standalone`` with ``nproc`` ranks; returns the run's ``metrics.json``."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", STAGE, *self.stage_args(out, *extra)]  # fmt: skip
        proc = subprocess.run(
            cmd, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text())

    def single(self, out: Path) -> pretrain.StageResult:
        """The one-process reference, in this process."""
        config = pretrain.Config.from_profile(
            load_profile(str(self.profile)),
            {"shards_dir": self.shards, "tokenizer": self.tokenizer},
            out_dir=out,
            device="cpu",
        )
        return pretrain.run(config)
