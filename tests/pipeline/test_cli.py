"""``scriptorium generate`` as a real subprocess on a small saved model and tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from llm_core.checkpoint import save_weights
from llm_core.config import ModelConfig
from llm_core.model import Transformer
from llm_core.tokenizer import train_bpe

SCRIPTORIUM = Path(sys.executable).parent / "scriptorium"


def test_generate_streams_a_continuation(tmp_path) -> None:
    tok = train_bpe(iter(["the sea and the ship and the whale\n" * 200]), vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, context_length=64, n_layer=1, n_head=2, d_model=32, ffn_hidden=64)
    save_weights(Transformer(cfg), tmp_path)
    cmd = [str(SCRIPTORIUM), "generate", "--weights", str(tmp_path), "--max-new-tokens", "12",
           "--seed", "1", "the sea"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("the sea") and len(first.stdout) > len("the sea\n")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.stdout == first.stdout  # seeded sampling is reproducible


def test_generate_names_a_missing_weights_folder(tmp_path) -> None:
    proc = subprocess.run(
        [str(SCRIPTORIUM), "generate", "--weights", str(tmp_path / "nope"), "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "scriptorium generate:" in proc.stderr
