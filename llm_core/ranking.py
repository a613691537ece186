"""Ranked preferences: ``k`` scored responses per prompt, and the losses that read them.

A preference pair says one thing: ``chosen`` beats ``rejected``. A ranked row says more: a prompt
with ``k >= 2`` responses and a score for each (a reward model's, a rater's), so every ordering
between them is a training signal. The source format is ``llm_codebase``'s,
``{"prompt": ..., "text": [t1, t2, ...], "score": [s1, s2, ...]}``, where shorter lists are padded
with score :data:`NO_RESPONSE` (-100): such a slot holds no response. :class:`Ranked` is the
internal form every ranking method reads; a pair is its ``k = 2`` case (scores 1 and 0).

Losses on a group of ``k`` responses (``pred`` and ``target`` of shape ``[G, K]``, ``valid``
marking the real slots):

* :func:`listwise_loss`: Plackett–Luce, the listwise Bradley–Terry: the likelihood of the target
  order as successive choices of the best remaining response. At ``k = 2`` it *is*
  ``-log σ(r_chosen − r_rejected)``. :class:`ListwiseRewardObjective` trains a reward model
  with it on ranked groups.
* :func:`rrhf_rank_loss`: RRHF's hinge ``Σ_{t_i < t_j} max(0, p_i − p_j)`` on length-normalised
  log-probabilities (Yuan et al., 2023), used by :class:`RRHFObjective` with the SFT loss on the
  best response.
* :func:`reward_weights`: per-response weights for reward-weighted SFT (:class:`WeightedObjective`):
  a softmax over the group, or a clipped advantage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from llm_core.objectives import add_router_losses, evaluate_objective, per_token_nll
from llm_core.sft import ChatDataset, encode_replies

Messages = list[dict[str, str]]
NO_RESPONSE = -100.0  # a padding slot of a ragged ranked row: no response there
WEIGHTINGS = ("softmax", "advantage")


# ------------------------------------------------------------------------------ data
def ranked_row_problem(texts: Sequence[Any], scores: Sequence[Any]) -> str | None:
    """Why a raw ranked row cannot be trained on, or None. Slots scored :data:`NO_RESPONSE` are
    padding and ignored. Reasons: ``length_mismatch`` (texts and scores of different lengths),
    ``non_numeric_score``, ``empty_text`` (a scored response with no text), ``too_few_responses``
    (fewer than two real ones), ``all_equal_scores`` (no ordering to learn)."""
    if len(texts) != len(scores):
        return "length_mismatch"
    kept: list[float] = []
    for text, score in zip(texts, scores, strict=True):
        if isinstance(score, bool) or not isinstance(score, int | float) or math.isnan(score):
            return "non_numeric_score"
        if float(score) == NO_RESPONSE:
            continue
        if not isinstance(text, str) or not text.strip():
            return "empty_text"
        kept.append(float(score))
    if len(kept) < 2:
        return "too_few_responses"
    if max(kept) == min(kept):
        return "all_equal_scores"
    return None


@dataclass(frozen=True)
class Ranked:
    """Prompts, each with ``k_i >= 2`` responses and their scores (ragged, no padding slots)."""

    prompts: list[Messages]
    responses: list[list[str]]
    scores: list[list[float]]

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if len(self.responses) != n or len(self.scores) != n:
            raise ValueError(
                f"ranked data needs responses and scores per prompt: got {n} prompts, "
                f"{len(self.responses)} response lists, {len(self.scores)} score lists"
            )
        for i, (texts, scores) in enumerate(zip(self.responses, self.scores, strict=True)):
            problem = ranked_row_problem(texts, scores)
            if problem or NO_RESPONSE in scores:
                raise ValueError(f"ranked row #{i}: {problem or 'holds a padding slot'}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def max_k(self) -> int:
        return max((len(r) for r in self.responses), default=0)

    @classmethod
    def from_pairs(
        cls, prompts: Sequence[Messages], chosen: Sequence[str], rejected: Sequence[str]
    ) -> Ranked:
        """Pairs as the ``k = 2`` case: ``chosen`` scores 1, ``rejected`` 0."""
        return cls(
            [list(p) for p in prompts],
            [[c, r] for c, r in zip(chosen, rejected, strict=True)],
            [[1.0, 0.0] for _ in prompts],
        )

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> Ranked:
        """Rows with ``prompt``, ``text`` and ``score`` (padding slots dropped); a bad row raises
        (the pipeline sorts them out first, into ``rejects.parquet``)."""
        prompts, responses, scores = [], [], []
        for r in records:
            keep = [(t, float(s)) for t, s in zip(r["text"], r["score"], strict=False) if s != -100]
            prompts.append([{"role": m["role"], "content": m["content"]} for m in r["prompt"]])
            responses.append([t for t, _ in keep])
            scores.append([s for _, s in keep])
        return cls(prompts, responses, scores)

    def records(self) -> list[dict[str, Any]]:
        """The rows in the source schema (``prompt``, ``text``, ``score``), unpadded."""
        return [
            {"prompt": p, "text": t, "score": s}
            for p, t, s in zip(self.prompts, self.responses, self.scores, strict=True)
        ]

    @classmethod
    def read_parquet(cls, path: str | Path) -> Ranked:
        """A ranked split file (``prompt``, ``text``, ``score`` columns)."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no ranked preferences file here")
        try:
            table = pq.read_table(path, columns=["prompt", "text", "score"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a ranked preferences file ({e})") from e
        return cls.from_records(table.to_pylist())

    def write_parquet(self, path: Path) -> Path:
        """This split in the source schema, written atomically."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        from llm_core.data import atomic_write_bytes

        schema = pa.schema(
            [
                ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                ("text", pa.list_(pa.string())),
                ("score", pa.list_(pa.float64())),
            ]
        )
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.records(), schema=schema), buf)
        atomic_write_bytes(path, buf.getvalue())
        return path


# ------------------------------------------------------------------------------ batches
@dataclass
class RankedData:
    """Every response of every group encoded after its prompt (flat), and where each group's
    responses start (``group_offsets``, CSR) with their scores."""

    flat: ChatDataset
    group_offsets: np.ndarray  # int64 [G + 1]
    scores: np.ndarray  # float64 [total responses]

    def __len__(self) -> int:
        return len(self.group_offsets) - 1


def encode_ranked(tok: Tokenizer, ranked: Ranked, max_tokens: int) -> RankedData:
    """Each response after its prompt in the SFT chat template, at most ``max_tokens``."""
    prompts = [p for p, rs in zip(ranked.prompts, ranked.responses, strict=True) for _ in rs]
    replies = [r for rs in ranked.responses for r in rs]
    flat = encode_replies(tok, prompts, replies, max_tokens=max_tokens)
    sizes = np.array([len(r) for r in ranked.responses], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    scores = np.array([s for ss in ranked.scores for s in ss], dtype=np.float64)
    return RankedData(flat, offsets, scores)


def collate_ranked(data: RankedData, index: Sequence[int], pad_id: int) -> dict[str, Tensor]:
    """Groups ``index`` as one batch: every response a row (``input_ids``, so the trainer
    counts their tokens, and ``targets``/``mask``/``lengths`` as in
    :func:`llm_core.align.collate_pairs`), and per group ``[G, K]`` the ``scores``, ``valid``
    slots and ``rows`` (the row of each slot; 0 where not valid)."""
    groups = [range(int(data.group_offsets[i]), int(data.group_offsets[i + 1])) for i in index]
    flat = [j for g in groups for j in g]
    k = max(len(g) for g in groups)
    width = max(int(data.flat.offsets[j + 1] - data.flat.offsets[j]) for j in flat)
    ids = np.full((len(flat), width), pad_id, dtype=np.int64)
    sup = np.zeros((len(flat), width), dtype=bool)
    lengths = np.zeros(len(flat), dtype=np.int64)
    for row, j in enumerate(flat):
        tokens, mask = data.flat.get(j)
        ids[row, : len(tokens)], sup[row, : len(tokens)] = tokens, mask
        lengths[row] = len(tokens)
    targets = np.full_like(ids, pad_id)
    targets[:, :-1] = ids[:, 1:]
    target_mask = np.zeros_like(sup)
    target_mask[:, :-1] = sup[:, 1:]
    scores = np.zeros((len(groups), k), dtype=np.float32)
    valid = np.zeros((len(groups), k), dtype=bool)
    rows = np.zeros((len(groups), k), dtype=np.int64)
    row = 0
    for gi, g in enumerate(groups):
        for slot, j in enumerate(g):
            scores[gi, slot], valid[gi, slot], rows[gi, slot] = data.scores[j], True, row
            row += 1
    return {
        "input_ids": torch.from_numpy(ids),
        "targets": torch.from_numpy(targets),
        "mask": torch.from_numpy(target_mask),
        "lengths": torch.from_numpy(lengths),
        "scores": torch.from_numpy(scores),
        "valid": torch.from_numpy(valid),
        "rows": torch.from_numpy(rows),
    }


def ranked_batches(
    data: RankedData, batch_size: int, pad_id: int, max_batches: int | None = None
) -> list[dict[str, Tensor]]:
    """Validation batches: groups in order, the same on every call."""
    n = len(data) if max_batches is None else min(len(data), batch_size * max_batches)
    return [
        collate_ranked(data, range(i, min(i + batch_size, n)), pad_id)
        for i in range(0, n, batch_size)
    ]


# ------------------------------------------------------------------------------ losses
def listwise_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Plackett–Luce negative log-likelihood of the order of ``target`` under scores ``pred``
    ([G, K] each), mean over groups: the best response is chosen from all of them, the second
    from the rest, and so on (``-Σ_i [p_(i) − logsumexp_{j ≥ i} p_(j)]``). At ``k = 2`` this is
    the pairwise Bradley–Terry loss ``-log σ(p_best − p_other)``. Slots not ``valid`` take no
    part; equal targets keep their given order (a tie is not a preference any loss can learn)."""
    pred = pred.float()
    valid = torch.ones_like(pred, dtype=torch.bool) if valid is None else valid
    key = target.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    p = pred.gather(1, order)
    v = valid.gather(1, order)
    p = p.masked_fill(~v, -1e9)  # finite: an -inf here would make NaN gradients in torch.where
    # logsumexp over the suffix j >= i: flip, cumulative logsumexp, flip back.
    suffix = torch.logcumsumexp(p.flip(1), dim=1).flip(1)
    last = v & ~torch.roll(v, -1, dims=1)  # the last valid slot chooses from itself: no term
    last[:, -1] = v[:, -1]
    terms = torch.where(v & ~last, p - suffix, torch.zeros_like(p))
    return -terms.sum(dim=1).mean()


def rrhf_rank_loss(logp: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """RRHF's ranking loss ``Σ_{t_i < t_j} max(0, p_i − p_j)`` per group, mean over groups:
    a worse response must not be more likely (length-normalised) than a better one."""
    better = (target[:, None, :] > target[:, :, None]) & valid[:, None, :] & valid[:, :, None]
    gap = (logp[:, :, None] - logp[:, None, :]).clamp_min(0.0)  # [G, i, j]: p_i - p_j
    return (gap * better).sum(dim=(1, 2)).mean()


def reward_weights(
    scores: Tensor, valid: Tensor, how: str, temperature: float = 1.0, clip: float = 2.0
) -> Tensor:
    """Weights [G, K] of each response's SFT loss from its group's scores: ``softmax`` of
    ``score / temperature`` over the group (sums to 1), or ``advantage``: the standardised
    score ``(s − mean) / std`` clipped to ``[0, clip]`` (below-average responses get 0)."""
    if how not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {how!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = scores.float()
    if how == "softmax":
        return torch.softmax((s / temperature).masked_fill(~valid, float("-inf")), dim=1)
    n = valid.sum(1, keepdim=True).clamp_min(1)
    mean = (s * valid).sum(1, keepdim=True) / n
    var = (((s - mean) * valid) ** 2).sum(1, keepdim=True) / n
    adv = (s - mean) / (var.sqrt() + 1e-6)
    return adv.clamp(0.0, clip) * valid


def response_nll(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed NLL of each response's tokens [N] and its token count [N] (float32)."""
    logits = model(batch["input_ids"])
    mask = batch["mask"]
    nll = per_token_nll(logits, batch["targets"].masked_fill(~mask, 0), ignore_index=-100)
    m = mask.float()
    return (nll * m).sum(-1), m.sum(-1)


def _grouped(x: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Per-row values [N] laid out as the batch's groups [G, K] (0 in empty slots)."""
    return x[batch["rows"]] * batch["valid"]


def order_accuracy(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Share of strictly ordered response pairs whose ``pred`` order agrees with ``target``."""
    better = (target[:, None, :] > target[:, :, None]) & valid[:, None, :] & valid[:, :, None]
    right = (pred[:, None, :] > pred[:, :, None]) & better
    return right.sum().float() / better.sum().clamp_min(1).float()


class RRHFObjective:
    """RRHF (Yuan et al., 2023): :func:`rrhf_rank_loss` on the mean log-probability per token
    of each response, plus ``sft_weight`` times the NLL (per token) of each group's best one."""

    def __init__(self, sft_weight: float = 1.0) -> None:
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
        self.sft_weight = float(sft_weight)

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Any]:
        nll, count = response_nll(model, batch)
        logp = _grouped(-nll / count.clamp_min(1.0), batch)
        valid, target = batch["valid"], batch["scores"]
        rank = rrhf_rank_loss(logp, target, valid)
        best = target.masked_fill(~valid, float("-inf")).argmax(1, keepdim=True)
        best_rows = batch["rows"].gather(1, best).squeeze(1)
        sft = nll[best_rows].sum() / count[best_rows].sum().clamp_min(1.0)
        loss = rank + self.sft_weight * sft
        metrics = {
            "loss": loss.detach(),
            "rank_loss": rank.detach(),
            "sft_loss": sft.detach(),
            "order_accuracy": order_accuracy(logp.detach(), target, valid),
            "best_logp": logp.detach().gather(1, best).mean(),
        }
        return add_router_losses(model, loss, metrics)


class WeightedObjective:
    """Reward-weighted SFT: the NLL of every response token, weighted by its response's
    :func:`reward_weights` weight, averaged over the weighted tokens (``Σ w·nll_sum / Σ w·n``):
    SFT's per-token mean, with each response counted by its reward. Per-token, not
    per-response: averaging each response first would give a short reply's ``<|end|>`` the
    weight of a whole long reply, and teach the policy to stop early."""

    def __init__(self, weighting: str = "softmax", temperature: float = 1.0, clip: float = 2.0):
        reward_weights(
            torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), weighting, temperature, clip
        )  # fmt: skip  (validates the knobs)
        self.weighting, self.temperature, self.clip = weighting, temperature, clip

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Any]:
        nll, count = response_nll(model, batch)
        per_token = _grouped(nll / count.clamp_min(1.0), batch)
        valid, target = batch["valid"], batch["scores"]
        w = reward_weights(target, valid, self.weighting, self.temperature, self.clip)
        tokens = (w * _grouped(count, batch)).sum()
        loss = (w * _grouped(nll, batch)).sum() / tokens.clamp_min(1e-6)
        metrics = {
            "loss": loss.detach(),
            "nll": (per_token.sum() / valid.sum().clamp_min(1)).detach(),
            "weight_max": w.max(1).values.mean(),
            "order_accuracy": order_accuracy(-per_token.detach(), target, valid),
        }
        return add_router_losses(model, loss, metrics)


class ListwiseRewardObjective:
    """A reward model trained on ranked groups: :func:`listwise_loss` of its rewards against the
    groups' scores (every response of a batch in one forward). On ``k = 2`` groups it is the
    pairwise Bradley–Terry loss of :class:`llm_core.objectives.RewardObjective`."""

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Any]:
        rewards = _grouped(model(batch["input_ids"], batch["lengths"]), batch)
        valid, target = batch["valid"], batch["scores"]
        loss = listwise_loss(rewards, target, valid)
        metrics = {"loss": loss.detach(), "order_accuracy": order_accuracy(rewards, target, valid)}
        return add_router_losses(model, loss, metrics)


def evaluate_ranked(
    model: nn.Module, objective: Any, batches: Sequence[Mapping[str, Tensor]]
) -> dict[str, float]:
    """The objective's metrics on held-out groups, weighted by groups per batch, as ``val_*``."""
    return evaluate_objective(model, objective, batches, count_key="scores", what="groups")
