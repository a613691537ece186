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

Method (see ``benchmarks/common.py``): every configuration is warmed up (untimed), then the
timed steps are *interleaved*: each round runs one step of every configuration, in an order that
rotates from round to round. Each row reports the ratio of medians, the median of per-round
ratios, their spread (min-max), the number of rounds, and a verdict: "met" only when the lower end
of the spread clears the target. The ratio of process CPU seconds per step is reported beside it.

**The two training rows.** The fp32 row (ours fp32 against HF fp32) is the like-for-like figure
for the model code. The bf16 row compares our bf16 autocast step against *HF's fastest path on
this CPU*: on CPUs with native bf16 GEMMs (AVX512-BF16/AMX: ``cpu_bf16_kernels() == "native"``)
that is HF under bf16 autocast; on CPUs without them (AVX2-only parts: ``"emulated"``) PyTorch's
bf16 GEMMs fall back to generic loops (~7x slower than fp32 per GEMM, a bf16 step of either model
~20x slower than fp32) while our model runs its bf16 matmuls as fp32 GEMMs on bf16-rounded
operands; HF's fastest path there is its fp32 step, so that is the baseline, and the row says so
(``baseline`` in the JSON). Comparing against HF's own bf16 loops there would measure a kernel
choice, not the model. ``--bf16-baseline`` overrides the choice.

**Generation.** The cached and uncached paths are both warmed up with full-length runs, their
rounds interleave, and every round's tokens must be identical on both paths (the script raises
otherwise).

MFU = achieved FLOP/s / peak. Achieved FLOPs per token = ``Transformer.flops_per_token`` (6*N plus
the 12*L*d*T attention term; the same model shape, so the same figure for HF). The default peak
is an estimate for the cores in use: threads x 3.0 GHz x 32 FP32 FLOP/cycle (two 256-bit FMA pipes,
e.g. Zen 4 / Skylake-class AVX-512 parts running 256-bit datapaths), and twice that for bf16 where
the CPU has AVX512-BF16 or AMX (two multiply-adds per float32 lane). Pass ``--peak-flops`` (and
``--peak-flops-bf16``) for your machine.

OpenMP threads: unless ``OMP_WAIT_POLICY`` is already set, this script sets it to PASSIVE before
torch loads OpenMP. With the default (spinning) policy, on a machine whose cores are shared with
other work, a thread waiting at a barrier for a descheduled sibling burns its time slice; we
measured 3-7x lower throughput for *both* models that way on the 2-core development VM. On an idle
machine PASSIVE costs a little per parallel region; run with ``OMP_WAIT_POLICY=ACTIVE`` to compare.
The policy, the thread count, the CPU and the load average are recorded in the JSON.

``--smoke`` runs a toy shape (2 layers, d=64) for a few rounds: seconds, every code path, figures
meaningless. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see above)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    add_common_args,
    compare,
    describe,
    emit,
    interleave,
    machine_info,
)
from llm_core.config import ModelConfig  # noqa: E402
from llm_core.generate import generate  # noqa: E402
from llm_core.model import Transformer  # noqa: E402
from llm_core.trainer import cpu_has_bf16_dot_products  # noqa: E402

try:
    from llm_core.kernels import cpu_bf16_kernels  # noqa: E402
except ImportError:  # before the kernels split
    from llm_core.model import cpu_bf16_kernels  # type: ignore[attr-defined,no-redef]  # noqa: E402

GHZ, FP32_FLOP_PER_CYCLE = 3.0, 32
TARGETS = {"bf16": 1.3, "fp32": None, "gen": 5.0}


def default_peak_flops(threads: int) -> float:
    """FP32 peak estimate (see the module docstring)."""
    return threads * GHZ * 1e9 * FP32_FLOP_PER_CYCLE


