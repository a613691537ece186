"""Changed bytes and killed saves (SECURITY.md items 2 and 3): shards, checkpoints, weights.

Each test damages real files the project wrote (two bytes of a shard, four bytes of a checkpoint,
a save killed between its renames) and checks the damage is an error naming the file, or is
cleaned up, instead of training on id 65535 or loading NaN weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from llm_core.checkpoint import (
    CorruptCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from llm_core.data import TokenShards
from llm_core.data.lm import RandomWindowSampler
from llm_core.model import Transformer
from llm_core.objectives import LMObjective
from llm_core.trainer import Trainer
from pipeline.io import atomic_write_parquet
from tests.llm_core.training_helpers import SEQ, make_shards, tiny_model_config, tiny_train_config

VOCAB = 512


def _flip_last_token(shard: Path) -> None:
    """Set the last token of a .npy shard to 0xFFFF: two bytes, as the report's attack did."""
    with open(shard, "r+b") as fh:
        fh.seek(-2, os.SEEK_END)
        fh.write(b"\xff\xff")


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _rewrite_manifest(root: Path, drop: tuple[str, ...]) -> None:
    m = _manifest(root)
    for s in m["shards"]:
        for key in drop:
            s.pop(key, None)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("drop", "message"),
    [((), "CRC-32 differs"), (("crc32",), "SHA-256 differs"), (("crc32", "sha256"), "65535")],
    ids=["crc32", "sha256-only-manifest", "no-checksum"],
)
def test_two_flipped_bytes_in_a_shard_fail_on_open(
    tmp_path: Path, drop: tuple[str, ...], message: str
) -> None:
    root = make_shards(tmp_path / "s", vocab=VOCAB)
    checksums = [("crc32" in s, "sha256" in s) for s in _manifest(root)["shards"]]
    TokenShards(root, "train")  # intact: opens
    _flip_last_token(root / "train_00001.npy")
    _rewrite_manifest(root, drop)
    with pytest.raises(ValueError, match=message) as err:
        TokenShards(root, "train")
    assert "train_00001.npy" in str(err.value)
    TokenShards(root, "val")  # the other split's shards are intact
    assert set(checksums) == {(True, True)}  # the writer records both


def test_sampler_refuses_ids_changed_after_open(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "s", vocab=VOCAB, train_tokens=2048, tokens_per_shard=4096)
    shards = TokenShards(root, "train")
    sampler = RandomWindowSampler(shards, 4, SEQ, seed=1)
    assert int(sampler.batch(0)[0].max()) < VOCAB
    data = np.load(root / "train_00000.npy", mmap_mode="r+")
    data[:] = 65535  # the bytes change under the open mmap
    data.flush()
    with pytest.raises(ValueError, match="token id 65535 outside the vocabulary of 512"):
        sampler.batch(1)


def _tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_model_config())


def test_flipped_bytes_in_a_checkpoint_fail_resume(tmp_path: Path) -> None:
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path / "ck", 3, model, opt, {}, {}, None)
    weights = ckpt / "model.safetensors"
    with open(weights, "r+b") as fh:  # four bytes in the middle of a tensor: NaN/1e38 before
        fh.seek(weights.stat().st_size - 64)
        fh.write(b"\xff\xff\xff\x7f")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: SHA-256 differs"):
        load_checkpoint(ckpt, _tiny(), torch.optim.AdamW(_tiny().parameters()))
    ckpt2 = save_checkpoint(tmp_path / "ck", 6, model, opt, {}, {}, None)
    with open(ckpt2 / "optimizer.pt", "r+b") as fh:
        fh.seek(-40, os.SEEK_END)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt"):
        load_checkpoint(ckpt2, _tiny(), torch.optim.AdamW(_tiny().parameters()))


def test_killed_saves_are_cleaned_on_next_save_and_on_resume(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "s")
    out = tmp_path / "out"
    ck = out / "checkpoints"
    stale = ck / ".tmp-step_00000003-k1ll3d"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    cfg = tiny_train_config(steps=1, checkpoint_every=1)

    def trainer() -> Trainer:
        sampler = RandomWindowSampler(TokenShards(shards, "train"), cfg.batch_size, SEQ, seed=7)
        return Trainer(_tiny(), LMObjective(), cfg, sampler, out_dir=out)

    trainer().fit()  # its save removes the leftover of the killed one
    assert not stale.exists() and latest_checkpoint(ck) == ck / "step_00000001"
    # Saves killed after that one, then a resume whose checkpoint is damaged: the resume removes
    # the leftovers before it looks for steps, and the damage stops it before any weight loads.
    (ck / ".tmp-step_00000002-again").mkdir()
    (ck / ".old-step_00000001-77").mkdir()
    with open(ck / "step_00000001" / "optimizer.pt", "r+b") as fh:
        fh.seek(-40, os.SEEK_END)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(CorruptCheckpointError, match="step_00000001/optimizer.pt"):
        trainer().fit(resume=True)
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000001"]


def test_new_weights_never_pair_with_an_old_config(tmp_path: Path) -> None:
    old = _tiny()
    save_weights(old, tmp_path / "w")
    torch.manual_seed(1)
    new = Transformer(tiny_model_config(vocab=96))  # another shape: a config mismatch shows
    save_weights(new, tmp_path / "scratch")
    # A save killed between its two renames: the new weights landed, config.json is the old one.
    shutil.copyfile(
        tmp_path / "scratch" / "model.safetensors", tmp_path / "w" / "model.safetensors"
    )
    assert json.loads((tmp_path / "w" / "config.json").read_text())["vocab_size"] == 64
    loaded = load_weights(tmp_path / "w")
    assert loaded.config.vocab_size == 96
    for k, v in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_parquet_writer_fsyncs_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spy over the real os.fsync (it still syncs) records which files were synced."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "rejects.parquet"
    atomic_write_parquet(pl.DataFrame({"id": [1, 2], "reason": ["a", "b"]}), target)
    assert any(Path(p).name.startswith(".rejects.parquet.") for p in synced), synced
    assert str(tmp_path) in synced  # and the folder, so the rename itself survives a power cut
    assert pl.read_parquet(target)["id"].to_list() == [1, 2]
