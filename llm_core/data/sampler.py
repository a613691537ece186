"""The one shape of every training batch stream: a step-indexed, rank-sliced, resumable sampler.

Each stage reads its data through a subclass of :class:`StepSampler`: LM windows
(:class:`llm_core.data.lm.RandomWindowSampler`), SFT rows (:class:`llm_core.sft.SFTSampler`),
preference pairs (:class:`llm_core.align.IndexSampler`) and GRPO prompts
(:class:`llm_core.rl.RolloutSampler`). They share three properties, held here once:

* *step-indexed*: global batch ``k`` is a pure function of ``(seed, k)``, so the state is a
  counter and a resumed run sees exactly the batches an unbroken run would, without replaying
  the stream;
* *rank-sliced*: ``global_batch_size`` is the batch across all processes and rank ``r`` takes
  rows ``[r*b, (r+1)*b)`` of it, so the data of an optimiser step does not depend on the world
  size;
* *resumable*: ``state_dict()`` is plain JSON (the stream's ``kind``, ``step`` and the geometry
  the batches depend on) and ``load_state_dict()`` refuses a different stream or geometry.

A subclass says only how to build batch ``k`` (:meth:`StepSampler.batch`) and what else its
batches depend on (:meth:`StepSampler.geometry`). Neither NumPy nor torch is needed here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

Rows = TypeVar("Rows")  # anything sliceable: a list, a NumPy array


def rank_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """The rows ``[rank*b, (rank+1)*b)`` of a global batch, ``b = global_batch_size //
    world_size``; raises ``ValueError`` when the batch cannot be split evenly."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    if global_batch_size % world_size:
        raise ValueError(
            f"global batch {global_batch_size} not divisible by world_size {world_size}"
        )
    per = global_batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


class StepSampler(ABC):
    """Base of every training sampler: ``step``, ``seed``, this rank's slice and the state.

    ``KIND`` names the stream in the state dict, so a checkpoint of one stage's data cannot be
    resumed into another's. State dicts written before ``kind`` existed carry none and are
    accepted; their geometry is still checked.
    """

    KIND: ClassVar[str]

    def __init__(
        self, global_batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self._rows = rank_slice(self.global_batch_size, rank, world_size)
        self.step = 0

    def local(self, global_batch: Rows) -> Rows:
        """This rank's rows of a global batch (a list or an array, sliced along its first axis)."""
        return global_batch[self._rows]  # type: ignore[index]

    @abstractmethod
    def batch(self, step: int) -> Any:
        """This rank's part of global batch number ``step`` (a pure function of seed and step)."""

    def next_batch(self) -> Any:
        """The batch at the current step; advances the step."""
        out = self.batch(self.step)
        self.step += 1
        return out

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next_batch()

    def geometry(self) -> dict[str, Any]:
        """What the batches depend on besides the step; a resume must match all of it.
        Subclasses extend it (``{**super().geometry(), ...}``)."""
        return {"seed": self.seed, "global_batch_size": self.global_batch_size}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: the stream's kind, the step and the geometry."""
        return {"kind": self.KIND, "step": self.step, **self.geometry()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state['step']``; the world size may differ, the kind and geometry not."""
        kind = state.get("kind")
        if kind is not None and kind != self.KIND:
            raise ValueError(f"sampler state is for a {kind!r} stream, not {self.KIND!r}")
        for key, mine in self.geometry().items():
            if state.get(key) != mine:
                raise ValueError(
                    f"{self.KIND} sampler state mismatch on {key}: "
                    f"saved {state.get(key)}, now {mine}"
                )
        self.step = int(state["step"])
