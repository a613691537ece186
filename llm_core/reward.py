"""Reward model: the chat model's transformer with a scalar head, trained on preference pairs.

:class:`RewardModel` scores a whole conversation (prompt + reply, in the SFT chat template) with
one number. The backbone starts from the SFT weights; the head is a linear map of a pooled hidden
state: the ``last`` real token of the row (the reply's closing ``<|end|>`` when the row ends
there, which under causal attention has seen everything), ``eos`` (the reply's own first
``<|end|>``/``<|endoftext|>`` wherever it lies: it differs from ``last`` when the window holds
more than the reply, e.g. a truncated multi-turn row or a packed one), or the ``mean`` (also
spelt ``average``) / ``max`` over the real tokens.

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

import io
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

POOLINGS = ("last", "eos", "mean", "average", "max")


@dataclass(frozen=True)
class RewardConfig:
    """The backbone's shape plus how hidden states are pooled; ``config.json`` is its dict."""

    model: ModelConfig
    pooling: str = "last"
    # ``eos`` pooling: the ids that end a reply, and the id that opens it (``<|assistant|>``).
    end_ids: tuple[int, ...] = ()
    start_id: int | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "eos" and not self.end_ids:
            raise ValueError("eos pooling needs end_ids (the reply's end tokens)")

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def to_dict(self) -> dict[str, Any]:
        out = {**self.model.to_dict(), "pooling": self.pooling}
        if self.end_ids:
            out.update(end_ids=list(self.end_ids), start_id=self.start_id)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RewardConfig:
        rest = dict(d)
        if "pooling" not in rest:
            raise ValueError("not a reward model config: no 'pooling' key")
        pooling = rest.pop("pooling")
        end_ids, start_id = tuple(rest.pop("end_ids", ())), rest.pop("start_id", None)
        return cls(ModelConfig.from_dict(rest), pooling, end_ids, start_id)


def eos_positions(
    ids: Tensor, lengths: Tensor, end_ids: Sequence[int], start_id: int | None = None
) -> Tensor:
    """[B] index of each row's reply end: the first of ``end_ids`` after the row's last
    ``start_id`` (the reply's opening token; the row's start when None), among its real tokens.
    A row whose reply was cut before its end (no end token after the start) gives its last
    real token, the best remaining summary of the reply."""
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device)[None, :].expand(b, t)
    real = pos < lengths[:, None]
    start = torch.zeros(b, dtype=torch.long, device=ids.device)
    if start_id is not None:
        opens = (ids == start_id) & real
        start = torch.where(opens.any(1), (pos * opens).amax(1), start)
    ends = torch.isin(ids, torch.tensor(list(end_ids), device=ids.device))
    ends &= real & (pos > start[:, None])
    first = torch.where(ends, pos, torch.full_like(pos, t)).amin(1)
    return torch.where(first < t, first, lengths - 1)


def pool_hidden(
    hidden: Tensor,
    lengths: Tensor,
    pooling: str,
    *,
    ids: Tensor | None = None,
    end_ids: Sequence[int] = (),
    start_id: int | None = None,
) -> Tensor:
    """[B, T, D] states of right-padded rows -> [B, D], over each row's ``lengths`` tokens:
    ``last`` (the last real token), ``eos`` (the reply's end, :func:`eos_positions`, which needs
    the ``ids``), ``mean``/``average`` or ``max``. The reward model's and the classifier's heads
    read the same pooled state."""
    b, t, _ = hidden.shape
    if bool((lengths < 1).any()) or bool((lengths > t).any()):
        raise ValueError(f"lengths must be in [1, {t}]")
    rows = torch.arange(b, device=hidden.device)
    if pooling == "last":
        return hidden[rows, lengths - 1]
    if pooling == "eos":
        if ids is None or not end_ids:
            raise ValueError("eos pooling needs the token ids and the end ids")
        return hidden[rows, eos_positions(ids, lengths, end_ids, start_id)]
    real = torch.arange(t, device=hidden.device)[None, :] < lengths[:, None]  # [B, T]
    if pooling in ("mean", "average"):
        h = hidden.float() * real[..., None]
        return (h.sum(1) / lengths[:, None].to(h.dtype)).to(hidden.dtype)
    return hidden.masked_fill(~real[..., None], float("-inf")).amax(dim=1)


