"""The alignment methods side by side in the report: one column per materialised method, read
back from the ``metrics.json`` each method's stage wrote."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from pipeline.artefacts import Artefacts
from pipeline.eval.methods import method_figures
from pipeline.eval.run import finalize, write_report
from pipeline.eval.sets import REJECTS_SCHEMA
from tests.pipeline.eval.test_report import full_report

NO_REJECTS = pl.DataFrame(schema=REJECTS_SCHEMA)


def _method_folder(folder: Path, method: str, wins: int, reply_tokens: float) -> None:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    win = {"win_rate": (wins + 1) / 10, "ci95": [0.2, 0.7], "wins": wins, "ties": 2,
           "losses": 8 - wins, "n": 10, "reward_mean": 1.5, "baseline_reward_mean": 1.0,
           "reply_tokens_mean": reply_tokens, "baseline_reply_tokens_mean": 40.0,
           "examples": []}  # fmt: skip
    summary = {"method": method, "steps": 7, "wall_time_s": 12.5, "win_rate": win}
    (folder / "metrics.json").write_text(json.dumps(summary))


def test_one_column_per_materialised_method(tmp_path: Path) -> None:
    _method_folder(tmp_path / "rlhf_weights", "dpo", 5, 41.0)
    _method_folder(tmp_path / "rlhf" / "rrhf", "rrhf", 6, 38.5)
    (tmp_path / "rlhf" / "weighted").mkdir()  # not materialised: no weights, no column
    figures = method_figures(Artefacts(tmp_path))
    assert list(figures) == ["rlhf_weights (dpo)", "rrhf"]
    assert figures["rrhf"]["win_rate"] == 0.7 and figures["rrhf"]["reply_tokens_mean"] == 38.5
    assert figures["rlhf_weights (dpo)"]["asset"] == "rlhf_weights"

    report = finalize({**full_report(), "rlhf_methods": figures}, previous=None,
                      loss_curves={}, mlflow_run_id="abc")  # fmt: skip
    md = write_report(report, NO_REJECTS, tmp_path / "report")["md"].read_text()
    assert "### Alignment methods: reward-model win rate over SFT" in md
    assert "| figure | rlhf_weights (dpo) | rrhf |" in md
    assert "| win rate over SFT | 60.0% | 70.0% |" in md
    assert "| mean reply tokens: aligned / SFT | 41.0 / 40.0 | 38.5 / 40.0 |" in md
    html = (tmp_path / "report" / "report.html").read_text()
    assert "rlhf_weights (dpo)" in html and "38.5 / 40.0" in html


def test_no_methods_no_table(tmp_path: Path) -> None:
    assert method_figures(Artefacts(tmp_path)) == {}
    report = finalize(full_report(), previous=None, loss_curves={}, mlflow_run_id="abc")
    md = write_report(report, NO_REJECTS, tmp_path / "report")["md"].read_text()
    assert "Alignment methods" not in md
