"""Headline figures, comparison with the previous run, checks and the written report files."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.eval.checks import FINITE, NO_REGRESSION, RLHF_WINS, SFT_BELOW_BASE
from pipeline.eval.report import absent, compare, headline, non_finite
from pipeline.eval.run import finalize, write_report
from pipeline.eval.sets import REJECTS_SCHEMA

VOID = {"meta", "br", "img", "hr", "input", "link", "path", "rect", "use", "stop", "circle"}


def acc(k: int, n: int) -> dict[str, Any]:
    return {
        "accuracy": k / n,
        "correct": k,
        "n": n,
        "ci95": (max(0.0, k / n - 0.2), min(1.0, k / n + 0.2)),
    }


def stage(bpb: float, sft_loss: float, blimp: int, gsm: dict[str, Any]) -> dict[str, Any]:
    return {
        "heldout": {"loss": bpb * 2, "bpb": bpb, "perplexity": math.exp(bpb * 2)},
        "sft_val": {"loss": sft_loss, "tokens": 100.0},
        "blimp": {**acc(blimp, 20), "chance": 0.5, "per_phenomenon": {"anaphor": acc(blimp, 20)}},
        "lambada": {**acc(1, 20), "chance": 0.0},
        "gsm8k": gsm,
        "generations": {
            "settings": {"temperature": 0.7},
            "samples": [
                {"prompt": "What is the biggest animal in the world?", "reply": "<b>whale</b>"}
            ],
        },
    }


def win(w: int, t: int, n: int) -> dict[str, Any]:
    return {
        "win_rate": (w + t / 2) / n,
        "wins": w,
        "ties": t,
        "losses": n - w - t,
        "n": n,
        "ci95": (0.1, 0.9),
        "judge": "reward_model",
        "order_agreement": 1.0,
    }


def full_report() -> dict[str, Any]:
    return {
        "profile": "test",
        "settings": {"regression_tolerance": 0.02},
        "stages": {
            "base": stage(2.0, 3.0, 11, absent("chat stages only")),
            "sft": stage(2.1, 2.5, 12, acc(2, 20)),
            "rlhf": stage(2.1, 2.6, 12, acc(3, 20)),
        },
        "win_rates": {
            "sft_vs_base": {"reward_model": win(14, 2, 20)},
            "rlhf_vs_sft": {"reward_model": win(8, 0, 20)},
        },
        "sets": {
            "blimp": {"available": 10, "used": 5, "rejected": 1},
            "lambada": absent("no files"),
        },
    }


def test_headline_names_every_measured_figure() -> None:
    h = headline(full_report())
    assert h["base_bpb"] == 2.0 and h["sft_sft_val_loss"] == 2.5
    assert h["rlhf_gsm8k_accuracy"] == 3 / 20 and "base_gsm8k_accuracy" not in h
    assert h["sft_vs_base_win_rate"] == 0.75 and h["rlhf_vs_sft_win_rate"] == 0.4
    report = full_report()
    report["stages"]["rlhf"] = absent("rlhf_weights is not materialised")
    assert not any(k.startswith("rlhf_") and "vs" not in k for k in headline(report))


def test_compare_flags_regressions_by_direction() -> None:
    current = {
        "base_bpb": 2.05,
        "sft_blimp_accuracy": 0.55,
        "sft_vs_base_win_rate": 0.74,
        "rlhf_bpb": 1.0,
    }
    previous = {
        "run_id": "r1",
        "metrics": {
            "base_bpb": 2.0,
            "sft_blimp_accuracy": 0.60,
            "sft_vs_base_win_rate": 0.75,
            "sft_bpb": 3.0,
            "tokens_per_s": 9.0,
        },
    }
    comp = compare(current, previous, tolerance=0.02)
    assert comp["regressions"] == ["base_bpb", "sft_blimp_accuracy"]  # bpb up, accuracy down
    assert not comp["figures"]["sft_vs_base_win_rate"]["regressed"]  # -0.01 is within tolerance
    assert comp["new"] == ["rlhf_bpb"] and comp["dropped"] == ["sft_bpb"]
    assert compare(current, None, 0.02)["absent"].startswith("no previous")


def test_non_finite_paths() -> None:
    assert non_finite({"a": {"b": [1.0, float("nan")]}, "c": float("inf"), "d": None}) == [
        "a.b[1]",
        "c",
    ]


def test_checks_pass_fail_and_skip() -> None:
    report = finalize(full_report(), previous=None, loss_curves={})
    checks = {c["name"]: c for c in report["checks"]}
    assert checks[SFT_BELOW_BASE]["passed"] and not checks[SFT_BELOW_BASE]["skipped"]
    assert not checks[RLHF_WINS]["passed"]  # 0.40 < 0.5
    assert checks[FINITE]["passed"]
    assert checks[NO_REGRESSION]["passed"] and checks[NO_REGRESSION]["skipped"]

    worse = full_report()
    worse["stages"]["sft"]["sft_val"]["loss"] = 3.5
    worse["stages"]["base"]["heldout"]["perplexity"] = float("inf")
    del worse["stages"]["rlhf"]
    worse["stages"]["rlhf"] = absent("rlhf_weights is not materialised")
    worse["win_rates"]["rlhf_vs_sft"] = absent("stage(s) ['rlhf'] not materialised")
    previous = {"run_id": "r0", "metrics": {"sft_sft_val_loss": 2.5}}
    report = finalize(worse, previous=previous, loss_curves={})
    checks = {c["name"]: c for c in report["checks"]}
    assert not checks[SFT_BELOW_BASE]["passed"]
    assert checks[RLHF_WINS]["passed"] and checks[RLHF_WINS]["skipped"]
    assert (
        not checks[FINITE]["passed"] and "stages.base.heldout.perplexity" in checks[FINITE]["note"]
    )
    assert not checks[NO_REGRESSION]["passed"] and checks[NO_REGRESSION]["severity"] == "WARN"


class _Balanced(HTMLParser):
    """Fails on a closing tag that does not match the innermost open one."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.tags.add(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        self.tags.add(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def assert_valid_html(text: str) -> set[str]:
    parser = _Balanced()
    parser.feed(text)
    parser.close()
    assert text.startswith("<!DOCTYPE html>")
    assert not parser.errors and not parser.stack, (parser.errors[:5], parser.stack)
    return parser.tags


