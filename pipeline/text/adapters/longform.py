"""akoksal/LongForm: ``input`` (an instruction generated for a human-written text), ``output``.

``source`` and ``subset`` name the corpus the output came from; they are provenance, not chat.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import conversation, message, no_reason

REQUIRED_COLUMNS = ("input", "output")


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """User: input; assistant: output."""
    return frame.select(
        "source_id",
        conversation(
            message("user", pl.col("input")), message("assistant", pl.col("output"))
        ).alias("messages"),
        no_reason(),
    )
