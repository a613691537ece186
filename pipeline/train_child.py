"""The training subprocess that Dagster Pipes launches (``python -m pipeline.train_child``).

It runs ``llm_core`` with plain arguments taken from the Pipes extras, opens the MLflow run,
streams progress into the Dagster run's event log and reports the materialisation back. Keeping
training out of the code server's process means torch memory is released when the run ends and
``torchrun`` works: under it every rank trains, and only rank 0 talks to Pipes and MLflow.

Every stage (``pretrain``, ``sft``) shares :func:`run_stage`: profile and train config, the
MLflow run with its params, artefacts, loss curve and registered model, fixed-prompt samples and
the common metadata. A :class:`Stage` only says how to train and what it adds to the metadata.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_core.config import TrainConfig, load_profile, model_config_from_profile
from llm_core.trainer import Callback, TrainResult

SAMPLE_PROMPTS = (
    "It was a dark and stormy night",
    "The old man looked at the sea and said",
    "Once upon a time there lived a king who",
)
# Fixed chat prompts, answered greedily after SFT so runs can be compared side by side.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a short poem about the sea.",
    "If I have 3 apples and buy 5 more, how many apples do I have?",
    "Write a Python function that returns the square of a number.",
)


class PipesProgress(Callback):
    """Step and eval metrics as Dagster log lines (the UI streams them while the run goes)."""

    def __init__(self, pipes: Any, every: int) -> None:
        self.pipes, self.every = pipes, max(every, 1)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            self.pipes.log.info(f"step {step}: {shown}")

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        self.pipes.log.info(f"eval @ {step}: {shown}")


def sample_continuations(
    weights_dir: Path, tokenizer_path: Path, n_new: int = 40
) -> dict[str, str]:
    """Continuations of fixed prompts, sampled with a fixed seed so reruns are comparable."""
    from llm_core.checkpoint import load_weights
    from llm_core.generate import generate
    from llm_core.tokenizer import EOT, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    model = load_weights(weights_dir).eval()
    out = {}
    for prompt in SAMPLE_PROMPTS:
        ids = tok.encode(prompt, add_special_tokens=False).ids
        new = generate(
            model, ids, n_new, temperature=0.8, top_k=50, stop_ids=(tok.token_to_id(EOT),), seed=0
        )[0]
        out[prompt] = tok.decode(new, skip_special_tokens=True)
    return out


def chat_answers(
    weights_dir: Path, tokenizer_path: Path, prompts: Sequence[str] = CHAT_PROMPTS, n_new: int = 48
) -> dict[str, str]:
    """Greedy answers of the chat model to fixed single-turn prompts (one batched generate)."""
    from llm_core.checkpoint import load_weights
    from llm_core.generate import generate
    from llm_core.sft import ChatSpecials, encode_prompt
    from llm_core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    sp = ChatSpecials.from_tokenizer(tok)
    model = load_weights(weights_dir).eval()
    ids = [encode_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    n_new = max(1, min(n_new, model.config.context_length - max(map(len, ids))))
    new = generate(model, ids, n_new, temperature=0.0, stop_ids=(sp.end, sp.eot), pad_id=sp.pad)
    answers = (tok.decode(a, skip_special_tokens=True).strip() for a in new)
    return {p: a or "(no text)" for p, a in zip(prompts, answers, strict=True)}


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A browsable link: the server itself for http stores, else the `make ui` MLflow UI."""
    base = tracking_uri if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def stage_train_config(profile: dict[str, Any], section: str, ex: dict[str, Any]) -> TrainConfig:
    """The profile's ``section`` as a TrainConfig, with the run's step and device overrides."""
    train = dict(profile.get(section) or {})
    train.setdefault("seed", profile.get("seed", 1337))
    if ex.get("steps"):
        train["steps"] = int(ex["steps"])
    train["device"] = ex.get("device") or "auto"
    return TrainConfig.from_dict(train)


def _meta(value: Any, kind: str) -> dict[str, Any]:
    return {"raw_value": value, "type": kind}


# (extras, train config, callbacks) -> (result, summary written to metrics.json)
TrainFn = Callable[[dict[str, Any], TrainConfig, Sequence[Any]], tuple[TrainResult, dict[str, Any]]]


@dataclass(frozen=True)
class Stage:
    """What differs between training stages; everything else is :func:`run_stage`."""

    section: str  # profile section holding the TrainConfig
    train: TrainFn
    samples: Callable[[dict[str, Any]], dict[str, str]]  # fixed prompts -> model output
    samples_key: str  # metadata name of those samples
    metadata: Callable[[TrainResult, dict[str, Any]], dict[str, Any]]


def _pretrain_fn(
    ex: dict[str, Any], cfg: TrainConfig, callbacks: Sequence[Any]
) -> tuple[TrainResult, dict[str, Any]]:
    from llm_core.pretrain import run_pretraining

    model_cfg = model_config_from_profile(load_profile(ex["profile"]))
    out = Path(ex["out_dir"])
    result = run_pretraining(
        ex["shards_dir"], out, model_cfg, cfg, callbacks=callbacks, resume=bool(ex["resume"])
    )
    metrics = out / "metrics.json"
    return result, json.loads(metrics.read_text()) if metrics.exists() else {}


