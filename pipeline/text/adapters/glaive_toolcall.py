"""llamafactory/glaive_toolcall_en: ShareGPT ``conversations`` with tool calls, plus ``tools``.

``conversations`` is a list of ``{from, value}`` turns: ``human``, ``gpt``, ``function_call`` (the
model calling a tool, JSON) and ``observation`` (the tool's JSON result). Everything stays text,
in order, so no chat template has to know about tools:

* a system message comes first, in Glaive's own wording, listing the JSON tool schemas (or
  saying there are none); an optional ``system`` column is put before it;
* ``human`` -> user, ``gpt`` -> assistant;
* ``function_call`` -> an assistant turn ``<tool_call>\n{json}\n</tool_call>``;
* ``observation`` -> a ``tool`` turn holding the result.

A turn from any other speaker rejects the row, naming the speaker.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import conversation, joined, message

REQUIRED_COLUMNS = ("conversations", "tools")
SPEAKERS = {
    "human": "user",
    "gpt": "assistant",
    "function_call": "assistant",
    "observation": "tool",
}
WITH_TOOLS = (
    "You are a helpful assistant with access to the following functions. Use them if required -\n"
)
WITHOUT_TOOLS = "You are a helpful assistant, with no access to external functions."


def system_prompt(frame: pl.DataFrame) -> pl.Expr:
    """Glaive's system prompt for the row's ``tools``, after the row's ``system`` if any."""
    tools = pl.col("tools").cast(pl.String).str.strip_chars()
    has_tools = tools.is_not_null() & ~tools.is_in(["", "[]", "null"])
    prompt = pl.when(has_tools).then(pl.lit(WITH_TOOLS) + tools).otherwise(pl.lit(WITHOUT_TOOLS))
    if "system" in frame.columns:
        return joined(pl.col("system").cast(pl.String), prompt)
    return prompt


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """System prompt, then every turn as text, tool calls and results included."""
    speaker = pl.element().struct.field("from")
    value = pl.element().struct.field("value")
    turn = pl.struct(
        speaker.replace_strict(SPEAKERS, default=None, return_dtype=pl.String).alias("role"),
        pl.when(speaker == "function_call")
        .then(pl.concat_str(pl.lit("<tool_call>\n"), value, pl.lit("\n</tool_call>")))
        .otherwise(value)
        .alias("content"),
    )
    turns = pl.col("conversations").list.eval(turn)
    unknown = pl.col("conversations").list.eval(speaker.filter(~speaker.is_in(list(SPEAKERS))))
    return frame.select(
        "source_id",
        conversation(message("system", system_prompt(frame)), turns).alias("messages"),
        pl.when(unknown.list.len() > 0)
        .then(pl.format("unknown speaker '{}'", unknown.list.first()))
        .alias("reason"),
    )
