"""Token shards as training batches: the pretraining sampler and eval batches (PyTorch).

:class:`RandomWindowSampler` is a :class:`~llm_core.data.sampler.StepSampler`: the windows of
batch ``k`` are a pure function of ``(seed, k)``, so its state is a counter (plus the geometry a
resume must match) and a resumed run sees exactly the batches an unbroken run would, without
replaying the data stream. This module only says which windows make batch ``k``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from llm_core.data.sampler import StepSampler, rank_slice
from llm_core.data.shards import TokenShards


def _stack(
    shards: TokenShards, starts: Sequence[int], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = (
        np.stack([shards.get(s, seq_len + 1) for s in starts])
        if starts
        else np.empty((0, seq_len + 1), dtype=np.int64)
    )
    # The shards were checked when opened; this catches bytes changed under the mmap since
    # (microseconds per batch), before an id past the vocabulary reaches the embedding.
    if rows.size and int(rows.max()) >= shards.vocab_size:
        raise ValueError(
            f"{shards.root}: split {shards.split!r} holds token id {int(rows.max())} outside the "
            f"vocabulary of {shards.vocab_size} (the shard changed on disk)"
        )
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class RandomWindowSampler(StepSampler):
    """Seeded, resumable sampler of ``(x, y)`` batches of contiguous ``seq_len`` windows.

    The split is cut into non-overlapping windows of stride ``seq_len``; each epoch shuffles them
    with its own permutation and shifts all boundaries by a random offset, so every token is seen
    once per epoch and windows do not always start at the same positions. ``global_batch_size`` is
    the batch across all ranks; rank ``r`` takes rows ``[r*b, (r+1)*b)`` of it, so the data the
    model sees per step is identical for any world size.
    """

    KIND = "lm"

    def __init__(
        self,
        shards: TokenShards,
        global_batch_size: int,
        seq_len: int,
        *,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if global_batch_size <= 0 or seq_len <= 0:
            raise ValueError("global_batch_size and seq_len must be positive")
        super().__init__(global_batch_size, seed=seed, rank=rank, world_size=world_size)
        self.shards = shards
        self.seq_len = int(seq_len)
        # Room for a random offset in [0, seq_len) plus the one-token target shift.
        self.num_windows = (shards.num_tokens - seq_len) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"split {shards.split!r} has {shards.num_tokens} tokens, too few for one window "
                f"of {seq_len}+1 tokens"
            )
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        self._offset = 0

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, int]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(0, self.seq_len))
            self._perm = rng.permutation(self.num_windows)
            self._epoch = epoch
        return self._perm, self._offset

    def window_starts(self, step: int) -> list[int]:
        """Start offsets of the *global* batch number ``step`` (a pure function of seed, step)."""
        starts = []
        for g in range(step * self.global_batch_size, (step + 1) * self.global_batch_size):
            perm, offset = self._epoch_plan(g // self.num_windows)
            starts.append(offset + int(perm[g % self.num_windows]) * self.seq_len)
        return starts

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)`` LongTensors ``[global_batch_size // world_size, seq_len]``."""
        return _stack(self.shards, self.local(self.window_starts(step)), self.seq_len)

    @property
    def epoch(self) -> float:
        """Fractional passes over the split so far."""
        return self.step * self.global_batch_size / self.num_windows

    def geometry(self) -> dict[str, Any]:
        return {
            **super().geometry(),
            "seq_len": self.seq_len,
            "num_tokens": self.shards.num_tokens,
        }


class EvalBatches:
    """Deterministic, re-iterable validation batches: the first ``num_batches`` global batches of
    consecutive windows from the start of the split, identical on every call and world size."""

    def __init__(
        self,
        shards: TokenShards,
        global_batch_size: int,
        seq_len: int,
        num_batches: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shards, self.seq_len = shards, int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self._slice = rank_slice(self.global_batch_size, rank, world_size)
        windows = (shards.num_tokens - 1) // self.seq_len
        self.num_batches = min(int(num_batches), windows // self.global_batch_size)
        if self.num_batches < 1:
            raise ValueError(
                f"split {shards.split!r} has {shards.num_tokens} tokens, too few for one eval "
                f"batch of {global_batch_size}x{seq_len}"
            )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(self.num_batches):
            base = b * self.global_batch_size
            starts = [(base + i) * self.seq_len for i in range(self.global_batch_size)]
            yield _stack(self.shards, starts[self._slice], self.seq_len)
