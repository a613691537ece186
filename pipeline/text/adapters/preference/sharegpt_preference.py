"""LLaMA-Factory's preference format (llamafactory/DPO-En-Zh-20k): ShareGPT turns + two replies.

``conversations`` is the dialogue so far, a list of ``{from, value}`` turns (``system``, ``human``,
``gpt``) ending with the human's message; ``chosen`` and ``rejected`` are single ``{from, value}``
turns, both from ``gpt``. A system turn is kept as the prompt's system message. A row with any
other speaker, or a reply that is not the assistant's, is rejected with the speaker named.
"""

from __future__ import annotations

import polars as pl

REQUIRED_COLUMNS = ("conversations", "chosen", "rejected")
SPEAKERS = {"system": "system", "human": "user", "gpt": "assistant"}
REPLY_SPEAKER = "gpt"


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """Prompt: every turn of ``conversations``; replies: the ``value`` of ``chosen``/``rejected``."""
    speaker = pl.element().struct.field("from")
    turn = pl.struct(
        speaker.replace_strict(SPEAKERS, default=None, return_dtype=pl.String).alias("role"),
        pl.element().struct.field("value").cast(pl.String).alias("content"),
    )
    unknown = pl.col("conversations").list.eval(speaker.filter(~speaker.is_in(list(SPEAKERS))))
    chosen_from = pl.col("chosen").struct.field("from")
    rejected_from = pl.col("rejected").struct.field("from")
    return frame.select(
        "source_id",
        pl.col("conversations").list.eval(turn).alias("prompt"),
        pl.col("chosen").struct.field("value").cast(pl.String).alias("chosen"),
        pl.col("rejected").struct.field("value").cast(pl.String).alias("rejected"),
        pl.when(unknown.list.len() > 0)
        .then(pl.format("unknown speaker '{}'", unknown.list.first()))
        .when(chosen_from != REPLY_SPEAKER)
        .then(pl.format("chosen reply from '{}'", chosen_from.fill_null("null")))
        .when(rejected_from != REPLY_SPEAKER)
        .then(pl.format("rejected reply from '{}'", rejected_from.fill_null("null")))
        .alias("reason"),
    )
