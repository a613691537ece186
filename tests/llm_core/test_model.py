"""Transformer: shapes, causality, GQA, packed documents, KV cache, fused loss, accounting.

The paths every block family shares run for both ``arch="llama"`` and ``arch="gpt2"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from llm_core.config import ModelConfig
from llm_core.decode import KVCache
from llm_core.model import Transformer, positions_from_doc_ids

V = 97


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny shapes gain nothing from threads, and on a busy shared machine spinning OpenMP
    workers can make them 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        vocab_size=V, context_length=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
        ffn_hidden=48,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def make(seed: int = 0, **kw: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval()


GPT2 = {"arch": "gpt2", "n_kv_head": None}
both_archs = pytest.mark.parametrize("arch", [{}, GPT2], ids=["llama", "gpt2"])


def autocast(enabled: bool) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def assert_grads_close(got: list[torch.Tensor], ref: list[torch.Tensor], tol: float) -> None:
    """Every gradient's largest error, relative to the reference's largest entry, is below tol."""
    for a, b in zip(got, ref, strict=True):
        scale = b.abs().max().clamp_min(1e-12)
        assert ((a - b).abs().max() / scale).item() < tol


def test_shapes_and_dtypes() -> None:
    m = make()
    idx = torch.randint(0, V, (3, 11))
    logits = m(idx)
    assert logits.shape == (3, 11, V) and logits.dtype == torch.float32
    h = m.hidden_states(idx)
    assert h.shape == (3, 11, 32)
    torch.testing.assert_close(m(idx, return_hidden=True), h)
    torch.testing.assert_close(m.lm_head(h), logits)
    with autocast(True):
        assert m(idx).dtype == torch.float32  # logits are float even under autocast


@both_archs
@pytest.mark.parametrize("bf16", [False, True])
def test_causality(arch: dict[str, object], bf16: bool) -> None:
    m = make(**arch)
    idx = torch.randint(0, V, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, V, (2, 8))
    with autocast(bf16):
        a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("bf16", [False, True])
def test_gqa_equals_mha_with_repeated_kv_heads(bf16: bool) -> None:
    gqa = make(n_head=4, n_kv_head=2)
    mha = make(n_head=4, n_kv_head=None)
    sd = gqa.state_dict()
    hd, rep = 8, 2
    for i in range(2):
        w = sd[f"blocks.{i}.attn.qkv.weight"]  # [(4 + 2 + 2) * hd, d]
        q, k, v = w.split((4 * hd, 2 * hd, 2 * hd))
        k, v = (t.view(2, hd, -1).repeat_interleave(rep, 0).reshape(4 * hd, -1) for t in (k, v))
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat((q, k, v))
    mha.load_state_dict(sd)
    assert gqa.blocks[0].attn.qkv.weight.shape[0] == 8 * hd
    assert mha.blocks[0].attn.qkv.weight.shape[0] == 12 * hd
    idx = torch.randint(0, V, (2, 16))
    with autocast(bf16):
        a, b = gqa(idx), mha(idx)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 if not bf16 else 0.05)


def test_positions_from_doc_ids() -> None:
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_doc_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@both_archs
@pytest.mark.parametrize("bf16", [False, True])
def test_packed_documents_equal_separate_runs(arch: dict[str, object], bf16: bool) -> None:
    m = make(**arch)
    d1, d2 = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 9))
    packed = torch.cat((d1, d2), dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 9])
    with autocast(bf16):
        out = m(packed, doc_ids=doc_ids)
        alone1, alone2 = m(d1), m(d2)
    tol = dict(rtol=0, atol=1e-5) if not bf16 else dict(rtol=0, atol=0.05)
    torch.testing.assert_close(out[:, :5], alone1, **tol)
    torch.testing.assert_close(out[:, 5:], alone2, **tol)
    # Without doc_ids the second document sees the first one.
    assert not torch.allclose(m(packed)[:, 5:], m(d2), atol=1e-3)


def test_num_params_and_flops() -> None:
    cfg = tiny()
    m = Transformer(cfg)
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_hidden
    per_layer = d * (cfg.n_head + 2 * cfg.kv_heads) * hd + cfg.n_head * hd * d + 3 * d * f + 2 * d
    expected = V * d + cfg.n_layer * per_layer + d  # tied head counted once, final norm
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - V * d
    n_matmul = cfg.n_layer * (per_layer - 2 * d) + V * d
    assert m.flops_per_token() == 6 * n_matmul + 12 * cfg.n_layer * d * cfg.context_length
    assert m.flops_per_token(8) == 6 * n_matmul + 12 * cfg.n_layer * d * 8


def test_demo_shape_param_count() -> None:
    cfg = ModelConfig(vocab_size=8192, context_length=256, n_layer=6, n_head=6, d_model=384,
                      ffn_hidden=1024)  # fmt: skip
    n = Transformer(cfg).num_params()
    assert 13_000_000 < n < 14_500_000  # "~14M parameters" in the demo profile


def test_tied_and_untied_embeddings() -> None:
    m = make()
    assert m.lm_head.weight is m.tok_emb.weight
    assert "lm_head.weight" in m.state_dict()  # both names, same storage
    assert m.state_dict()["lm_head.weight"].data_ptr() == m.tok_emb.weight.data_ptr()
    u = make(tie_embeddings=False)
    assert u.lm_head.weight is not u.tok_emb.weight
    assert u.num_params() == m.num_params() + V * 32


def test_scaled_residual_init() -> None:
    cfg = ModelConfig(vocab_size=256, context_length=16, n_layer=8, n_head=4, d_model=256,
                      ffn_hidden=512)  # fmt: skip
    torch.manual_seed(0)
    m = Transformer(cfg)
    target = 0.02 / math.sqrt(2 * cfg.n_layer)
    down = torch.cat([b.mlp.down.weight.flatten() for b in m.blocks])
    proj = torch.cat([b.attn.proj.weight.flatten() for b in m.blocks])
    assert abs(down.std().item() - target) < 0.1 * target
    assert abs(proj.std().item() - target) < 0.1 * target
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert all(not hasattr(mod, "bias") or mod.bias is None for mod in m.modules()
               if isinstance(mod, torch.nn.Linear))  # fmt: skip


@both_archs
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_matches_reference(arch: dict[str, object], bf16: bool) -> None:
    m = make(**arch).train()
    idx = torch.randint(0, V, (3, 16))
    tgt = torch.randint(0, V, (3, 16))
    tgt[0, :4] = -100  # ignored positions

    def run(fused: bool, reduction: str = "mean") -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        with autocast(bf16):
            loss = m.loss(idx, tgt, fused=fused, reduction=reduction)
        (loss * 0.5).backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    ref_logits = m(idx).flatten(0, 1)
    for reduction in ("mean", "sum"):
        ref, ref_g = run(False, reduction)
        got, got_g = run(True, reduction)
        if not bf16:
            torch.testing.assert_close(ref, F.cross_entropy(ref_logits, tgt.flatten(),
                                                            reduction=reduction))  # fmt: skip
        torch.testing.assert_close(got, ref, rtol=1e-5 if not bf16 else 1e-2, atol=1e-5)
        assert_grads_close(got_g, ref_g, 1e-4 if not bf16 else 3e-2)


@both_archs
def test_grad_and_inference_paths_agree(arch: dict[str, object]) -> None:
    """RMSNorm/RoPE use autograd Functions only when recording; both paths give the same output."""
    m = make(**arch)
    idx = torch.randint(0, V, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    with torch.inference_mode():
        ref = m(idx)
    torch.testing.assert_close(m(idx), ref)
    torch.testing.assert_close(m(idx, positions=pos), ref)


def test_loss_without_grad() -> None:
    m = make()
    idx = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        a = m.loss(idx, idx)
    torch.testing.assert_close(a, F.cross_entropy(m(idx).flatten(0, 1), idx.flatten()))


@both_archs
@pytest.mark.parametrize("bf16", [False, True])
def test_kv_cache_incremental_equals_full(arch: dict[str, object], bf16: bool) -> None:
    m = make(**arch)
    idx = torch.randint(0, V, (2, 14))
    with torch.inference_mode(), autocast(bf16):
        full = m(idx)
        cache = m.new_kv_cache(2)
        parts = [m(idx[:, :6], kv_cache=cache)]  # prefill
        parts += [m(idx[:, 6:9], kv_cache=cache)]  # a chunk on top of a non-empty cache
        parts += [m(idx[:, t : t + 1], kv_cache=cache) for t in range(9, 14)]  # one at a time
    assert cache.pos == 14
    tol = dict(rtol=0, atol=1e-4) if not bf16 else dict(rtol=0, atol=0.1)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **tol)


@both_archs
def test_kv_cache_left_padding_matches_unpadded_rows(arch: dict[str, object]) -> None:
    m = make(**arch)
    a, b = torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 4))
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat((a, torch.cat((pad, b), dim=1)))
    nxt = torch.randint(0, V, (2, 3))
    with torch.inference_mode():
        cache = m.new_kv_cache(2, start=[0, 5])
        pre = m(batch, kv_cache=cache)
        steps = [m(nxt[:, i : i + 1], kv_cache=cache) for i in range(3)]
        ref_a = m(torch.cat((a, nxt[:1]), dim=1))
        ref_b = m(torch.cat((b, nxt[1:]), dim=1))
    got = torch.cat((pre[:, -1:], *steps), dim=1)  # last prompt position + 3 decode steps
    torch.testing.assert_close(got[0], ref_a[0, -4:], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1], ref_b[0, -4:], rtol=0, atol=1e-4)
    assert torch.isfinite(pre).all()  # pad queries must not produce NaNs
    assert cache.positions(1).tolist() == [[12], [7]]


def test_kv_cache_lazy_dtype_and_limits() -> None:
    m = make()
    cache = KVCache.for_model(m, batch_size=1, max_len=8)
    with torch.inference_mode(), autocast(True):
        m(torch.randint(0, V, (1, 8)), kv_cache=cache)
    assert cache.k[0] is not None and cache.k[0].dtype == torch.bfloat16
    assert cache.k[0].shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="KV cache full|exceeds"):
        m(torch.randint(0, V, (1, 1)), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds context_length"):
        KVCache.for_model(m, batch_size=1, max_len=64)


@both_archs
def test_context_overflow_is_refused(arch: dict[str, object]) -> None:
    m = make(**arch)
    with pytest.raises(ValueError, match="context_length"):
        m(torch.randint(0, V, (1, 33)))
    with pytest.raises(ValueError, match="doc_ids"):
        m(torch.randint(0, V, (1, 4)), doc_ids=torch.zeros(1, 4, dtype=torch.long),
          kv_cache=m.new_kv_cache(1))  # fmt: skip


@both_archs
def test_bf16_autocast_close_to_fp32(arch: dict[str, object]) -> None:
    m = make(**arch)
    idx = torch.randint(0, V, (2, 24))
    ref = m(idx)
    with autocast(True):
        got = m(idx)
    assert (got - ref).abs().max().item() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


@both_archs
def test_training_step_reduces_loss(arch: dict[str, object]) -> None:
    torch.manual_seed(0)
    m = Transformer(tiny(**arch)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    idx = torch.randint(0, V, (2, 16))
    first = None
    for _ in range(12):
        loss = m.loss(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_gpt2_variant_parts() -> None:
    """nanoGPT's GPT-2: learned positions, LayerNorm with bias, GELU MLP, biases, no RoPE."""
    m = make(**GPT2)
    cfg = m.config
    names = set(m.state_dict())
    assert {"pos_emb.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias",
            "blocks.0.mlp.c_fc.weight", "blocks.0.mlp.c_proj.bias", "blocks.0.attn_norm.bias",
            "norm.bias"} <= names  # fmt: skip
    assert not any("gate" in n or "rope" in n for n in names) and not hasattr(m, "rope_cos")
    assert isinstance(m.norm, torch.nn.LayerNorm) and m.lm_head.bias is None
    d, f = cfg.d_model, cfg.ffn_hidden
    per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # attn, mlp, two LayerNorms
    expected = V * d + cfg.context_length * d + cfg.n_layer * per_layer + 2 * d
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - V * d - cfg.context_length * d
    # Position matters (learned table), and positions past the table are refused.
    idx = torch.randint(0, V, (1, 6))
    assert not torch.allclose(m(idx), m(idx, positions=torch.arange(6)[None] + 3))
    with pytest.raises(ValueError, match="positions must be < context_length"):
        m(idx, positions=torch.arange(6)[None] + 30)
    x = torch.randn(2, 5, d)
    mlp = m.blocks[0].mlp
    ref = mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
    torch.testing.assert_close(mlp(x), ref)


