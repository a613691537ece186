"""Every loss, and the ``Objective`` protocol that lets one trainer serve every stage.

The trainer knows nothing about *what* it optimises: it calls ``objective(model, batch)`` and gets
back a scalar loss plus detached metrics. The stages differ only in the objective passed in, and
all of them are here, beside the losses they share: :class:`LMObjective` (pretraining),
:class:`SFTObjective` (masked next-token loss), :class:`RewardObjective` (Bradley–Terry),
:class:`DPOObjective` and :class:`GRPOObjective`. Their data (samplers, encodings, rollouts) lives
with each stage's data code: :mod:`llm_core.data`, :mod:`llm_core.sft`, :mod:`llm_core.align`,
:mod:`llm_core.rl`.

All losses are computed in float32 even under bf16 autocast: a softmax over a large vocabulary in
bf16 loses enough precision to bias the loss and its gradients.

This module imports torch and the checkpoint helpers only, because the trainer imports it: GRPO's
rollout machinery (:mod:`llm_core.rl`, which reaches the trainer through :mod:`llm_core.align`)
is imported when a :class:`GRPOObjective` is built, not at module level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from llm_core.checkpoint import unwrap_model
from llm_core.moe import pop_router_losses

if TYPE_CHECKING:  # rl imports the trainer, which imports this module
    from llm_core.rl import GroupRollouts, Rollout

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


def per_token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
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
    nll = per_token_nll(logits, targets.masked_fill(mask == 0, 0), ignore_index=-100)
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


def sequence_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Sum of ``log p(target_t)`` over masked positions, per sequence ``[B]`` (float32).

    This is the quantity DPO compares between policy and reference: the log-likelihood of the
    response tokens only, the prompt being masked out.
    """
    m = mask.to(torch.float32)
    nll = per_token_nll(logits, targets.masked_fill(m == 0, 0), ignore_index=-100)
    return -(nll * m).sum(dim=-1)


