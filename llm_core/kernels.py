"""The CPU/GPU kernel choices behind :mod:`llm_core.model`: what each op runs, and why.

The model is written to be fast in *eager* mode on CPU, fp32 and bf16 autocast alike. At
d_model=384 the GEMMs already run near the cores' peak, so what is left to win is the memory
traffic and kernel count around them; each choice here was measured at the demo shape
(benchmarks/train_throughput.py):

* RoPE rotates the query and key heads of the fused QKV output in one pass, from cos/sin tables
  computed once, through an autograd Function whose backward is the inverse rotation (nothing but
  the tables is saved): :func:`apply_rope`;
* RMSNorm is an autograd Function (3 passes forward, 6 backward, vs. ~5 and ~10 for the CPU
  composite) that writes its output in the autocast dtype, saving the cast before each matmul:
  :class:`RMSNormFn`;
* attention is ``F.scaled_dot_product_attention`` in float32, but explicit baddbmm/softmax/bmm in
  bf16 on CPU, where the fused kernel's forward+backward is ~2x slower: :func:`attention`;
* the training loss computes the LM head and cross-entropy chunk-wise with the gradient formed in
  the forward pass (:class:`LinearCrossEntropy`), instead of materialising float32 [B, T, V]
  logits, their log-softmax and its gradient.

Two CPU choices depend on the machine and the mode rather than the shape:

* bf16 autocast on a CPU without native bf16 GEMMs (AVX2-only parts) runs every matmul as a float32
  GEMM of bf16-rounded operands (:func:`cpu_bf16_kernels`, :class:`Linear`): PyTorch's own
  fallback there was ~20x slower per training step than float32;
* while generation has installed a transposed snapshot of the weights
  (:class:`llm_core.decode.InferenceWeights`), :class:`Linear` multiplies by it: the layout the
  CPU's matrix-vector kernels stream fastest.

The custom Functions are only used when autograd records (:func:`needs_grad`); inference
(generation) calls the same kernels directly.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CPU_BF16_ENV",
    "Linear",
    "LinearCrossEntropy",
    "RMSNormFn",
    "apply_rope",
    "attention",
    "compute_dtype",
    "cpu_bf16_kernels",
    "needs_grad",
    "rotate",
    "weight_t",
]

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


def compute_dtype(x: Tensor) -> torch.dtype:
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


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will record an op on these (no Function overhead when decoding)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class RMSNormFn(torch.autograd.Function):
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


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
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
        return rotate(x, cos, sin)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors  # type: ignore[attr-defined]
        return rotate(grad, cos, -sin), None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [..., D] by the angles whose cos/sin [..., D/2] broadcast against it.

    "Half-split" layout (as in Llama/GPT-NeoX): dimension ``i`` pairs with ``i + D/2``:
    ``out = [x1 cos - x2 sin, x2 cos + x1 sin]``.
    """
    return _RoPEFn.apply(x, cos, sin) if needs_grad(x) else rotate(x, cos, sin)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with two CPU kernel choices.

    * Under bf16 autocast on a CPU without native bf16 GEMMs (:func:`cpu_bf16_kernels`), the
      matmul is a float32 GEMM of bf16-rounded operands, rounded back to bf16. Autograd replays the
      same casts, so gradients are rounded where native bf16 autocast rounds them.
    * While :class:`~llm_core.decode.InferenceWeights` are installed (generation), a CPU call
      without autograd or autocast multiplies by the installed transposed copy of the weight
      (:func:`weight_t` reads it for the lean decoding step).

    Everything else (training, CUDA) is ``F.linear``.
    """

    _wt: Tensor | None = None  # set only inside llm_core.decode.InferenceWeights.installed()

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if torch.is_autocast_enabled("cpu") and _emulated_bf16(x, torch.get_autocast_dtype("cpu")):
            bias = None if self.bias is None else _bf16_as_fp32(self.bias)
            with torch.autocast("cpu", enabled=False):
                out = F.linear(_bf16_as_fp32(x), _bf16_as_fp32(self.weight), bias)
            return out.to(torch.bfloat16)
        wt = self._wt
        if wt is None or needs_grad(x, self.weight) or torch.is_autocast_enabled("cpu"):
            return F.linear(x, self.weight, self.bias)
        if x.dim() == 2 and x.shape[0] in SMALL_BATCH:
            out = rows_mm(x.to(wt.dtype), self)
        else:
            out = torch.matmul(x.to(wt.dtype), wt)
        return out if self.bias is None else out.add_(self.bias)


def weight_t(linear: Linear) -> Tensor:
    """A bias-free Linear's weight as [in, out]: the installed inference copy, else a view."""
    return linear._wt if linear._wt is not None else linear.weight.t()


# Rows per decoding step for which ``weight @ x.T`` beats ``x @ weight_t``. MKL's small-M SGEMM on
# the transposed copy ran at ~20 GFLOP/s at the demo shape (AVX-512 EPYC): the LM head took
# 0.98-1.34 ms for 4 rows against 0.24 ms for one, so batched serving barely paid. The same
# product as [out, in] @ [in, M] took 0.31-0.38 ms; from 8 rows on the two are even.
SMALL_BATCH = range(2, 7)


def rows_mm(x: Tensor, linear: Linear) -> Tensor:
    """``x [M, in]`` times a bias-free Linear's weight, as ``[M, out]`` (contiguous), by the
    faster layout for ``M`` (see :data:`SMALL_BATCH`). Decoding only (no autograd)."""
    if x.shape[0] in SMALL_BATCH and linear.weight.dtype == x.dtype:
        return torch.mm(linear.weight, x.t()).t().contiguous()
    return torch.mm(x, weight_t(linear))


def rows_addmm(residual: Tensor, x: Tensor, linear: Linear) -> Tensor:
    """``residual + x @ weight`` for decoding: fused ``addmm`` in the usual layout, the
    :func:`rows_mm` layout (then one add) for :data:`SMALL_BATCH` rows."""
    if x.shape[0] in SMALL_BATCH and linear.weight.dtype == x.dtype:
        return residual + rows_mm(x, linear)
    return torch.addmm(residual, x, weight_t(linear))


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


class LinearCrossEntropy(torch.autograd.Function):
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
