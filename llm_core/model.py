"""The decoder-only transformer: Llama-style blocks in one readable file (nanoGPT spirit).

Token embedding -> ``n_layer`` x [RMSNorm -> causal self-attention (RoPE, optional grouped KV heads)
-> residual, RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> LM head (tied to the embedding).
No biases anywhere.

``ModelConfig.arch == "gpt2"`` swaps in GPT-2's parts, as nanoGPT has them, so GPT-2 checkpoints
can be imported (``llm_core.interop``): token + learned position embedding, LayerNorm (with bias)
instead of RMSNorm, no rotation in attention, a tanh-GELU MLP (``c_fc``/``c_proj``) instead of
SwiGLU, and biases on every linear layer except the LM head. Everything else (the fused loss,
packed ``doc_ids`` with per-document positions, the KV cache with left padding, generation) is
shared; the Llama path is unchanged by the variant's existence.

Two layout choices here were measured at the demo shape (benchmarks/train_throughput.py):

* one fused QKV projection; RoPE rotates the query and key heads of its output in one pass, from
  cos/sin tables computed once (non-persistent buffers: not in checkpoints);
* gate and up stay two GEMMs: a fused gate/up GEMM was no faster, and slicing its output in two
  makes the SwiGLU elementwise kernels run on strided halves, ~1.5-2x slower than on contiguous
  tensors.

What each op runs on which device and dtype (the RMSNorm and RoPE autograd Functions, attention
dispatch, bf16 emulation on CPUs without native bf16 GEMMs, the fused chunked LM head and
cross-entropy) is in :mod:`llm_core.kernels`; the KV cache and the inference-only decoding fast
path are in :mod:`llm_core.decode`. Packed sequences (``doc_ids``) get a block-diagonal causal mask
and per-document positions; batched decoding uses :class:`~llm_core.decode.KVCache`, which
supports left padding through per-row start offsets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_core.config import ModelConfig
from llm_core.decode import KVCache, decode_step
from llm_core.kernels import (
    Linear,
    LinearCrossEntropy,
    RMSNormFn,
    apply_rope,
    attention,
    compute_dtype,
    needs_grad,
)
from llm_core.moe import MoE

__all__ = ["RMSNorm", "Transformer", "positions_from_doc_ids"]


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """Positions that restart at 0 wherever the document id changes along the time axis.

    ``doc_ids`` [B, T] -> [B, T] long. Vectorised (a running max of each document's start index), so
    it costs one small kernel per call rather than a Python loop over documents.
    """
    _, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - doc_start


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain (no mean subtraction, no bias).

    Under autocast the output is already in the autocast dtype (the following matmul would cast
    it anyway), so the gradient flowing back is consumed in that dtype without an extra cast.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if needs_grad(x, self.weight):
            return RMSNormFn.apply(x, self.weight, self.eps, compute_dtype(x))
        # Inference (decoding one token at a time): fewest Python-level calls wins.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps).to(compute_dtype(x))


class Attention(nn.Module):
    """Causal self-attention with RoPE and optional grouped KV heads (GQA/MQA).

    The GPT-2 variant (``cos is None``) has biases and no rotation: its positions were added to
    the input embedding. ``qkv`` holds the query heads, then the key heads, then the value heads,
    which for multi-head attention is exactly GPT-2's ``c_attn`` layout.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        bias = config.arch == "gpt2"
        self.qkv = Linear(config.d_model, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=bias)
        self.proj = Linear(self.n_head * self.head_dim, config.d_model, bias=bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor | None,
        sin: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        b, t, _ = x.shape
        h, kvh = self.n_head, self.n_kv
        qkv = self.qkv(x).view(b, t, h + 2 * kvh, self.head_dim)
        if cos is None or sin is None:  # GPT-2: positions are in the input, nothing to rotate
            q, k, v = qkv.split((h, kvh, kvh), dim=2)
        else:
            # Queries and keys are adjacent heads of the fused output: rotate them in one pass.
            # split (not slicing): its backward concatenates the gradients instead of
            # zero-filling a full-size buffer and copying each slice into it.
            qk, v = qkv.split((h + kvh, kvh), dim=2)
            q, k = apply_rope(qk, cos, sin).split((h, kvh), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] views
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            if k.dtype != q.dtype:  # e.g. fp32 cache written by an earlier non-autocast call
                k, v = k.to(q.dtype), v.to(q.dtype)
        y = attention(q, k, v, attn_mask, is_causal)
        # y is [B, H, T, D]; the fused CPU kernel leaves it [B, T, H, D] in memory (free reshape).
        return self.proj(y.transpose(1, 2).reshape(b, t, h * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); why not a fused gate/up: module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Linear(config.d_model, config.ffn_hidden, bias=False)
        self.up = Linear(config.d_model, config.ffn_hidden, bias=False)
        self.down = Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

    @property
    def out_proj(self) -> nn.Linear:
        """The projection back into the residual stream (its init is depth-scaled)."""
        return self.down


class GeluMLP(nn.Module):
    """GPT-2 feed-forward: c_proj(gelu(c_fc(x))) with biases, GELU in its tanh form as GPT-2 has it
    (``gelu_new`` in Hugging Face). The names are GPT-2's, so its checkpoints map one to one."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.d_model, config.ffn_hidden, bias=True)
        self.c_proj = Linear(config.ffn_hidden, config.d_model, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    @property
    def out_proj(self) -> nn.Linear:
        return self.c_proj


def make_norm(config: ModelConfig) -> nn.Module:
    """RMSNorm for Llama blocks, LayerNorm (with bias) for GPT-2 blocks."""
    if config.arch == "gpt2":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return RMSNorm(config.d_model, config.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp: MLP | GeluMLP | MoE = GeluMLP(config) if config.arch == "gpt2" else MLP(config)
        if config.moe is not None:  # routed experts (llm_core.moe) in place of the MLP
            self.mlp = MoE(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor | None,
        sin: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, kv_cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only language model built from a :class:`~llm_core.config.ModelConfig`.

    ``forward(idx)`` returns float logits [B, T, V]; ``loss(idx, targets)`` is the training entry
    point; ``hidden_states(idx)`` (or ``forward(..., return_hidden=True)``) returns the final-normed
    hidden states [B, T, d_model] for heads other than the LM head (e.g. a reward model).
    ``pos_emb`` (learned positions) exists only for ``arch="gpt2"``; RoPE tables only for Llama.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb: nn.Embedding | None = None
        if config.arch == "gpt2":
            self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if self.pos_emb is None:
            cos, sin = self._rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @staticmethod
    def _rope_tables(config: ModelConfig) -> tuple[Tensor, Tensor]:
        """cos/sin [context_length, head_dim/2], computed once in float64 for accuracy."""
        half = config.head_dim // 2
        inv_freq = config.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
        angles = torch.outer(torch.arange(config.context_length, dtype=torch.float64), inv_freq)
        return angles.cos().float(), angles.sin().float()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, output projections scaled by 1/sqrt(2 * n_layer).

        The scaling keeps the residual stream's variance roughly independent of depth: each block
        adds two projections' worth of variance to it. Biases (GPT-2 variant) start at zero.
        """
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        proj_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=proj_std)
            mlp = block.mlp
            for proj in mlp.out_projs if isinstance(mlp, MoE) else [mlp.out_proj]:
                nn.init.normal_(proj.weight, mean=0.0, std=proj_std)

    # ------------------------------------------------------------------ forward passes

    def forward(
        self,
        idx: Tensor,
        *,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits [B, T, V] (float32, also under autocast), or hidden states with ``return_hidden``.

        ``doc_ids`` [B, T]: packed sequences; a token attends only to earlier tokens of the same
        document, and positions restart at 0 per document unless ``positions`` are given.
        ``kv_cache``: incremental decoding; ``idx`` holds only the new tokens.
        """
        h = self._trunk(idx, positions=positions, doc_ids=doc_ids, kv_cache=kv_cache)
        if return_hidden:
            return h
        return self.lm_head(h).float()

    def hidden_states(
        self,
        idx: Tensor,
        *,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Final-normed hidden states [B, T, d_model] (what the LM head sees)."""
        return self._trunk(idx, positions=positions, doc_ids=doc_ids, kv_cache=kv_cache)

    def loss(
        self,
        idx: Tensor,
        targets: Tensor,
        *,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        fused: bool = True,
    ) -> Tensor:
        """Next-token cross-entropy of ``idx`` against ``targets`` (already shifted, [B, T]).

        Same value as ``F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ...)`` but,
        with ``fused`` (the default), the [B*T, V] logits are never materialised: the LM head and
        the loss run chunk by chunk and the gradients are computed on the way (see
        :class:`~llm_core.kernels.LinearCrossEntropy`). That saves ~5 full passes over a [B*T, V]
        float32 tensor per step and the page faults of allocating them, which on CPU is a large
        share of the step.
        ``reduction`` is "mean" (over targets != ignore_index) or "sum".
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        h = self._trunk(idx, positions=positions, doc_ids=doc_ids, kv_cache=None)
        h, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        w = self.lm_head.weight
        if not fused:
            logits = F.linear(h, w).float()
            return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction)
        dev = h.device.type
        if torch.is_autocast_enabled(dev):  # what autocast would have done to F.linear's inputs
            dt = torch.get_autocast_dtype(dev)
            h, w = h.to(dt), w.to(dt)
        return LinearCrossEntropy.apply(h, w, t, ignore_index, reduction == "mean")

    def _trunk(
        self,
        idx: Tensor,
        *,
        positions: Tensor | None,
        doc_ids: Tensor | None,
        kv_cache: KVCache | None,
    ) -> Tensor:
        b, t = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if past + t > self.config.context_length:
            raise ValueError(
                f"sequence of {past + t} tokens exceeds context_length={self.config.context_length}"
            )
        attn_mask: Tensor | None = None
        is_causal = True
        if kv_cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids (packed sequences) cannot be combined with a KV cache")
            attn_mask, is_causal = kv_cache.attn_mask(t)
            if positions is None and kv_cache.start is not None:  # else: offset by `past` below
                positions = kv_cache.positions(t)
        elif doc_ids is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
            attn_mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
            is_causal = False
            if positions is None:
                positions = positions_from_doc_ids(doc_ids)
        cos: Tensor | None = None
        sin: Tensor | None = None
        if self.pos_emb is None:
            cos, sin = self._rope(t, positions, past)
            x = self.tok_emb(idx)
        else:  # GPT-2: learned absolute positions added to the input, no rotation later
            x = self.tok_emb(idx) + self.pos_emb(self._positions(t, positions, past, idx.device))
        if (
            kv_cache is not None
            and t == 1
            and cos is not None
            and sin is not None
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(idx.device.type)
        ):  # one decoding step: the lean path (llm_core.decode)
            cos, sin = cos.reshape(-1, 1, cos.shape[-1]), sin.reshape(-1, 1, sin.shape[-1])
            for i, block in enumerate(self.blocks):
                x = decode_step(block, x, cos, sin, attn_mask, kv_cache, i)
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, cos, sin, attn_mask, is_causal, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(t)
        return self.norm(x)

    def _positions(
        self, t: int, positions: Tensor | None, past: int, device: torch.device
    ) -> Tensor:
        """Position ids [T] or [B, T] for the learned position embedding (GPT-2 variant)."""
        if positions is None:
            return torch.arange(past, past + t, device=device)
        if bool((positions >= self.config.context_length).any()):
            raise ValueError(f"positions must be < context_length={self.config.context_length}")
        return positions

    def _rope(self, t: int, positions: Tensor | None, past: int) -> tuple[Tensor, Tensor]:
        """cos/sin broadcastable to [B, T, H, D/2], in the dtype the QKV projection will produce."""
        dev = self.rope_cos.device.type
        dtype = (
            torch.get_autocast_dtype(dev)
            if torch.is_autocast_enabled(dev)
            else self.tok_emb.weight.dtype
        )
        if positions is None:
            cos, sin = self.rope_cos[past : past + t, None], self.rope_sin[past : past + t, None]
        else:
            if bool((positions >= self.config.context_length).any()):
                raise ValueError(f"positions must be < context_length={self.config.context_length}")
            cos, sin = self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None]
        return cos.to(dtype), sin.to(dtype)

    # ------------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights counted once); ``non_embedding`` drops the embeddings.

        The non-embedding count is the "N" of scaling laws (Kaplan et al.). With tied weights the
        LM head is the embedding, so it goes too; so do GPT-2's learned positions (as nanoGPT).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 * N_matmul + 12 * n_layer * d_model * seq_len.

        N_matmul counts every weight that takes part in a matmul (the LM head included, the
        embedding lookup not); the second term is attention's QK^T and AV, counted unmasked as in
        the PaLM appendix and nanoGPT's MFU estimate. Forward is a third of it.
        """
        cfg = self.config
        t = seq_len or cfg.context_length
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        for moe in (b.mlp for b in self.blocks if isinstance(b.mlp, MoE)):  # active experts only
            n_matmul -= (moe.n_experts - moe.top_k) * sum(
                p.numel() for p in moe.experts[0].parameters()
            )
        return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.d_model * t

    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        *,
        start: Tensor | list[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """Shortcut for :meth:`KVCache.for_model`."""
        return KVCache.for_model(self, batch_size, max_len, start=start, dtype=dtype)