def test_gpt2_init_is_nanogpts() -> None:
    cfg = ModelConfig(vocab_size=256, context_length=16, n_layer=8, n_head=4, d_model=256,
                      ffn_hidden=1024, arch="gpt2")  # fmt: skip
    torch.manual_seed(0)
    m = Transformer(cfg)
    target = 0.02 / math.sqrt(2 * cfg.n_layer)
    c_proj = torch.cat([b.mlp.c_proj.weight.flatten() for b in m.blocks])
    assert abs(c_proj.std().item() - target) < 0.1 * target
    assert abs(m.pos_emb.weight.std().item() - 0.02) < 0.002  # type: ignore[union-attr]
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert all(mod.bias is None or not mod.bias.any() for mod in linears)
    assert all(
        bool((n.weight == 1).all()) for n in m.modules() if isinstance(n, torch.nn.LayerNorm)
    )


def test_arch_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown model arch 'mamba'"):
        tiny(arch="mamba")
    with pytest.raises(ValueError, match="multi-head attention"):
        tiny(arch="gpt2", n_kv_head=2)
    assert tiny(arch="gpt2", n_kv_head=4, d_model=36, n_head=4).head_dim == 9  # no RoPE parity
    with pytest.raises(ValueError, match="even for rotary"):
        tiny(d_model=36, n_head=4)
    assert (
        ModelConfig.from_dict({k: v for k, v in tiny().to_dict().items() if k != "arch"}) == tiny()
    )


