"""Pretraining throughput of two source trees, side by side: a refactor must not slow training.

Each round starts one fresh process per tree (``--before``, ``--after``) that runs the
``pretrain`` stage of a profile (default ``demo``: its model, batch, dtype) for ``--steps``
steps on the same token shards, and reports the trainer's own ``tokens_per_s`` (the timed
training loop only: imports, model construction and the final save are outside it). The two
trees run in alternating order, after a warm-up round of each, and the ratio (after over
before) is reported with its spread (see ``benchmarks/common.py``).

The child speaks both APIs: ``llm_core.stages.pretrain.run`` (a tree with stages) and
``llm_core.pretrain.run_pretraining`` (the trees before them).

    python benchmarks/stage_ab.py --before /tmp/base --shards data/token_shards \
        --tokenizer data/bpe_tokenizer/tokenizer.json --steps 20 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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

CHILD = r"""
import json, sys
tree, shards, tokenizer, profile_name, steps, out = sys.argv[1:7]
sys.path.insert(0, tree)
from llm_core.config import TrainConfig, load_profile, model_config_from_profile
profile = load_profile(profile_name)
section = {**profile["pretrain"], "steps": int(steps), "eval_batches": 0, "warmup_steps": 0,
           "checkpoint_every": 10**9, "log_every": 10**9}
try:
    from llm_core.stages import pretrain
except ImportError:
    from llm_core.pretrain import run_pretraining
    section.setdefault("seed", profile.get("seed", 1337))
    result = run_pretraining(shards, out, model_config_from_profile(profile),
                             TrainConfig.from_dict(section))
else:
    config = pretrain.Config.from_profile(
        {**profile, "pretrain": section}, {"shards_dir": shards, "tokenizer": tokenizer},
        out_dir=out)
    result = pretrain.run(config).train
print(json.dumps({"tokens_per_s": result.tokens_per_s, "steps": result.steps}))
"""


def run_tree(tree: Path, args: argparse.Namespace, out: Path) -> float:
    """Seconds per 1,000 tokens of one fresh process of ``tree`` (lower is better)."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(args.shards), str(args.tokenizer),
         args.profile, str(args.steps), str(out)],
        cwd=tree, capture_output=True, text=True, timeout=3600,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(tree)},
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {proc.stderr[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["steps"] != args.steps:
        raise RuntimeError(f"{tree}: ran {got['steps']} steps, asked for {args.steps}")
    return 1000.0 / got["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--before", type=Path, required=True, help="the older source tree")
    parser.add_argument("--after", type=Path, default=REPO, help="the newer tree (this one)")
    parser.add_argument("--shards", type=Path, required=True, help="a token_shards folder")
    parser.add_argument("--tokenizer", type=Path, required=True, help="its tokenizer.json")
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.warmup = 2, 2, 0
    with tempfile.TemporaryDirectory() as tmp:
        times = interleave(
            {
                "after": lambda: run_tree(args.after, args, Path(tmp) / "after"),
                "before": lambda: run_tree(args.before, args, Path(tmp) / "before"),
            },
            rounds=args.rounds,
            warmup=args.warmup,
        )
    stats = compare(
        times["after"], times["before"], a_name="after", b_name="before", target=0.97
    )  # "does not drop": after >= 0.97x before, 3% being the noise floor we accept
    print(f"after vs before (tokens/s): {describe(stats)}")
    emit(
        {
            "benchmark": "stage_ab",
            "smoke": args.smoke,
            "machine": machine_info(),
            "profile": args.profile,
            "steps": args.steps,
            "before": str(args.before),
            "after": str(args.after),
            "tokens_per_s": {
                side: [round(1000.0 / t, 1) for t in ts] for side, ts in times.items()
            },
            "after_vs_before": stats,
        }
    )


if __name__ == "__main__":
    main()
