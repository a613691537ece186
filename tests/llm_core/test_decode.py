"""Incremental decoding: the transposed weight snapshot and the lean one-token block step."""

from __future__ import annotations

import pytest
import torch

from llm_core.config import ModelConfig
from llm_core.decode import InferenceWeights, decode_step
from llm_core.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97
both_archs = pytest.mark.parametrize(
    "arch", [{}, {"arch": "gpt2", "n_kv_head": None}], ids=["llama", "gpt2"]
)


def make(**kw: object) -> Transformer:
    torch.manual_seed(0)
    base: dict[str, object] = dict(
        vocab_size=V, context_length=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
        ffn_hidden=48,
    )  # fmt: skip
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()  # type: ignore[arg-type]


@both_archs
def test_inference_weights_are_a_scoped_snapshot(arch: dict[str, object]) -> None:
    """Installed transposed weights give the plain path's outputs, are used only inside the
    context and never by autograd, and a snapshot does not follow later weight updates (fused
    AdamW updates in place without bumping the version counter)."""
    m = make(**arch)
    idx = torch.randint(0, V, (2, 12))
    with torch.inference_mode():
        ref = m(idx)
    snap = InferenceWeights(m)
    assert len(snap.pairs) == sum(isinstance(x, torch.nn.Linear) for x in m.modules())
    with snap.installed(), torch.inference_mode():
        torch.testing.assert_close(m(idx), ref)
    assert all(mod._wt is None for mod, _ in snap.pairs)
    with snap.installed():  # autograd records: the parameters themselves are used
        m.train()
        loss = m.loss(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    torch.optim.AdamW(m.parameters(), lr=0.1, fused=True).step()
    with torch.inference_mode():
        moved = m(idx)
    assert not torch.allclose(moved, ref)
    with InferenceWeights(m).installed(), torch.inference_mode():
        torch.testing.assert_close(m(idx), moved)


@torch.inference_mode()
def test_decode_step_matches_block_forward() -> None:
    """The lean step is the block's forward for one new token per row: same output, same cache."""
    m = make()
    block = m.blocks[0]
    x = torch.randn(2, 1, 32)
    cos, sin = m.rope_cos[3:4].reshape(1, 1, -1), m.rope_sin[3:4].reshape(1, 1, -1)
    k0, v0 = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    caches = [m.new_kv_cache(2, start=[0, 1]) for _ in range(2)]
    for c in caches:  # three earlier columns, the first of them a pad column in row 1
        c.update(0, k0, v0)
        c.advance(3)
    mask, _ = caches[0].attn_mask(1)
    ref = block(x, cos[:, :, None], sin[:, :, None], mask, False, caches[0], 0)
    got = decode_step(block, x, cos, sin, mask, caches[1], 0)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(caches[1].k[0], caches[0].k[0])
    torch.testing.assert_close(caches[1].v[0], caches[0].v[0])
