"""One evaluation pass over every stage that exists under the artefact root.

:func:`evaluate` loads the benchmark items once, then each stage's weights in turn (one model in
memory at a time), scores it, and keeps only the texts the win rates need; :func:`finalize`
adds the headline figures, the comparison with the previous evaluation and the checks;
:func:`write_report` writes ``report.json``, ``report.md``, ``report.html`` and the items refused
by the loaders (``rejects.parquet``). MLflow reads and writes stay in the Pipes child.

Held-out bits per byte and the assistant-token loss are measured on the same windows and batches
as the training runs' own validation (the profile's ``pretrain`` and ``sft_train`` batch size and
``eval_batches``), so the base model's figure equals its last ``val_bpb`` and a stage's
``sft_val`` loss equals what ``sft_weights`` reported as ``val_loss``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from llm_core.stages.base import json_safe
from pipeline.artefacts import Artefacts
from pipeline.eval import benchmarks, judge
from pipeline.eval.checks import run_checks
from pipeline.eval.humaneval import load_humaneval
from pipeline.eval.methods import method_figures
from pipeline.eval.mmlu import load_mmlu
from pipeline.eval.mmlu_humaneval import mmlu_and_humaneval
from pipeline.eval.prompts import generation_prompts, win_rate_prompts
from pipeline.eval.report import (
    absent,
    compare,
    headline,
    non_finite,
    render_html,
    render_markdown,
)
from pipeline.eval.sets import (
    REJECTS_SCHEMA,
    EvalSetMissing,
    Loaded,
    load_alpaca_eval,
    load_blimp,
    load_gsm8k,
    load_lambada,
    set_files,
)
from pipeline.eval.settings import EvalSettings
from pipeline.io import atomic_write_json, atomic_write_parquet, atomic_write_text, sha256_file

FORMAT = "scriptorium-evaluation/1"
# stage -> the asset holding its weights; the order is the order of training.
STAGE_ASSETS: Mapping[str, str] = {
    "base": "pretrained_weights",
    "sft": "sft_weights",
    "rlhf": "rlhf_weights",
}
CHAT_STAGES = ("sft", "rlhf")
# comparison -> (challenger, baseline)
COMPARED: Mapping[str, tuple[str, str]] = {
    "sft_vs_base": ("sft", "base"),
    "rlhf_vs_sft": ("rlhf", "sft"),
}
LOADERS: Mapping[str, Callable[..., Loaded]] = {
    "blimp": load_blimp,
    "lambada": load_lambada,
    "gsm8k_test": load_gsm8k,
    "alpaca_eval": load_alpaca_eval,
    "mmlu": load_mmlu,
    "humaneval": load_humaneval,
}
Log = Callable[[str], None]
__all__ = ["EvalSettings", "HttpJudgeConfig", "evaluate", "finalize", "load_sets", "write_report"]


@dataclass(frozen=True)
class HttpJudgeConfig:
    """An OpenAI-compatible judge endpoint (``$JUDGE_URL``); the key is never reported."""

    url: str
    model: str
    api_key: str | None = None

    def __repr__(self) -> str:  # the key and URL credentials stay out of logs and tracebacks
        key = judge.REDACTED if self.api_key else None
        return f"HttpJudgeConfig(url={self.public_url!r}, model={self.model!r}, api_key={key!r})"

    @property
    def public_url(self) -> str:
        """The URL without ``user:key@``: what MLflow, Dagster metadata and the report show."""
        return judge.redact_url(self.url)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HttpJudgeConfig | None:
        url = env.get(judge.JUDGE_URL_ENV, "").strip()
        if not url:
            return None
        return cls(
            url, env.get(judge.JUDGE_MODEL_ENV, "judge"), env.get(judge.JUDGE_API_KEY_ENV) or None
        )


def load_sets(
    eval_dir: Path, settings: EvalSettings
) -> tuple[dict[str, Loaded | dict[str, str]], pl.DataFrame]:
    """Every benchmark's items (or why it is absent) and all refused records."""
    loaded: dict[str, Loaded | dict[str, str]] = {}
    rejects = [REJECTS_SCHEMA.to_frame()]
    for set_id, loader in LOADERS.items():
        n = settings.items.get(set_id, 0)
        if n <= 0:
            loaded[set_id] = absent(f"evaluation.items.{set_id} is 0 or unset in the profile")
            continue
        if set_id == "humaneval" and not settings.humaneval.execute:
            loaded[set_id] = absent(
                "evaluation.humaneval.execute is false: generated code runs only when the "
                "profile enables it"
            )
            continue
        try:
            files = set_files(eval_dir, set_id)
        except EvalSetMissing as exc:
            loaded[set_id] = absent(str(exc))
            continue
        result = loader(files, n, settings.seed)
        loaded[set_id] = result
        rejects.append(result.rejects)
    return loaded, pl.concat(rejects)


