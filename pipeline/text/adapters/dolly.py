"""databricks-dolly-15k: ``instruction``, optional ``context`` (reference text), ``response``.

``category`` (closed_qa, brainstorming...) is not part of the conversation and is dropped.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import instruction_response

REQUIRED_COLUMNS = ("instruction", "context", "response")


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """User: instruction, then the context passage when there is one; assistant: response."""
    return instruction_response(frame, "instruction", "context", "response")
