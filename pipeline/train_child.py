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
    from llm_core.generate import chat_replies
    from llm_core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    model = load_weights(weights_dir).eval()
    messages = [[{"role": "user", "content": p}] for p in prompts]
    answers = chat_replies(model, tok, messages, n_new, batch_size=len(messages))
    return {p: a or "(no text)" for p, a in zip(prompts, answers, strict=True)}


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A browsable link: the server itself for http stores, else the `make ui` MLflow UI."""
    base = tracking_uri if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def stage_train_config(
    profile: dict[str, Any], section: str, ex: dict[str, Any], overlay: str | None = None
) -> TrainConfig:
    """The profile's ``section`` as a TrainConfig, with the run's step and device overrides.

    ``overlay`` names a method whose mapping inside the section overrides the section's own keys
    (e.g. ``rlhf.grpo``), and is recorded as ``method``; the other methods' mappings are left out.
    """
    raw = dict(profile.get(section) or {})
    train = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    if overlay is not None:
        train.update({"method": overlay, **(raw.get(overlay) or {})})
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
    overlay: str | None = None  # mapping inside ``section`` that overrides it (a method's own)


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


# ------------------------------------------------------------------------------ alignment
def _preferences(path: str) -> Any:
    """A ``preference_pairs`` split as plain lists for llm_core; a train split must not be empty
    (an empty val split only turns validation off)."""
    from llm_core.align import Preferences
    from pipeline.text.preferences import read_pairs

    prefs = Preferences.from_records(read_pairs(path))
    if not len(prefs) and Path(path).name.startswith("train"):
        raise ValueError(f"{path}: no preference pairs to train on (see its rejects.parquet)")
    return prefs


def _reward_fn(ex: dict[str, Any], cfg: TrainConfig) -> Any:
    """``(prompts, replies) -> rewards`` from the ``reward_model`` artefact."""
    import functools

    from llm_core.reward import load_reward_model, score_replies
    from llm_core.tokenizer import load_tokenizer
    from llm_core.trainer import resolve_device

    model = load_reward_model(ex["reward_model"], device=resolve_device(cfg.device))
    return functools.partial(score_replies, model, load_tokenizer(ex["tokenizer"]))


def _on_pairs(
    run_fn: Callable[..., Any],
    ex: dict[str, Any],
    cfg: TrainConfig,
    callbacks: Sequence[Any],
    **kw: Any,
) -> Any:
    """``run_fn`` (run_reward_training, run_dpo) on the train and val preference pairs."""
    return run_fn(
        _preferences(ex["train_path"]),
        _preferences(ex["val_path"]),
        ex["init_weights"],
        ex["tokenizer"],
        ex["out_dir"],
        cfg,
        callbacks=callbacks,
        resume=bool(ex["resume"]),
        **kw,
    )


def _reward_train_fn(
    ex: dict[str, Any], cfg: TrainConfig, callbacks: Sequence[Any]
) -> tuple[TrainResult, dict[str, Any]]:
    from llm_core.reward import run_reward_training

    run = _on_pairs(
        run_reward_training,
        ex,
        cfg,
        callbacks,
        pooling=str(cfg.extra.get("pooling", "last")),
        lm_loss_weight=float(cfg.extra.get("lm_loss_weight", 0.0)),
    )
    return run.result, run.summary


def _accuracy_ci(summary: dict[str, Any]) -> tuple[float, float] | None:
    from llm_core.evaluate import wilson_interval

    acc, n = summary.get("val_accuracy"), int(summary.get("val_pairs") or 0)
    return wilson_interval(acc * n, n) if acc is not None and n else None


def _reward_metadata(result: TrainResult, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "val_accuracy": _meta(summary.get("val_accuracy"), "float"),
        "val_accuracy_ci95": _meta(_accuracy_ci(summary), "json"),
        "val_accuracy_before": _meta(summary.get("val_accuracy_before"), "float"),
        "val_margin": _meta(summary.get("val_margin"), "float"),
        "val_ece": _meta(summary.get("val_ece"), "float"),
        "pooling": _meta(summary.get("pooling"), "text"),
        "lm_loss_weight": _meta(summary.get("lm_loss_weight"), "float"),
        "train_pairs": _meta(summary.get("train_pairs"), "int"),
        "val_pairs": _meta(summary.get("val_pairs"), "int"),
    }


def reward_examples(ex: dict[str, Any], n: int = 3) -> dict[str, str]:
    """Rewards of the first held-out pairs, chosen against rejected, for a glance at the model."""
    from llm_core.reward import load_reward_model, score_replies
    from llm_core.tokenizer import load_tokenizer

    pairs = _preferences(ex["val_path"]).head(n)
    model, tok = load_reward_model(ex["out_dir"]), load_tokenizer(ex["tokenizer"])
    rc = score_replies(model, tok, pairs.prompts, pairs.chosen)
    rr = score_replies(model, tok, pairs.prompts, pairs.rejected)
    return {
        p[-1]["content"][:200]: f"chosen {c:+.3f} vs rejected {r:+.3f}"
        for p, c, r in zip(pairs.prompts, rc, rr, strict=True)
    }


def _held_out_prompts(ex: dict[str, Any], n: int) -> list[list[dict[str, str]]]:
    """The first ``n`` distinct prompts of the held-out pairs (the same for every method)."""
    from llm_core.align import unique_prompts

    return unique_prompts(_preferences(ex["val_path"]).prompts)[:n]


def rlhf_win_rate(ex: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Reward-model win rate of the aligned model over the SFT model on held-out prompts
    (``rlhf.win_rate_prompts`` of them, greedy replies of ``rlhf.max_new_tokens``)."""
    from llm_core.checkpoint import load_weights
    from llm_core.reward import load_reward_model, policy_win_rate
    from llm_core.tokenizer import load_tokenizer
    from llm_core.trainer import resolve_device

    section = load_profile(ex["profile"]).get("rlhf") or {}
    dev = resolve_device(device)
    prompts = _held_out_prompts(ex, int(section.get("win_rate_prompts", 8)))
    return policy_win_rate(
        load_reward_model(ex["reward_model"], device=dev),
        load_tokenizer(ex["tokenizer"]),
        load_weights(ex["out_dir"], device=dev).eval(),
        load_weights(ex["init_weights"], device=dev).eval(),
        prompts,
        max_new_tokens=int(section.get("max_new_tokens", 32)),
    )


