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

Written to be fast in *eager* mode on CPU, fp32 and bf16 autocast alike. At d_model=384 the GEMMs
already run near the cores' peak, so what is left to win is the memory traffic and kernel count
around them; each choice below was measured at the demo shape (benchmarks/train_throughput.py):

* one fused QKV projection; RoPE rotates the query and key heads of its output in one pass, from
  cos/sin tables computed once (non-persistent buffers: not in checkpoints), through an autograd
  Function whose backward is the inverse rotation (nothing but the tables is saved);
* gate and up stay two GEMMs: a fused gate/up GEMM was no faster, and slicing its output in two
  makes the SwiGLU elementwise kernels run on strided halves, ~1.5-2x slower than on contiguous
  tensors;
* RMSNorm is an autograd Function (3 passes forward, 6 backward, vs. ~5 and ~10 for the CPU
  composite) that writes its output in the autocast dtype, saving the cast before each matmul;
* attention is ``F.scaled_dot_product_attention`` in float32, but explicit baddbmm/softmax/bmm in
  bf16 on CPU, where the fused kernel's forward+backward is ~2x slower;
* :meth:`Transformer.loss` computes the LM head and cross-entropy chunk-wise with the gradient
  formed in the forward pass (:class:`_LinearCrossEntropy`), instead of materialising float32
  [B, T, V] logits, their log-softmax and its gradient.

Two CPU choices depend on the machine and the mode rather than the shape:

* bf16 autocast on a CPU without native bf16 GEMMs (AVX2-only parts) runs every matmul as a float32
  GEMM of bf16-rounded operands (:func:`cpu_bf16_kernels`, :class:`Linear`): PyTorch's own
  fallback there was ~20x slower per training step than float32;
* generation decodes with a snapshot of the weights transposed for the matrix-vector kernels
  (:class:`InferenceWeights`), and a single decoding step takes a lean path through each block
  (:meth:`Block.decode_step`).

The custom Functions are only used when autograd records; inference (generation) calls the same
kernels directly. Packed sequences (``doc_ids``) get a block-diagonal causal mask and
per-document positions; batched decoding uses :class:`KVCache`, which supports left padding
through per-row start offsets.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_core.config import ModelConfig

__all__ = [
    "InferenceWeights",
    "KVCache",
    "Linear",
    "RMSNorm",
    "Transformer",
    "cpu_bf16_kernels",
    "positions_from_doc_ids",
]

#: Environment override for :func:`cpu_bf16_kernels`: ``native``, ``emulated`` or ``auto``.
CPU_BF16_ENV = "LLM_CORE_CPU_BF16"


@functools.cache
def cpu_bf16_kernels() -> str:
    """How bf16 autocast runs its GEMMs on this CPU: ``"native"`` or ``"emulated"``.

    oneDNN's bf16 GEMMs need AVX-512 (with AVX512-BF16/AMX they are twice as fast as float32).
    Without it, e.g. on AVX2-only parts, PyTorch falls back to generic bf16 loops: measured 7x
    slower than float32 per GEMM on an AVX2 EPYC, which made a bf16 training step 20x slower
    than a float32 one. There "emulated" runs every matmul as a float32 GEMM on bf16-rounded
    operands and rounds the result to bf16: the roundings of bf16 autocast, at float32 speed.
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is PyTorch's own test for the native path;
    ``LLM_CORE_CPU_BF16=native|emulated`` overrides it (read once per process).
    """
    mode = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if mode in ("native", "emulated"):
        return mode
    if mode != "auto":
        raise ValueError(f"{CPU_BF16_ENV} must be native, emulated or auto, got {mode!r}")
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        native = bool(torch.cpu._is_avx512_bf16_supported())
    return "native" if native else "emulated"


def _emulated_bf16(t: Tensor, dtype: torch.dtype) -> bool:
    """Whether a matmul on ``t`` computed in ``dtype`` takes the emulated bf16 path."""
    return t.device.type == "cpu" and dtype == torch.bfloat16 and cpu_bf16_kernels() == "emulated"


