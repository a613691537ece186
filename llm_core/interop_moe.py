"""Hugging Face interop for MoE models: export and import as ``MixtralForCausalLM``.

A Mixtral decoder layer is a Llama layer whose MLP is ``block_sparse_moe``: a bias-free router
``gate`` ([n_experts, hidden]) and experts with ``w1`` (gate), ``w3`` (up) and ``w2`` (down)
SwiGLU projections. Its routing is ours (:mod:`llm_core.moe`): softmax over all experts in float32,
top-k, renormalised. So the mapping is the Llama table of :mod:`llm_core.interop` with the three
MLP rows replaced, and the config is the Llama config with the Mixtral keys added.

Export writes the classic per-expert names, which every ``transformers`` release (4.x and 5.x,
where a load-time converter fuses them into ``experts.gate_up_proj``/``down_proj``), vLLM and
llama.cpp read. Import accepts those, and also the fused 5.x layout a ``save_pretrained`` of
``transformers`` 5 writes, splitting it back per expert.

:mod:`llm_core.interop` calls :func:`moe_param_map`, :func:`mixtral_config`,
:func:`config_from_mixtral` and :func:`unfuse_experts`; this module does not import it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from llm_core.config import ModelConfig, MoEConfig

__all__ = ["config_from_mixtral", "mixtral_config", "moe_param_map", "unfuse_experts"]

ParamMap = list[tuple[str, tuple[str, ...], bool]]
_DENSE_MLP = re.compile(r"blocks\.(\d+)\.mlp\.(gate|up|down)\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def moe_param_map(cfg: ModelConfig, dense: ParamMap) -> ParamMap:
    """The Llama table ``dense`` with each layer's MLP rows replaced by router and experts."""
    assert cfg.moe is not None
    out: ParamMap = []
    for ours, hf, transpose in dense:
        m = _DENSE_MLP.fullmatch(ours)
        if m is None:
            out.append((ours, hf, transpose))
            continue
        if m.group(2) != "gate":  # the whole layer is emitted at its first MLP row
            continue
        i = m.group(1)
        layer = f"model.layers.{i}.block_sparse_moe."
        out.append((f"blocks.{i}.mlp.router.weight", (f"{layer}gate.weight",), False))
        for e in range(cfg.moe.n_experts):
            for ours_name, hf_name in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                out.append(
                    (
                        f"blocks.{i}.mlp.experts.{e}.{ours_name}.weight",
                        (f"{layer}experts.{e}.{hf_name}.weight",),
                        False,
                    )
                )
    return out


def mixtral_config(llama: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` for ``MixtralForCausalLM``: the Llama one plus the routing keys.

    ``router_aux_loss_coef`` carries our coefficient for a fine-tune in ``transformers`` (whose
    loss counts top-k slots, ``top_k`` times ours: see :mod:`llm_core.moe`); no sliding window,
    no router jitter, so its forward is ours.
    """
    assert cfg.moe is not None
    drop = {"mlp_bias", "pretraining_tp", "attention_bias"}
    out = {k: v for k, v in llama.items() if k not in drop}
    out.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=cfg.moe.n_experts,
        num_experts_per_tok=cfg.moe.top_k,
        router_aux_loss_coef=cfg.moe.aux_loss_coef,
        output_router_logits=False,
        router_jitter_noise=0.0,
        sliding_window=None,
    )
    return out


def config_from_mixtral(
    hf: Mapping[str, Any],
    where: str,
    llama_config: Callable[..., ModelConfig],
    refuse: Callable[[str], Exception],
) -> ModelConfig:
    """Our :class:`ModelConfig` from a Mixtral ``config.json``: the Llama reading of the shared
    keys (``llama_config``) plus ``moe``; a sliding window or router jitter is refused (our
    attention is full and our routing deterministic)."""
    if hf.get("sliding_window") is not None:
        raise refuse(f"{where}: sliding_window={hf['sliding_window']} is not supported")
    if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
        raise refuse(f"{where}: router_jitter_noise is not supported")
    for key in ("num_local_experts", "num_experts_per_tok"):
        if hf.get(key) is None:
            raise refuse(f"{where}: missing {key!r}")
    base = llama_config({**hf, "model_type": "llama"}, where=where)
    moe = MoEConfig(
        n_experts=int(hf["num_local_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)),
    )
    return dataclasses.replace(base, moe=moe)


def unfuse_experts(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``transformers`` 5's fused layout (``mlp.gate.weight``, ``mlp.experts.gate_up_proj``
    [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F]) as the classic per-expert names; a state
    already in the classic layout is returned as it is."""
    if cfg.moe is None or not any(_FUSED.match(k) for k in state):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = _FUSED.match(key)
        router = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate\.weight", key)
        if router is not None:
            out[f"model.layers.{router.group(1)}.block_sparse_moe.gate.weight"] = t
        elif m is None:
            out[key] = t
        elif m.group(2) == "gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                base = f"model.layers.{m.group(1)}.block_sparse_moe.experts.{e}."
                out[base + "w1.weight"], out[base + "w3.weight"] = gate[e], up[e]
        else:
            for e, w2 in enumerate(t):
                out[f"model.layers.{m.group(1)}.block_sparse_moe.experts.{e}.w2.weight"] = w2
    return out
