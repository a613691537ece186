"""Reward model: the chat model's transformer with a scalar head, trained on preference pairs.

:class:`RewardModel` scores a whole conversation (prompt + reply, in the SFT chat template) with
one number. The backbone starts from the SFT weights; the head is a linear map of a pooled hidden
state: the ``last`` real token (the reply's closing ``<|end|>``, which under causal attention has
seen everything), or the ``mean`` / ``max`` over the real tokens.

Training (the ``reward`` stage, :mod:`llm_core.stages.reward`) is the one
:class:`~llm_core.trainer.Trainer` with :class:`llm_core.objectives.RewardObjective`: the
Bradley–Terry loss ``-log σ(r_chosen − r_rejected)``, plus optionally ``lm_loss_weight`` times the
next-token loss on the chosen reply, which keeps the backbone a language model while the head
learns (it helps when pairs are few). Held-out metrics: pairwise accuracy (ties count half), mean
reward margin, and the expected calibration error of ``σ(margin)`` read as the probability that
the chosen reply is preferred (:func:`reward_metrics`).

On disk a reward model is a folder with ``model.safetensors`` (backbone and head) and
``config.json`` (the backbone's model config plus ``pooling``), written through the same
:func:`~llm_core.checkpoint.save_weights` as every model, so checkpoints and resume work as well.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from llm_core.checkpoint import CONFIG_NAME, load_state_dict, save_weights
from llm_core.config import ModelConfig
from llm_core.generate import chat_replies
from llm_core.model import Transformer
from llm_core.sft import ChatSpecials, encode_replies

POOLINGS = ("last", "mean", "max")


@dataclass(frozen=True)
class RewardConfig:
    """The backbone's shape plus how hidden states are pooled; ``config.json`` is its dict."""

    model: ModelConfig
    pooling: str = "last"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return {**self.model.to_dict(), "pooling": self.pooling}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RewardConfig:
        rest = dict(d)
        if "pooling" not in rest:
            raise ValueError("not a reward model config: no 'pooling' key")
        pooling = rest.pop("pooling")
        return cls(ModelConfig.from_dict(rest), pooling)


