"""Mixture of Experts: routed SwiGLU experts in place of a block's MLP (``model.moe``).

Mixtral's design (Jiang et al., 2024), which is also what ``transformers``' ``MixtralForCausalLM``
computes, so an export matches it to float precision (:mod:`llm_core.interop_moe`):

* **Routing**: a bias-free linear ``router`` gives each token one logit per expert; softmax over
  all experts (float32), keep the ``top_k`` largest probabilities, renormalise them to sum to 1,
  and add the chosen experts' outputs weighted by them.
* **Load balancing** (Switch Transformer, Fedus et al., 2021; Mixtral's ``router_aux_loss_coef``):
  ``aux = E * sum_e f_e * P_e`` with ``f_e`` the share of the token-to-expert assignments that
  went to expert ``e`` and ``P_e`` its mean router probability. It is 1.0 when routing is uniform
  and grows as tokens pile onto few experts; its gradient flows through ``P_e``. (Hugging Face's
  ``load_balancing_loss_func`` counts assignments per top-k slot, which is ``top_k`` times this.)
* **Router z-loss** (ST-MoE, Zoph et al., 2022): ``mean(logsumexp(logits)^2)`` keeps the router
  logits small, which keeps bf16 routing stable; off unless ``z_loss_coef > 0``.

Tokens are dispatched by sorting the (token, expert) assignments by expert into one zero-padded
[n_experts, capacity, d] batch (capacity: the busiest expert's count), so each projection is one
batched GEMM over the experts' stacked weights, and one ``index_add_`` scatters the results back.
On a CPU that measured 2-3x faster than one GEMM chain per expert on its slice (per-call weight
reorders dominate those small bf16 GEMMs); the price is the padding, which grows with imbalance
(what the load-balancing loss keeps small: at a max/mean load of 1.5, a third of the rows are pad).

The auxiliary losses reach the training loss through the objective
(:func:`llm_core.objectives.add_router_losses`): while autograd records, each forward of a
:class:`MoE` layer leaves its losses and expert loads in :attr:`MoE.records`, and
:func:`pop_router_losses` collects them, weighted, plus per-layer metrics (aux loss, most and
least loaded expert as a multiple of the uniform load) that the trainer logs to MLflow.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_core.config import ModelConfig, MoEConfig
from llm_core.kernels import Linear, weight_t

__all__ = [
    "MoE",
    "RouterRecord",
    "active_params",
    "load_balancing_loss",
    "pop_router_losses",
    "router_z_loss",
]

# Forwards with autograd whose losses nobody collected (an objective without MoE support) are
# dropped beyond this many, so they cannot hold graphs alive step after step.
MAX_PENDING_RECORDS = 4
# Without autograd, up to this many tokens per expert take the per-expert path (decoding).
SMALL_BATCH = 4


def load_balancing_loss(probs: Tensor, top_idx: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Switch/Mixtral auxiliary loss and the expert loads.

    ``probs`` [N, E] (float32 softmax), ``top_idx`` [N, k]. Returns ``(aux, load)``: ``aux`` as in
    the module docstring (1.0 when balanced), ``load`` [E] the share of assignments per expert.
    """
    counts = torch.bincount(top_idx.reshape(-1), minlength=n_experts).to(probs.dtype)
    load = counts / counts.sum().clamp_min(1.0)
    aux = n_experts * torch.dot(load, probs.mean(dim=0))
    return aux, load


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's z-loss: mean squared log-partition of the router logits [N, E] (float32)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class Expert(nn.Module):
    """One SwiGLU expert, the dense MLP's shape: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate = Linear(d_model, hidden, bias=False)
        self.up = Linear(d_model, hidden, bias=False)
        self.down = Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad or torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return self.down(F.silu(self.gate(x)) * self.up(x))
        # Inference: the transposed weights while generation has them installed (decode.py).
        h = F.silu(torch.mm(x, weight_t(self.gate))).mul_(torch.mm(x, weight_t(self.up)))
        return torch.mm(h, weight_t(self.down))


class RouterRecord:
    """What one forward of a :class:`MoE` layer leaves for the objective (tensors with grad)."""

    __slots__ = ("aux", "load", "z")

    def __init__(self, aux: Tensor, z: Tensor, load: Tensor) -> None:
        self.aux, self.z, self.load = aux, z, load


class MoE(nn.Module):
    """Top-k routed SwiGLU experts; a drop-in for the block's MLP (same input and output)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        if moe is None:
            raise ValueError("MoE needs config.moe")
        self.cfg: MoEConfig = moe
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.router = Linear(config.d_model, moe.n_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(config.d_model, config.ffn_hidden) for _ in range(moe.n_experts)
        )
        self.records: deque[RouterRecord] = deque(maxlen=MAX_PENDING_RECORDS)

    @property
    def out_projs(self) -> list[nn.Linear]:
        """The projections back into the residual stream (their init is depth-scaled)."""
        return [e.down for e in self.experts]

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(router logits [N, E] float32, top-k weights [N, k], top-k experts [N, k])``."""
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        top_w, top_idx = probs.topk(self.top_k, dim=-1)
        return logits, top_w / top_w.sum(dim=-1, keepdim=True), top_idx

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, top_w, top_idx = self.route(flat)
        if torch.is_grad_enabled():
            probs = logits.softmax(dim=-1)
            aux, load = load_balancing_loss(probs, top_idx, self.n_experts)
            z = router_z_loss(logits) if self.cfg.z_loss_coef > 0 else aux.new_zeros(())
            self.records.append(RouterRecord(aux, z, load.detach()))
        n_tok = flat.shape[0]
        if n_tok <= SMALL_BATCH * self.n_experts and not torch.is_grad_enabled():
            # Decoding (a few new tokens): only the chosen experts run, on their own rows,
            # through the transposed inference weights; stacking every expert's weights would
            # copy all of them for each generated token.
            out = torch.zeros_like(flat)
            for e in top_idx.unique().tolist():
                rows, slot = (top_idx == e).nonzero(as_tuple=True)
                y = self.experts[e](flat[rows]) * top_w[rows, slot].unsqueeze(1)
                out.index_add_(0, rows, y.to(out.dtype))
            return out.reshape(shape)
        # Dispatch: sort the (token, expert) assignments by expert and lay them out as one
        # [n_experts, capacity, d] batch (capacity = the busiest expert's count, zero-padded),
        # so each projection is one batched GEMM over the stacked expert weights.
        assignment = top_idx.reshape(-1)  # token t's j-th expert at t * k + j
        order = torch.argsort(assignment, stable=True)
        expert = assignment[order]
        counts = torch.bincount(assignment, minlength=self.n_experts)
        rank = torch.arange(expert.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
        token = order // self.top_k
        padded = flat.new_zeros(self.n_experts, int(counts.max()), shape[-1])
        padded = padded.index_put((expert, rank), flat.index_select(0, token))
        w_gate, w_up, w_down = self.stacked_weights()
        h = F.silu(torch.bmm(padded, w_gate.transpose(1, 2))) * torch.bmm(
            padded, w_up.transpose(1, 2)
        )
        y = torch.bmm(h, w_down.transpose(1, 2))[expert, rank]
        y = y * top_w.reshape(-1)[order].unsqueeze(1).to(y.dtype)
        out = torch.zeros((n_tok, shape[-1]), dtype=y.dtype, device=y.device)
        return out.index_add_(0, token, y).reshape(*shape[:-1], shape[-1])

    def stacked_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The experts' gate, up [E, F, D] and down [E, D, F] weights, stacked (autograd flows
        back to each expert's own Linear, so checkpoints and exports keep one module per expert)."""
        return (
            torch.stack([e.gate.weight for e in self.experts]),
            torch.stack([e.up.weight for e in self.experts]),
            torch.stack([e.down.weight for e in self.experts]),
        )


