"""Losses, and the ``Objective`` protocol that lets one trainer serve every stage.

The trainer knows nothing about *what* it optimises: it calls ``objective(model, batch)`` and gets
back a scalar loss plus detached metrics. Pretraining, SFT (masked next-token loss), reward
modelling (Bradley–Terry) and DPO differ only in the objective object passed in.

All losses are computed in float32 even under bf16 autocast: a softmax over a large vocabulary in
bf16 loses enough precision to bias the loss and its gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor] | Mapping[str, torch.Tensor]
Metrics = dict[str, torch.Tensor]


@runtime_checkable
class Objective(Protocol):
    """``(model, batch) -> (loss, metrics)``.

    ``loss`` is the scalar to backpropagate (mean over this rank's micro-batch). ``metrics`` holds
    detached scalar tensors (not floats) so the trainer can average them over gradient
    accumulation and synchronise with the device only when it logs.
    """

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Metrics]: ...


def _per_token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Negative log-likelihood per position ``[B, T]`` in float32 (0 where ignored)."""
    v = logits.size(-1)
    nll = F.cross_entropy(
        logits.float().reshape(-1, v),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )
    return nll.view(targets.shape)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over positions whose target is not ``ignore_index``."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index
    )


def masked_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy averaged over positions where ``loss_mask`` is true (e.g. assistant turns in
    SFT). An all-zero mask gives 0 rather than NaN so an unlucky micro-batch cannot poison a run."""
    mask = loss_mask.to(torch.float32)
    nll = _per_token_nll(logits, targets.masked_fill(mask == 0, 0), ignore_index=-100)
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


def sequence_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Sum of ``log p(target_t)`` over masked positions, per sequence ``[B]`` (float32).

    This is the quantity DPO compares between policy and reference: the log-likelihood of the
    response tokens only, the prompt being masked out.
    """
    m = mask.to(torch.float32)
    nll = _per_token_nll(logits, targets.masked_fill(m == 0, 0), ignore_index=-100)
    return -(nll * m).sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation loss (Rafailov et al., 2023).

    ``loss = -mean(log σ(β·[(π_c − ref_c) − (π_r − ref_r)]))``. The implicit rewards
    ``β·(π − ref)`` are returned detached for logging (reward margin, accuracy).
    """
    chosen = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected = policy_rejected_logps.float() - ref_rejected_logps.float()
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, (beta * chosen).detach(), (beta * rejected).detach()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model loss ``-mean(log σ(r_c − r_r))``: the chosen answer should score higher."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def _forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {k: batch[k] for k in ("positions", "doc_ids") if batch.get(k) is not None}
    return model(batch["input_ids"], **kwargs)


def _as_mapping(batch: Batch) -> Mapping[str, torch.Tensor]:
    if isinstance(batch, Mapping):
        return batch
    x, y = batch
    return {"input_ids": x, "targets": y}


def _has_fused_loss(model: nn.Module) -> bool:
    """True for a bare ``Transformer``: its chunked ``loss`` never materialises [B*T, V] logits.

    DDP and ``torch.compile`` wrappers are excluded on purpose: calling ``.loss`` on the inner
    module would bypass DDP's gradient hooks or the compiled graph, so they keep ``forward``.
    """
    from llm_core.model import Transformer

    return type(model) is Transformer


class LMObjective:
    """Next-token prediction. Accepts ``(x, y)`` or a mapping with ``input_ids``, ``targets`` and
    optionally ``loss_mask`` (SFT), ``positions`` and ``doc_ids`` (packed documents)."""

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        b = _as_mapping(batch)
        if b.get("loss_mask") is None and _has_fused_loss(model):
            kwargs = {k: b[k] for k in ("positions", "doc_ids") if b.get(k) is not None}
            loss = model.loss(
                b["input_ids"], b["targets"], ignore_index=self.ignore_index, **kwargs
            )
            return loss, {"loss": loss.detach()}
        logits = _forward(model, b)
        if b.get("loss_mask") is not None:
            loss = masked_lm_loss(logits, b["targets"], b["loss_mask"])
        else:
            loss = lm_loss(logits, b["targets"], self.ignore_index)
        return loss, {"loss": loss.detach()}


class DPOObjective:
    """DPO against a frozen reference model.

    The batch mapping holds ``chosen_ids``/``chosen_targets``/``chosen_mask`` and the same three
    for ``rejected``. Reference log-probs come from ``ref_chosen_logps``/``ref_rejected_logps`` in
    the batch when precomputed, else from ``reference`` (run under ``no_grad``).
    """

    def __init__(self, beta: float = 0.1, reference: nn.Module | None = None) -> None:
        self.beta = beta
        self.reference = reference

    def _logps(self, model: nn.Module, b: Mapping[str, torch.Tensor], side: str) -> torch.Tensor:
        logits = model(b[f"{side}_ids"])
        return sequence_logprobs(logits, b[f"{side}_targets"], b[f"{side}_mask"])

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Metrics]:
        pc, pr = self._logps(model, batch, "chosen"), self._logps(model, batch, "rejected")
        if "ref_chosen_logps" in batch:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            if self.reference is None:
                raise ValueError("DPOObjective needs a reference model or precomputed ref logps")
            with torch.no_grad():
                rc = self._logps(self.reference, batch, "chosen")
                rr = self._logps(self.reference, batch, "rejected")
        loss, cr, rjr = dpo_loss(pc, pr, rc, rr, self.beta)
        return loss, {
            "loss": loss.detach(),
            "reward_margin": (cr - rjr).mean(),
            "reward_accuracy": (cr > rjr).float().mean(),
            "rewards_chosen": cr.mean(),
            "rewards_rejected": rjr.mean(),
            "logps_chosen": pc.detach().mean(),
            "logps_rejected": pr.detach().mean(),
        }
