"""Quality per wall-clock minute: held-out val bpb after N minutes of pretraining, per recipe.

Each (recipe, minutes) cell trains a fresh model of the profile's shape (default ``demo``) on
the token shards for ``minutes`` of wall time with the trainer's own time budget
(``train.minutes``: the schedule adapts to the measured step time, see ``llm_core.schedule``),
then reports the validation bpb on a fixed slice of the held-out books (``--eval-batches``
batches of 8 x context windows from the start of the val split, the same for every cell).

Recipes (``--recipes``):

- ``old``: the profile's ``pretrain`` section with the old recipe forced (``OLD``: AdamW,
  warmup + cosine).
- ``new``: the profile's ``pretrain`` section with ``NEW`` on top (Muon for the blocks'
  matrices + AdamW for the rest, warmup-stable-decay; settings tuned on this benchmark at
  3-minute budgets, see BENCHMARKS.md).

``--set-old`` / ``--set-new key=value`` override single keys (tuning). Cells run one after the
other in this process (bf16 autocast as the profile says; ``OMP_NUM_THREADS`` as the caller
sets it); evaluation time is outside the budget. The last line is one JSON object with every
row, the bpb table and the machine record (CPU flags, clock, load before and after).

    python benchmarks/recipe_quality.py --shards /tmp/demo_data/token_shards --minutes 5 10 15 30
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import add_common_args, emit, loadavg, machine_info  # noqa: E402
from llm_core.config import TrainConfig, load_profile, model_config_from_profile  # noqa: E402
from llm_core.data import TokenShards  # noqa: E402
from llm_core.data.lm import EvalBatches, RandomWindowSampler  # noqa: E402
from llm_core.evaluate import make_lm_evaluator  # noqa: E402
from llm_core.model import Transformer  # noqa: E402
from llm_core.objectives import LMObjective  # noqa: E402
from llm_core.trainer import Trainer  # noqa: E402

OLD: dict[str, Any] = {"optimizer": "adamw", "schedule": "cosine", "lr": 1.0e-3, "warmup_steps": 50,
                       "batch_size": 8}  # fmt: skip
# Tuned at 2.5 minutes (BENCHMARKS.md): batch 16 amortises Muon's per-step cost (the Newton-Schulz
# GEMMs do not grow with the batch); 3 iterations instead of 5 cost 40% less and won per minute.
NEW: dict[str, Any] = {"optimizer": "muon", "schedule": "wsd", "lr": 3.0e-3, "warmup_steps": 20,
                       "decay_fraction": 0.4, "muon_lr": 0.02, "muon_momentum": 0.95,
                       "muon_ns_steps": 3, "batch_size": 16}  # fmt: skip
EVAL_BATCH = 8


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values parsed as YAML scalars (numbers, booleans, strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set-old/--set-new take key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_cell(
    profile: dict[str, Any], shards: Path, recipe: dict[str, Any], minutes: float, args: Any
) -> dict[str, Any]:
    """Train one fresh model for ``minutes`` under ``recipe``; return its row."""
    section = {**profile["pretrain"], **recipe, "minutes": minutes, "steps": 0, "eval_every": 0,
               "checkpoint_every": 0, "seed": args.seed, "device": "cpu"}  # fmt: skip
    cfg = TrainConfig.from_dict(section)
    model_cfg = model_config_from_profile(profile)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    seq = model_cfg.context_length
    sampler = RandomWindowSampler(TokenShards(shards, "train"), cfg.batch_size, seq, seed=cfg.seed)
    val = TokenShards(shards, "val")
    batches = EvalBatches(val, EVAL_BATCH, seq, args.eval_batches)
    trainer = Trainer(model, LMObjective(), cfg, sampler, out_dir=None)
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    trainer.evaluator = make_lm_evaluator(batches, val.tokens_per_byte)
    metrics = trainer.evaluate()
    return {
        "minutes": minutes,
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "train_wall_s": round(wall, 1),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "val_bpb": round(metrics["val_bpb"], 4),
        "val_loss": round(metrics["val_loss"], 4),
        "eval_tokens": len(batches) * EVAL_BATCH * seq,
        "final_train_loss": round(result.history[-1]["loss"], 4) if result.history else None,
    }


def smoke_shards(root: Path) -> Path:
    """A small learnable shard set (the tests' corpus), so ``--smoke`` needs no data."""
    from tests.llm_core.training_helpers import make_shards

    return make_shards(root, train_tokens=20_000, val_tokens=4_000, vocab=512)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", type=Path, default=Path("/tmp/demo_data/token_shards"))
    p.add_argument("--profile", default="demo")
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 15, 30])
    p.add_argument("--recipes", nargs="+", default=["old", "new"], choices=["old", "new"])
    p.add_argument("--set-old", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--set-new", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--eval-batches", type=int, default=64)
    p.add_argument("--seed", type=int, default=1337)
    add_common_args(p)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    profile = load_profile(args.profile)
    tmp = tempfile.TemporaryDirectory(prefix="recipe-quality-")
    shards = args.shards
    if args.smoke:
        profile = load_profile("tiny")
        profile["vocab_size"] = 512
        shards, args.minutes, args.eval_batches = smoke_shards(Path(tmp.name)), [0.03], 4
    recipes = {
        "old": {**OLD, **parse_sets(args.set_old)},
        "new": {**NEW, **parse_sets(args.set_new)},
    }
    load_before = loadavg()
    rows = []
    for minutes in args.minutes:
        for name in args.recipes:
            row = {"recipe": name, **run_cell(profile, shards, recipes[name], minutes, args)}
            print(
                f"{name:>4} {minutes:>5g} min: val_bpb {row['val_bpb']:.4f} after "
                f"{row['steps']} steps ({row['tokens_per_s']:.0f} tokens/s)",
                flush=True,
            )
            rows.append(row)
    tmp.cleanup()
    emit(
        {
            "benchmark": "recipe_quality",
            "smoke": args.smoke,
            "profile": profile.get("name"),
            "recipes": {n: recipes[n] for n in args.recipes},
            "rows": rows,
            "val_bpb": {
                n: {str(r["minutes"]): r["val_bpb"] for r in rows if r["recipe"] == n}
                for n in args.recipes
            },  # fmt: skip
            "threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "machine": machine_info(),
        }
    )


if __name__ == "__main__":
    main()
