"""GPU pretraining throughput and MFU of the ``gpt2-124m`` profile, through the project's own
training loop (``llm_core.trainer.Trainer``: bf16 autocast, ``torch.compile``, SDPA attention,
which is FlashAttention on Hopper/Ampere in bf16, and fused AdamW).

    python benchmarks/gpu_pretrain.py                    # 300 steps of the profile's batch
    python benchmarks/gpu_pretrain.py --steps 500 --batch-size 16 --grad-accum 8
    python benchmarks/gpu_pretrain.py --shards data/token_shards   # real tokens, same speed

Tokens/s is the median of the logging windows after ``--warmup`` steps (compilation and
autotuning happen in the first ones); MFU = tokens/s × FLOPs per token / peak bf16 FLOP/s, with
``Transformer.flops_per_token`` (6 × matmul weights + 12 × layers × d_model × sequence: the PaLM
/ nanoGPT convention) and the GPU's dense bf16 peak from ``llm_core.trainer.default_peak_flops``
(``--peak-tflops`` for a GPU it does not know). The data are uniform random tokens unless
``--shards`` is given: throughput does not depend on them. The last line is one JSON object
with the GPU's name. Without CUDA it exits with status 2 and says so; ``--smoke`` runs the tiny
profile on the CPU for a few steps so the script cannot rot (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, machine_info  # noqa: E402
from llm_core.config import ModelConfig, TrainConfig, load_profile, model_config_from_profile  # noqa: E402

NO_CUDA = (
    "gpu_pretrain: no CUDA device (torch.cuda.is_available() is False, torch {version}): this "
    "benchmark measures GPU training and measured nothing. Run it on a CUDA machine, or use "
    "--smoke to check the script on the CPU."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="gpt2-124m", help="model shape and batch from this profile")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps to run")
    p.add_argument("--warmup", type=int, default=30, help="steps left out of the timing")
    p.add_argument(
        "--batch-size", type=int, default=0, help="sequences per micro-batch (0: profile)"
    )
    p.add_argument("--grad-accum", type=int, default=0, help="micro-batches per step (0: profile)")
    p.add_argument("--seq-len", type=int, default=0, help="sequence length (0: context_length)")
    p.add_argument("--log-every", type=int, default=10, help="steps per timing window")
    p.add_argument("--no-compile", action="store_true", help="eager mode (compare the gain)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense peak (0: known GPUs)")
    p.add_argument("--shards", type=Path, default=None, help="token shards instead of random ids")
    p.add_argument("--smoke", action="store_true", help="tiny profile on the CPU, a few steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.profile, args.steps, args.warmup, args.log_every = "tiny", 6, 2, 2
        args.no_compile, args.dtype = True, "float32"
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def model_config(profile: str, seq_len: int = 0) -> ModelConfig:
    """The profile's model shape (``seq_len`` overrides its context length)."""
    cfg = model_config_from_profile(load_profile(profile))
    if seq_len:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "context_length": seq_len})
    return cfg


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token of the model ``cfg`` describes (built on the meta device: no
    memory, no time)."""
    from llm_core.model import Transformer

    with torch.device("meta"):
        return float(Transformer(cfg).flops_per_token(seq_len or cfg.context_length))


def mfu(tokens_per_s: float, flops_per_token_: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak_flops}")
    return tokens_per_s * flops_per_token_ / peak_flops


class RandomTokens:
    """Uniform random ``(inputs, targets)`` made on the device (no host copies), seeded by step:
    a sampler for the trainer when the data do not matter."""

    def __init__(self, batch: int, seq: int, vocab: int, device: torch.device) -> None:
        self.batch, self.seq, self.vocab, self.device, self.step = batch, seq, vocab, device, 0
        self.gen = torch.Generator(device=device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.gen.manual_seed(self.step)
        self.step += 1
        ids = torch.randint(
            self.vocab, (self.batch, self.seq + 1), device=self.device, generator=self.gen
        )
        return ids[:, :-1], ids[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random_tokens", "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class Windows:
    """Trainer callback: the tokens/s of every logging window."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append((step, float(metrics["tokens_per_s"])))

    def after(self, warmup: int) -> list[float]:
        return [tps for step, tps in self.rows if step > warmup]


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train ``args.steps`` steps and measure; returns the result record."""
    from llm_core.data import TokenShards
    from llm_core.data.lm import RandomWindowSampler
    from llm_core.model import Transformer
    from llm_core.objectives import LMObjective
    from llm_core.trainer import DistInfo, Trainer, default_peak_flops

    profile = load_profile(args.profile)
    section = dict(profile.get("pretrain") or {})
    cfg = model_config(args.profile, args.seq_len)
    seq = cfg.context_length
    batch = args.batch_size or int(section.get("batch_size", 8))
    accum = args.grad_accum or int(section.get("grad_accum", 1))
    train = TrainConfig(
        steps=args.steps,
        batch_size=batch,
        grad_accum=accum,
        lr=float(section.get("lr", 6e-4)),
        warmup_steps=min(args.warmup, args.steps - 1),
        log_every=args.log_every,
        eval_every=0,
        checkpoint_every=0,
        dtype=args.dtype,
        compile=not args.no_compile,
        device=str(device),
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(1337)
    model = Transformer(cfg).to(device)
    sampler: Any
    if args.shards is not None:
        sampler = RandomWindowSampler(TokenShards(args.shards, "train"), batch, seq, seed=1337)
    else:
        sampler = RandomTokens(batch, seq, cfg.vocab_size, device)
    windows = Windows()
    trainer = Trainer(model, LMObjective(), train, sampler, callbacks=[windows],
                      dist_info=DistInfo(device=device))  # fmt: skip
    result = trainer.fit()
    timed = windows.after(args.warmup)
    tps = statistics.median(timed) if timed else result.tokens_per_s
    fpt = model.flops_per_token(seq)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else default_peak_flops(device, args.dtype)
    return {
        "benchmark": "gpu_pretrain",
        "smoke": args.smoke,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "profile": args.profile,
        "params": model.num_params(),
        "seq_len": seq,
        "batch_size": batch,
        "grad_accum": accum,
        "tokens_per_step": batch * accum * seq,
        "steps": result.steps,
        "timed_windows": len(timed),
        "dtype": args.dtype,
        "compile": not args.no_compile,
        "data": str(args.shards) if args.shards else "random",
        "tokens_per_s": round(tps, 1),
        "flops_per_token": fpt,
        "peak_flops": peak,
        "mfu": round(mfu(tps, fpt, peak), 4),
        "final_loss": result.final_metrics.get("loss"),
        "wall_time_s": round(result.wall_time_s, 1),
        "cuda_max_memory_gib": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda"
            else None
        ),
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda:0")
    res = run(args, device)
    print(
        f"{res['gpu'] or res['device']}: {res['params'] / 1e6:.1f}M params, "
        f"{res['tokens_per_step']} tokens/step, {res['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {res['mfu']:.1%} (peak {res['peak_flops'] / 1e12:.3g} TFLOP/s)"
    )
    emit(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
