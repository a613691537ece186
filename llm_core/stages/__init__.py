"""Training stages: one module each, each with a typed ``Config``, ``run()`` and ``main()``.

``python -m llm_core.stages.<stage> --help`` (or ``torchrun … -m llm_core.stages.<stage>``)
runs a stage with no Dagster; ``pipeline.child`` runs the same ``run()`` for an asset. Adding a
stage means adding a module here and its name to :data:`STAGES`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES = ("pretrain", "sft", "reward", "dpo", "grpo", "best_of_n", "rrhf", "weighted", "classify",
          "classify_multi")  # fmt: skip


def stage_module(name: str) -> ModuleType:
    """The module of stage ``name``, with an error that lists the stages."""
    if name not in STAGES:
        raise ValueError(f"unknown training stage {name!r}; expected one of {list(STAGES)}")
    return importlib.import_module(f"llm_core.stages.{name}")
