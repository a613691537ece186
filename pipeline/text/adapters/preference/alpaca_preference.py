"""Alpaca schema with two replies: ``instruction``, optional ``input``, ``chosen``, ``rejected``.

Used by rasbt's ``instruction-data-with-preference.json`` (its ``output`` column, the SFT
reference answer, is ignored). The user turn is built exactly as the SFT ``alpaca`` adapter builds
it for the same book's ``instruction-data.json``: the instruction, then the input when there is
one, so the reward model and DPO see the prompts the SFT model was trained on.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import conversation, joined, message, no_reason

REQUIRED_COLUMNS = ("instruction", "input", "chosen", "rejected")


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """Prompt: one user turn (instruction + input); replies: ``chosen`` and ``rejected``."""
    return frame.select(
        "source_id",
        conversation(message("user", joined(pl.col("instruction"), pl.col("input")))).alias(
            "prompt"
        ),
        pl.col("chosen").cast(pl.String),
        pl.col("rejected").cast(pl.String),
        no_reason(),
    )