def token_logps(
    model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``log p(target)`` per position [N, W] in float32 (0 where ``mask`` is false)."""
    nll = per_token_nll(model(ids), targets.masked_fill(~mask, 0), ignore_index=-100)
    return -nll * mask


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


def forward_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``batch["input_ids"]``, passing ``positions`` and ``doc_ids`` (packed
    documents) when the batch has them."""
    kwargs = {k: batch[k] for k in ("positions", "doc_ids") if batch.get(k) is not None}
    return model(batch["input_ids"], **kwargs)


def _as_mapping(batch: Batch) -> Mapping[str, torch.Tensor]:
    if isinstance(batch, Mapping):
        return batch
    x, y = batch
    return {"input_ids": x, "targets": y}


def add_router_losses(
    model: nn.Module, loss: torch.Tensor, metrics: Metrics
) -> tuple[torch.Tensor, Metrics]:
    """``loss`` plus the weighted auxiliary losses of ``model``'s MoE layers (:mod:`llm_core.moe`)
    from the forwards just run, and their per-layer metrics; unchanged for a dense model.

    ``metrics["loss"]`` stays the task loss (what val loss and bpb compare against); the total
    that is backpropagated differs from it by ``moe_aux_loss``.
    """
    extra, router_metrics = pop_router_losses(model)
    if extra is None:
        return loss, metrics
    metrics.update(router_metrics)
    metrics["moe_aux_loss"] = extra.detach()
    return loss + extra, metrics


@torch.no_grad()
def evaluate_objective(
    model: nn.Module,
    objective: Objective,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    count_key: str,
    what: str,
) -> dict[str, float]:
    """An objective's own metrics on held-out batches as ``val_*``, weighted by the rows of
    ``batch[count_key]`` (pairs, groups), so train and validation compute them the same way."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    try:
        for batch in batches:
            b = {k: v.to(device) for k, v in batch.items()}
            rows = int(b[count_key].size(0))
            _, metrics = objective(model, b)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * rows
            n += rows
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError(f"no validation {what}")
    return {f"val_{k}": v / n for k, v in sums.items()}


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
            return add_router_losses(model, loss, {"loss": loss.detach()})
        logits = forward_logits(model, b)
        if b.get("loss_mask") is not None:
            loss = masked_lm_loss(logits, b["targets"], b["loss_mask"])
        else:
            loss = lm_loss(logits, b["targets"], self.ignore_index)
        return add_router_losses(model, loss, {"loss": loss.detach()})


class SFTObjective:
    """Next-token loss on assistant tokens only (``masked_lm_loss``), packed or padded batches
    (:class:`llm_core.sft.SFTSampler`).

    ``supervised_frac`` (share of target positions that carry loss) is reported so a run whose
    batches are mostly prompt or padding is visible in the logs.
    """

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Metrics]:
        logits = forward_logits(model, batch)
        mask = batch["loss_mask"]
        loss = masked_lm_loss(logits, batch["targets"], mask)
        metrics = {"loss": loss.detach(), "supervised_frac": mask.float().mean()}
        return add_router_losses(model, loss, metrics)


class RewardObjective:
    """Bradley–Terry on a pair batch (both sides in one forward of a
    :class:`~llm_core.reward.RewardModel`), plus ``lm_loss_weight`` times the next-token loss on
    the chosen reply."""

    def __init__(self, lm_loss_weight: float = 0.0) -> None:
        if lm_loss_weight < 0:
            raise ValueError(f"lm_loss_weight must be >= 0, got {lm_loss_weight}")
        self.lm_loss_weight = float(lm_loss_weight)

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Metrics]:
        b = batch["chosen_ids"].size(0)
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        lengths = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]])
        metrics: Metrics = {}
        if self.lm_loss_weight > 0:
            rewards, hidden = model(ids, lengths, return_hidden=True)
            head = unwrap_model(model).backbone.lm_head
            logits = head(hidden[:b]).float()
            lm = masked_lm_loss(logits, batch["chosen_targets"], batch["chosen_mask"])
            metrics["lm_loss"] = lm.detach()
        else:
            rewards = model(ids, lengths)
            lm = rewards.new_zeros(())
        rc, rr = rewards[:b], rewards[b:]
        bt = bradley_terry_loss(rc, rr)
        loss = bt + self.lm_loss_weight * lm
        margin = (rc - rr).detach()
        metrics.update(
            loss=loss.detach(),
            bt_loss=bt.detach(),
            reward_accuracy=(margin > 0).float().mean() + 0.5 * (margin == 0).float().mean(),
            reward_margin=margin.mean(),
        )
        return add_router_losses(model, loss, metrics)


class ClassifyObjective:
    """Cross-entropy of every task's head on its own rows of a :class:`~llm_core.classify.
    TaskSampler` batch, weighted per task (``loss = sum_t w_t * CE_t``): the multi-task "dict
    head" trained jointly. All tasks' rows go through one backbone forward, padded to one width."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        bad = {k: w for k, w in weights.items() if w < 0}
        if bad or not weights:
            raise ValueError(f"task loss weights must be >= 0 and non-empty, got {dict(weights)}")
        self.weights = dict(weights)

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Metrics]:
        names = list(self.weights)
        ids = [batch[f"{t}_ids"] for t in names]
        width = max(int(x.size(1)) for x in ids)
        padded = torch.cat([F.pad(x, (0, width - x.size(1))) for x in ids])  # pads are never read
        lengths = torch.cat([batch[f"{t}_lengths"] for t in names])
        # One forward (through the DDP wrapper, so gradients sync) for every task's rows.
        rows = [(t, int(x.size(0))) for t, x in zip(names, ids, strict=True)]
        all_logits = model(padded, lengths, rows)
        loss = torch.zeros((), dtype=torch.float32, device=padded.device)
        metrics: Metrics = {}
        for t, logits in zip(names, all_logits, strict=True):
            labels = batch[f"{t}_labels"]
            ce = F.cross_entropy(logits.float(), labels)
            loss = loss + self.weights[t] * ce
            metrics[f"{t}_loss"] = ce.detach()
            metrics[f"{t}_accuracy"] = (logits.argmax(-1) == labels).float().mean().detach()
        metrics["loss"] = loss.detach()
        return loss, metrics


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
        return add_router_losses(
            model,
            loss,
            {
                "loss": loss.detach(),
                "reward_margin": (cr - rjr).mean(),
                "reward_accuracy": (cr > rjr).float().mean(),
                "rewards_chosen": cr.mean(),
                "rewards_rejected": rjr.mean(),
                "logps_chosen": pc.detach().mean(),
                "logps_rejected": pr.detach().mean(),
            },
        )


class GRPOObjective:
    """GRPO's loss over rollouts it samples itself (see :mod:`llm_core.rl`).

    A batch of :class:`llm_core.rl.RolloutSampler` names prompts and a rollout id; the first time
    an id is seen, its :class:`llm_core.rl.GroupRollouts` (given to the constructor) samples ``group_size`` replies per prompt
    from the current policy and scores them. The loss is the PPO-style clipped surrogate of the
    group-normalised advantages with a KL penalty to the frozen reference (the k3 estimator
    ``exp(q) - q - 1`` with ``q = log ref - log pi``, unbiased and never negative). A rollout is
    reused for ``updates_per_rollout`` optimiser steps; the ratio to the sampling policy, and so
    the clipping, only matters then. The old log-probs are those of the first update's forward on
    the rollout (the policy that sampled it), so no extra forward pass is spent on them.
    ``history`` keeps one entry per rollout (mean reward, reply length) for the run summary.
    """

    def __init__(self, rollouts: GroupRollouts) -> None:
        self.cfg = rollouts.cfg
        self.rollouts = rollouts
        self._cache: dict[int, Rollout] = {}  # the rollouts of the current optimiser steps

    @property
    def history(self) -> list[dict[str, float]]:
        return self.rollouts.history

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Metrics]:
        rid = int(batch["rollout"])
        keep_from = int(batch.get("keep_from", rid))
        self._cache = {k: v for k, v in self._cache.items() if k >= keep_from}
        if rid not in self._cache:
            index = batch["prompt_index"].tolist()
            self._cache[rid] = self.rollouts.sample(unwrap_model(model), index, rid)
        ro = self._cache[rid]
        logp = token_logps(model, ro.ids, ro.targets, ro.mask)
        if ro.old_logps is None:
            ro.old_logps = logp.detach()
        m = ro.mask.float()
        # Log-ratios are clamped at ±20 only so a token the policy has all but abandoned cannot
        # overflow exp() in float32; within that range the loss is the textbook one.
        ratio = torch.exp((logp - ro.old_logps).clamp(-20.0, 20.0))
        adv = ro.advantages[:, None]
        eps = self.cfg.clip_eps
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        q = (ro.ref_logps - logp).clamp(-20.0, 20.0)
        kl = torch.exp(q) - q - 1  # k3: an unbiased, non-negative estimate of KL(pi || ref)
        per_token = -(surrogate - self.cfg.kl_coef * kl) * m
        tokens = m.sum(dim=1).clamp_min(1.0)
        loss = (per_token.sum(dim=1) / tokens).mean()  # each reply weighs the same (GRPO)
        clipped = ((ratio - 1).abs() > eps).float()
        n_tok = m.sum().clamp_min(1.0)
        return loss, {
            "loss": loss.detach(),
            "reward_mean": ro.rewards.mean(),
            "reward_std": ro.rewards.std(unbiased=False),
            "kl": ((kl * m).sum() / n_tok).detach(),
            "reply_len": tokens.mean(),
            "clip_frac": (clipped * m).sum() / n_tok,
            "tokens": torch.tensor(ro.ids.numel()),  # what the trainer counts as tokens seen
        }
