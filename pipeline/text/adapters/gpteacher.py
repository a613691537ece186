"""GPTeacher (Code-Instruct, Toolformer): ``instruction``, optional ``input``, ``response``.

Toolformer rows describe their tool in the instruction and call it inline in the response
(``wikipedia('French Revolution')``); both stay as text, which is what the model should learn.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import instruction_response

REQUIRED_COLUMNS = ("instruction", "input", "response")


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """User: instruction, then the input when there is one; assistant: response."""
    return instruction_response(frame, "instruction", "input", "response")
