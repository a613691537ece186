"""reasoning-machines/gsm-hard: ``input`` (a GSM8K question with bigger numbers), ``code`` (a
program-of-thought ``solution()`` in Python) and ``target`` (its result, a float).

The assistant answers with the program in a fenced block and then the result, so the model learns
to reason in code and still state an answer. Integral targets print as integers (``72``, not
``72.0``), others rounded to 4 decimals; a missing or non-finite target is rejected.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import conversation, message

REQUIRED_COLUMNS = ("input", "code", "target")


def format_target(target: pl.Expr) -> pl.Expr:
    """``72.0`` -> ``"72"``, ``3244047.0999999996`` -> ``"3244047.1"``; null if not finite."""
    value = target.cast(pl.Float64)
    integral = value.is_finite() & (value == value.round(0)) & (value.abs() < 2**53)
    return (
        pl.when(integral)
        .then(value.cast(pl.Int64).cast(pl.String))
        .when(value.is_finite())
        .then(value.round(4).cast(pl.String))
    )


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """User: the question; assistant: the program, then ``The answer is <target>.``."""
    answer = format_target(pl.col("target"))
    reply = pl.concat_str(
        pl.lit("```python\n"),
        pl.col("code").str.strip_chars("\n"),
        pl.lit("\n```\n\nThe answer is "),
        answer,
        pl.lit("."),
    )
    return frame.select(
        "source_id",
        conversation(message("user", pl.col("input")), message("assistant", reply)).alias(
            "messages"
        ),
        pl.when(pl.col("code").is_not_null() & answer.is_null())
        .then(pl.lit("target is not a finite number"))
        .alias("reason"),
    )