def model_config(seq: int, smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(vocab_size=512, context_length=seq, n_layer=2, n_head=2, n_kv_head=2,
                           d_model=64, ffn_hidden=128, rope_theta=10000.0, norm_eps=1e-5,
                           tie_embeddings=True)  # fmt: skip
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


def bf16_baseline(args: argparse.Namespace, kernels: str) -> str:
    """The bf16 row's baseline: HF's fastest path on this CPU (see the module docstring).

    Where bf16 GEMMs are emulated, HF's bf16 step runs PyTorch's generic loops (~20x slower than
    its fp32 step, ~1 min a step at the demo shape), so it is not measured and the baseline is HF
    fp32. Otherwise both HF steps are measured and the faster one (``fastest``) is the baseline.
    """
    if args.bf16_baseline != "auto":
        return args.bf16_baseline
    return "hf_fp32" if kernels == "emulated" else "fastest"


BASELINE_TEXT = {
    "hf_bf16": "HF LlamaForCausalLM, bf16 autocast",
    "hf_fp32": "HF LlamaForCausalLM, fp32",
}


def bench_training(args: argparse.Namespace, cfg: ModelConfig, kernels: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    configs = ["ours_fp32", "ours_bf16"]
    baseline = None
    if not args.skip_hf:
        baseline = bf16_baseline(args, kernels)
        configs += ["hf_fp32"] + ([] if baseline == "hf_fp32" else ["hf_bf16"])
    steps: dict[str, Callable[[], float]] = {}
    for name in configs:
        kind, prec = name.split("_")
        steps[name], n = make_step(kind, cfg, prec == "bf16", x, y)
        print(f"built {name}: {n / 1e6:.2f}M parameters")
    cpu: dict[str, list[float]] = {k: [] for k in steps}  # process CPU seconds per step

    def timed(name: str) -> Callable[[], None]:
        def run() -> None:
            c0 = time.process_time()
            steps[name]()
            cpu[name].append(time.process_time() - c0)

        return run

    times = interleave({name: timed(name) for name in steps}, rounds=args.steps, warmup=args.warmup)
    cpu = {k: v[args.warmup :] for k, v in cpu.items()}  # drop the warm-up steps

    tokens = args.batch * args.seq
    flops_tok = Transformer(cfg).flops_per_token(args.seq)
    peak = {"fp32": args.peak_flops, "bf16": args.peak_flops_bf16}
    res: dict[str, Any] = {"flops_per_token": flops_tok, "tokens_per_step": tokens}
    per_config: dict[str, Any] = {}
    for name, ts in times.items():
        tps = tokens / statistics.median(ts)
        per_config[name] = {
            "tokens_per_s": round(tps, 1),
            "best_tokens_per_s": round(tokens / min(ts), 1),
            "mfu": round(tps * flops_tok / peak[name.split("_")[1]], 4),
            "step_s": [round(t, 4) for t in ts],
        }
    res["configs"] = per_config
    if baseline is not None:
        why = {"fp32": "like for like: the model code"}
        if baseline == "fastest":
            baseline = min(("hf_fp32", "hf_bf16"), key=lambda k: statistics.median(times[k]))
            why["bf16"] = "HF's fastest path on this CPU (measured: the faster of its two steps)"
        elif baseline == "hf_fp32" and kernels == "emulated":
            why["bf16"] = (
                "HF's fastest path on this CPU: no native bf16 GEMMs here, so HF's bf16 step "
                "would run PyTorch's generic bf16 loops; not a like-for-like bf16 comparison"
            )
        else:
            why["bf16"] = "chosen with --bf16-baseline"
        rows: dict[str, Any] = {}
        for prec, base in (("fp32", "hf_fp32"), ("bf16", baseline)):
            ours = f"ours_{prec}"
            rows[prec] = {
                "ours": ours,
                "baseline": base,
                "baseline_is": f"{BASELINE_TEXT[base]} ({why[prec]})",
                "ours_tokens_per_s": per_config[ours]["tokens_per_s"],
                "baseline_tokens_per_s": per_config[base]["tokens_per_s"],
                "vs_baseline": compare(
                    times[ours], times[base], target=TARGETS[prec], a_name=ours, b_name=base
                ),
                # CPU seconds per step: with passive OpenMP waiting this is the work done,
                # nearly blind to time slices lost to other processes on a shared machine.
                "vs_baseline_cpu_time": compare(cpu[ours], cpu[base], a_name=ours, b_name=base),
            }
        res["rows"] = rows
    return res


def bench_generation(args: argparse.Namespace, cfg: ModelConfig, batch: int) -> dict[str, Any]:
    """Greedy generation of ``gen_tokens`` new tokens for ``batch`` one-token prompts, with and
    without the KV cache: both warmed up, rounds interleaved, outputs required to be equal."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    # 1 + 256 new tokens fills exactly the 256-token window (the last is not fed).
    prompts = [[1 + i] for i in range(batch)]
    n = args.gen_tokens
    reference: list[list[int]] = []
    rounds = args.gen_rounds if batch == 1 else args.gen_rounds_batch

    def side(use_cache: bool) -> Callable[[], None]:
        def run() -> None:
            out = generate(model, prompts, n, temperature=0, use_cache=use_cache)
            if not reference:
                reference.extend(out)
            elif out != reference:
                label = "cached" if use_cache else "uncached"
                raise RuntimeError(
                    f"generation batch {batch}: the {label} path produced different tokens"
                )

        return run

    times = interleave(
        {"cached": side(True), "uncached": side(False)},
        rounds=rounds,
        warmup=args.gen_warmup,
        log=lambda line: print(f"generation batch {batch} {line}"),
    )
    stats = compare(
        times["cached"],
        times["uncached"],
        target=TARGETS["gen"] if batch == 1 else None,
        a_name="cached",
        b_name="uncached",
    )
    return {
        "batch": batch,
        "new_tokens": n,
        "cached_tokens_per_s": round(batch * n / stats["a_median"], 1),
        "uncached_tokens_per_s": round(batch * n / stats["b_median"], 1),
        "speedup": stats,
        "outputs_equal": True,  # enforced: a mismatch raises
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--steps", type=int, default=8, help="timed rounds (one step per config each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per config")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--peak-flops", type=float, default=None,
                   help="fp32 peak FLOP/s for MFU (default: threads x 3 GHz x 32)")  # fmt: skip
    p.add_argument("--peak-flops-bf16", type=float, default=None,
                   help="bf16 peak FLOP/s for MFU (default: 2x the fp32 peak with native "
                        "AVX512-BF16/AMX kernels, else the fp32 peak)")  # fmt: skip
    p.add_argument("--bf16-baseline", choices=["auto", "hf_bf16", "hf_fp32"], default="auto",
                   help="the bf16 row's baseline (auto: HF's fastest path on this CPU: "
                        "fp32 where bf16 GEMMs are emulated, else the faster HF step)")  # fmt: skip
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--gen-rounds", type=int, default=7, help="timed rounds, batch 1")
    p.add_argument("--gen-rounds-batch", type=int, default=3, help="timed rounds, --batch rows")
    p.add_argument("--gen-warmup", type=int, default=1, help="untimed full runs of each path")
    p.add_argument("--skip-hf", action="store_true", help="only our model (no transformers)")
    p.add_argument("--skip-gen", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch, args.seq = 3, 1, 2, 32
        args.gen_tokens, args.gen_rounds, args.gen_rounds_batch, args.gen_warmup = 16, 3, 2, 1
    torch.set_num_threads(args.threads)
    args.peak_flops = args.peak_flops or default_peak_flops(args.threads)
    kernels = cpu_bf16_kernels()
    args.peak_flops_bf16 = args.peak_flops_bf16 or (
        2 * args.peak_flops
        if cpu_has_bf16_dot_products() and kernels == "native"
        else args.peak_flops
    )
    if not args.skip_hf:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed (pip install -e '.[bench]'): skipping HF")
            args.skip_hf = True
        else:
            print(f"transformers {transformers.__version__}")
    cfg = model_config(args.seq, args.smoke)
    info = machine_info()
    print(f"{info['cpu_model']} @ {info['cpu_mhz']} MHz, flags {info['cpu_flags']}; "
          f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.seq}, "
          f"peak {args.peak_flops / 1e9:.0f} / {args.peak_flops_bf16 / 1e9:.0f} GFLOP/s "
          f"(fp32 / bf16), bf16 kernels {kernels}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {info['loadavg']}")  # fmt: skip
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "train_throughput",
        "smoke": args.smoke,
        "machine": info,
        "shape": {
            "n_layer": cfg.n_layer,
            "d_model": cfg.d_model,
            "n_head": cfg.n_head,
            "ffn_hidden": cfg.ffn_hidden,
            "vocab_size": cfg.vocab_size,
            "seq": args.seq,
            "batch": args.batch,
        },
        "torch": torch.__version__,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_kernels": kernels,
        "timed_rounds": args.steps,
        "warmup_steps": args.warmup,
        "peak_flops_fp32": args.peak_flops,
        "peak_flops_bf16": args.peak_flops_bf16,
    }
    res["train"] = bench_training(args, cfg, kernels)
    if not args.skip_gen:
        res["generation"] = [bench_generation(args, cfg, 1)]
        if args.batch > 1:  # the demo shape's batch: decoding a batch is how serving runs
            res["generation"].append(bench_generation(args, cfg, args.batch))
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    res["loadavg_end"] = machine_info()["loadavg"]

    print()
    configs = res["train"]["configs"]
    for name, c in configs.items():
        print(f"train {name}: {c['tokens_per_s']:.0f} tok/s (MFU {100 * c['mfu']:.1f}%)")
    for prec, row in res["train"].get("rows", {}).items():
        print(f"{prec} row, ours vs {row['baseline_is']}: {describe(row['vs_baseline'])}; "
              f"CPU time {describe(row['vs_baseline_cpu_time'])}")  # fmt: skip
    for g in res.get("generation", []):
        print(f"generate {g['new_tokens']} tokens, batch {g['batch']}: cached "
              f"{g['cached_tokens_per_s']:.0f} tok/s, uncached {g['uncached_tokens_per_s']:.0f} "
              f"tok/s, {describe(g['speedup'])} (same tokens, enforced)")  # fmt: skip
    emit(res)
    return res


if __name__ == "__main__":
    main()
