"""Training and generation throughput of llm_core's Transformer on CPU, beside Hugging Face Llama.

At the demo shape (6 layers, d=384, 6 heads, ffn 1024, vocab 8192, context 256, batch 8) it measures
one full training step (forward + backward + AdamW) of

* ours: ``llm_core.model.Transformer`` with its training entry point ``model.loss``;
* Hugging Face ``LlamaForCausalLM`` built to the same shape (tied embeddings, no biases, SwiGLU
  with the same ffn width, RoPE theta, RMSNorm eps, ``attn_implementation="sdpa"``), trained the
  way its users do: ``model(input_ids, labels=..., shift_labels=...).loss`` (loss over the same
  B*T targets as ours),

in float32 and under bf16 autocast, with identical optimisers (``torch.optim.AdamW``). Then
greedy generation of 256 new tokens with and without the KV cache, for one prompt and for a
batch of 8 (the demo shape's batch). A single sequence decodes at the speed weights stream from
memory (every step reads all 55 MB of fp32 weights for one token), so batch 1 shows the floor of
the cache's gain and batch 8 what it gives when the weights are shared by several rows.

Fairness on a noisy shared machine: every configuration gets warmup steps (not timed), then the
timed steps are *interleaved*: each round runs one step of every configuration in a random order,
so a burst of load from a neighbour hits all of them alike. Throughput is computed from the median
step time; the ours/HF ratio is the median of per-round ratios (each round's two steps ran back to
back), which cancels most of the drift. Also reported: the best-case (minimum-time) ratio and the
ratio of process CPU seconds per step, which barely moves when other processes steal the cores.

MFU = achieved FLOP/s / peak. Achieved FLOPs per token = ``Transformer.flops_per_token`` (6*N plus
the 12*L*d*T attention term; the same model shape, so the same figure for HF). The default peak
is an estimate for the cores in use: threads x 3.0 GHz x 32 FP32 FLOP/cycle (two 256-bit FMA pipes,
e.g. Zen 4 / Skylake-class AVX-512 parts running 256-bit datapaths), and twice that for bf16 where
the CPU has AVX512-BF16 or AMX (two multiply-adds per float32 lane). Pass ``--peak-flops`` (and
``--peak-flops-bf16``) for your machine.

bf16 on CPUs without native bf16 GEMMs (AVX2-only parts: no AVX-512): PyTorch's bf16 GEMMs fall
back to generic loops there, ~7x slower than float32 per GEMM, and a bf16 autocast training step
of *either* model becomes ~20x slower than its float32 step. Our model then runs every matmul as a
float32 GEMM of bf16-rounded operands (``llm_core.model.cpu_bf16_kernels`` says which path this
CPU takes; the JSON records it as ``cpu_bf16_kernels``); Hugging Face's model takes PyTorch's
path. On such a CPU the bf16 ratio measures that kernel choice, not the model code: compare the
fp32 ratio for the latter.

OpenMP threads: unless ``OMP_WAIT_POLICY`` is already set, this script sets it to PASSIVE before
torch loads OpenMP. With the default (spinning) policy, on a machine whose cores are shared with
other work, a thread waiting at a barrier for a descheduled sibling burns its time slice; we
measured 3-7x lower throughput for *both* models that way on the 2-core development VM. On an idle
machine PASSIVE costs a little per parallel region; run with ``OMP_WAIT_POLICY=ACTIVE`` to compare.
The policy, the thread count and the load average are recorded in the JSON.

The last line printed is one JSON object with every figure. Runtime on 2 cores: ~1-3 minutes
with the defaults (``--steps`` sets the timed rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see above)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_core.config import ModelConfig  # noqa: E402
from llm_core.generate import generate  # noqa: E402
from llm_core.model import Transformer, cpu_bf16_kernels  # noqa: E402
from llm_core.trainer import cpu_has_bf16_dot_products  # noqa: E402

GHZ, FP32_FLOP_PER_CYCLE = 3.0, 32


def default_peak_flops(threads: int) -> float:
    """FP32 peak estimate (see the module docstring)."""
    return threads * GHZ * 1e9 * FP32_FLOP_PER_CYCLE


def demo_config(seq: int) -> ModelConfig:
    return ModelConfig(vocab_size=8192, context_length=seq, n_layer=6, n_head=6, n_kv_head=6,
                       d_model=384, ffn_hidden=1024, rope_theta=10000.0, norm_eps=1e-5,
                       tie_embeddings=True)  # fmt: skip


def hf_llama(cfg: ModelConfig) -> torch.nn.Module:
    """``LlamaForCausalLM`` with exactly our shape, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
        mlp_bias=False, hidden_act="silu", use_cache=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )  # fmt: skip
    return LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")