def pool_hidden(hidden: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """[B, T, D] states of right-padded rows -> [B, D], over each row's ``lengths`` tokens:
    ``last`` (the last real token), ``mean`` or ``max``. The reward model's and the
    classifier's heads read the same pooled state."""
    b, t, _ = hidden.shape
    if bool((lengths < 1).any()) or bool((lengths > t).any()):
        raise ValueError(f"lengths must be in [1, {t}]")
    if pooling == "last":
        return hidden[torch.arange(b, device=hidden.device), lengths - 1]
    real = torch.arange(t, device=hidden.device)[None, :] < lengths[:, None]  # [B, T]
    if pooling == "mean":
        h = hidden.float() * real[..., None]
        return (h.sum(1) / lengths[:, None].to(h.dtype)).to(hidden.dtype)
    return hidden.masked_fill(~real[..., None], float("-inf")).amax(dim=1)


class RewardModel(nn.Module):
    """A :class:`~llm_core.model.Transformer` backbone and a scalar head over pooled states."""

    def __init__(self, backbone: Transformer, pooling: str = "last") -> None:
        super().__init__()
        self.config = RewardConfig(backbone.config, pooling)
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.d_model, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def pooling(self) -> str:
        return self.config.pooling

    def pool(self, hidden: Tensor, lengths: Tensor) -> Tensor:
        """[B, T, D] states of right-padded rows -> [B, D] (:func:`pool_hidden`)."""
        return pool_hidden(hidden, lengths, self.pooling)

    def forward(
        self, idx: Tensor, lengths: Tensor, *, return_hidden: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Reward per row [B] (float32) of right-padded ``idx`` [B, T] with ``lengths`` [B] real
        tokens; with ``return_hidden`` also the hidden states [B, T, D] (for an LM loss)."""
        hidden = self.backbone.hidden_states(idx)
        rewards = self.head(self.pool(hidden, lengths)).squeeze(-1).float()
        return (rewards, hidden) if return_hidden else rewards

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """The backbone's (the head is negligible), for the trainer's MFU."""
        return self.backbone.flops_per_token(seq_len)


def save_reward_model(model: RewardModel, out_dir: str | Path) -> Path:
    """``model.safetensors`` + ``config.json`` (model config and ``pooling``) in ``out_dir``."""
    return save_weights(model, out_dir)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """Rebuild a reward model saved by :func:`save_reward_model` (safetensors only)."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing reward model config")
    cfg = RewardConfig.from_dict(json.loads(cfg_path.read_text()))
    model = RewardModel(Transformer(cfg.model), cfg.pooling)
    model.load_state_dict(load_state_dict(folder), strict=True)
    return model.to(device).eval()


# ------------------------------------------------------------------------------ held-out metrics
def expected_calibration_error(margins: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the pairwise prediction ``p = σ(r_chosen − r_rejected)``.

    Each pair is a binary prediction: the model says "chosen wins" with confidence ``max(p,
    1 − p)``, and is right when ``p > 0.5``. Pairs are binned by confidence into ``n_bins`` equal
    bins of [0.5, 1]; ECE is the pair-weighted mean of ``|accuracy − confidence|`` per bin (Guo et
    al., 2017). A tie (``p = 0.5``) is half right. 0 is perfectly calibrated.
    """
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    if m.size == 0:
        return float("nan")
    p = 1.0 / (1.0 + np.exp(-m))
    conf = np.maximum(p, 1.0 - p)
    correct = np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0))
    bins = np.minimum(((conf - 0.5) * 2 * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for k in range(n_bins):
        sel = bins == k
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def reward_metrics(margins: np.ndarray, n_bins: int = 10) -> dict[str, float]:
    """Pairwise accuracy (ties half), mean margin and ECE of ``r_chosen − r_rejected``."""
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    if m.size == 0:
        raise ValueError("reward_metrics: no pairs")
    acc = float(((m > 0).sum() + 0.5 * (m == 0).sum()) / m.size)
    bt = float(np.mean(np.logaddexp(0.0, -m)))  # -log σ(m), overflow-safe
    return {
        "accuracy": acc,
        "margin": float(m.mean()),
        "ece": expected_calibration_error(m, n_bins),
        "loss": bt,
        "pairs": float(m.size),
    }


@torch.no_grad()
def pair_margins(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> np.ndarray:
    """``r_chosen − r_rejected`` for every pair of ``batches`` (model mode restored after)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in batches:
            b = {k: v.to(device) for k, v in batch.items()}
            rc = model(b["chosen_ids"], b["chosen_lengths"])
            rr = model(b["rejected_ids"], b["rejected_lengths"])
            out.append((rc - rr).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def make_reward_evaluator(batches: Sequence[Mapping[str, Tensor]]) -> Any:
    """A trainer evaluator: ``val_loss`` (Bradley–Terry), ``val_reward_accuracy``,
    ``val_reward_margin`` and ``val_ece`` on held-out pairs."""

    def evaluator(model: nn.Module) -> dict[str, float]:
        m = reward_metrics(pair_margins(model, batches))
        return {
            "val_loss": m["loss"],
            "val_reward_accuracy": m["accuracy"],
            "val_reward_margin": m["margin"],
            "val_ece": m["ece"],
        }

    return evaluator


# ------------------------------------------------------------------------------ scoring
@torch.no_grad()
def score_replies(
    model: RewardModel,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    replies: Sequence[str],
    batch_size: int = 16,
) -> np.ndarray:
    """The reward of each ``(prompt, reply)``, rendered with the chat template exactly as SFT
    trains (the prompt loses its oldest tokens when the pair exceeds the context)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not len(prompts):
        return np.zeros(0)
    data = encode_replies(tokenizer, prompts, replies, max_tokens=model.config.context_length)
    pad = ChatSpecials.from_tokenizer(tokenizer).pad
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros(len(data))
    lengths = data.lengths()
    order = np.argsort(-lengths, kind="stable")  # similar lengths share a batch: less padding
    try:
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            width = int(lengths[rows].max())
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            for r, j in enumerate(rows):
                tokens, _ = data.get(int(j))
                ids[r, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
            n = torch.from_numpy(lengths[rows].astype(np.int64))
            out[rows] = model(ids.to(device), n.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def policy_win_rate(
    reward_model: RewardModel,
    tokenizer: Tokenizer,
    policy: Transformer,
    baseline: Transformer,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    examples: int = 3,
) -> dict[str, Any]:
    """Reward-model win rate of ``policy`` over ``baseline``: greedy replies of both to the same
    held-out ``prompts`` (:func:`~llm_core.generate.chat_replies`), scored by ``reward_model``
    (:func:`score_replies`), compared by :func:`llm_core.evaluate.reward_win_rate` (ties half).

    Also returns both mean rewards and a few example replies side by side.
    """
    from llm_core.evaluate import REWARD_TIE_TOLERANCE, reward_win_rate

    ra_text = chat_replies(policy, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    rb_text = chat_replies(baseline, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    ra = score_replies(reward_model, tokenizer, prompts, ra_text, batch_size)
    rb = score_replies(reward_model, tokenizer, prompts, rb_text, batch_size)
    return {
        **reward_win_rate(ra, rb, tie_tolerance=REWARD_TIE_TOLERANCE),
        "reward_mean": float(ra.mean()) if ra.size else float("nan"),
        "baseline_reward_mean": float(rb.mean()) if rb.size else float("nan"),
        "examples": [
            {"prompt": p[-1]["content"], "reply": a, "baseline_reply": b}
            for p, a, b in list(zip(prompts, ra_text, rb_text, strict=True))[:examples]
        ],
    }
