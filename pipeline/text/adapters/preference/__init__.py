"""Preference adapters: each upstream preference schema in, one pair schema out.

A preference source gives, per row, a conversation so far and two candidate replies to it, one
preferred. Each module here (one small file per upstream schema, named by the ``adapter`` field of
``configs/preference_sources.yaml``) follows the SFT adapters' contract
(:mod:`pipeline.text.adapters.base`) with another output::

    REQUIRED_COLUMNS: tuple[str, ...]             # columns its files must have
    def convert(frame: pl.DataFrame) -> pl.DataFrame: ...

``convert`` receives a file's rows plus a ``source_id`` column and returns exactly the columns of
:data:`ADAPTED_PAIR_SCHEMA`: ``source_id``; ``prompt``, the messages before the replies (the SFT
``messages`` struct); ``chosen`` and ``rejected``, the two reply texts; ``reason``, null or why
the row cannot be a pair (a malformed transcript, an unknown speaker). Checks every source shares
(empty or identical replies, who speaks last, length, duplicates) run afterwards, in
:func:`pipeline.text.preferences.build_pairs`.

This is a sub-package so that :func:`pipeline.text.adapters.registry.available_adapters` never
offers these modules as SFT adapters.
"""

from __future__ import annotations

import polars as pl

from pipeline.text.adapters.base import MESSAGES

ADAPTED_PAIR_SCHEMA = pl.Schema(
    {
        "source_id": pl.String,
        "prompt": MESSAGES,
        "chosen": pl.String,
        "rejected": pl.String,
        "reason": pl.String,
    }
)