def make_step(
    kind: str, cfg: ModelConfig, bf16: bool, x: torch.Tensor, y: torch.Tensor
) -> tuple[Callable[[], float], int]:
    """A closure running one optimiser step (returns the loss) and the model's parameter count."""
    torch.manual_seed(0)
    model = Transformer(cfg) if kind == "ours" else hf_llama(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def loss_fn() -> torch.Tensor:
        if kind == "ours":
            return model.loss(x, y)
        return model(input_ids=x, labels=y, shift_labels=y).loss

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return step, n_params


def bench_training(args: argparse.Namespace, cfg: ModelConfig) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    kinds = ["ours"] + ([] if args.skip_hf else ["hf"])
    steps: dict[str, Callable[[], float]] = {}
    for kind in kinds:
        for prec in ("fp32", "bf16"):
            steps[f"{kind}_{prec}"], n = make_step(kind, cfg, prec == "bf16", x, y)
            print(f"built {kind}_{prec}: {n / 1e6:.2f}M parameters")
    for name, step in steps.items():  # warmup: allocator, oneDNN primitive caches, autocast
        for _ in range(args.warmup):
            step()
        print(f"warmed up {name}")
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}  # process CPU seconds per step
    for r in range(args.steps):
        order = list(steps)
        random.Random(r).shuffle(order)
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(
            f"round {r + 1}/{args.steps}: " + "  ".join(f"{k} {times[k][-1]:.3f}s" for k in steps)
        )

    tokens = args.batch * args.seq
    flops_tok = Transformer(cfg).flops_per_token(args.seq)
    peak = {"fp32": args.peak_flops, "bf16": args.peak_flops_bf16}
    res: dict[str, Any] = {"flops_per_token": flops_tok}
    for name, ts in times.items():
        tps = tokens / statistics.median(ts)
        res[f"{name}_tokens_per_s"] = round(tps, 1)
        res[f"{name}_best_tokens_per_s"] = round(tokens / min(ts), 1)
        res[f"{name}_mfu"] = round(tps * flops_tok / peak[name.split("_")[1]], 4)
    if not args.skip_hf:
        for prec in ("fp32", "bf16"):
            paired = [
                h / o for h, o in zip(times[f"hf_{prec}"], times[f"ours_{prec}"], strict=True)
            ]
            res[f"ratio_{prec}"] = round(statistics.median(paired), 3)
            res[f"ratio_{prec}_best"] = round(
                min(times[f"hf_{prec}"]) / min(times[f"ours_{prec}"]), 3
            )
            # CPU seconds consumed per step: with passive OpenMP waiting this is the work done,
            # nearly blind to time slices lost to other processes on a shared machine.
            paired = [h / o for h, o in zip(cpu[f"hf_{prec}"], cpu[f"ours_{prec}"], strict=True)]
            res[f"ratio_{prec}_cpu_time"] = round(statistics.median(paired), 3)
    return res