def _batches(profile: Mapping[str, Any], section: str) -> tuple[int, int]:
    train = profile.get(section) or {}
    return int(train.get("batch_size", 8)), max(1, int(train.get("eval_batches", 8)))


@dataclass
class _Run:
    """What every stage is scored against, loaded once."""

    profile: Mapping[str, Any]
    settings: EvalSettings
    tok: Any
    shards: Path
    sets: dict[str, Loaded | dict[str, str]]
    val_convs: list[list[dict[str, str]]]
    val_path: Path
    win_prompts: list[list[dict[str, str]]]
    log: Log


class _Timer:
    """Runs each measurement under ``inference_mode`` and records how long it took."""

    def __init__(self, stage: str, log: Log) -> None:
        self.stage, self.log = stage, log
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        import torch

        t = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        self.seconds[name] = round(time.perf_counter() - t, 3)
        self.log(f"{self.stage}: {name} in {self.seconds[name]:.1f}s")
        return out


def score_stage(stage: str, model: Any, run: _Run) -> tuple[dict[str, Any], list[str] | None]:
    """Every figure of one stage, and its greedy replies to the win-rate prompts."""
    from llm_core.evaluate import evaluate_assistant_loss, evaluate_heldout
    from llm_core.generate import chat_replies

    s, tok, timed = run.settings, run.tok, _Timer(stage, run.log)
    section: dict[str, Any] = {}
    bs, nb = _batches(run.profile, "pretrain")
    section["heldout"] = timed(
        "heldout", lambda: evaluate_heldout(model, run.shards, batch_size=bs, num_batches=nb)
    )
    if run.val_convs:
        sbs, snb = _batches(run.profile, "sft_train")
        section["sft_val"] = timed(
            "sft_val",
            lambda: evaluate_assistant_loss(
                model, tok, run.val_convs, batch_size=sbs, num_batches=snb
            ),
        )
    else:
        section["sft_val"] = absent(f"{run.val_path} does not exist (materialise sft_mixture)")
    for bench, score in (
        ("blimp", benchmarks.blimp_scores),
        ("lambada", benchmarks.lambada_scores),
    ):
        items = run.sets[bench]
        section[bench] = (
            timed(bench, lambda f=score, i=items: f(model, tok, i.items, batch_size=s.batch_size))
            if isinstance(items, Loaded)
            else items
        )
    gsm = run.sets["gsm8k_test"]
    if stage not in CHAT_STAGES:
        section["gsm8k"] = absent("chat stages only")
    elif not isinstance(gsm, Loaded):
        section["gsm8k"] = gsm
    else:
        section["gsm8k"] = timed(
            "gsm8k",
            lambda: benchmarks.gsm8k_scores(
                model,
                tok,
                gsm.items,
                max_new_tokens=s.gsm8k_max_new_tokens,
                batch_size=s.batch_size,
            ),
        )
    section.update(
        mmlu_and_humaneval(
            model, run.tok, run.sets, run.settings, chat=stage in CHAT_STAGES, timed=timed
        )
    )
    section["generations"] = timed(
        "generations",
        lambda: benchmarks.generations(
            model,
            tok,
            generation_prompts(run.profile),
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            seed=s.seed,
            batch_size=s.batch_size,
        ),
    )
    replies = None
    if run.win_prompts:
        replies = timed(
            "win_rate_replies",
            lambda: chat_replies(
                model,
                tok,
                run.win_prompts,
                s.max_new_tokens,
                temperature=0.0,
                batch_size=s.batch_size,
            ),
        )
    section["timing_s"] = dict(timed.seconds)
    return section, replies


