"""SFT batching: packed rows (block-diagonal attention) against padded rows, same data, same model.

Both layouts train on the same conversations from the mirror's SFT sources; what differs is how
much of each step is padding and how attention is masked:

- ``pack``: several conversations per row of ``context_length`` tokens, ``doc_ids`` give a
  block-diagonal causal mask (explicit mask, slower attention kernel, almost no padding);
- ``pad``: one conversation per row, right-padded to the longest row of the batch (the fused
  causal kernel, but every short conversation pays for the longest one).

The figure that matters is *conversations (or supervised tokens) per second*: the number of
optimiser steps per epoch differs between the layouts. Each mode runs ``--warmup`` untimed steps,
then ``--steps`` timed ones (forward, backward, AdamW) with the profile's dtype; the two modes
alternate step by step (the order rotating every round) and rates use the median step time, so
load from other processes on a shared machine biases neither. ``pack_vs_pad`` gives the ratio of
medians, the median of per-round ratios of conversations/s, their spread and the verdict against
the target (packing at least as fast as padding: it is the default), as every benchmark does (see
``benchmarks/common.py``).

The last line is one JSON object with every figure and ``"faster"`` naming the winner.

Usage: python benchmarks/sft_packing.py [--profile demo] [--steps 8] [--mirror ../shared/mirror]
       python benchmarks/sft_packing.py --smoke     # tiny profile, few conversations: seconds
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    add_common_args,
    compare,
    describe,
    emit,
    interleave,
    machine_info,
)
from llm_core.config import load_profile, model_config_from_profile, train_config_from_profile  # noqa: E402
from llm_core.model import Transformer  # noqa: E402
from llm_core.objectives import SFTObjective  # noqa: E402
from llm_core.sft import ChatSpecials, SFTSampler, encode_conversations  # noqa: E402
from llm_core.tokenizer import train_bpe  # noqa: E402
from llm_core.trainer import build_optimizer  # noqa: E402
from pipeline.text.adapters import adapt_source, load_sft_sources  # noqa: E402


def mirror_conversations(mirror: Path, limit: int, seed: int) -> list[list[dict[str, str]]]:
    """A seeded sample of adapted rows from every SFT source the mirror holds."""
    frames = []
    for source in load_sft_sources(REPO / "configs" / "sft_sources.yaml"):
        if source.url is not None:
            files = [mirror / "files" / source.url.split("://", 1)[1]]
        else:
            base = mirror / "hf" / "datasets" / str(source.repo)
            files = sorted({p for pat in source.patterns for p in base.glob(pat)})
        frames.append(adapt_source(source, files)[0])
    rows = pl.concat(frames)
    picked = np.random.default_rng(seed).permutation(rows.height)[:limit]
    return rows["messages"].gather(picked).to_list()


class Mode:
    """One layout's model, optimiser, sampler and per-step measurements."""

    def __init__(
        self, packing: bool, data: Any, model_cfg: Any, train_cfg: Any, pad_id: int, batch: int
    ) -> None:
        torch.manual_seed(0)
        self.model = Transformer(model_cfg).train()
        self.opt = build_optimizer(self.model, train_cfg, torch.device("cpu"))
        self.sampler = SFTSampler(
            data, batch, model_cfg.context_length, pad_id, packing=packing, seed=1
        )
        self.bf16 = train_cfg.dtype == "bfloat16"
        self.seconds: list[float] = []
        self.rates: list[float] = []  # conversations/s of each timed step
        self.conversations = self.supervised = self.tokens = 0

    def step(self, timed: bool) -> float:
        rows = self.sampler.rows(self.sampler.step)
        batch = self.sampler.next_batch()
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        t0 = time.perf_counter()
        with autocast:
            loss, _ = SFTObjective()(self.model, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        secs = time.perf_counter() - t0
        if timed:
            self.seconds.append(secs)
            self.rates.append(sum(len(r) for r in rows) / secs)
            self.conversations += sum(len(r) for r in rows)
            self.supervised += int(batch["loss_mask"].sum())
            self.tokens += batch["input_ids"].numel()
        return secs

    def summary(self) -> dict[str, float]:
        """Rates use the *median* step time: robust to other processes stealing the CPU."""
        n = len(self.seconds)
        median = statistics.median(self.seconds)
        counts = {"conv": self.conversations, "sup": self.supervised, "tok": self.tokens}
        per_step = {k: v / n for k, v in counts.items()}
        return {
            "steps": n,
            "median_step_s": round(median, 4),
            "min_step_s": round(min(self.seconds), 4),
            "conversations_per_step": round(per_step["conv"], 2),
            "tokens_per_step": round(per_step["tok"], 1),
            "supervised_fraction": round(self.supervised / self.tokens, 4),
            "conversations_per_s": round(per_step["conv"] / median, 3),
            "supervised_tokens_per_s": round(per_step["sup"] / median, 1),
            "tokens_per_s": round(per_step["tok"] / median, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--mirror", type=Path, default=REPO.parent / "shared" / "mirror")
    ap.add_argument("--conversations", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="default: sft_train.batch_size")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.profile, args.conversations, args.steps, args.warmup = "tiny", 200, 3, 1
    info = machine_info()
    print(f"{info['cpu_model']} @ {info['cpu_mhz']} MHz, flags {info['cpu_flags']}, "
          f"load average {info['loadavg']}")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    model_cfg = model_config_from_profile(profile)
    train_cfg = train_config_from_profile(profile, "sft_train")
    args.batch_size = args.batch_size or train_cfg.batch_size
    convs = mirror_conversations(args.mirror, args.conversations, seed=0)
    texts = (m["content"] for c in convs for m in c)
    tok = train_bpe(texts, int(profile["vocab_size"]))
    data = encode_conversations(tok, convs, max_tokens=model_cfg.context_length + 1)
    pad_id = ChatSpecials.from_tokenizer(tok).pad
    lengths = data.lengths()
    modes = {
        name: Mode(name == "pack", data, model_cfg, train_cfg, pad_id, args.batch_size)
        for name in ("pack", "pad")
    }
    # Interleaved, so a burst of load from elsewhere hits both layouts alike.
    calls = dict.fromkeys(modes, 0)

    def side(name: str) -> Any:
        def run() -> float:
            calls[name] += 1
            return modes[name].step(timed=calls[name] > args.warmup)

        return run

    interleave({name: side(name) for name in modes}, rounds=args.steps, warmup=args.warmup)
    pack_vs_pad = compare(
        modes["pack"].rates,
        modes["pad"].rates,
        lower_is_better=False,
        target=1.0,
        a_name="pack conversations/s",
        b_name="pad conversations/s",
    )
    print(f"pack vs pad, conversations/s: {describe(pack_vs_pad)}")
    results = {name: mode.summary() for name, mode in modes.items()}
    for mode, r in results.items():
        print(f"{mode}: {r}")
    speedup = results["pack"]["conversations_per_s"] / results["pad"]["conversations_per_s"]
    summary = {
        "benchmark": "sft_packing",
        "smoke": args.smoke,
        "machine": info,
        "loadavg_end": machine_info()["loadavg"],
        "profile": profile.get("name", args.profile),
        "context_length": model_cfg.context_length,
        "batch_size": args.batch_size,
        "dtype": train_cfg.dtype,
        "threads": torch.get_num_threads(),
        "conversations": len(data),
        "mean_tokens": round(float(lengths.mean()), 1),
        "truncated": data.truncated,
        **results,
        "pack_speedup": round(speedup, 3),
        "pack_vs_pad": pack_vs_pad,
        "faster": "pack" if speedup > 1 else "pad",
    }
    emit(summary)


if __name__ == "__main__":
    main()
