"""Optimisers for the training loop: AdamW (the old recipe) and Muon + AdamW (the new one).

Muon (Keller Jordan et al.; the form nanochat and modded-nanogpt use) runs SGD with Nesterov
momentum and replaces each update of a hidden weight matrix by the nearest semi-orthogonal
matrix, computed by a few Newton–Schulz iterations. Every singular direction of the update then
moves by the same amount, so the rare directions a small model learns slowly get the same step as
the dominant ones: the same loss in fewer tokens. Muon is for the 2-D matrices *inside* the
transformer blocks only; the embedding (tied to the LM head here), norms, biases, routers and any
task head stay with AdamW, whose per-coordinate scaling suits rows that see sparse gradients.

Both kinds of parameter group live in one :class:`MuonAdamW` optimiser, so checkpoints hold one
``state_dict`` and exact resume works as for plain AdamW. Each group keeps its peak learning rate
as ``base_lr``; :func:`set_lr_factor` applies the schedule's multiplier to all of them at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from llm_core.config import TrainConfig

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "muon")
# Quintic Newton–Schulz coefficients (Keller Jordan): the largest slope at zero that still maps
# every singular value into roughly [0.7, 1.2] in 5 steps; exact orthogonality is not needed.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> Tensor:
    """An approximately semi-orthogonal matrix with ``g``'s singular vectors (``U V^T`` of its
    SVD, singular values pushed into ~[0.7, 1.2]); batched over leading dimensions.

    ``dtype`` is the arithmetic type: bf16 where the hardware has bf16 dot products (CUDA,
    AVX512-BF16/AMX CPUs), float32 elsewhere, where emulated bf16 GEMMs are slower than fp32 ones.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    a, b, c = _NS_COEFFS
    x = g.to(dtype or _ns_dtype(g.device))
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide side: X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def _orthogonal_step(g: Tensor, steps: int) -> Tensor:
    """Muon's update of one matrix: orthogonalised, scaled by ``sqrt(max(1, rows/cols))`` (as
    nanochat) so a tall matrix moves as far per element as a square one."""
    return newton_schulz(g, steps) * max(1.0, g.size(-2) / g.size(-1)) ** 0.5


def _ns_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16
    fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if fast_bf16 else torch.float32


class MuonAdamW(torch.optim.Optimizer):
    """One optimiser, two update rules: groups with ``kind="muon"`` get Muon, the rest AdamW.

    Muon group keys: ``lr``, ``momentum``, ``nesterov``, ``ns_steps``, ``weight_decay`` and
    ``split`` (row sizes orthogonalised separately, e.g. the fused q/k/v projection; empty for
    none; the step size is then each part's own). AdamW group keys: ``lr``, ``betas``, ``eps``,
    ``weight_decay`` (decoupled).
    """

    def __init__(self, groups: Iterable[dict[str, Any]]) -> None:
        defaults = {"lr": 1e-3, "kind": "adamw", "weight_decay": 0.0, "betas": (0.9, 0.95),
                    "eps": 1e-8, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "split": []}  # fmt: skip
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["kind"] not in OPTIMIZERS:
                raise ValueError(f"unknown parameter group kind {group['kind']!r}")
            if group["kind"] == "muon" and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices only (ndim >= 2)")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        if closure is not None:
            raise ValueError("MuonAdamW does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["kind"] == "muon" else self._adamw)(group, params)

    def _muon(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mom)
            g = p.grad.lerp(buf, mom) if group["nesterov"] else buf
            parts = g.split(group["split"]) if group["split"] else [g]
            update = torch.cat([_orthogonal_step(x, group["ns_steps"]) for x in parts])
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr)

    def _adamw(self, group: dict[str, Any], params: list[Tensor]) -> None:
        (beta1, beta2), lr, wd, eps = (
            group["betas"],
            group["lr"],
            group["weight_decay"],
            group["eps"],
        )
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
            if wd:
                p.mul_(1 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


def muon_param_names(model: nn.Module) -> list[str]:
    """The parameters Muon trains: matrices inside the transformer ``blocks`` except MoE routers.

    Everything else (token/position embeddings, the LM head tied to them, norms, biases, routers,
    classification or reward heads) is AdamW's: those are not linear maps between hidden
    states, so orthogonalising their updates has no meaning.
    """
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and p.ndim >= 2 and name.startswith("blocks.") and "router" not in name
    ]


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Parameter groups for ``cfg.optimizer``; every trainable parameter is in exactly one.

    ``adamw``: matrices with ``weight_decay``, vectors (gains, biases) without.
    ``muon``: the hidden matrices in Muon groups at ``muon_lr`` (fused q/k/v projections split
    into their q, k and v rows), the rest as for ``adamw`` at ``lr``.
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"train.optimizer must be one of {list(OPTIMIZERS)}, got {cfg.optimizer!r}"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = set(muon_param_names(model)) if cfg.optimizer == "muon" else set()
    adam = {"kind": "adamw", "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8}
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in named if p.ndim >= 2 and n not in muon], **adam,
         "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": [p for n, p in named if p.ndim < 2], **adam,
         "weight_decay": 0.0, "base_lr": cfg.lr},
    ]  # fmt: skip
    if muon:
        mu = {"kind": "muon", "momentum": cfg.muon_momentum, "nesterov": True,
              "ns_steps": cfg.muon_ns_steps, "weight_decay": cfg.muon_weight_decay,
              "base_lr": cfg.muon_lr}  # fmt: skip
        splits = _qkv_splits(model)
        plain = [p for n, p in named if n in muon and n not in splits]
        groups.append({"params": plain, **mu, "split": []})
        for sizes in sorted({tuple(s) for s in splits.values()}):
            same = [p for n, p in named if n in splits and tuple(splits[n]) == sizes]
            groups.append({"params": same, **mu, "split": list(sizes)})
    for g in groups:
        g["lr"] = g["base_lr"]
    return [g for g in groups if g["params"]]


def _qkv_splits(model: nn.Module) -> dict[str, list[int]]:
    """Row sizes of each fused q/k/v projection (``*.attn.qkv.weight``): q, k and v are separate
    maps, and orthogonalising them together would couple their step sizes."""
    out: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "qkv") and hasattr(module, "n_head") and hasattr(module, "head_dim"):
            kv = getattr(module, "n_kv", module.n_head)
            hd = module.head_dim
            out[f"{name}.qkv.weight"] = [module.n_head * hd, kv * hd, kv * hd]
    return out


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` names, over :func:`param_groups`.

    ``adamw`` is torch's AdamW, ``fused=True`` (one kernel for all parameters) where torch
    supports it (CPU and CUDA in torch 2.13), else foreach. ``muon`` is :class:`MuonAdamW`.
    """
    groups = param_groups(model, cfg)
    if cfg.optimizer == "muon":
        return MuonAdamW(groups)
    for g in groups:
        g.pop("kind")
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8}
    if device.type in {"cpu", "cuda"}:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError) as exc:  # pragma: no cover - depends on build
            log.warning("fused AdamW unavailable on %s (%s); using foreach", device, exc)
    return torch.optim.AdamW(groups, **kwargs)


def set_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group at ``factor`` times its peak rate (``base_lr``; ``lr`` for foreign groups)."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
