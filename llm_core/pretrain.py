"""Pretraining entry point: token shards in, ``model.safetensors`` + metrics out.

``run_pretraining`` is the importable core (the pipeline calls it from a Dagster Pipes subprocess
and observes progress through ``callbacks``); ``python -m llm_core.pretrain`` is the CLI around it,
with optional MLflow logging. Both work single-process and under
``torchrun --nproc_per_node N`` (only rank 0 writes files and talks to MLflow).

``TrainConfig.batch_size`` is the *global* micro-batch (sequences per forward pass, summed over
ranks), so changing the number of processes changes speed, not the optimisation trajectory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llm_core.checkpoint import save_weights
from llm_core.config import (
    ModelConfig,
    TrainConfig,
    load_profile,
    model_config_from_profile,
    train_config_from_profile,
)
from llm_core.data import (
    EvalBatches,
    RandomWindowSampler,
    TokenShards,
    atomic_write_bytes,
    read_manifest,
)
from llm_core.evaluate import make_lm_evaluator
from llm_core.objectives import LMObjective
from llm_core.trainer import Trainer, TrainResult, init_distributed

log = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    """Strict JSON: NaN/Inf become ``null`` (the default encoder would emit invalid ``NaN``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_metrics(out: Path, summary: dict[str, Any]) -> None:
    """``out/metrics.json`` in strict JSON, written atomically."""
    atomic_write_bytes(
        out / "metrics.json", (json.dumps(_json_safe(summary), indent=2) + "\n").encode()
    )


def run_pretraining(
    shards_dir: str | Path,
    out_dir: str | Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    *,
    device: str | None = None,
) -> TrainResult:
    """Pretrain a fresh ``Transformer`` on ``shards_dir`` and write it to ``out_dir``.

    Writes ``out_dir/model.safetensors``, ``config.json``, ``checkpoints/`` and ``metrics.json``.
    ``resume=True`` continues from the latest checkpoint in ``out_dir/checkpoints`` (or starts
    fresh if there is none). Joins/creates the torchrun process group when launched under one and
    tears it down again only if it created it.
    """
    from llm_core.model import Transformer

    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device or train_cfg.device)
    owns_group = owns_group and info.distributed
    try:
        out = Path(out_dir)
        manifest = read_manifest(shards_dir)
        if int(manifest["vocab_size"]) > model_cfg.vocab_size:
            raise ValueError(
                f"{Path(shards_dir) / 'manifest.json'}: shards use vocab_size "
                f"{manifest['vocab_size']} but the model has only {model_cfg.vocab_size}"
            )
        seq_len = model_cfg.context_length
        train = TokenShards(shards_dir, "train")
        sampler = RandomWindowSampler(
            train,
            train_cfg.batch_size,
            seq_len,
            seed=train_cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        evaluator = None
        val_split = manifest["splits"].get("val")
        if val_split and int(val_split["tokens"]) > 0 and train_cfg.eval_batches > 0:
            val = TokenShards(shards_dir, "val")
            val_batches = EvalBatches(
                val,
                train_cfg.batch_size,
                seq_len,
                train_cfg.eval_batches,
                rank=info.rank,
                world_size=info.world_size,
            )
            evaluator = make_lm_evaluator(val_batches, val.tokens_per_byte)
        elif info.is_main:
            log.warning("no usable 'val' split in %s: validation disabled", shards_dir)

        torch.manual_seed(train_cfg.seed)  # identical init on every rank (DDP also broadcasts)
        model = Transformer(model_cfg).to(info.device)
        if info.is_main:
            log.info(
                "model: %.2fM params on %s x%d",
                model.num_params() / 1e6,
                info.device,
                info.world_size,
            )
        trainer = Trainer(
            model,
            LMObjective(),
            train_cfg,
            sampler,
            evaluator=evaluator,
            out_dir=out,
            callbacks=callbacks,
            dist_info=info,
        )
        result = trainer.fit(resume=resume)
        if info.is_main:
            save_weights(model, out)
            summary = {
                **result.to_dict(),
                "num_params": model.num_params(),
                "world_size": info.world_size,
                "device": str(info.device),
                "model_config": model_cfg.to_dict(),
                "train_config": train_cfg.to_dict(),
                "shards": {
                    "dir": str(shards_dir),
                    "tokenizer_sha256": manifest.get("tokenizer_sha256"),
                },
            }
            write_metrics(out, summary)
        if info.distributed:
            dist.barrier()
        return result
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--tag expects key=value, got {item!r}")
        tags[key] = value
    return tags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llm_core.pretrain", description=__doc__.split("\n")[0]
    )
    p.add_argument("--shards", required=True, type=Path, help="token shard directory")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--profile", default=None, help="profile name (tiny, demo …) or YAML path")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--steps", type=int, default=None, help="override pretrain.steps")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default sqlite in data root)")
    p.add_argument("--mlflow-experiment", default=None, help="enables MLflow logging")
    p.add_argument("--mlflow-run-name", default=None)
    p.add_argument("--register-model", default=None, help="register the weights under this name")
    p.add_argument("--tag", action="append", default=[], help="run tag key=value (repeatable)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    profile = load_profile(args.profile)
    model_cfg = model_config_from_profile(profile)
    train_cfg = train_config_from_profile(profile, "pretrain")
    if args.steps is not None:
        train_cfg = TrainConfig.from_dict({**train_cfg.to_dict(), "steps": args.steps})
    rank = int(os.environ.get("RANK", "0"))
    use_mlflow = rank == 0 and (args.mlflow_uri or args.mlflow_experiment)
    if not use_mlflow:
        run_pretraining(
            args.shards, args.out, model_cfg, train_cfg, resume=args.resume, device=args.device
        )
        return 0

    from llm_core.tracking import MlflowTracker

    tracker = MlflowTracker(args.mlflow_uri, args.mlflow_experiment or "scriptorium")
    with tracker.start_run(args.mlflow_run_name, _parse_tags(args.tag)) as run:
        tracker.log_params(
            {
                "profile": profile.get("name", args.profile),
                "model": model_cfg.to_dict(),
                "pretrain": train_cfg.to_dict(),
            }
        )
        result = run_pretraining(
            args.shards,
            args.out,
            model_cfg,
            train_cfg,
            callbacks=[tracker.callback()],
            resume=args.resume,
            device=args.device,
        )
        tracker.log_artifacts(weights_dir=args.out, config=profile)
        tracker.log_artifact(args.out / "metrics.json")
        tracker.log_loss_curve_png(result.history, result.eval_history)
        if args.register_model:
            version = tracker.register_model(args.register_model, run.info.run_id)
            log.info("registered %s version %d", args.register_model, version)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
