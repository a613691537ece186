"""Sequence classification: a language model's transformer with a dict of named linear heads.

:class:`ClassifierModel` reads one pooled hidden state per text (the ``last`` real token, as
Raschka's *LLMs from scratch* ch. 6 does, which under causal attention has seen the whole text;
or the ``mean`` / ``max`` over the real tokens) and maps it through one linear head per task,
each with its own label set. One head is the single-task spam classifier; several heads over one
backbone are the multi-task "classification dict head": each task's rows go through the same
forward (padded to one width) and each head reads only its own rows.

The heads carry no bias, so a single-task model with ``last`` pooling is exactly Hugging Face's
``LlamaForSequenceClassification`` (its ``score`` layer has none): see
:mod:`llm_core.classify_export`.

Which parameters train is a knob: the whole model (``train_blocks = -1``) or only the last ``k``
blocks plus the final norm and the heads (the book's choice, ``k = 1``), so a small labelled set
cannot wreck the pretrained features.

On disk a classifier is a folder with ``model.safetensors`` and ``config.json`` (the backbone's
model config plus ``pooling`` and ``tasks``: each task's labels in head order).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from llm_core.checkpoint import CONFIG_NAME, load_state_dict, save_weights
from llm_core.config import ModelConfig
from llm_core.data.sampler import StepSampler
from llm_core.model import Transformer
from llm_core.reward import pool_hidden

POOLINGS = ("last", "mean", "max")
PAD_TOKENS = ("<|pad|>", "<|endoftext|>")


@dataclass(frozen=True)
class ClassifierConfig:
    """The backbone's shape, the pooling and each task's labels (``config.json`` is its dict)."""

    model: ModelConfig
    tasks: Mapping[str, tuple[str, ...]]
    pooling: str = "last"
    end_token: int | None = None  # appended to every text (a fixed position for `last`)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not self.tasks:
            raise ValueError("a classifier needs at least one task")
        for name, labels in self.tasks.items():
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise ValueError(f"task {name!r}: needs >= 2 distinct labels, got {list(labels)}")

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def to_dict(self) -> dict[str, Any]:
        tasks = {k: list(v) for k, v in self.tasks.items()}
        return {
            **self.model.to_dict(),
            "pooling": self.pooling,
            "tasks": tasks,
            "end_token": self.end_token,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassifierConfig:
        rest = dict(d)
        if "tasks" not in rest:
            raise ValueError("not a classifier config: no 'tasks' key")
        tasks = {k: tuple(v) for k, v in rest.pop("tasks").items()}
        pooling = rest.pop("pooling", "last")
        end = rest.pop("end_token", None)
        return cls(ModelConfig.from_dict(rest), tasks, pooling, None if end is None else int(end))


class ClassifierModel(nn.Module):
    """A :class:`~llm_core.model.Transformer` backbone and one bias-free linear head per task."""

    def __init__(
        self,
        backbone: Transformer,
        tasks: Mapping[str, Sequence[str]],
        pooling: str = "last",
        end_token: int | None = None,
    ) -> None:
        super().__init__()
        self.config = ClassifierConfig(
            backbone.config, {k: tuple(v) for k, v in tasks.items()}, pooling, end_token
        )
        self.backbone = backbone
        d = backbone.config.d_model
        self.heads = nn.ModuleDict(
            {name: nn.Linear(d, len(labels), bias=False) for name, labels in tasks.items()}
        )
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=0.02)

    @property
    def tasks(self) -> Mapping[str, tuple[str, ...]]:
        return self.config.tasks

    def pooled(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """The pooled state [B, D] of each right-padded row of ``idx`` [B, T]."""
        return pool_hidden(self.backbone.hidden_states(idx), lengths, self.config.pooling)

    def forward(self, idx: Tensor, lengths: Tensor, task: str | Sequence[tuple[str, int]]) -> Any:
        """Logits [B, n_labels] (float32) of ``task``'s head for every row; or, for a list of
        ``(task, rows)``, the logits of each task's consecutive rows (one backbone forward for
        a multi-task batch)."""
        pooled = self.pooled(idx, lengths)
        if isinstance(task, str):
            return self.heads[task](pooled).float()
        out, start = [], 0
        for name, rows in task:
            out.append(self.heads[name](pooled[start : start + rows]).float())
            start += rows
        if start != idx.size(0):
            raise ValueError(f"task rows add up to {start}, the batch has {idx.size(0)}")
        return out

    def freeze_all_but(self, train_blocks: int) -> None:
        """Train the whole model (``-1``) or only the last ``train_blocks`` blocks, the final norm
        and the heads (the token embedding stays frozen: with tied weights it is the LM head)."""
        if train_blocks < 0:
            for p in self.parameters():
                p.requires_grad_(True)
            return
        blocks = self.backbone.blocks
        if train_blocks > len(blocks):
            raise ValueError(f"train_blocks {train_blocks} > the model's {len(blocks)} blocks")
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for block in list(blocks)[len(blocks) - train_blocks :]:
            for p in block.parameters():
                p.requires_grad_(True)
        for p in [*self.backbone.norm.parameters(), *self.heads.parameters()]:
            p.requires_grad_(True)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.backbone.flops_per_token(seq_len)


def save_classifier(model: ClassifierModel, out_dir: str | Path) -> Path:
    """``model.safetensors`` + ``config.json`` (model config, ``pooling``, ``tasks``)."""
    return save_weights(model, out_dir)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> ClassifierModel:
    """Rebuild a classifier saved by :func:`save_classifier` (safetensors only)."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing classifier config")
    cfg = ClassifierConfig.from_dict(json.loads(cfg_path.read_text()))
    model = ClassifierModel(Transformer(cfg.model), cfg.tasks, cfg.pooling, cfg.end_token)
    model.load_state_dict(load_state_dict(folder), strict=True)
    return model.to(device).eval()


