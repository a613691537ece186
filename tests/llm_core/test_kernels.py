"""Kernel choices: the CPU bf16 path switch and the fused LM head + cross-entropy.

The kernels' effect on a whole model (emulated vs. native bf16, the fused loss against the
reference) is tested through the Transformer in test_model.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_core.kernels import CPU_BF16_ENV, LinearCrossEntropy, cpu_bf16_kernels

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cpu_bf16_kernels_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        for mode in ("native", "emulated"):
            monkeypatch.setenv(CPU_BF16_ENV, mode)
            cpu_bf16_kernels.cache_clear()
            assert cpu_bf16_kernels() == mode
        monkeypatch.setenv(CPU_BF16_ENV, "fast")
        cpu_bf16_kernels.cache_clear()
        with pytest.raises(ValueError, match=CPU_BF16_ENV):
            cpu_bf16_kernels()
        monkeypatch.delenv(CPU_BF16_ENV)
        cpu_bf16_kernels.cache_clear()
        assert cpu_bf16_kernels() in ("native", "emulated")
    finally:
        cpu_bf16_kernels.cache_clear()


def test_fused_loss_with_vanishing_probabilities() -> None:
    """Targets whose softmax probability underflows still get the exact loss and gradient."""
    torch.manual_seed(0)
    h = torch.randn(6, 8, requires_grad=True)
    w = (torch.randn(5, 8) * 30).requires_grad_()  # logit gaps of hundreds: p(target) ~ 0
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    ref = F.cross_entropy(h @ w.t(), t)
    gh, gw = torch.autograd.grad(ref, (h, w))
    got = LinearCrossEntropy.apply(h, w, t, -100, True)
    assert torch.isfinite(got) and ref.item() > 50
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got, (h, w)), (gh, gw), strict=True):
        torch.testing.assert_close(a, b)