def _sft_fn(
    ex: dict[str, Any], cfg: TrainConfig, callbacks: Sequence[Any]
) -> tuple[TrainResult, dict[str, Any]]:
    from llm_core.finetune import run_sft

    run = run_sft(
        ex["train_path"],
        ex["val_path"],
        ex["init_weights"],
        ex["tokenizer"],
        ex["out_dir"],
        cfg,
        packing=bool(cfg.extra.get("packing", True)),
        callbacks=callbacks,
        resume=bool(ex["resume"]),
    )
    return run.result, run.summary


def _sft_metadata(result: TrainResult, summary: dict[str, Any]) -> dict[str, Any]:
    before, after = summary.get("val_loss_before"), summary.get("val_loss_after")
    change = after - before if before is not None and after is not None else None
    data = summary.get("train_data", {})
    return {
        "val_loss_pretrained": _meta(before, "float"),
        "val_loss_change": _meta(change, "float"),
        "packing": _meta(summary.get("packing"), "bool"),
        "train_conversations": _meta(data.get("conversations"), "int"),
        "train_supervised_tokens": _meta(data.get("supervised_tokens"), "int"),
        "train_truncated": _meta(data.get("truncated"), "int"),
        "val_conversations": _meta(summary.get("val_data", {}).get("conversations"), "int"),
    }


STAGES: dict[str, Stage] = {
    "pretrain": Stage(
        section="pretrain",
        train=_pretrain_fn,
        samples=lambda ex: sample_continuations(Path(ex["out_dir"]), Path(ex["tokenizer"])),
        samples_key="samples",
        metadata=lambda result, _: {
            "final_val_bpb": _meta(result.final_metrics.get("val_bpb"), "float")
        },
    ),
    "sft": Stage(
        section="sft_train",
        train=_sft_fn,
        samples=lambda ex: chat_answers(Path(ex["out_dir"]), Path(ex["tokenizer"])),
        samples_key="answers",
        metadata=_sft_metadata,
    ),
}


def run_stage(stage: Stage, ex: dict[str, Any], pipes: Any | None) -> None:
    """Train one stage; on rank 0 with Pipes, track it in MLflow and report the materialisation."""
    profile = load_profile(ex["profile"])
    train_cfg = stage_train_config(profile, stage.section, ex)
    out = Path(ex["out_dir"])
    if int(os.environ.get("RANK", "0")) != 0 or pipes is None:
        stage.train(ex, train_cfg, ())
        return

    from llm_core.tracking import MlflowTracker

    tracker = MlflowTracker(ex["mlflow_uri"], ex["experiment"])
    t0 = time.perf_counter()
    with tracker.start_run(ex["run_name"], ex["tags"]) as run:
        model = model_config_from_profile(profile).to_dict()
        tracker.log_params(
            {"profile": profile.get("name"), "model": model, stage.section: train_cfg.to_dict()}
        )
        callbacks = [tracker.callback(), PipesProgress(pipes, train_cfg.log_every)]
        result, summary = stage.train(ex, train_cfg, callbacks)
        tracker.log_artifacts(weights_dir=out, config=profile, tokenizer_file=ex["tokenizer"])
        tracker.log_artifact(out / "metrics.json")
        tracker.log_loss_curve_png(result.history, result.eval_history)
        version = tracker.register_model(ex["registered_model"], run.info.run_id)
        samples = stage.samples(ex)
        tracker.client.log_dict(run.info.run_id, samples, f"{stage.samples_key}.json")
        run_id, exp_id = run.info.run_id, run.info.experiment_id
    final = result.final_metrics
    link = run_link(tracker.tracking_uri, exp_id, run_id)
    pipes.report_asset_materialization(
        metadata={
            "params": _meta(summary.get("num_params"), "int"),
            "tokens_seen": _meta(result.tokens_seen, "int"),
            "steps": _meta(result.steps, "int"),
            "final_train_loss": _meta(final.get("loss"), "float"),
            "final_val_loss": _meta(final.get("val_loss"), "float"),
            **stage.metadata(result, summary),
            "tokens_per_s": _meta(round(result.tokens_per_s, 1), "float"),
            "mfu": _meta(result.mfu, "float"),
            "wall_time_s": _meta(round(time.perf_counter() - t0, 1), "float"),
            "device": _meta(summary.get("device"), "text"),
            "world_size": _meta(summary.get("world_size"), "int"),
            "mlflow_run_id": _meta(run_id, "text"),
            "mlflow_run": _meta(link, "url"),
            "registered_model": _meta(f"{ex['registered_model']} v{version}", "text"),
            stage.samples_key: _meta("\n\n".join(f"**{p}** {c}" for p, c in samples.items()), "md"),
            "path": _meta(str(out / "model.safetensors"), "path"),
        },
        data_version=ex.get("data_version"),
    )


def main() -> None:
    from dagster_pipes import open_dagster_pipes

    if int(os.environ.get("RANK", "0")) != 0:
        # Other torchrun ranks train but never touch the Pipes channel.
        extras = json.loads(os.environ["SCRIPTORIUM_TRAIN_EXTRAS"])
        run_stage(STAGES[extras["stage"]], extras, None)
        return
    with open_dagster_pipes() as pipes:
        stage = pipes.get_extra("stage")
        if stage not in STAGES:
            raise ValueError(f"unknown training stage {stage!r}; expected one of {sorted(STAGES)}")
        run_stage(STAGES[stage], dict(pipes.extras), pipes)


if __name__ == "__main__":
    main()