def _with_win_rate(
    ex: dict[str, Any], cfg: TrainConfig, callbacks: Sequence[Any], run: Any
) -> tuple[TrainResult, dict[str, Any]]:
    """Add the win rate to the run's summary (and ``metrics.json``) and report it to the
    callbacks as the run's last evaluation, so MLflow records it with the other metrics."""
    from llm_core.pretrain import write_metrics

    if int(os.environ.get("RANK", "0")) != 0:
        return run.result, run.summary
    win = rlhf_win_rate(ex, cfg.device)
    summary = {**run.summary, "win_rate": win}
    write_metrics(Path(ex["out_dir"]), summary)
    scalars = {
        "win_rate": win["win_rate"],
        "policy_reward": win["reward_mean"],
        "sft_reward": win["baseline_reward_mean"],
    }
    for cb in callbacks:
        if hasattr(cb, "on_eval"):
            cb.on_eval(run.result.steps, scalars)
    return run.result, summary


def _dpo_fn(
    ex: dict[str, Any], cfg: TrainConfig, callbacks: Sequence[Any]
) -> tuple[TrainResult, dict[str, Any]]:
    from llm_core.align import run_dpo

    run = _on_pairs(run_dpo, ex, cfg, callbacks, beta=float(cfg.extra.get("beta", 0.1)))
    return _with_win_rate(ex, cfg, callbacks, run)


def _grpo_fn(
    ex: dict[str, Any], cfg: TrainConfig, callbacks: Sequence[Any]
) -> tuple[TrainResult, dict[str, Any]]:
    from llm_core.align import unique_prompts
    from llm_core.rl import GRPOConfig, run_grpo

    run = run_grpo(
        unique_prompts(_preferences(ex["train_path"]).prompts),
        unique_prompts(_preferences(ex["val_path"]).prompts),
        ex["init_weights"],
        ex["tokenizer"],
        ex["out_dir"],
        cfg,
        _reward_fn(ex, cfg),
        GRPOConfig.from_dict(cfg.extra),
        callbacks=callbacks,
        resume=bool(ex["resume"]),
    )
    return _with_win_rate(ex, cfg, callbacks, run)


def _best_of_n_fn(
    ex: dict[str, Any], cfg: TrainConfig, callbacks: Sequence[Any]
) -> tuple[TrainResult, dict[str, Any]]:
    from llm_core.align import unique_prompts
    from llm_core.rl import run_best_of_n

    x = cfg.extra
    prompts = unique_prompts(_preferences(ex["train_path"]).prompts)
    run = run_best_of_n(
        prompts[: int(x.get("prompts", len(prompts)))],
        _held_out_prompts(ex, int(x.get("val_prompts", 16))),
        ex["init_weights"],
        ex["tokenizer"],
        ex["out_dir"],
        cfg,
        _reward_fn(ex, cfg),
        n=int(x.get("n", 4)),
        max_new_tokens=int(x.get("max_new_tokens", 32)),
        temperature=float(x.get("temperature", 1.0)),
        callbacks=callbacks,
        resume=bool(ex["resume"]),
    )
    return _with_win_rate(ex, cfg, callbacks, run)


# What each method adds to the metadata (beyond the win rate): summary keys, final metrics keys.
_METHOD_SUMMARY = {
    "dpo": ("beta", "train_pairs", "val_pairs"),
    "grpo": (
        "reward_first",
        "reward_last",
        "kl_last",
        "reply_len_last",
        "val_reward_before",
        "val_reward_after",
    ),
    "best_of_n": ("n", "winners", "empty_winners", "sample_reward_mean", "winner_reward_mean"),
}
_METHOD_FINAL = {
    "dpo": (
        "val_reward_accuracy",
        "val_reward_margin",
        "val_logps_chosen",
        "val_logps_rejected",
    ),
    "grpo": (),
    "best_of_n": (),
}