# ------------------------------------------------------------------------------ data
def pad_id(tokenizer: Tokenizer) -> int:
    """The id padding fills with: ``<|pad|>`` (or ``<|endoftext|>``), which never occurs inside
    a text, so the Hugging Face export can find each row's last real token by it."""
    for name in PAD_TOKENS:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    raise ValueError(f"tokenizer has none of the padding tokens {PAD_TOKENS}")


@dataclass
class Encoded:
    """One split of one task: token ids per text (truncated) and label indices."""

    ids: list[np.ndarray]
    labels: np.ndarray
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def encode_texts(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    labels: Sequence[str],
    label_names: Sequence[str],
    max_tokens: int,
    end_token: int | None = None,
) -> Encoded:
    """Token ids (the first ``max_tokens``, ``end_token`` included when given: it is appended
    after the cut) and the index of each label in ``label_names`` (an unknown label is an error
    naming it)."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not in the task's label set {list(label_names)}")
    ids, truncated = [], 0
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        row = np.asarray(enc.ids, dtype=np.int64)
        room = max_tokens - (end_token is not None)
        if len(row) > room:
            row, truncated = row[:room], truncated + 1
        if end_token is not None:
            row = np.append(row, np.int64(end_token))
        if not len(row):
            raise ValueError("a text encodes to no tokens (empty texts must be rejected upstream)")
        ids.append(row)
    return Encoded(ids, np.asarray([index[lab] for lab in labels], dtype=np.int64), truncated)


def collate(rows: Sequence[np.ndarray], pad: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, T] (T = the longest row) and the real lengths [B]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.from_numpy(r)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


class TaskSampler(StepSampler):
    """Each step, ``global_batch_size`` rows of *every* task (one batch of each, trained jointly).

    Rows are drawn epoch by epoch without replacement: global row ``p`` of task ``t`` is item
    ``p mod n`` of a permutation seeded by ``(seed, t, p div n)``, so batch ``k`` is a pure
    function of the seed and ``k`` (exact resume).
    """

    KIND = "classify"

    def __init__(
        self,
        tasks: Mapping[str, Encoded],
        global_batch_size: int,
        pad: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(global_batch_size, seed=seed, rank=rank, world_size=world_size)
        empty = [k for k, v in tasks.items() if not len(v)]
        if empty:
            raise ValueError(f"no training rows for task(s) {empty}")
        self.tasks, self.pad = dict(tasks), pad

    def _indices(self, t: int, n: int, step: int) -> np.ndarray:
        start = step * self.global_batch_size
        pos = np.arange(start, start + self.global_batch_size)
        out = np.empty(len(pos), dtype=np.int64)
        for epoch in np.unique(pos // n):
            perm = np.random.default_rng([self.seed, t, int(epoch)]).permutation(n)
            sel = pos // n == epoch
            out[sel] = perm[pos[sel] % n]
        return out

    def batch(self, step: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for t, (name, data) in enumerate(self.tasks.items()):
            rows = self.local(self._indices(t, len(data), step))
            ids, lengths = collate([data.ids[i] for i in rows], self.pad)
            out[f"{name}_ids"] = ids
            out[f"{name}_lengths"] = lengths
            out[f"{name}_labels"] = torch.from_numpy(data.labels[rows])
        return out

    def geometry(self) -> dict[str, Any]:
        sizes = {k: len(v) for k, v in self.tasks.items()}
        return {**super().geometry(), "tasks": sizes}


# ------------------------------------------------------------------------------ prediction
@torch.no_grad()
def predict(
    model: ClassifierModel, data: Encoded, task: str, pad: int, batch_size: int = 32
) -> np.ndarray:
    """Class probabilities [N, n_labels] of every text of ``data`` (model mode restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros((len(data), len(model.tasks[task])), dtype=np.float64)
    order = np.argsort([-len(r) for r in data.ids], kind="stable")  # less padding per batch
    try:
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            ids, lengths = collate([data.ids[j] for j in rows], pad)
            logits = model(ids.to(device), lengths.to(device), task)
            out[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def classify_texts(
    model: ClassifierModel, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32
) -> list[dict[str, tuple[str, float]]]:
    """For every text, each head's most probable label and its probability."""
    pad = pad_id(tokenizer)
    out: list[dict[str, tuple[str, float]]] = [{} for _ in texts]
    if not texts:
        return out
    for task, labels in model.tasks.items():
        data = encode_texts(
            tokenizer,
            texts,
            [labels[0]] * len(texts),
            labels,
            model.config.context_length,
            model.config.end_token,
        )
        probs = predict(model, data, task, pad, batch_size)
        for i, p in enumerate(probs):
            k = int(p.argmax())
            out[i][task] = (labels[k], float(p[k]))
    return out


@dataclass
class EvalSet:
    """A held-out split of one task, for the trainer's evaluator."""

    task: str
    data: Encoded
    pad: int
    limit: int = 0  # rows scored per evaluation (0: all)
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def make_classify_evaluator(sets: Sequence[EvalSet], batch_size: int) -> Any:
    """A trainer evaluator: ``val_loss`` (the mean of the tasks' cross-entropies) and per task
    ``val_<task>_accuracy`` / ``val_<task>_balanced_accuracy`` on the validation splits."""
    from llm_core.classify_metrics import classification_metrics

    def evaluator(model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        losses = []
        for s in sets:
            data = s.data
            if s.limit and len(data) > s.limit:
                data = Encoded(data.ids[: s.limit], data.labels[: s.limit])
            probs = predict(model, data, s.task, s.pad, batch_size)  # type: ignore[arg-type]
            m = classification_metrics(data.labels, probs, model.tasks[s.task])  # type: ignore[attr-defined,index]
            losses.append(m["loss"])
            out[f"val_{s.task}_accuracy"] = m["accuracy"]
            out[f"val_{s.task}_balanced_accuracy"] = m["balanced_accuracy"]
        out["val_loss"] = float(np.mean(losses)) if losses else float("nan")
        return out

    return evaluator
