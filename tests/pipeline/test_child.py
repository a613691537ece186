"""The one Pipes child: plain stage figures become typed Dagster metadata."""

from __future__ import annotations

from llm_core.stages.base import Markdown
from pipeline.child import metadata_value


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
