"""The evaluation subprocess that Dagster Pipes launches (``python -m pipeline.eval_child``).

Like ``pipeline.train_child`` for training: scoring loads every stage's weights with torch, so
it runs outside the code server and its memory goes when it ends. It reads the previous
evaluation and the stages' loss curves from MLflow, evaluates (:func:`pipeline.eval.run.evaluate`)
inside its own MLflow run (tagged with the Dagster run id and asset key), writes the report, logs
the headline figures as metrics and the report files as artefacts, and reports the
materialisation and the asset checks back through Pipes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from llm_core.config import load_profile
from pipeline.eval.history import loss_curves, previous_evaluation
from pipeline.eval.report import render_markdown
from pipeline.eval.run import EvalSettings, HttpJudgeConfig, evaluate, finalize, write_report
from pipeline.train_child import _meta, run_link


def run_evaluation(ex: dict[str, Any], pipes: Any) -> dict[str, Any]:
    """Evaluate, track and report; returns the final report (as written to report.json)."""
    from llm_core.tracking import MlflowTracker

    profile = load_profile(ex["profile"])
    settings = EvalSettings.from_profile(profile)
    out = Path(ex["out_dir"])
    judge = HttpJudgeConfig.from_env(os.environ)
    tracker = MlflowTracker(ex["mlflow_uri"], ex["experiment"])
    previous = previous_evaluation(tracker.client, tracker.experiment_id)
    curves = loss_curves(tracker.client)
    t0 = time.perf_counter()
    with tracker.start_run(ex["run_name"], ex["tags"]) as run:
        run_id, exp_id = run.info.run_id, run.info.experiment_id
        tracker.log_params(
            {
                "profile": profile.get("name"),
                "evaluation": settings.to_dict(),
                "judge": judge.url if judge else "reward_model only",
            }
        )
        report, rejects = evaluate(
            ex["data_root"], profile, judge_config=judge, device=ex["device"], log=pipes.log.info
        )
        report = finalize(report, previous=previous, loss_curves=curves, mlflow_run_id=run_id)
        files = write_report(report, rejects, out)
        tracker.log_metrics(report["headline"], step=0)
        for path in files.values():
            tracker.log_artifact(path, "report")
    link = run_link(tracker.tracking_uri, exp_id, run_id)
    for check in report["checks"]:
        pipes.report_asset_check(
            check_name=check["name"],
            passed=check["passed"],
            severity=check["severity"],
            metadata={"note": check["note"], "skipped": check["skipped"]},
        )
    comparison = report["comparison"]
    stages = {s: "absent" not in v for s, v in report["stages"].items()}
    pipes.report_asset_materialization(
        metadata={
            **{name: _meta(value, "float") for name, value in report["headline"].items()},
            "stages": _meta(stages, "json"),
            "regressions": _meta(comparison.get("regressions", []), "json"),
            "previous_mlflow_run_id": _meta(comparison.get("previous_run_id"), "text"),
            "checks": _meta({c["name"]: c["passed"] for c in report["checks"]}, "json"),
            "report": _meta(render_markdown(report, headline_only=True), "md"),
            "wall_time_s": _meta(round(time.perf_counter() - t0, 1), "float"),
            "mlflow_run_id": _meta(run_id, "text"),
            "mlflow_run": _meta(link, "url"),
            "path": _meta(str(files["html"]), "path"),
        },
        data_version=ex.get("data_version"),
    )
    return report


def main() -> None:
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        run_evaluation(dict(pipes.extras), pipes)


if __name__ == "__main__":
    main()
