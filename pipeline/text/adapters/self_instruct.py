"""yizhongw/self_instruct, ``human_eval`` config: ``id``, ``instruction`` and ``instances``.

``instances`` is how ``datasets`` stores the feature ``Sequence({input, output})``: a struct of
two parallel lists (a list of ``{input, output}`` structs, the source's own JSON layout, is read
too). Each instance becomes one conversation with ``source_id`` ``"<id>:<k>"``; the user turn is
the instruction followed by the instance's input, when it has one. A row whose lists differ in
length, or that has no instance, is rejected.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import (
    SourceSchemaError,
    conversation,
    joined,
    message,
    no_reason,
)

REQUIRED_COLUMNS = ("id", "instruction", "instances")


def _instance_lists(frame: pl.DataFrame) -> pl.DataFrame:
    """``inputs``/``outputs`` list columns from either layout of ``instances``."""
    dtype = frame.schema["instances"]
    instances = pl.col("instances")
    if isinstance(dtype, pl.Struct):
        inputs, outputs = instances.struct.field("input"), instances.struct.field("output")
    elif isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct):
        inputs = instances.list.eval(pl.element().struct.field("input"))
        outputs = instances.list.eval(pl.element().struct.field("output"))
    else:
        raise SourceSchemaError(f"'instances' has type {dtype}, expected a struct of lists")
    return frame.with_columns(inputs.alias("inputs"), outputs.alias("outputs"))


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """One conversation per instance; malformed rows become rejects."""
    frame = _instance_lists(frame)
    n_in, n_out = pl.col("inputs").list.len(), pl.col("outputs").list.len()
    problem = (
        pl.when(n_in.is_null() | n_out.is_null())
        .then(pl.lit("no instances"))
        .when(n_in != n_out)
        .then(pl.format("instances have {} inputs but {} outputs", n_in, n_out))
        .when(n_out == 0)
        .then(pl.lit("no instances"))
    )
    frame = frame.with_columns(problem.alias("reason"))
    bad = frame.filter(pl.col("reason").is_not_null()).select(
        pl.col("id").cast(pl.String).alias("source_id"),
        pl.lit(None).alias("messages"),
        "reason",
    )
    good = (
        frame.filter(pl.col("reason").is_null())
        .explode(["inputs", "outputs"])
        .select(
            pl.format("{}:{}", pl.col("id"), pl.int_range(pl.len()).over("id")).alias("source_id"),
            conversation(
                message("user", joined(pl.col("instruction"), pl.col("inputs"))),
                message("assistant", pl.col("outputs")),
            ).alias("messages"),
            no_reason(),
        )
    )
    return pl.concat([good, bad.cast({"messages": good.schema["messages"]})])
