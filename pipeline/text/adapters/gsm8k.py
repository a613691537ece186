"""openai/gsm8k: ``question``, ``answer`` (worked solution ending in ``#### <number>``).

The answers carry calculator annotations (``48/2 = <<48/2=24>>24``) that only made sense for the
original paper's calculator-tool decoding; a chat model imitating them would print them, so they
are removed. The ``#### 72`` marker becomes the sentence ``The answer is 72.``. A row without the
marker is rejected: its final answer cannot be told from its working.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import conversation, message

REQUIRED_COLUMNS = ("question", "answer")
CALCULATOR = r"<<[^>]*>>"
FINAL_ANSWER = r"(?m)^####\s*(.+?)\s*$"


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """User: question; assistant: the worked answer, annotations removed, final answer spelt out."""
    answer = pl.col("answer")
    solution = answer.str.replace_all(CALCULATOR, "").str.replace(
        FINAL_ANSWER, "The answer is ${1}."
    )
    missing_final = answer.is_not_null() & ~answer.str.contains(FINAL_ANSWER)
    return frame.select(
        "source_id",
        conversation(message("user", pl.col("question")), message("assistant", solution)).alias(
            "messages"
        ),
        pl.when(missing_final)
        .then(pl.lit("answer has no '#### <final answer>' line"))
        .alias("reason"),
    )
