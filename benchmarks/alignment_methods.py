"""The alignment methods side by side, and the reward model's pooling, on one profile's artefacts.

Part 1, ``--methods``: each alignment stage (``dpo``, ``grpo``, ``best_of_n``, ``rrhf``,
``weighted``) runs from ``sft_weights`` with the profile's ``rlhf`` settings into its own folder,
``$SCRIPTORIUM_DATA/rlhf/<method>/`` (what the ``rlhf/<method>`` asset writes), and is read back
for: the reward-model win rate over ``sft_weights`` on the same held-out prompts (the stages' own
:func:`llm_core.stages.alignment.win_rate`, greedy replies, ties half) with its Wilson 95%
interval, the mean reply length in tokens of both (a length-hacked win shows there), and the
method's wall time (data building, training and the win rate).

Part 2, ``--poolings``: a reward model per pooling (``last``, ``eos``, ``mean``, ``max``), each
trained like ``reward_model`` (``reward_train``, ``--pooling-steps`` steps) into
``$SCRIPTORIUM_DATA/reward_pooling/<pooling>/``, then scored on *every* held-out pair: pairwise
accuracy with its Wilson interval, and ECE (``reward_train.ece_bins`` bins). ``existing`` scores
the data root's own ``reward_model`` the same way, without training it.

Prints a table for each part and, as the last line, one JSON object with every figure and the
machine it ran on. Existing folders of the data root are never written, only the two above.

    SCRIPTORIUM_DATA=/tmp/demo_data python benchmarks/alignment_methods.py --profile demo \
        --methods dpo grpo best_of_n rrhf weighted --poolings last eos mean max
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import emit, machine_info  # noqa: E402

METHODS = ("dpo", "grpo", "best_of_n", "rrhf", "weighted")
POOLINGS = ("last", "eos", "mean", "max")


def run_method(method: str, profile: dict[str, Any], root: Path) -> dict[str, Any]:
    """Train ``method`` into ``root/rlhf/<method>`` and read its win rate back."""
    from llm_core.stages import stage_module
    from pipeline.artefacts import Artefacts

    stage = stage_module(method)
    out = root / "rlhf" / method
    config = stage.Config.from_profile(
        profile, Artefacts(root).stage_inputs(method), out_dir=out, device="cpu"
    )
    t0 = time.perf_counter()
    result = stage.run(config)
    wall = time.perf_counter() - t0
    win = result.summary.get("win_rate") or {}
    return {
        "method": method,
        "win_rate": win.get("win_rate"),
        "ci95": win.get("ci95"),
        "wins": win.get("wins"),
        "ties": win.get("ties"),
        "losses": win.get("losses"),
        "n": win.get("n"),
        "policy_reward_mean": win.get("reward_mean"),
        "sft_reward_mean": win.get("baseline_reward_mean"),
        "reply_tokens_mean": win.get("reply_tokens_mean"),
        "sft_reply_tokens_mean": win.get("baseline_reply_tokens_mean"),
        "steps": result.train.steps,
        "wall_time_s": round(wall, 1),
        "beats_sft": bool(win.get("ci95") and win["ci95"][0] > 0.5),
        "out": str(out),
    }


def run_pooling(pooling: str, profile: dict[str, Any], root: Path, steps: int) -> dict[str, Any]:
    """Train a reward model with ``pooling`` into ``root/reward_pooling/<pooling>`` and score it
    on every held-out pair."""
    from llm_core.align import Preferences, encode_pairs, pair_batches
    from llm_core.evaluate import wilson_interval
    from llm_core.reward import load_reward_model, pair_margins, reward_metrics
    from llm_core.sft import ChatSpecials
    from llm_core.stages import reward
    from llm_core.tokenizer import load_tokenizer
    from pipeline.artefacts import Artefacts

    inputs = Artefacts(root).stage_inputs("reward")
    out = root / "reward_pooling" / pooling if pooling != "existing" else root / "reward_model"
    config = reward.Config.from_profile(profile, inputs, out_dir=out, steps=steps, device="cpu")
    wall, source = None, "trained here"
    if pooling == "existing":  # the data root's own reward_model, scored only
        pooling = load_reward_model(out).pooling
        config = dataclasses.replace(config, pooling=pooling)
        steps_done = json.loads((out / "metrics.json").read_text()).get("steps")
        source = "the data root's reward_model"
    else:
        config = dataclasses.replace(config, pooling=pooling)
        t0 = time.perf_counter()
        reward.run(config)
        wall = round(time.perf_counter() - t0, 1)
        steps_done = config.train.steps
    tok = load_tokenizer(config.tokenizer)
    model = load_reward_model(config.out_dir)
    val = Preferences.read_parquet(config.val_path)
    data = encode_pairs(tok, val, model.config.context_length)
    batches = pair_batches(data, 16, ChatSpecials.from_tokenizer(tok).pad)
    m = reward_metrics(pair_margins(model, batches), config.ece_bins)
    n = int(m["pairs"])
    return {
        "pooling": pooling,
        "accuracy": m["accuracy"],
        "accuracy_ci95": wilson_interval(m["accuracy"] * n, n),
        "ece": m["ece"],
        "ece_bins": config.ece_bins,
        "margin": m["margin"],
        "pairs": n,
        "steps": steps_done,
        "wall_time_s": wall,
        "folder": str(out),
        "source": source,
    }


def _fmt_ci(ci: Any) -> str:
    return f"[{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "-"


def main(argv: list[str] | None = None) -> int:
    from llm_core.config import load_profile
    from pipeline.artefacts import data_root

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="demo")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--poolings",
        nargs="*",
        default=list(POOLINGS),
        choices=[*POOLINGS, "existing"],
        help="'existing': also score the data root's own reward_model (no training)",
    )
    p.add_argument("--pooling-steps", type=int, default=0, help="0: reward_train.steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    root, profile = data_root(), load_profile(args.profile)
    before = machine_info()
    methods, poolings = [], []
    for method in args.methods:
        methods.append(run_method(method, profile, root))
        r = methods[-1]
        print(
            f"{method:10s} win {r['win_rate']:.1%} {_fmt_ci(r['ci95'])} "
            f"(W/T/L {r['wins']}/{r['ties']}/{r['losses']}) reply {r['reply_tokens_mean']:.1f} "
            f"vs sft {r['sft_reply_tokens_mean']:.1f} tokens, {r['wall_time_s']:.0f} s",
            flush=True,
        )
    for pooling in args.poolings:
        poolings.append(run_pooling(pooling, profile, root, args.pooling_steps))
        r = poolings[-1]
        print(
            f"pooling {pooling:5s} accuracy {r['accuracy']:.1%} {_fmt_ci(r['accuracy_ci95'])} "
            f"ECE {r['ece']:.3f} on {r['pairs']} pairs, {r['steps']} steps, {r['wall_time_s']} s",
            flush=True,
        )
    result = {
        "benchmark": "alignment_methods",
        "profile": args.profile,
        "data_root": str(root),
        "methods": methods,
        "poolings": poolings,
        "machine_before": before,
        "machine_after": machine_info(),
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
