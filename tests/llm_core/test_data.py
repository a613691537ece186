"""Token shards: writer/reader/manifest round trip, atomic writes, sampler determinism/resume/DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_core.data import (
    ShardWriter,
    TokenShards,
    dtype_for_vocab,
    read_manifest,
    write_manifest,
)
from llm_core.data import shards as data_mod
from llm_core.data.lm import EvalBatches, RandomWindowSampler
from llm_core.data.sampler import StepSampler, rank_slice
from tests.llm_core.training_helpers import corpus, make_shards

REPO = Path(__file__).resolve().parents[2]


def test_writer_reader_round_trip(tmp_path: Path) -> None:
    root = make_shards(tmp_path, train_tokens=3500, val_tokens=700, tokens_per_shard=1000)
    manifest = read_manifest(root, verify_hashes=True)
    train_files = [s["file"] for s in manifest["shards"] if s["split"] == "train"]
    assert train_files == [f"train_{i:05d}.npy" for i in range(4)]
    assert [s["tokens"] for s in manifest["shards"] if s["split"] == "train"] == [1000] * 3 + [500]
    assert np.load(root / "train_00000.npy").dtype == np.uint16
    expected = corpus(4200)
    train = TokenShards(root, "train")
    assert len(train) == 3500 and train.tokens_per_byte == pytest.approx(0.25)
    np.testing.assert_array_equal(train.get(0, 3500), expected[:3500])
    np.testing.assert_array_equal(train.get(990, 1020), expected[990:2010])  # spans 3 shards
    np.testing.assert_array_equal(TokenShards(root, "val").get(0, 700), expected[3500:])
    with pytest.raises(IndexError):
        train.get(3000, 501)
    with pytest.raises(KeyError, match="no split 'test'"):
        TokenShards(root, "test")


def test_dtype_choice_and_range_checks(tmp_path: Path) -> None:
    assert dtype_for_vocab(1024) == "uint16" and dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(65537) == "uint32"
    w = ShardWriter(tmp_path, split="train", tokens_per_shard=10, dtype="uint32")
    w.write(np.array([70000, 1, 2]))
    assert np.load(tmp_path / w.close()[0]["file"]).dtype == np.uint32
    w16 = ShardWriter(tmp_path, split="val", tokens_per_shard=10, dtype=np.dtype(np.uint16))
    assert w16.dtype == "uint16"  # np.dtype objects are accepted too
    with pytest.raises(ValueError, match="token ids must lie in"):
        w16.write(np.array([65536]))
    with pytest.raises(TypeError):
        w16.write(np.array([1.5]))


def test_shard_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = np.save

    def failing_save(fh, arr, **kw):  # type: ignore[no-untyped-def]
        real_save(fh, arr[: arr.size // 2], **kw)  # half a file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(data_mod.np, "save", failing_save)
    w = ShardWriter(tmp_path, split="train", tokens_per_shard=8, dtype="uint16")
    with pytest.raises(OSError, match="disk full"):
        w.write(np.arange(10))
    assert list(tmp_path.iterdir()) == []  # no partial .npy and no temp file left behind


def test_manifest_write_is_atomic_and_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_shards(tmp_path)
    good = (root / "manifest.json").read_text()
    broken = json.loads(good)
    broken["splits"]["train"]["tokens"] += 1
    with pytest.raises(ValueError, match=r"manifest\.json: split 'train' declares"):
        write_manifest(root, broken)
    assert (root / "manifest.json").read_text() == good

    def crash(*_a: object) -> None:
        raise OSError("crash during rename")

    monkeypatch.setattr(data_mod.os, "replace", crash)
    with pytest.raises(OSError):
        write_manifest(root, json.loads(good) | {"tokenizer_sha256": "f" * 64})
    monkeypatch.undo()
    assert (root / "manifest.json").read_text() == good
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.pop("dtype"), "missing keys"),
        (lambda m: m.update(format="other/1"), "unsupported format"),
        (lambda m: m.update(dtype="uint32"), "does not match vocab_size"),
        (lambda m: m["shards"][0].update(tokens=5), "expected 1024"),
        (lambda m: m["shards"][0].update(file="../x.npy"), "bare file name"),
        (lambda m: m["shards"][0].update(file="nope_00000.npy"), "is missing"),
    ],
)
def test_read_manifest_errors_name_the_file(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    root = make_shards(tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    mutate(m)
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=message) as err:
        read_manifest(root)
    assert str(root / "manifest.json") in str(err.value)


def test_read_manifest_missing_and_tampered(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)
    root = make_shards(tmp_path)
    arr = np.load(root / "train_00001.npy")
    arr[0] += 1
    np.save(root / "train_00001.npy", arr)
    read_manifest(root)  # cheap validation passes
    with pytest.raises(ValueError, match="sha256 mismatch for shard train_00001.npy"):
        read_manifest(root, verify_hashes=True)


def _batches(sampler: RandomWindowSampler, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_is_deterministic_and_windows_are_contiguous(tmp_path: Path) -> None:
    train = TokenShards(make_shards(tmp_path), "train")
    a = _batches(RandomWindowSampler(train, 4, 16, seed=3), 5)
    b = _batches(RandomWindowSampler(train, 4, 16, seed=3), 5)
    c = _batches(RandomWindowSampler(train, 4, 16, seed=4), 5)
    assert all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c, strict=True))
    full = torch.from_numpy(corpus(6000))
    sampler = RandomWindowSampler(train, 4, 16, seed=3)
    starts = sampler.window_starts(0)
    x, y = sampler.next_batch()
    assert x.dtype == torch.long and x.shape == (4, 16)
    for row, s in enumerate(starts):
        assert torch.equal(x[row], full[s : s + 16]) and torch.equal(y[row], full[s + 1 : s + 17])


def test_sampler_covers_each_window_once_per_epoch(tmp_path: Path) -> None:
    train = TokenShards(make_shards(tmp_path), "train")
    s = RandomWindowSampler(train, 1, 16, seed=0)
    starts = [s.window_starts(i)[0] for i in range(s.num_windows)]
    offsets = {st % 16 for st in starts}
    assert len(offsets) == 1 and len(set(starts)) == s.num_windows
    assert max(starts) + 17 <= len(train)


def test_sampler_state_resume_matches_unbroken(tmp_path: Path) -> None:
    train = TokenShards(make_shards(tmp_path), "train")
    unbroken = _batches(RandomWindowSampler(train, 8, 16, seed=1), 100)  # crosses epochs
    first = RandomWindowSampler(train, 8, 16, seed=1)
    _batches(first, 37)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = RandomWindowSampler(train, 8, 16, seed=1)
    resumed.load_state_dict(state)
    for (xu, yu), (xr, yr) in zip(unbroken[37:], _batches(resumed, 63), strict=True):
        assert torch.equal(xu, xr) and torch.equal(yu, yr)
    with pytest.raises(ValueError, match="seq_len"):
        RandomWindowSampler(train, 8, 32, seed=1).load_state_dict(state)


def test_ddp_ranks_slice_the_same_global_batch(tmp_path: Path) -> None:
    train = TokenShards(make_shards(tmp_path), "train")
    single = _batches(RandomWindowSampler(train, 4, 16, seed=9), 3)
    ranks = [
        _batches(RandomWindowSampler(train, 4, 16, seed=9, rank=r, world_size=2), 3)
        for r in range(2)
    ]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y)
    with pytest.raises(ValueError, match="not divisible"):
        RandomWindowSampler(train, 3, 16, world_size=2)


class Squares(StepSampler):
    """The smallest StepSampler: global batch ``k`` is ``[(k*B + i)**2 for i < B]``."""

    KIND = "squares"

    def batch(self, step: int) -> list[int]:
        b = self.global_batch_size
        return list(self.local([(step * b + i) ** 2 for i in range(b)]))


def test_step_sampler_base_steps_slices_and_checks_state() -> None:
    one = Squares(4, seed=0)
    assert [one.next_batch() for _ in range(2)] == [[0, 1, 4, 9], [16, 25, 36, 49]]
    halves = [Squares(4, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert halves[0].next_batch() + halves[1].next_batch() == [0, 1, 4, 9]
    assert one.state_dict() == {"kind": "squares", "step": 2, "seed": 0, "global_batch_size": 4}
    again = Squares(4, seed=0)
    again.load_state_dict({"step": 2, "seed": 0, "global_batch_size": 4})  # no kind: older state
    assert again.next_batch() == [64, 81, 100, 121]
    with pytest.raises(ValueError, match="'lm' stream, not 'squares'"):
        again.load_state_dict({**one.state_dict(), "kind": "lm"})
    with pytest.raises(ValueError, match="squares sampler state mismatch on seed"):
        again.load_state_dict({**one.state_dict(), "seed": 1})
    assert rank_slice(6, 2, 3) == slice(4, 6)
    with pytest.raises(ValueError, match="invalid rank"):
        rank_slice(6, 3, 3)
    with pytest.raises(ValueError, match="must be positive"):
        Squares(0, seed=0)


def test_lm_sampler_state_has_its_kind_and_loads_pre_kind_state(tmp_path: Path) -> None:
    train = TokenShards(make_shards(tmp_path), "train")
    first = RandomWindowSampler(train, 4, 16, seed=3)
    want = _batches(first, 3)
    state = first.state_dict()
    assert state["kind"] == "lm"
    old = {k: v for k, v in state.items() if k != "kind"}  # a checkpoint from before `kind`
    resumed = RandomWindowSampler(train, 4, 16, seed=3)
    resumed.load_state_dict({**old, "step": 1})
    for (xw, yw), (xr, yr) in zip(want[1:], _batches(resumed, 2), strict=True):
        assert torch.equal(xw, xr) and torch.equal(yw, yr)


def test_eval_batches_fixed_sequential_and_sliced(tmp_path: Path) -> None:
    val = TokenShards(make_shards(tmp_path, val_tokens=1500), "val")
    ev = EvalBatches(val, 4, 16, num_batches=100)
    assert len(ev) == (1499 // 16) // 4
    first, again = list(ev), list(ev)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert torch.equal(first[1][0][0], torch.from_numpy(val.get(4 * 16, 16)))
    halves = [list(EvalBatches(val, 4, 16, 3, rank=r, world_size=2)) for r in range(2)]
    for b in range(3):
        assert torch.equal(torch.cat([halves[0][b][0], halves[1][b][0]]), first[b][0])
    with pytest.raises(ValueError, match="too few"):
        EvalBatches(val, 128, 16, 1)


def test_shard_format_and_data_stages_do_not_import_torch() -> None:
    """The data stages write shards through ``llm_core.data`` without PyTorch's import floor."""
    code = (
        "import sys, llm_core.data, llm_core.data.shards, pipeline.text.shards, pipeline.text.clean\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import llm_core.data.lm\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
