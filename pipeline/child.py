"""The one subprocess that Dagster Pipes launches for training and evaluation
(``python -m pipeline.child``, or under ``torchrun``).

Training: the extras carry a stage name and its typed config as JSON; the child turns it back
into the stage's ``Config``, runs it through :func:`llm_core.stages.base.execute` (the one place
MLflow is written), streams progress into the Dagster run and reports the stage's figures as the
materialisation. Under ``torchrun`` every rank trains; only rank 0 talks to Pipes and MLflow.

Evaluation (``stage == "evaluation"``) scores every stage (:mod:`pipeline.eval.run`) in its own
MLflow run and reports the materialisation and the asset checks.

Keeping this work out of the code server's process means torch memory is released when it ends.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from llm_core.stages import stage_module
from llm_core.stages.base import Markdown, Tracking, execute, is_main_rank, run_link

EVALUATION = "evaluation"
EXTRAS_ENV = "SCRIPTORIUM_STAGE_EXTRAS"  # what torchrun ranks other than 0 read (no Pipes)


class PipesProgress:
    """Step and eval metrics as Dagster log lines (the UI streams them while the run goes).

    A duck-typed trainer callback (``llm_core.trainer.Callback``'s hooks, without importing
    torch: ``pipeline.launch`` imports this module in every Dagster step process).

    A line reads ``step 10/600: loss=…, tokens_per_s=…``: ``scriptorium run`` turns the step
    count into its progress bar and ETA.
    """

    def __init__(self, pipes: Any, every: int, total: int = 0) -> None:
        self.pipes, self.every, self.total = pipes, max(every, 1), total

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "planned_steps" in metrics:  # a run sized in minutes: the trainer's current plan
            self.total = int(metrics["planned_steps"])
        if step % self.every == 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            of = f"/{self.total}" if self.total else ""
            self.pipes.log.info(f"step {step}{of}: {shown}")

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        self.pipes.log.info(f"eval @ {step}: {shown}")


def metadata_value(value: Any) -> dict[str, Any]:
    """A plain figure as Pipes metadata, typed by its Python type."""
    if value is None:
        kind = "null"
    elif isinstance(value, Markdown):
        kind = "md"
    elif isinstance(value, bool):
        kind = "bool"
    elif isinstance(value, int):
        kind = "int"
    elif isinstance(value, float):
        kind = "float"
    elif isinstance(value, str):
        kind = "text"
    else:
        kind = "json"
    return {"raw_value": value, "type": kind}


def run_training(extras: dict[str, Any], pipes: Any | None) -> None:
    """Train one stage; on rank 0 with Pipes, track it in MLflow and report the figures."""
    stage = stage_module(extras["stage"])
    config = stage.Config.from_dict(extras["config"])
    if pipes is None or not is_main_rank():
        stage.run(config, ())
        return
    tracking = Tracking.from_dict(extras["tracking"])
    progress = PipesProgress(pipes, config.train.log_every, config.train.steps)
    result, tracked = execute(stage, config, tracking, [progress], log_line=pipes.log.info)
    assert tracked is not None
    figures = {
        **result.headline(),
        "wall_time_s": tracked.wall_time_s,
        "precision": tracked.precision,
        "mlflow_run_id": tracked.run_id,
        "registered_model": tracked.registered,
    }
    metadata = {k: metadata_value(v) for k, v in figures.items()}
    metadata["mlflow_run"] = {"raw_value": tracked.link, "type": "url"}
    metadata["path"] = {"raw_value": str(config.out_dir / "model.safetensors"), "type": "path"}
    pipes.report_asset_materialization(metadata=metadata, data_version=extras.get("data_version"))


def run_evaluation(extras: dict[str, Any], pipes: Any) -> dict[str, Any]:
    """Evaluate, track and report; returns the final report (as written to report.json)."""
    from llm_core.tracking import MlflowTracker
    from pipeline.eval.epochs import add_epochs
    from pipeline.eval.history import evaluation_history, loss_curves, previous_evaluation
    from pipeline.eval.questions import add_questions
    from pipeline.eval.report import render_markdown
    from pipeline.eval.run import EvalSettings, HttpJudgeConfig, evaluate, finalize, write_report

    cfg, tracking = extras["config"], Tracking.from_dict(extras["tracking"])
    profile = cfg["profile"]
    settings = EvalSettings.from_profile(profile)
    out = Path(cfg["out_dir"])
    judge = HttpJudgeConfig.from_env(os.environ)
    tracker = MlflowTracker(tracking.uri, tracking.experiment)
    previous = previous_evaluation(tracker.client, tracker.experiment_id)
    curves = loss_curves(tracker.client)
    history = evaluation_history(tracker.client, tracker.experiment_id, settings.trend_runs)
    t0 = time.perf_counter()
    with tracker.start_run(tracking.run_name, tracking.tags) as run:
        run_id, exp_id = run.info.run_id, run.info.experiment_id
        tracker.log_params(
            {
                "profile": profile.get("name"),
                "evaluation": settings.to_dict(),
                "judge": judge.public_url if judge else "reward_model only",
            }
        )
        report, rejects = evaluate(
            cfg["data_root"], profile, judge_config=judge, device=cfg["device"], log=pipes.log.info
        )
        report = add_questions(report, cfg["data_root"], profile, device=cfg["device"])
        report = add_epochs(report, cfg["data_root"], profile, device=cfg["device"])
        report = finalize(
            report, previous=previous, loss_curves=curves, mlflow_run_id=run_id, history=history
        )
        files = write_report(report, rejects, out)
        tracker.log_metrics(report["headline"], step=0)
        for path in files.values():
            tracker.log_artifact(path, "report")
    for check in report["checks"]:
        pipes.report_asset_check(
            check_name=check["name"],
            passed=check["passed"],
            severity=check["severity"],
            metadata={"note": check["note"], "skipped": check["skipped"]},
        )
    comparison = report["comparison"]
    figures = {
        **{name: float(value) for name, value in report["headline"].items()},
        "stages": {s: "absent" not in v for s, v in report["stages"].items()},
        "regressions": comparison.get("regressions", []),
        "previous_mlflow_run_id": comparison.get("previous_run_id"),
        "checks": {c["name"]: c["passed"] for c in report["checks"]},
        "report": Markdown(render_markdown(report, headline_only=True)),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "mlflow_run_id": run_id,
    }
    metadata = {k: metadata_value(v) for k, v in figures.items()}
    metadata["mlflow_run"] = {"raw_value": run_link(tracker.tracking_uri, exp_id, run_id),
                              "type": "url"}  # fmt: skip
    metadata["path"] = {"raw_value": str(files["html"]), "type": "path"}
    pipes.report_asset_materialization(metadata=metadata, data_version=extras.get("data_version"))
    return report


def main() -> None:
    from dagster_pipes import open_dagster_pipes

    if not is_main_rank():
        # Other torchrun ranks train but never touch the Pipes channel.
        run_training(json.loads(os.environ[EXTRAS_ENV]), None)
        return
    with open_dagster_pipes() as pipes:
        extras = dict(pipes.extras)
        if extras["stage"] == EVALUATION:
            run_evaluation(extras, pipes)
        else:
            run_training(extras, pipes)


if __name__ == "__main__":
    main()
