"""What the integrity checks of SECURITY.md item 2 cost a training run at the demo shape.

The checks: a CRC-32 and an id-range ``max`` over every shard when a run opens its shards
(:class:`llm_core.data.TokenShards`), an id-range ``max`` over every batch
(``llm_core.data.lm._stack``), the SHA-256 of every checkpoint file at save time and its
verification at resume. The target: together they slow training by less than 1 %.

Method: demo-shaped shards (12.25 M uint16 tokens in 4 M-token shards, vocabulary 8,192) are
written with the project's writer into a temp folder; the demo model (6 layers, d=384, context
256, batch 8, bf16 as the profile trains) runs real ``Trainer`` steps over them, and a checkpoint
of that model and its AdamW state is saved. Each cost is timed over several rounds (page cache
warm, as in a run that just wrote or read its data): the shard verification (CRC-32 and id range
of every shard), the batch check on real batches, hashing and verifying the checkpoint. The share
is the checks' time over the demo pretraining run (600 steps, a checkpoint every 100) divided by
that run's step time; the per-step share of the batch check is reported on its own.

    python benchmarks/integrity.py            # demo shape, ~1-2 min
    python benchmarks/integrity.py --smoke    # tiny shape, seconds

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, emit, machine_info, summarize  # noqa: E402
from llm_core.checkpoint import _sha256, save_checkpoint, verify_checkpoint  # noqa: E402
from llm_core.config import load_profile, model_config_from_profile, train_config_from_profile  # noqa: E402
from llm_core.data import ShardWriter, TokenShards, write_manifest  # noqa: E402
from llm_core.data.lm import RandomWindowSampler  # noqa: E402
from llm_core.data.shards import verify_shard  # noqa: E402
from llm_core.model import Transformer  # noqa: E402
from llm_core.objectives import LMObjective  # noqa: E402
from llm_core.trainer import Trainer  # noqa: E402


def write_shards(root: Path, tokens: int, per_shard: int, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    with ShardWriter(root, split="train", tokens_per_shard=per_shard, dtype="uint16") as w:
        for start in range(0, tokens, 1 << 20):
            w.write(rng.integers(0, vocab, size=min(1 << 20, tokens - start), dtype=np.int64))
    entries = w.close()
    write_manifest(
        root,
        {
            "format": "scriptorium-shards/1", "dtype": "uint16", "vocab_size": vocab,
            "eot_id": 0, "tokens_per_shard": per_shard,
            "splits": {"train": {"tokens": tokens, "bytes": tokens * 4}}, "shards": entries,
        },
    )  # fmt: skip
    return root


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed training steps (after 1 warm-up)")
    args = ap.parse_args()
    profile = load_profile("tiny" if args.smoke else "demo")
    model_cfg = model_config_from_profile(profile)
    train_cfg = train_config_from_profile(profile, "pretrain")
    run_steps, ckpt_every = train_cfg.steps, train_cfg.checkpoint_every
    tokens, per_shard = (200_000, 65_536) if args.smoke else (12_253_904, 4_194_304)
    rounds, steps = (2, 2) if args.smoke else (args.rounds, args.steps)
    info = machine_info()
    print(f"{info['cpu_model']} @ {info['cpu_mhz']} MHz, load average {info['loadavg']}")
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        root = write_shards(Path(tmp) / "shards", tokens, per_shard, model_cfg.vocab_size)
        shards = TokenShards(root, "train", verify=False)
        entries = [e for e in shards.manifest["shards"] if e["split"] == "train"]

        def verify_all() -> None:  # exactly what TokenShards(verify=True) adds to an open
            for entry, arr in zip(entries, shards._arrays, strict=True):
                verify_shard(root, entry, arr, shards.vocab_size)

        open_cost = [timed(verify_all) for _ in range(rounds)]

        sampler = RandomWindowSampler(
            shards, train_cfg.batch_size, model_cfg.context_length, seed=1
        )
        rows = np.stack(
            [shards.get(s, model_cfg.context_length + 1) for s in sampler.window_starts(0)]
        )
        reps = 200
        batch_check = [
            timed(lambda: [int(rows.max()) for _ in range(reps)]) / reps for _ in range(rounds)
        ]

        torch.manual_seed(0)
        model = Transformer(model_cfg)

        def fit(n: int, name: str) -> Trainer:
            cfg = train_cfg.__class__.from_dict(
                {**train_cfg.to_dict(), "steps": n, "eval_every": 10**9,
                 "checkpoint_every": 10**9, "device": "cpu"}
            )  # fmt: skip
            trainer = Trainer(model, LMObjective(), cfg, sampler, out_dir=Path(tmp) / name)
            trainer.fit()
            return trainer

        fit(1, "warmup")  # kernels, allocator and caches warm: not timed
        trainer = fit(steps, "timed")
        step_s = trainer.train_time_s / steps

        ck = save_checkpoint(Path(tmp) / "ck", 1, model, trainer.optimizer, {}, {}, None)
        ckpt_bytes = sum(f.stat().st_size for f in ck.iterdir())
        hash_s = [
            timed(lambda: [_sha256(f) for f in ck.iterdir() if f.name != "trainer_state.json"])
            for _ in range(rounds)
        ]
        verify_s = [timed(lambda: verify_checkpoint(ck)) for _ in range(rounds)]

    saves = max(1, run_steps // max(1, ckpt_every))
    med = lambda xs: float(np.median(xs))  # noqa: E731
    run_s = run_steps * step_s
    total_s = med(open_cost) + run_steps * med(batch_check) + saves * med(hash_s) + med(verify_s)
    share = total_s / run_s
    shares = [  # percent of the run's training time
        100 * (o + run_steps * b + saves * h + v) / run_s
        for o, b, h, v in zip(open_cost, batch_check, hash_s, verify_s, strict=True)
    ]
    result = {
        "benchmark": "integrity",
        "smoke": args.smoke,
        "machine": info,
        "loadavg_end": machine_info()["loadavg"],
        "profile": profile.get("name"),
        "shard_tokens": tokens,
        "shard_mb": round(tokens * 2 / 1e6, 1),
        "checkpoint_mb": round(ckpt_bytes / 1e6, 1),
        "step_s": round(step_s, 4),
        "timed_steps": steps,
        "run_steps": run_steps,
        "checkpoint_saves": saves,
        "open_verify_ms": summarize([x * 1e3 for x in open_cost]),
        "batch_check_us": summarize([x * 1e6 for x in batch_check]),
        "batch_check_share_of_step": round(med(batch_check) / step_s, 7),
        "checkpoint_hash_ms": summarize([x * 1e3 for x in hash_s]),
        "checkpoint_verify_ms": summarize([x * 1e3 for x in verify_s]),
        "checks_s_per_run": round(total_s, 3),
        "run_share_pct": summarize(shares, target=1.0, at_most=True),
    }
    print(
        f"step {step_s * 1e3:.0f} ms; shard verification {med(open_cost) * 1e3:.1f} ms once; "
        f"batch check {med(batch_check) * 1e6:.1f} us/step; checkpoint hash "
        f"{med(hash_s) * 1e3:.0f} ms per save ({ckpt_bytes / 1e6:.0f} MB), verify "
        f"{med(verify_s) * 1e3:.0f} ms once; share of a {run_steps}-step run: {share:.4%}"
    )
    emit(result)


if __name__ == "__main__":
    main()