# ---------------------------------------------------------------- CPU kernel choices (whole model)


@both_archs
def test_emulated_bf16_matches_native_bf16(
    arch: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float32 GEMMs on bf16-rounded operands (CPUs without native bf16) give what native bf16
    autocast gives, to bf16 precision: the loss, every gradient and the logits."""
    import llm_core.kernels as kernels_mod

    m = make(**arch).train()
    idx = torch.randint(0, V, (3, 16))
    tgt = torch.randint(0, V, (3, 16))

    def run(kernels: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(kernels_mod, "cpu_bf16_kernels", lambda: kernels)
        m.zero_grad(set_to_none=True)
        with autocast(True):
            loss = m.loss(idx, tgt)
            logits = m(idx)
        loss.backward()
        assert logits.dtype == torch.float32
        return loss.detach(), logits.detach(), [p.grad.clone() for p in m.parameters()]

    (nat_loss, nat_logits, nat_g), (emu_loss, emu_logits, emu_g) = run("native"), run("emulated")
    torch.testing.assert_close(emu_loss, nat_loss, rtol=1e-2, atol=1e-3)
    assert (emu_logits - nat_logits).abs().max().item() < 0.05
    assert all(a.dtype == b.dtype == torch.float32 for a, b in zip(emu_g, nat_g, strict=True))
    assert_grads_close(emu_g, nat_g, 5e-2)
    # ... and it is bf16, not float32, arithmetic: the roundings are there.
    m.zero_grad(set_to_none=True)
    fp32_loss = m.loss(idx, tgt).detach()
    assert emu_loss.item() != fp32_loss.item()
