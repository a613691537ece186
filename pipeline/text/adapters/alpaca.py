"""Alpaca schema: ``instruction``, optional ``input``, ``output``.

Used by tatsu-lab/alpaca (its extra ``text`` column, the prompt pre-formatted in Alpaca's
template, is ignored: templating is the SFT stage's job), CodeAlpaca, Alpaca-CoT and rasbt's
``instruction-data.json``.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import instruction_response

REQUIRED_COLUMNS = ("instruction", "input", "output")


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """User: instruction, then the input when there is one; assistant: output."""
    return instruction_response(frame, "instruction", "input", "output")
