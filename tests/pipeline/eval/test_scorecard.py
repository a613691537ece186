"""The scorecard (every benchmark x stage with interval and chance), MMLU/HumanEval headline
figures, the trend across evaluation runs, and the evaluation settings' opt-in for code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.eval.plots import plot_trend
from pipeline.eval.report import absent, headline, render_markdown
from pipeline.eval.run import finalize, load_sets
from pipeline.eval.sandbox import SandboxLimits, describe
from pipeline.eval.scorecard import scorecard_rows, trend_chance, trend_rows, trend_runs
from pipeline.eval.settings import EvalSettings
from tests.pipeline.eval.eval_fixtures import write_eval_sets
from tests.pipeline.eval.test_report import acc, full_report


def mmlu(correct: int, n: int, shots: int) -> dict[str, Any]:
    per = {"anatomy": acc(correct, n // 2), "virology": acc(0, n // 2)}
    return {
        **acc(correct, n),
        "chance": 0.25,
        "macro_accuracy": correct / n,
        "macro_ci95": (0.05, 0.45),
        "shots": shots,
        "mean_shots_kept": 1.5 if shots else 0.0,
        "per_subject": per,
    }


def humaneval(passed: int, n: int) -> dict[str, Any]:
    return {
        **acc(passed, n),
        "pass@1": passed / n,
        "pass@2": min(1.0, 2 * passed / n),
        "chance": 0.0,
        "samples_per_problem": 2,
        "temperature": 0.8,
        "outcomes": {"failed": 2 * n - passed, "passed": passed},
        "sandbox": describe(SandboxLimits(timeout_s=3.0, memory_mb=256), "namespace"),
        "sandbox_seconds": 0.5,
    }


def report_with_new_benchmarks() -> dict[str, Any]:
    report = full_report()
    for i, name in enumerate(("base", "sft", "rlhf")):
        report["stages"][name] |= {
            "mmlu_0shot": mmlu(2 + i, 8, 0),
            "mmlu_kshot": mmlu(3, 8, 5),
            "humaneval": humaneval(i, 4) if name != "base" else absent("off in this test"),
        }
    history = [
        {"run_id": "r1", "start_time": 1_700_000_000_000, "metrics": {"base_bpb": 2.4}},
        {
            "run_id": "r2",
            "start_time": 1_700_000_600_000,
            "metrics": {"base_bpb": 2.2, "base_mmlu_0shot_accuracy": 0.2},
        },
    ]
    return finalize(report, previous=None, loss_curves={}, mlflow_run_id="r3", history=history)


def test_scorecard_has_every_benchmark_and_stage_with_interval_and_chance() -> None:
    report = report_with_new_benchmarks()
    header, rows, notes = scorecard_rows(report)
    assert header == ["benchmark", "chance", "base", "sft", "rlhf"]
    by_label = {r[0]: r for r in rows}
    assert by_label["MMLU 0-shot (macro) ↑"] == [
        "MMLU 0-shot (macro) ↑",
        "25%",
        "25.0% [5.0, 45.0] n=8",
        "37.5% [5.0, 45.0] n=8",
        "50.0% [5.0, 45.0] n=8",
    ]
    assert by_label["MMLU k-shot (macro) ↑"][2].endswith("(1.5 of 5 shots)")
    assert by_label["HumanEval pass@1 ↑"][1:] == [
        "0%",
        "–",
        "25.0% [5.0, 45.0] n=4",
        "50.0% [30.0, 70.0] n=4",
    ]
    assert by_label["HumanEval pass@2 ↑"][2:] == ["–", "50.0%", "100.0%"]
    assert by_label["BLiMP minimal pairs ↑"][1] == "50%"
    assert by_label["held-out bits per byte ↓"][1:] == ["–", "2.000", "2.100", "2.100"]
    wins = by_label["win rate over the previous stage (reward_model) ↑"]
    assert wins[1:3] == ["50%", "–"] and wins[3].startswith("75.0% [10.0, 90.0]")
    # every empty cell has its reason, once
    assert notes == {"off in this test": ["humaneval/base"], "chat stages only": ["gsm8k/base"]}


def test_headline_and_trend_carry_mmlu_and_humaneval() -> None:
    report = report_with_new_benchmarks()
    h = headline(report)
    assert h["sft_mmlu_0shot_accuracy"] == 3 / 8 and h["rlhf_humaneval_pass_at_1"] == 0.5
    assert "base_humaneval_pass_at_1" not in h
    runs = trend_runs(report)
    assert [r["run_id"] for r in runs] == ["r1", "r2", "r3"] and runs[-1]["label"] == "this run"
    header, rows = trend_rows(report)
    assert header[-1] == "this run" and len(header) == 4
    row = next(r for r in rows if r[0] == "base_mmlu_0shot_accuracy")
    assert row[1:] == ["–", "0.200", "0.250"]
    chance = trend_chance(report)
    assert chance["mmlu_0shot_accuracy"] == 0.25 and chance["humaneval_pass_at_1"] == 0.0
    svg = plot_trend(runs, chance)
    assert svg is not None and svg.startswith("<svg") and "mmlu_0shot_accuracy" in svg
    md = render_markdown(report)
    assert "### Scorecard" in md and "### HumanEval sandbox" in md
    assert "wall clock 3.0 s" in md and "address space 256 MiB" in md
    assert "| anatomy |" in md  # MMLU per subject


def test_humaneval_runs_only_when_the_profile_enables_it(tmp_path: Path) -> None:
    eval_dir = write_eval_sets(tmp_path)
    off = EvalSettings.from_profile({"evaluation": {"items": {"humaneval": 2, "mmlu": 1}}})
    sets, _ = load_sets(eval_dir, off)
    assert "execute is false" in sets["humaneval"]["absent"]
    assert sets["mmlu"].items.height == 2  # one question of each subject
    on = EvalSettings.from_profile(
        {"evaluation": {"items": {"humaneval": 2}, "humaneval": {"execute": True, "samples": 3}}}
    )
    sets, rejects = load_sets(eval_dir, on)
    assert sets["humaneval"].items.height == 2 and on.humaneval.samples == 3
    assert rejects.filter(rejects["eval_set"] == "humaneval")["reason"].to_list() == [
        "no test or entry point"
    ]
    with pytest.raises(ValueError, match="evaluation.humaneval.*timeout"):
        EvalSettings.from_profile({"evaluation": {"humaneval": {"timeout": 3}}})
    with pytest.raises(ValueError, match="unknown evaluation set"):
        EvalSettings.from_profile({"evaluation": {"items": {"arc": 3}}})