def _bf16_as_fp32(t: Tensor) -> Tensor:
    """``t`` rounded to bf16 and widened back: a float32 operand with bf16's precision."""
    return t.to(torch.bfloat16).float()


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


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding of a batch.

    Each layer owns ``k`` and ``v`` tensors of shape [B, kv_heads, max_len, head_dim]; ``pos``
    counts the columns already written (shared by all rows: rows are aligned on the right, so a
    batch of prompts of different lengths is *left padded*). ``start[b]`` is the number of pad
    columns in front of row ``b``: keys before it are masked out, and row ``b``'s RoPE positions
    start at 0 on its first real token, so a padded row decodes exactly like the same row alone.

    ``dtype=None`` allocates on the first write with the dtype of the keys written, so decoding
    under bf16 autocast gets a bf16 cache without the caller having to know.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        start: Tensor | list[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.n_layer, self.batch_size, self.kv_heads = n_layer, batch_size, kv_heads
        self.max_len, self.head_dim = max_len, head_dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.pos = 0
        self.start: Tensor | None = None
        if start is not None:
            s = torch.as_tensor(start, dtype=torch.long, device=self.device).reshape(batch_size)
            if bool((s < 0).any()):
                raise ValueError("start offsets must be >= 0")
            self.start = s if bool((s > 0).any()) else None  # all-zero: take the mask-free path
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer
        if dtype is not None:
            for i in range(n_layer):
                self._allocate(i, dtype)

    @classmethod
    def for_model(
        cls,
        model: Transformer,
        batch_size: int,
        max_len: int | None = None,
        *,
        start: Tensor | list[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache shaped for ``model``; ``max_len`` defaults to (and may not exceed) its context."""
        cfg = model.config
        max_len = max_len or cfg.context_length
        if max_len > cfg.context_length:
            raise ValueError(f"max_len={max_len} exceeds context_length={cfg.context_length}")
        device = model.tok_emb.weight.device
        return cls(
            cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim,
            start=start, device=device, dtype=dtype,
        )  # fmt: skip

    def _allocate(self, layer: int, dtype: torch.dtype) -> None:
        shape = (self.batch_size, self.kv_heads, self.max_len, self.head_dim)
        self.k[layer] = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v[layer] = torch.zeros(shape, dtype=dtype, device=self.device)

    def reset(self) -> None:
        """Forget everything written (buffers are kept for reuse)."""
        self.pos = 0

    @property
    def remaining(self) -> int:
        return self.max_len - self.pos

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` [B, kv_heads, T, D] at ``pos`` and return all keys/values so far.

        ``pos`` itself is advanced once per forward by :meth:`advance`, after the last layer.
        """
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {t} tokens > max_len={self.max_len}")
        if self.k[layer] is None:
            self._allocate(layer, self.dtype or k.dtype)
        ck, cv = self.k[layer], self.v[layer]
        assert ck is not None and cv is not None
        ck[:, :, self.pos : self.pos + t] = k
        cv[:, :, self.pos : self.pos + t] = v
        end = self.pos + t
        return ck[:, :, :end], cv[:, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t

    def positions(self, t: int) -> Tensor:
        """RoPE positions [B, t] of the next ``t`` columns (0 at each row's first real token)."""
        cols = torch.arange(self.pos, self.pos + t, device=self.device)
        if self.start is None:
            return cols.expand(self.batch_size, t)
        return (cols[None, :] - self.start[:, None]).clamp_min(0)

    def attn_mask(self, t: int) -> tuple[Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for ``t`` new queries against the ``pos + t`` cached keys.

        Returns no mask where SDPA can do without one (no padding and either a single query or an
        empty cache), because the unmasked kernels are the fast ones.
        """
        end = self.pos + t
        if self.start is None:
            if t == 1:
                return None, False
            if self.pos == 0:
                return None, True
        q_idx = torch.arange(self.pos, end, device=self.device)[:, None]  # [t, 1]
        k_idx = torch.arange(end, device=self.device)[None, :]  # [1, end]
        mask = k_idx <= q_idx  # causal, [t, end]
        if self.start is None:
            return mask, False
        real = k_idx[None] >= self.start[:, None, None]  # [B, 1, end]: not a pad column
        # A pad query attends to itself only: its output is never used, but an all-masked row
        # would turn into NaNs inside SDPA.
        mask = (mask[None] & real) | (k_idx == q_idx)[None]
        return mask[:, None], False  # [B, 1, t, end]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` will run in: the autocast dtype when autocast is on."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _rms_norm(
    x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (x * rstd * weight in ``out_dtype``, x * rstd, rstd); statistics in >= float32."""
    acc = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    rstd = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    xhat = x * rstd
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    return torch.mul(xhat, weight, out=out), xhat, rstd


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will record an op on these (no Function overhead when decoding)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward, emitting the dtype the next matmul wants.

    On CPU ``F.rms_norm`` is a composite (pow, mean, rsqrt, mul, mul) in both directions. Here the
    forward is 3 passes over [N, d] (norm, scale, gain-and-cast) and saves the normalised input for
    a 6-pass backward; the output is written directly in the autocast dtype, so neither autocast's
    cast before the next matmul nor its cast-back in the backward pass is needed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        eps: float,
        out_dtype: torch.dtype,
    ) -> Tensor:
        out, xhat, rstd = _rms_norm(x, weight, eps, out_dtype)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.x_dtype = x.dtype  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        xhat, rstd, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        # y = xhat * w, xhat = x * rstd  =>  dx = rstd * (g*w - xhat * mean(g*w*xhat)).
        grad_weight = None
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            grad_weight = (grad * xhat).flatten(0, -2).sum(0, dtype=weight.dtype)
        gw = grad * weight.to(xhat.dtype)  # float32 even for a bf16 grad
        dot = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze(-1).div_(-xhat.shape[-1])
        grad_x = torch.addcmul(gw, xhat, dot).mul_(rstd)
        return grad_x.to(ctx.x_dtype), grad_weight, None, None  # type: ignore[attr-defined]


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
        if _needs_grad(x, self.weight):
            return _RMSNormFn.apply(x, self.weight, self.eps, _compute_dtype(x))
        # Inference (decoding one token at a time): fewest Python-level calls wins.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps).to(_compute_dtype(x))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """[x1 cos - x2 sin, x2 cos + x1 sin] in 4 kernels writing straight into the output halves."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2 = x.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _RoPEFn(torch.autograd.Function):
    """Rotary embedding as an autograd Function: 4 kernels forward, 4 backward.

    A rotation's gradient is the inverse rotation (the same code with ``-sin``), so nothing but the
    small cos/sin tables is saved; plain autograd would save and replay ~7 kernels each way.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, cos: Tensor, sin: Tensor
    ) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors  # type: ignore[attr-defined]
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [..., D] by the angles whose cos/sin [..., D/2] broadcast against it.

    "Half-split" layout (as in Llama/GPT-NeoX): dimension ``i`` pairs with ``i + D/2``:
    ``out = [x1 cos - x2 sin, x2 cos + x1 sin]``.
    """
    return _RoPEFn.apply(x, cos, sin) if _needs_grad(x) else _rotate(x, cos, sin)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with two CPU kernel choices.

    * Under bf16 autocast on a CPU without native bf16 GEMMs (:func:`cpu_bf16_kernels`), the
      matmul is a float32 GEMM of bf16-rounded operands, rounded back to bf16. Autograd replays the
      same casts, so gradients are rounded where native bf16 autocast rounds them.
    * While :class:`InferenceWeights` are installed (generation), a CPU call without autograd or
      autocast multiplies by the installed transposed copy of the weight.

    Everything else (training, CUDA) is ``F.linear``.
    """

    _wt: Tensor | None = None  # set only inside InferenceWeights.installed()

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if torch.is_autocast_enabled("cpu") and _emulated_bf16(x, torch.get_autocast_dtype("cpu")):
            bias = None if self.bias is None else _bf16_as_fp32(self.bias)
            with torch.autocast("cpu", enabled=False):
                out = F.linear(_bf16_as_fp32(x), _bf16_as_fp32(self.weight), bias)
            return out.to(torch.bfloat16)
        wt = self._wt
        if wt is None or _needs_grad(x, self.weight) or torch.is_autocast_enabled("cpu"):
            return F.linear(x, self.weight, self.bias)
        out = torch.matmul(x.to(wt.dtype), wt)
        return out if self.bias is None else out.add_(self.bias)


class InferenceWeights:
    """A snapshot of a model's linear weights, transposed to [in, out] and contiguous.

    Decoding one sequence is a chain of matrix-vector products that stream every weight from
    memory, and MKL's vector-times-matrix kernel on this layout ran 1.7x faster (weights not in
    cache) to 3x faster (in cache) than ``F.linear``'s dot-product-per-row layout, measured on an
    AVX2 EPYC at the demo shape. Generation takes a snapshot when it starts (one pass over the
    weights) and installs it around each forward pass only, so nothing outside that call ever sees
    it: a policy trained between generation calls is never decoded with stale weights (in-place
    optimiser updates, fused AdamW's included, need not bump a version counter we could check).
    CPU only; on other devices the snapshot is empty.
    """

    def __init__(self, model: nn.Module) -> None:
        self.pairs = [
            (m, m.weight.detach().t().contiguous())
            for m in model.modules()
            if isinstance(m, Linear) and m.weight.device.type == "cpu"
        ]

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        # object.__setattr__: nn.Module's own costs microseconds per call, and this runs twice
        # per generated token for every linear layer.
        for module, wt in self.pairs:
            object.__setattr__(module, "_wt", wt)
        try:
            yield
        finally:
            for module, _ in self.pairs:
                object.__setattr__(module, "_wt", None)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """Softmax attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D] (Hkv divides H).

    ``attn_mask`` is boolean (True = may attend), broadcastable to [B, H, Tq, Tk]; ``is_causal``
    asks for the standard lower-triangular mask instead (Tq == Tk).

    ``F.scaled_dot_product_attention`` (fused kernel) serves float32 and every non-CPU device. For
    bf16/fp16 on CPU we spell attention out as baddbmm (scale and mask folded into the GEMM) ->
    softmax -> bmm: measured at the demo shape, forward+backward is ~2x faster than the fused
    kernel's, whose blocked bf16 loops don't reach oneDNN's GEMM throughput. Numerics are those of
    the common "eager" attention: scores and probabilities in bf16, softmax accumulated in float32.
    """
    b, h, tq, d = q.shape
    if _emulated_bf16(q, q.dtype):
        # No native bf16 GEMMs (see cpu_bf16_kernels): the fused float32 kernel on the bf16
        # values, its output rounded back to bf16.
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=attn_mask, is_causal=is_causal,
                enable_gqa=k.shape[1] != h,
            )  # fmt: skip
        return y.to(torch.bfloat16)
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=k.shape[1] != h
        )
    if k.shape[1] != h:
        rep = h // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    tk = k.shape[2]
    if is_causal:
        attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is None:
        bias = q.new_zeros(()).expand(b * h, tq, tk)
    else:
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill_(~attn_mask, float("-inf")).expand(b, h, tq, tk)
        bias = bias.reshape(b * h, tq, tk)
    scores = torch.baddbmm(
        bias, q.reshape(b * h, tq, d), k.reshape(b * h, tk, d).transpose(1, 2), alpha=d**-0.5
    )
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(b * h, tk, d)).view(b, h, tq, d)


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
        self.mlp: MLP | GeluMLP = GeluMLP(config) if config.arch == "gpt2" else MLP(config)

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

    def decode_step(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None,
        kv_cache: KVCache,
        layer: int,
    ) -> Tensor:
        """:meth:`forward` for one new token per row against the KV cache (Llama blocks, no
        autograd, no autocast): the same kernels, in fewer calls.

        Decoding a single sequence costs a few microseconds of Python and dispatch per call, and
        a step makes ~40 calls per layer through the modules. Here it is ~15: no module or
        autograd-Function layers, the attention and MLP residual adds folded into ``addmm``, and
        the KV cache written straight from the fused QKV output. Measured +18% tokens/s at the
        demo shape, batch 1. ``cos``/``sin``: [B or 1, 1, head_dim / 2].
        """
        b, _, d = x.shape
        attn, mlp = self.attn, self.mlp
        assert isinstance(mlp, MLP) and isinstance(self.attn_norm, RMSNorm)
        assert isinstance(self.mlp_norm, RMSNorm)
        nh, nkv, hd = attn.n_head, attn.n_kv, attn.head_dim
        x = x.view(b, d)
        h = F.rms_norm(x, (d,), self.attn_norm.weight, self.attn_norm.eps)
        qkv = torch.mm(h, _weight_t(attn.qkv)).view(b, nh + 2 * nkv, hd)
        qk = _rotate(qkv[:, : nh + nkv], cos, sin)
        k, v = kv_cache.update(layer, qk[:, nh:, None], qkv[:, nh + nkv :, None])
        y = attention(qk[:, :nh, None], k, v, attn_mask, False)  # [B, H, 1, D]
        x = torch.addmm(x, y.reshape(b, nh * hd), _weight_t(attn.proj))
        h = F.rms_norm(x, (d,), self.mlp_norm.weight, self.mlp_norm.eps)
        gate = F.silu(torch.mm(h, _weight_t(mlp.gate))).mul_(torch.mm(h, _weight_t(mlp.up)))
        return torch.addmm(x, gate, _weight_t(mlp.down)).view(b, 1, d)


def _weight_t(linear: Linear) -> Tensor:
    """A bias-free Linear's weight as [in, out]: the installed inference copy, else a view."""
    return linear._wt if linear._wt is not None else linear.weight.t()


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ w.T`` against ``targets`` with the backward pass done up front.

    The loss is the last op of the graph, so its gradient w.r.t. the logits (softmax minus one-hot)
    is known during the forward pass. One GEMM writes the logits into a buffer in the compute
    dtype; then, chunk by chunk (cache-sized), each block of rows is upcast, log-softmaxed, its loss
    summed, and overwritten in place with its logit gradient. The two gradient GEMMs run once on
    that buffer and the backward pass only rescales. Compared with
    ``F.cross_entropy(F.linear(h, w).float())`` it is the same three GEMMs and the same numerics
    (logits rounded to the compute dtype, softmax in float32), with one [N, V] tensor alive instead
    of four (two of them float32) and about five fewer full passes over [N, V] memory.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        h: Tensor,
        w: Tensor,
        targets: Tensor,
        ignore_index: int,
        mean: bool,
    ) -> Tensor:
        n, v = h.shape[0], w.shape[0]
        chunk = max(64, (1 << 21) // v)  # ~8 MB of float32 per block of rows
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        valid = targets != ignore_index
        all_valid = bool(valid.all())
        acc_dtype = torch.promote_types(h.dtype, torch.float32)  # softmax in >= float32
        total = torch.zeros((), dtype=acc_dtype, device=h.device)
        # Without native bf16 GEMMs (see cpu_bf16_kernels) the three GEMMs run in float32 on the
        # bf16 operands, and the logit buffer stays float32 (one rounding fewer than native).
        h_mm, w_mm = (h.float(), w.float()) if _emulated_bf16(h, h.dtype) else (h, w)
        with torch.autocast(h.device.type, enabled=False):
            buf = torch.mm(h_mm, w_mm.t())  # logits, then (in place) their gradient
            for s in range(0, n, chunk):
                rows = buf[s : s + chunk]
                tc = targets[s : s + chunk].clamp_min(0)[:, None]
                # softmax(dtype=float32) straight from the bf16 block: measured ~40% cheaper
                # than log_softmax of an upcast copy followed by exp.
                p = torch.softmax(rows, dim=1, dtype=acc_dtype)
                p_t = p.gather(1, tc)
                nll = -p_t.log().squeeze(1)
                tiny = p_t.squeeze(1) < 1e-30  # log(p) would lose precision or be -inf there
                if bool(tiny.any()):
                    z = rows[tiny].to(acc_dtype)
                    nll[tiny] = torch.logsumexp(z, dim=1) - z.gather(1, tc[tiny]).squeeze(1)
                total += nll.sum() if all_valid else (nll * valid[s : s + chunk]).sum()
                if not need_grad:
                    continue
                p.scatter_add_(1, tc, torch.full(tc.shape, -1.0, dtype=p.dtype, device=p.device))
                if not all_valid:
                    p.mul_(valid[s : s + chunk, None])
                rows.copy_(p)
            grad_h = grad_w = None
            if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
                grad_h = torch.mm(buf, w_mm).to(h.dtype)
            if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
                grad_w = torch.mm(buf.t(), h_mm).to(w.dtype)
        denom = valid.sum().clamp_min(1).to(acc_dtype) if mean else total.new_ones(())
        ctx.save_for_backward(grad_h, grad_w, denom)
        return total / denom

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, denom = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = grad_out / denom
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * scale.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None


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
            nn.init.normal_(block.mlp.out_proj.weight, mean=0.0, std=proj_std)

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
        :class:`_LinearCrossEntropy`). That saves ~5 full passes over a [B*T, V] float32 tensor
        per step and the page faults of allocating them, which on CPU is a large share of the step.
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
        return _LinearCrossEntropy.apply(h, w, t, ignore_index, reduction == "mean")

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
        ):  # one decoding step: the lean path
            cos, sin = cos.reshape(-1, 1, cos.shape[-1]), sin.reshape(-1, 1, sin.shape[-1])
            for i, block in enumerate(self.blocks):
                x = block.decode_step(x, cos, sin, attn_mask, kv_cache, i)
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
