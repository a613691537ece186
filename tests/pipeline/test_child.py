"""The one Pipes child: plain stage figures become typed Dagster metadata."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from llm_core.stages.base import Markdown
from pipeline.child import PipesProgress, metadata_value


def test_figures_are_typed_by_their_python_type() -> None:
    kinds = {
        k: metadata_value(v)["type"]
        for k, v in {
            "none": None,
            "md": Markdown("**x**"),
            "flag": True,
            "count": 3,
            "loss": 1.5,
            "name": "dpo",
            "ci": (0.1, 0.9),
            "counts": {"wins": 1},
        }.items()
    }
    assert kinds == {
        "none": "null",
        "md": "md",
        "flag": "bool",
        "count": "int",
        "loss": "float",
        "name": "text",
        "ci": "json",
        "counts": "json",
    }


def test_progress_lines_follow_a_time_budgets_plan(caplog: pytest.LogCaptureFixture) -> None:
    """A run sized in minutes reports its current plan; the ``step N/M`` lines (which
    ``scriptorium run`` turns into its progress bar and ETA) follow it."""
    pipes = SimpleNamespace(log=logging.getLogger("test.pipes"))  # what Pipes' log offers
    progress = PipesProgress(pipes, every=5, total=0)
    with caplog.at_level(logging.INFO, logger="test.pipes"):
        progress.on_metrics(5, {"loss": 3.0, "planned_steps": 180.0})
        progress.on_metrics(10, {"loss": 2.9, "planned_steps": 172.0})
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["step 5/180", "step 10/172"]