def _rlhf_metadata(result: TrainResult, summary: dict[str, Any]) -> dict[str, Any]:
    method = str(summary.get("method"))
    win = summary.get("win_rate") or {}
    meta: dict[str, Any] = {
        "method": _meta(method, "text"),
        "win_rate": _meta(win.get("win_rate"), "float"),
        "win_rate_ci95": _meta(win.get("ci95"), "json"),
        "win_rate_counts": _meta(
            {k: win.get(k) for k in ("wins", "ties", "losses", "n")} if win else None, "json"
        ),
        "policy_reward_mean": _meta(win.get("reward_mean"), "float"),
        "sft_reward_mean": _meta(win.get("baseline_reward_mean"), "float"),
        "win_rate_examples": _meta(
            "\n\n".join(
                f"**{e['prompt'][:200]}**<br>aligned: {e['reply']!r}<br>sft: {e['baseline_reply']!r}"
                for e in win.get("examples", [])
            )
            or None,
            "md",
        ),
    }
    for key in _METHOD_SUMMARY.get(method, ()):
        value = summary.get(key)
        meta[key] = _meta(value, "int" if isinstance(value, int) else "float")
    for key in _METHOD_FINAL.get(method, ()):
        meta[key] = _meta(result.final_metrics.get(key), "float")
    return meta


def _rlhf_stage(method: str, train: TrainFn) -> Stage:
    return Stage(
        section="rlhf",
        overlay=method,
        train=train,
        samples=lambda ex: chat_answers(Path(ex["out_dir"]), Path(ex["tokenizer"])),
        samples_key="answers",
        metadata=_rlhf_metadata,
    )


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
    "reward": Stage(
        section="reward_train",
        train=_reward_train_fn,
        samples=reward_examples,
        samples_key="val_pair_rewards",
        metadata=_reward_metadata,
    ),
    "dpo": _rlhf_stage("dpo", _dpo_fn),
    "grpo": _rlhf_stage("grpo", _grpo_fn),
    "best_of_n": _rlhf_stage("best_of_n", _best_of_n_fn),
}


def _model_config(profile: dict[str, Any], ex: dict[str, Any]) -> dict[str, Any]:
    """The trained model's config: the starting weights' own (fine-tuning stages, which may start
    from an imported checkpoint), else the profile's (pretraining)."""
    init = ex.get("init_weights")
    config = Path(init) / "config.json" if init else None
    if config is not None and config.is_file():
        return json.loads(config.read_text())
    return model_config_from_profile(profile).to_dict()


def _runtime() -> dict[str, str]:
    """What the numbers depend on besides the config: the torch build and the CPU's kernels."""
    import torch

    from llm_core.model import cpu_bf16_kernels

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_kernels": cpu_bf16_kernels(),
    }


def _precision(train_cfg: TrainConfig, summary: dict[str, Any], runtime: dict[str, str]) -> str:
    """``float32``, ``bfloat16`` or, on a CPU without native bf16 GEMMs, ``bfloat16 (emulated)``."""
    on_cpu = str(summary.get("device", "cpu")).startswith("cpu")
    if train_cfg.dtype == "bfloat16" and on_cpu and runtime["cpu_bf16_kernels"] == "emulated":
        return "bfloat16 (emulated: float32 GEMMs on bf16 operands)"
    return train_cfg.dtype


def run_stage(stage: Stage, ex: dict[str, Any], pipes: Any | None) -> None:
    """Train one stage; on rank 0 with Pipes, track it in MLflow and report the materialisation."""
    profile = load_profile(ex["profile"])
    train_cfg = stage_train_config(profile, stage.section, ex, stage.overlay)
    out = Path(ex["out_dir"])
    if int(os.environ.get("RANK", "0")) != 0 or pipes is None:
        stage.train(ex, train_cfg, ())
        return

    from llm_core.tracking import MlflowTracker

    tracker = MlflowTracker(ex["mlflow_uri"], ex["experiment"])
    t0 = time.perf_counter()
    with tracker.start_run(ex["run_name"], ex["tags"]) as run:
        model = _model_config(profile, ex)
        runtime = _runtime()
        tracker.log_params(
            {
                "profile": profile.get("name"),
                "model": model,
                stage.section: train_cfg.to_dict(),
                "runtime": runtime,
            }
        )
        if train_cfg.dtype == "bfloat16":  # on a CPU, which bf16 GEMMs (see cpu_bf16_kernels)
            pipes.log.info(f"bf16 autocast; on CPU its GEMMs are {runtime['cpu_bf16_kernels']}")
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
            "precision": _meta(_precision(train_cfg, summary, runtime), "text"),
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