class RewardModel(nn.Module):
    """A :class:`~llm_core.model.Transformer` backbone and a scalar head over pooled states."""

    def __init__(
        self,
        backbone: Transformer,
        pooling: str = "last",
        end_ids: Sequence[int] = (),
        start_id: int | None = None,
    ) -> None:
        super().__init__()
        self.config = RewardConfig(backbone.config, pooling, tuple(end_ids), start_id)
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.d_model, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def pooling(self) -> str:
        return self.config.pooling

    def pool(self, hidden: Tensor, lengths: Tensor, ids: Tensor | None = None) -> Tensor:
        """[B, T, D] states of right-padded rows -> [B, D] (:func:`pool_hidden`)."""
        c = self.config
        return pool_hidden(
            hidden, lengths, c.pooling, ids=ids, end_ids=c.end_ids, start_id=c.start_id
        )

    def forward(
        self, idx: Tensor, lengths: Tensor, *, return_hidden: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Reward per row [B] (float32) of right-padded ``idx`` [B, T] with ``lengths`` [B] real
        tokens; with ``return_hidden`` also the hidden states [B, T, D] (for an LM loss)."""
        hidden = self.backbone.hidden_states(idx)
        rewards = self.head(self.pool(hidden, lengths, idx)).squeeze(-1).float()
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
    model = RewardModel(Transformer(cfg.model), cfg.pooling, cfg.end_ids, cfg.start_id)
    model.load_state_dict(load_state_dict(folder), strict=True)
    return model.to(device).eval()


# ------------------------------------------------------------------------------ held-out metrics
def calibration_bins(margins: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """The reliability table of the pairwise prediction ``p = σ(r_chosen − r_rejected)``.

    Each pair is a binary prediction: the model says "chosen wins" with confidence ``max(p,
    1 − p)``, and is right when ``p > 0.5`` (a tie, ``p = 0.5``, is half right). Pairs are binned
    by confidence into ``n_bins`` equal bins of [0.5, 1]; each bin gives its range, pair count,
    accuracy and mean confidence (NaN for an empty bin)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    p = 1.0 / (1.0 + np.exp(-m))
    conf = np.maximum(p, 1.0 - p)
    correct = np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0))
    bins = np.minimum(((conf - 0.5) * 2 * n_bins).astype(int), n_bins - 1)
    out = []
    for k in range(n_bins):
        sel = bins == k
        out.append(
            {
                "lo": 0.5 + k / (2 * n_bins),
                "hi": 0.5 + (k + 1) / (2 * n_bins),
                "count": float(sel.sum()),
                "accuracy": float(correct[sel].mean()) if sel.any() else float("nan"),
                "confidence": float(conf[sel].mean()) if sel.any() else float("nan"),
            }
        )
    return out


def expected_calibration_error(margins: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the pairwise prediction (Guo et al., 2017): the pair-weighted mean over the
    :func:`calibration_bins` of ``|accuracy − confidence|``. 0 is perfectly calibrated."""
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    if m.size == 0:
        return float("nan")
    return float(
        sum(
            b["count"] / m.size * abs(b["accuracy"] - b["confidence"])
            for b in calibration_bins(m, n_bins)
            if b["count"]
        )
    )


def reliability_diagram(margins: np.ndarray, path: Path, n_bins: int = 10) -> Path:
    """A reliability diagram (accuracy against confidence per bin, the diagonal being perfect
    calibration, pair counts on the bars) as a PNG at ``path``; its title gives the ECE."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display in workers or CI
    import matplotlib.pyplot as plt

    from llm_core.data import atomic_write_bytes

    bins = calibration_bins(margins, n_bins)
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=80)
    try:
        width = 0.5 / n_bins
        for b in bins:
            if b["count"]:
                ax.bar(b["lo"], b["accuracy"], width=width, align="edge", color="tab:blue",
                       edgecolor="black", alpha=0.8)  # fmt: skip
                ax.text(b["lo"] + width / 2, min(b["accuracy"], 0.95) + 0.02,
                        str(int(b["count"])), ha="center", fontsize=7)  # fmt: skip
        ax.plot([0.5, 1.0], [0.5, 1.0], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0.5, 1.0)
        ax.set_ylim(0.0, 1.05)
        ax.set_xlabel("confidence max(p, 1-p), p = σ(margin)")
        ax.set_ylabel("pairwise accuracy")
        ece = expected_calibration_error(margins, n_bins)
        ax.set_title(f"reward model reliability: ECE {ece:.3f} ({n_bins} bins)")
        ax.legend(loc="lower right", fontsize=7)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


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


def make_reward_evaluator(batches: Sequence[Mapping[str, Tensor]], n_bins: int = 10) -> Any:
    """A trainer evaluator: ``val_loss`` (Bradley–Terry), ``val_reward_accuracy``,
    ``val_reward_margin`` and ``val_ece`` (``n_bins`` bins) on held-out pairs."""

    def evaluator(model: nn.Module) -> dict[str, float]:
        m = reward_metrics(pair_margins(model, batches), n_bins)
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

    def mean_tokens(texts: list[str]) -> float:  # a length-hacked win shows here
        enc = tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        return float(np.mean([len(e.ids) for e in enc])) if enc else float("nan")

    return {
        **reward_win_rate(ra, rb, tie_tolerance=REWARD_TIE_TOLERANCE),
        "reward_mean": float(ra.mean()) if ra.size else float("nan"),
        "baseline_reward_mean": float(rb.mean()) if rb.size else float("nan"),
        "reply_tokens_mean": mean_tokens(ra_text),
        "baseline_reply_tokens_mean": mean_tokens(rb_text),
        "examples": [
            {"prompt": p[-1]["content"], "reply": a, "baseline_reply": b}
            for p, a, b in list(zip(prompts, ra_text, rb_text, strict=True))[:examples]
        ],
    }
