"""benchmarks/gpu_pretrain.py without a GPU: its arguments, the FLOPs-per-token and MFU
arithmetic (checked against the gpt2-124m model's own parameters and a figure worked by hand),
the clear refusal on a machine without CUDA, and its whole loop on the CPU (``--smoke``)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_pretrain as bench
from llm_core.model import Transformer

HAS_CUDA = torch.cuda.is_available()


def test_arguments() -> None:
    args = bench.parse_args([])
    assert (args.profile, args.steps, args.warmup, args.dtype) == ("gpt2-124m", 300, 30, "bfloat16")
    assert not args.no_compile and args.shards is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "10", "--warmup", "10"])
    smoke = bench.parse_args(["--smoke"])
    assert smoke.profile == "tiny" and smoke.no_compile and smoke.steps > smoke.warmup


def test_flops_per_token_of_gpt2_124m() -> None:
    cfg = bench.model_config("gpt2-124m")
    assert (cfg.n_layer, cfg.d_model, cfg.context_length, cfg.vocab_size) == (12, 768, 1024, 32768)
    fpt = bench.flops_per_token(cfg)
    # By hand: per block qkv 3·768² + out 768² + SwiGLU 3·768·2048 = 7,077,888 weights; ×12,
    # plus the (tied) head 32768·768: 110,100,480 matmul weights. 6× that, plus attention's
    # 12·L·d·T = 12·12·768·1024.
    assert fpt == 6 * 110_100_480 + 12 * 12 * 768 * 1024 == 773_849_088
    # ... and from the model's parameters: everything but the norms' gains is a matmul weight
    # (the embedding is the tied head).
    with torch.device("meta"):
        model = Transformer(cfg)
    gains = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    assert fpt == 6 * (model.num_params() - gains) + 12 * cfg.n_layer * cfg.d_model * 1024
    assert bench.flops_per_token(cfg, 512) == fpt - 12 * 12 * 768 * 512


def test_mfu_arithmetic() -> None:
    fpt = 773_849_088
    assert bench.mfu(400_000, fpt, 989e12) == pytest.approx(0.31299, abs=1e-5)
    assert bench.mfu(0, fpt, 989e12) == 0
    with pytest.raises(ValueError, match="peak"):
        bench.mfu(1.0, fpt, 0)


@pytest.mark.skipif(HAS_CUDA, reason="impossible in CI: checks the refusal without CUDA")
def test_without_cuda_it_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "measured nothing" in err


def test_smoke_runs_the_loop_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--smoke"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["smoke"] is True and res["steps"] == 6 and res["timed_windows"] == 2
    assert res["tokens_per_s"] > 0 and 0 < res["mfu"] < 1
    assert res["flops_per_token"] == bench.flops_per_token(bench.model_config("tiny"))
