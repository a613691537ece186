"""What every SFT adapter shares: the one output schema, message builders and file reading.

Eleven sources arrive in seven schemas; the SFT stages downstream should see exactly one. Each
adapter module (one small file per source schema, named by the ``adapter`` field of
``configs/sft_sources.yaml``) declares::

    REQUIRED_COLUMNS: tuple[str, ...]             # columns its files must have
    def convert(frame: pl.DataFrame) -> pl.DataFrame: ...

``convert`` receives a file's rows plus a ``source_id`` column (``"<file name>:<row>"``, which it
may replace with a native id) and returns exactly :data:`ADAPTED_COLUMNS`: ``source_id``,
``messages`` (see :data:`MESSAGES`) and ``reason`` (null, or why the row must be rejected).
Generic checks (roles, empty turns, who speaks last) are applied afterwards by
:func:`pipeline.text.adapters.registry.adapt_source`, so adapters only state what is specific to
their schema. Everything is a polars expression: the full upstream files (tens of thousands of
rows) convert in well under a second.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl

ROLES = ("system", "user", "assistant", "tool")
MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})
# Multi-turn conversations keep every turn; tool calls and tool results are plain text turns.
MESSAGES = pl.List(MESSAGE)
ADAPTED_SCHEMA = pl.Schema({"source_id": pl.String, "messages": MESSAGES, "reason": pl.String})
ADAPTED_COLUMNS = tuple(ADAPTED_SCHEMA.names())
ROWS_SCHEMA = pl.Schema({"source": pl.String, "source_id": pl.String, "messages": MESSAGES})
REJECTS_SCHEMA = pl.Schema({"source": pl.String, "source_id": pl.String, "reason": pl.String})


class SourceSchemaError(ValueError):
    """A source's files do not have the columns (or column types) its adapter needs."""


def message(role: str, content: pl.Expr) -> pl.Expr:
    """One ``{role, content}`` struct per row."""
    return pl.struct(
        pl.lit(role, dtype=pl.String).alias("role"),
        content.cast(pl.String).alias("content"),
    )


def conversation(*turns: pl.Expr) -> pl.Expr:
    """Single turns (structs) and/or lists of turns concatenated, in order, into ``messages``."""
    return pl.concat_list(list(turns))


def joined(*parts: pl.Expr, separator: str = "\n\n") -> pl.Expr:
    """The non-blank ``parts`` joined by ``separator``; null when every part is blank.

    An instruction and its optional input become one user message; an empty input must not
    leave a dangling separator behind.
    """
    cleaned = [pl.when(p.str.strip_chars() != "").then(p) for p in parts]
    text = pl.concat_str(cleaned, separator=separator, ignore_nulls=True)
    return pl.when(text != "").then(text)


def tidy_text(text: pl.Expr) -> pl.Expr:
    """Trailing whitespace and leading blank lines removed; leading spaces are kept, because they
    may be the indentation of a code block."""
    return text.str.strip_chars_end().str.strip_chars_start("\r\n")


def no_reason() -> pl.Expr:
    """The ``reason`` of a row the adapter accepts."""
    return pl.lit(None, dtype=pl.String).alias("reason")


def instruction_response(
    frame: pl.DataFrame, instruction: str, context: str, response: str
) -> pl.DataFrame:
    """The common single-turn shape: user = instruction (+ context), assistant = response."""
    return frame.select(
        "source_id",
        conversation(
            message("user", joined(pl.col(instruction), pl.col(context))),
            message("assistant", pl.col(response)),
        ).alias("messages"),
        no_reason(),
    )


def read_records(path: Path) -> pl.DataFrame:
    """A data file as the mirror (and the Hub) stores it: Parquet, a JSON array, or JSON lines.

    Schemas are inferred from every row, not the first hundred, so a late row with a float
    where earlier ones had ints cannot fail the read.
    """
    name = path.name.lower()
    if name.endswith(".parquet"):
        return pl.read_parquet(path)
    source: Path | bytes = path
    if name.endswith(".gz"):
        source, name = gzip.decompress(path.read_bytes()), name[: -len(".gz")]
    if name.endswith((".jsonl", ".ndjson")):
        return pl.read_ndjson(source, infer_schema_length=None)
    if name.endswith(".json"):
        return pl.read_json(source, infer_schema_length=None)
    raise SourceSchemaError(f"{path.name}: unsupported file type (parquet, json, jsonl[.gz])")
