"""Preference pairs as training data, and the pieces of DPO (the stage is :mod:`llm_core.stages.dpo`).

A preference pair is a chat prompt (``[{role, content}, ...]`` ending in a user turn) and two
assistant replies, ``chosen`` and ``rejected``. Both sides are encoded with
:func:`llm_core.sft.encode_replies`, i.e. exactly the chat template SFT trains on, with only the
final reply supervised and over-long prompts cut from the left. The same encoded pairs feed the
reward model (:mod:`llm_core.reward`) and DPO, through one batch layout (:func:`collate_pairs`):

``{side}_ids`` [B, W]
    the whole conversation, right-padded (a reward model pools over it);
``{side}_targets`` / ``{side}_mask`` [B, W]
    the next token of each position and whether it is a reply token (DPO sums those
    log-probabilities; the last column never is);
``{side}_lengths`` [B]
    real tokens per row,

for ``side`` in ``chosen``/``rejected``, both padded to one width ``W`` so they can share a
forward pass. Batches come from :class:`IndexSampler`, a
:class:`~llm_core.data.sampler.StepSampler` like every training sampler, so a resumed run sees
the batches an unbroken one would.

DPO itself is :class:`llm_core.objectives.DPOObjective` run by the one
:class:`~llm_core.trainer.Trainer`, against a frozen copy of the starting (SFT) model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from llm_core.config import TrainConfig
from llm_core.data.sampler import StepSampler
from llm_core.objectives import DPOObjective, evaluate_objective
from llm_core.sft import ChatDataset, ChatSpecials, encode_replies
from llm_core.trainer import DistInfo

Messages = list[dict[str, str]]


# ------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Preferences:
    """Parallel lists of prompts, chosen and rejected replies (plain data, no pipeline types)."""

    prompts: list[Messages]
    chosen: list[str]
    rejected: list[str]

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if len(self.chosen) != n or len(self.rejected) != n:
            raise ValueError(
                f"preferences need one chosen and one rejected reply per prompt: got "
                f"{n} prompts, {len(self.chosen)} chosen, {len(self.rejected)} rejected"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_records(cls, records: Iterable[Any]) -> Preferences:
        """From objects (or mappings) with ``prompt``, ``chosen`` and ``rejected``: e.g. the
        ``PreferencePair`` rows of the pipeline's ``read_pairs``."""
        prompts, chosen, rejected = [], [], []
        for r in records:
            get = r.get if isinstance(r, Mapping) else lambda k, r=r: getattr(r, k)
            prompts.append([{"role": m["role"], "content": m["content"]} for m in get("prompt")])
            chosen.append(str(get("chosen")))
            rejected.append(str(get("rejected")))
        return cls(prompts, chosen, rejected)

    @classmethod
    def read_parquet(cls, path: str | Path) -> Preferences:
        """A ``preference_pairs`` split file (``prompt``, ``chosen``, ``rejected`` columns)."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no preference pairs file here")
        try:
            table = pq.read_table(path, columns=["prompt", "chosen", "rejected"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a preference pairs file ({e})") from e
        return cls.from_records(table.to_pylist())

    def head(self, n: int) -> Preferences:
        return Preferences(self.prompts[:n], self.chosen[:n], self.rejected[:n])


def unique_prompts(prompts: Iterable[Sequence[Mapping[str, str]]]) -> list[Messages]:
    """Distinct prompts in first-seen order (several pairs often share one prompt)."""
    seen: set[str] = set()
    out: list[Messages] = []
    for p in prompts:
        msgs = [{"role": m["role"], "content": m["content"]} for m in p]
        key = json.dumps(msgs, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(msgs)
    return out


@dataclass
class PairData:
    """Both sides of every pair, encoded (``chosen[i]`` and ``rejected[i]`` share a prompt)."""

    chosen: ChatDataset
    rejected: ChatDataset

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def truncated(self) -> int:
        return self.chosen.truncated + self.rejected.truncated


def encode_pairs(tok: Tokenizer, prefs: Preferences, max_tokens: int) -> PairData:
    """Encode both replies of each pair after its prompt, at most ``max_tokens`` each."""
    return PairData(
        chosen=encode_replies(tok, prefs.prompts, prefs.chosen, max_tokens=max_tokens),
        rejected=encode_replies(tok, prefs.prompts, prefs.rejected, max_tokens=max_tokens),
    )


def collate_pairs(data: PairData, index: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The pairs ``index`` in the batch layout described in the module docstring."""
    sides = {"chosen": data.chosen, "rejected": data.rejected}
    width = max(int(d.offsets[i + 1] - d.offsets[i]) for d in sides.values() for i in index)
    batch: dict[str, torch.Tensor] = {}
    for name, d in sides.items():
        ids = np.full((len(index), width), pad_id, dtype=np.int64)
        sup = np.zeros((len(index), width), dtype=bool)
        lengths = np.zeros(len(index), dtype=np.int64)
        for row, i in enumerate(index):
            tokens, mask = d.get(int(i))
            ids[row, : len(tokens)], sup[row, : len(tokens)] = tokens, mask
            lengths[row] = len(tokens)
        targets = np.full_like(ids, pad_id)
        targets[:, :-1] = ids[:, 1:]
        target_mask = np.zeros_like(sup)
        target_mask[:, :-1] = sup[:, 1:]
        batch[f"{name}_ids"] = torch.from_numpy(ids)
        batch[f"{name}_targets"] = torch.from_numpy(targets)
        batch[f"{name}_mask"] = torch.from_numpy(target_mask)
        batch[f"{name}_lengths"] = torch.from_numpy(lengths)
    return batch