def bench_generation(args: argparse.Namespace, cfg: ModelConfig, batch: int) -> dict[str, Any]:
    """Greedy generation of ``gen_tokens`` new tokens for ``batch`` one-token prompts, with and
    without the KV cache (interleaved rounds). Keys are ``gen_*`` for batch 1 and
    ``gen_b{batch}_*`` otherwise."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    # 1 + 256 new tokens fills exactly the 256-token window (the last is not fed).
    prompts = [[1 + i] for i in range(batch)]
    n = args.gen_tokens
    outs: dict[bool, list[list[int]]] = {}
    times: dict[bool, list[float]] = {True: [], False: []}
    generate(model, prompts, 8, temperature=0)  # warmup
    for r in range(args.gen_rounds):
        for use_cache in (True, False) if r % 2 == 0 else (False, True):
            t0 = time.perf_counter()
            outs[use_cache] = generate(model, prompts, n, temperature=0, use_cache=use_cache)
            times[use_cache].append(time.perf_counter() - t0)
            label = "cached" if use_cache else "uncached"
            rate = batch * n / times[use_cache][-1]
            print(f"generation batch {batch} round {r + 1}: {label} {rate:.1f} tokens/s")
    cached = batch * n / statistics.median(times[True])
    uncached = batch * n / statistics.median(times[False])
    paired = [u / c for u, c in zip(times[False], times[True], strict=True)]
    prefix = "gen" if batch == 1 else f"gen_b{batch}"
    return {
        f"{prefix}_new_tokens": n,
        f"{prefix}_cached_tokens_per_s": round(cached, 1),
        f"{prefix}_uncached_tokens_per_s": round(uncached, 1),
        f"{prefix}_speedup": round(statistics.median(paired), 2),  # per-round ratios
        f"{prefix}_outputs_match": outs[True] == outs[False],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed rounds (one step per config each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per config")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--peak-flops", type=float, default=None,
                   help="fp32 peak FLOP/s for MFU (default: threads x 3 GHz x 32)")  # fmt: skip
    p.add_argument("--peak-flops-bf16", type=float, default=None,
                   help="bf16 peak FLOP/s for MFU (default: 2x the fp32 peak with "
                        "AVX512-BF16/AMX, else the fp32 peak)")  # fmt: skip
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--gen-rounds", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true", help="only our model (no transformers)")
    p.add_argument("--skip-gen", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.peak_flops = args.peak_flops or default_peak_flops(args.threads)
    args.peak_flops_bf16 = args.peak_flops_bf16 or (
        2 * args.peak_flops if cpu_has_bf16_dot_products() else args.peak_flops
    )
    if not args.skip_hf:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed (pip install -e '.[bench]'): skipping HF")
            args.skip_hf = True
        else:
            print(f"transformers {transformers.__version__}")
    cfg = demo_config(args.seq)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.seq}, "
          f"peak {args.peak_flops / 1e9:.0f} / {args.peak_flops_bf16 / 1e9:.0f} GFLOP/s "
          f"(fp32 / bf16), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "shape": {
            "n_layer": cfg.n_layer,
            "d_model": cfg.d_model,
            "n_head": cfg.n_head,
            "ffn_hidden": cfg.ffn_hidden,
            "vocab_size": cfg.vocab_size,
            "seq": args.seq,
            "batch": args.batch,
        },  # fmt: skip
        "torch": torch.__version__,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_kernels": cpu_bf16_kernels(),
        "loadavg_start": round(os.getloadavg()[0], 2),
        "timed_rounds": args.steps,
        "peak_flops_fp32": args.peak_flops,
        "peak_flops_bf16": args.peak_flops_bf16,
    }
    res.update(bench_training(args, cfg))
    if not args.skip_gen:
        res.update(bench_generation(args, cfg, 1))
        if args.batch > 1:  # the demo shape's batch: decoding a batch is how serving runs
            res.update(bench_generation(args, cfg, args.batch))
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    res["loadavg_end"] = round(os.getloadavg()[0], 2)

    print()
    for prec in ("fp32", "bf16"):
        line = (f"train {prec}: ours {res[f'ours_{prec}_tokens_per_s']:.0f} tok/s "
                f"(MFU {100 * res[f'ours_{prec}_mfu']:.1f}%)")  # fmt: skip
        if not args.skip_hf:
            line += (f", HF {res[f'hf_{prec}_tokens_per_s']:.0f} tok/s "
                     f"(MFU {100 * res[f'hf_{prec}_mfu']:.1f}%), ours/HF {res[f'ratio_{prec}']:.2f}x "
                     f"(best-case {res[f'ratio_{prec}_best']:.2f}x, "
                     f"CPU-time {res[f'ratio_{prec}_cpu_time']:.2f}x)")  # fmt: skip
        print(line)
    if not args.skip_gen:
        for prefix, b in (("gen", 1), (f"gen_b{args.batch}", args.batch)):
            if f"{prefix}_speedup" not in res:
                continue
            print(f"generate {res[f'{prefix}_new_tokens']} tokens, batch {b}: cached "
                  f"{res[f'{prefix}_cached_tokens_per_s']:.0f} tok/s, uncached "
                  f"{res[f'{prefix}_uncached_tokens_per_s']:.0f} tok/s, "
                  f"{res[f'{prefix}_speedup']:.1f}x (same tokens: {res[f'{prefix}_outputs_match']})")  # fmt: skip
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