def moe_layers(model: nn.Module) -> list[MoE]:
    """The :class:`MoE` layers of ``model`` (through DDP, compile or reward-model wrappers)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def pop_router_losses(model: nn.Module) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The weighted auxiliary losses of the forwards since the last call, and their metrics.

    Returns ``(loss, metrics)``: ``loss`` is ``sum over layers of aux_loss_coef * aux +
    z_loss_coef * z``, averaged over the forwards recorded (DPO runs two per step), or None
    for a model without MoE layers or nothing recorded. ``metrics`` (detached): ``moe_aux_l{i}``,
    ``moe_load_max_l{i}`` / ``moe_load_min_l{i}`` (the busiest / idlest expert's share of the
    assignments times ``n_experts``: 1.0 is perfect balance), ``moe_aux`` (mean over layers) and
    ``moe_z`` when the z-loss is on.
    """
    total: Tensor | None = None
    metrics: dict[str, Tensor] = {}
    aux_sum: Tensor | None = None
    z_sum: Tensor | None = None
    layers = moe_layers(model)
    for i, layer in enumerate(layers):
        records = list(layer.records)
        layer.records.clear()
        if not records:
            continue
        n = len(records)
        aux = sum((r.aux for r in records), records[0].aux.new_zeros(())) / n
        z = sum((r.z for r in records), records[0].z.new_zeros(())) / n
        load = torch.stack([r.load for r in records]).mean(dim=0) * layer.n_experts
        loss = layer.cfg.aux_loss_coef * aux + layer.cfg.z_loss_coef * z
        total = loss if total is None else total + loss
        aux_sum = aux.detach() if aux_sum is None else aux_sum + aux.detach()
        z_sum = z.detach() if z_sum is None else z_sum + z.detach()
        metrics[f"moe_aux_l{i}"] = aux.detach()
        metrics[f"moe_load_max_l{i}"] = load.max()
        metrics[f"moe_load_min_l{i}"] = load.min()
    if aux_sum is not None and z_sum is not None:
        metrics["moe_aux"] = aux_sum / len(layers)
        if any(layer.cfg.z_loss_coef > 0 for layer in layers):
            metrics["moe_z"] = z_sum / len(layers)
    return total, metrics


def active_params(model: nn.Module) -> int:
    """Parameters one token uses: every parameter (tied ones once) minus the experts it is not
    routed to, ``(n_experts - top_k) / n_experts`` of each MoE layer's experts."""
    n = sum(p.numel() for p in model.parameters())
    for layer in moe_layers(model):
        expert = sum(p.numel() for p in layer.experts[0].parameters())
        n -= (layer.n_experts - layer.top_k) * expert
    return n
