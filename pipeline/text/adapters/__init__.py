"""SFT source adapters: many upstream schemas in, one ``messages`` schema out.

See :mod:`pipeline.text.adapters.base` for the adapter contract and
:mod:`pipeline.text.adapters.registry` for the source config and :func:`adapt_source`.
"""

from pipeline.text.adapters.base import MESSAGES, REJECTS_SCHEMA, ROWS_SCHEMA, SourceSchemaError
from pipeline.text.adapters.registry import (
    SftConfigError,
    SftSource,
    adapt_source,
    available_adapters,
    get_adapter,
    load_sft_sources,
)

__all__ = [
    "MESSAGES",
    "REJECTS_SCHEMA",
    "ROWS_SCHEMA",
    "SftConfigError",
    "SftSource",
    "SourceSchemaError",
    "adapt_source",
    "available_adapters",
    "get_adapter",
    "load_sft_sources",
]