def evaluate(
    root: str | Path,
    profile: Mapping[str, Any],
    *,
    judge_config: HttpJudgeConfig | None = None,
    device: str = "cpu",
    log: Log = print,
) -> tuple[dict[str, Any], pl.DataFrame]:
    """Measure every stage present under ``root`` (``$SCRIPTORIUM_DATA``); returns the report
    (without MLflow-derived parts) and the rejected benchmark records. ``device`` takes the
    trainer's spellings (``auto``, ``cpu``, ``cuda``)."""
    from llm_core.checkpoint import load_weights
    from llm_core.stages.session import read_conversations
    from llm_core.tokenizer import load_tokenizer
    from llm_core.trainer import resolve_device

    files = Artefacts(Path(root))
    dev = resolve_device(device)
    settings = EvalSettings.from_profile(profile)
    tokenizer_path = files.tokenizer
    tok = load_tokenizer(tokenizer_path)
    sets, rejects = load_sets(files.eval_sets, settings)
    val_path = files.sft_split("val")
    alpaca = sets["alpaca_eval"]
    run = _Run(
        profile=profile,
        settings=settings,
        tok=tok,
        shards=files.shards,
        sets=sets,
        val_convs=read_conversations(val_path) if val_path.is_file() else [],
        val_path=val_path,
        win_prompts=win_rate_prompts(  # the profile's report_prompts.win_rate (pipeline.eval.prompts)
            profile,
            alpaca.items["instruction"].to_list() if isinstance(alpaca, Loaded) else None,
            files.pairs_split("val"),
            settings.items.get("alpaca_eval", 0),
        ),
        log=log,
    )
    stages: dict[str, Any] = {}
    replies: dict[str, list[str]] = {}
    for stage, asset in STAGE_ASSETS.items():
        weights = files.trained(asset)
        if weights is None:
            stages[stage] = absent(f"{asset} is not materialised")
            continue
        t0 = time.perf_counter()
        model = load_weights(weights, device=dev).eval()
        if tok.get_vocab_size() > model.config.vocab_size:
            raise ValueError(
                f"{tokenizer_path}: vocabulary of {tok.get_vocab_size()} does not fit {weights} "
                f"(vocab_size {model.config.vocab_size}); was the tokenizer retrained?"
            )
        section, stage_replies = score_stage(stage, model, run)
        stages[stage] = {
            "weights": str(files.weights(asset)),
            "weights_sha256": sha256_file(files.weights(asset)),
            "params": model.num_params(),
            "context_length": model.config.context_length,
            **section,
        }
        stages[stage]["timing_s"]["total"] = round(time.perf_counter() - t0, 3)
        if stage_replies is not None:
            replies[stage] = stage_replies
        del model
    win_rates = _win_rates(
        files, tok, run.win_prompts, replies, alpaca, settings, judge_config, log, dev
    )
    report = {
        "format": FORMAT,
        "profile": profile.get("name"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings.to_dict(),
        "device": str(dev),
        "tokenizer_sha256": sha256_file(tokenizer_path),
        "stages": stages,
        "win_rates": win_rates,
        "reward_model": _reward_summary(files),
        "rlhf_methods": method_figures(files),  # one column per materialised method
        "sets": {
            k: (
                {"available": v.available, "used": v.items.height, "rejected": v.rejects.height}
                if isinstance(v, Loaded)
                else v
            )
            for k, v in sets.items()
        },
    }
    return report, rejects


def _reward_summary(files: Artefacts) -> dict[str, Any]:
    if files.trained("reward_model") is None:
        return absent("reward_model is not materialised")
    metrics = files.metrics("reward_model")
    return {
        "weights_sha256": sha256_file(files.weights("reward_model")),
        "metrics": json.loads(metrics.read_text())
        if metrics.is_file()
        else absent(f"{metrics} missing"),
    }


def _win_rates(
    files: Artefacts,
    tok: Any,
    prompts: list[list[dict[str, str]]],
    replies: dict[str, list[str]],
    alpaca: Loaded | dict[str, str],
    settings: EvalSettings,
    judge_config: HttpJudgeConfig | None,
    log: Log,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Each chat stage against the one before it: reward-model judge, optional HTTP judge."""
    out: dict[str, Any] = {}
    reward_dir = files.trained("reward_model")
    rm = None
    for name, (a, b) in COMPARED.items():
        if not prompts:
            why = (
                alpaca.get("absent") if isinstance(alpaca, dict) else "none in the profile's source"
            )
            out[name] = absent(f"no held-out prompts: {why}")
            continue
        if a not in replies or b not in replies:
            missing = [s for s in (a, b) if s not in replies]
            out[name] = absent(f"stage(s) {missing} not materialised")
            continue
        entry: dict[str, Any] = {
            "prompts": len(prompts),
            "replies": "greedy",
            "max_new_tokens": settings.max_new_tokens,
            # Two empty replies tie under any judge: say how many there were.
            f"empty_{a}": sum(not r for r in replies[a]),
            f"empty_{b}": sum(not r for r in replies[b]),
            "examples": [
                {"prompt": p[-1]["content"], a: ra, b: rb}
                for p, ra, rb in list(zip(prompts, replies[a], replies[b], strict=True))[
                    : benchmarks.EXAMPLES
                ]
            ],
        }
        if reward_dir is not None:
            from llm_core.reward import load_reward_model, score_replies

            rm = rm or load_reward_model(reward_dir, device=device).eval()
            t = time.perf_counter()

            def score(ps: Any, rs: Any, rm: Any = rm) -> Any:
                return score_replies(rm, tok, ps, rs, settings.batch_size)

            entry["reward_model"] = judge.reward_judge(score, prompts, replies[a], replies[b])
            log(
                f"{name}: reward-model win rate {entry['reward_model']['win_rate']:.3f} in {time.perf_counter() - t:.1f}s"
            )
        else:
            entry["reward_model"] = absent("reward_model is not materialised")
        if judge_config is not None:
            try:
                entry["http"] = judge.http_judge(
                    judge_config.url,
                    prompts,
                    replies[a],
                    replies[b],
                    model=judge_config.model,
                    api_key=judge_config.api_key,
                )
            except (RuntimeError, OSError) as exc:  # optional judge: reported, never fatal
                entry["http"] = absent(f"judge at {judge_config.public_url} failed: {exc}")
                log(entry["http"]["absent"])
        out[name] = entry
    return out


def finalize(
    report: dict[str, Any],
    *,
    previous: Mapping[str, Any] | None,
    loss_curves: Mapping[str, Any],
    mlflow_run_id: str | None = None,
    history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Add loss curves, headline figures, the comparison, the trend's earlier runs (oldest
    first, from :func:`pipeline.eval.history.evaluation_history`) and the check outcomes."""
    settings = report.get("settings", {})
    report = {**report, "loss_curves": dict(loss_curves), "mlflow_run_id": mlflow_run_id}
    report["trend"] = {"runs": list(history or [])}
    report["headline"] = headline(report)
    report["comparison"] = compare(
        report["headline"], previous, float(settings.get("regression_tolerance", 0.02))
    )
    bad = non_finite(report)
    report["non_finite"] = bad
    report["checks"] = [c.to_dict() for c in run_checks(report, bad)]
    return report


def write_report(
    report: Mapping[str, Any], rejects: pl.DataFrame, out_dir: str | Path
) -> dict[str, Path]:
    """``report.json``, ``report.md``, ``report.html`` and ``rejects.parquet``, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "report.json",
        "md": out / "report.md",
        "html": out / "report.html",
        "rejects": out / "rejects.parquet",
    }
    atomic_write_json(files["json"], json_safe(report))  # NaN/Inf: null, listed in non_finite
    atomic_write_text(files["md"], render_markdown(report))
    atomic_write_text(files["html"], render_html(report))
    atomic_write_parquet(rejects, files["rejects"])
    return files
