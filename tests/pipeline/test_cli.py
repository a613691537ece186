"""``scriptorium generate``, ``export`` and ``import`` as real subprocesses on a small saved model
and tokenizer."""

from __future__ import annotations

import os
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
    cfg = ModelConfig(
        vocab_size=300, context_length=64, n_layer=1, n_head=2, d_model=32, ffn_hidden=64
    )
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


def test_export_then_import_round_trips_the_weights(tmp_path) -> None:
    """``scriptorium export`` writes a Hub folder; ``scriptorium import`` reads it back exactly."""
    from safetensors.torch import load_file

    from llm_core.checkpoint import load_weights

    tok = train_bpe(iter(["the sea and the ship and the whale\n" * 200]), vocab_size=300)
    (tmp_path / "w").mkdir()
    tok.save(str(tmp_path / "w" / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=300, context_length=64, n_layer=1, n_head=2, d_model=32, ffn_hidden=64
    )
    save_weights(Transformer(cfg), tmp_path / "w")
    env = {**os.environ, "SCRIPTORIUM_DATA": str(tmp_path / "no-data")}
    exported = subprocess.run(
        [str(SCRIPTORIUM), "export", "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "hf"),
         "--license", "apache-2.0"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert "model_type" in (tmp_path / "hf" / "config.json").read_text()
    assert (tmp_path / "hf" / "README.md").read_text().startswith("---\n")
    assert "license: apache-2.0" in (tmp_path / "hf" / "README.md").read_text()
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(
        tmp_path / "hf" / "model.safetensors"
    )
    imported = subprocess.run(
        [str(SCRIPTORIUM), "import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert "llama" in imported.stdout
    ref, back = (
        load_weights(tmp_path / "w").state_dict(),
        load_weights(tmp_path / "back").state_dict(),
    )
    assert all(torch.equal(back[k], v) for k, v in ref.items())
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (
        tmp_path / "w" / "tokenizer.json"
    ).read_bytes()


def test_import_refuses_a_pickled_checkpoint(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    proc = subprocess.run(
        [str(SCRIPTORIUM), "import", "--hf", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "scriptorium: error:" in proc.stderr and "pytorch_model.bin" in proc.stderr
    assert "refusing to load pickled weights" in proc.stderr and not (tmp_path / "out").exists()