class IndexSampler(StepSampler):
    """Seeded, resumable batches of item indices, each turned into a batch by ``collate``.

    Epoch ``e`` visits the ``n`` items in the permutation ``rng([seed, e])``; global batch ``k``
    takes items ``k*B .. (k+1)*B - 1`` of the endless sequence of epochs, so it is a pure function
    of ``(seed, k)`` and the state is a counter. Rank ``r`` collates its slice of each global
    batch, so the data of an optimiser step does not depend on the number of processes.
    """

    KIND = "index"

    def __init__(
        self,
        n: int,
        global_batch_size: int,
        collate: Callable[[np.ndarray], Any],
        *,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n <= 0:
            raise ValueError("no items to sample from")
        super().__init__(global_batch_size, seed=seed, rank=rank, world_size=world_size)
        self.n = int(n)
        self.collate = collate
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def indices(self, step: int) -> np.ndarray:
        """The item indices of global batch ``step``."""
        b = self.global_batch_size
        flat = np.arange(step * b, (step + 1) * b)
        return np.array([self._order(int(r // self.n))[r % self.n] for r in flat], dtype=np.int64)

    def local_indices(self, step: int) -> np.ndarray:
        """This rank's slice of global batch ``step``."""
        return self.local(self.indices(step))

    def batch(self, step: int) -> Any:
        return self.collate(self.local_indices(step))

    def geometry(self) -> dict[str, Any]:
        return {**super().geometry(), "items": self.n}


def pair_sampler(
    data: PairData, global_batch_size: int, pad_id: int, *, seed: int, info: DistInfo
) -> IndexSampler:
    """Training batches of preference pairs."""
    if not len(data):
        raise ValueError("no preference pairs to train on")
    return IndexSampler(
        len(data),
        global_batch_size,
        lambda index: collate_pairs(data, index, pad_id),
        seed=seed,
        rank=info.rank,
        world_size=info.world_size,
    )


@dataclass
class PairTraining:
    """Encoded train/val pairs and what the trainer needs of them."""

    train: PairData
    val: PairData
    sampler: IndexSampler
    val_batches: list[dict[str, torch.Tensor]]  # empty when validation is off


def prepare_pairs(
    tok: Tokenizer,
    train: Preferences,
    val: Preferences,
    train_cfg: TrainConfig,
    max_tokens: int,
    info: DistInfo,
) -> PairTraining:
    """Encode both splits (each side at most ``max_tokens``), the seeded training sampler and
    up to ``eval_batches`` validation batches (none when there are no val pairs)."""
    pad = ChatSpecials.from_tokenizer(tok).pad
    train_data, val_data = encode_pairs(tok, train, max_tokens), encode_pairs(tok, val, max_tokens)
    batches = []
    if len(val_data) and train_cfg.eval_batches > 0:
        batches = pair_batches(val_data, train_cfg.batch_size, pad, train_cfg.eval_batches)
    sampler = pair_sampler(train_data, train_cfg.batch_size, pad, seed=train_cfg.seed, info=info)
    return PairTraining(train_data, val_data, sampler, batches)


def pair_batches(
    data: PairData, batch_size: int, pad_id: int, max_batches: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Validation batches: pairs in order, no shuffle, the same on every call."""
    n = len(data) if max_batches is None else min(len(data), batch_size * max_batches)
    return [
        collate_pairs(data, range(i, min(i + batch_size, n)), pad_id)
        for i in range(0, n, batch_size)
    ]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference model: same weights, no gradients, eval mode."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# ------------------------------------------------------------------------------ DPO
def evaluate_dpo(
    model: nn.Module, objective: DPOObjective, batches: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, float]:
    """DPO loss, implicit-reward accuracy and margin, and policy log-probs on held-out pairs,
    weighted by pairs per batch (the objective itself computes them, so train and val agree)."""
    return evaluate_objective(model, objective, batches, count_key="chosen_ids", what="pairs")