def test_written_report_files(tmp_path: Path) -> None:
    curves = {
        "base": {
            "registered_model": "scriptorium-pretrained",
            "version": 2,
            "run_id": "x",
            "loss": [[1, 5.0], [2, 4.0]],
            "val_loss": [[2, 4.5]],
        },
        "sft": absent("no registered model 'scriptorium-sft'"),
    }
    report = finalize(full_report(), previous=None, loss_curves=curves, mlflow_run_id="abc")
    report["stages"]["base"]["heldout"]["perplexity"] = float("nan")
    rejects = pl.DataFrame(
        {"eval_set": ["blimp"], "item": ["x:1"], "reason": ["empty sentence"]},
        schema=REJECTS_SCHEMA,
    )
    files = write_report(report, rejects, tmp_path)
    data = json.loads(files["json"].read_text())  # strict JSON: NaN was written as null
    assert data["stages"]["base"]["heldout"]["perplexity"] is None
    assert data["headline"]["sft_vs_base_win_rate"] == 0.75
    tags = assert_valid_html(files["html"].read_text())
    assert {"table", "svg", "figure"} <= tags
    html_text = files["html"].read_text()
    assert "&lt;b&gt;whale&lt;/b&gt;" in html_text  # model output is escaped
    assert html_text.count("<svg") == 4  # trend, loss curves, per-stage bars, accuracies
    md = files["md"].read_text()
    assert "| held-out bits per byte ↓ | – | 2.000 | 2.100 | 2.100 |" in md
    assert pl.read_parquet(files["rejects"])["reason"].to_list() == ["empty sentence"]
