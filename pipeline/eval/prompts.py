"""The report's prompts, from the profile: the fixed generation prompts and the win-rate prompts.

A Chinese profile cannot be judged on English prompts: its model has seen no English. The
profile's ``report_prompts`` section says which prompts the evaluation report uses::

    report_prompts:
      generation: ["介绍一下中国。", "世界上最大的动物是什么？"]  # absent: the English defaults
      win_rate: preference_val   # alpaca_eval (default) | preference_val

``win_rate: preference_val`` takes the prompts of ``preference_pairs``' validation split (split
by prompt hash, so no training pair shares one), in their file order, up to
``evaluation.items.alpaca_eval`` of them: held-out prompts in the profile's language.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.eval.benchmarks import GENERATION_PROMPTS

__all__ = ["SECTION", "WIN_RATE_SOURCES", "generation_prompts", "win_rate_prompts"]

SECTION = "report_prompts"
WIN_RATE_SOURCES = ("alpaca_eval", "preference_val")
Messages = list[dict[str, str]]


def _section(profile: Mapping[str, Any]) -> dict[str, Any]:
    section = dict(profile.get(SECTION) or {})
    if unknown := sorted(set(section) - {"generation", "win_rate"}):
        raise ValueError(
            f"profile `{SECTION}`: unknown key(s) {unknown}; allowed generation, win_rate"
        )
    if section.get("win_rate", "alpaca_eval") not in WIN_RATE_SOURCES:
        raise ValueError(
            f"profile `{SECTION}.win_rate` must be one of {list(WIN_RATE_SOURCES)}, "
            f"got {section['win_rate']!r}"
        )
    return section


def generation_prompts(profile: Mapping[str, Any]) -> tuple[str, ...]:
    """The fixed prompts answered in the report: the profile's, else the English defaults."""
    prompts = _section(profile).get("generation")
    if prompts is None:
        return GENERATION_PROMPTS
    if (
        isinstance(prompts, str)
        or not prompts
        or not all(isinstance(p, str) and p.strip() for p in prompts)
    ):
        raise ValueError(f"profile `{SECTION}.generation` must be a non-empty list of prompts")
    return tuple(prompts)


def win_rate_prompts(
    profile: Mapping[str, Any], alpaca_instructions: list[str] | None, pairs_val: Path, limit: int
) -> list[Messages]:
    """The single-turn prompts the win rates are measured on (empty: none available).

    ``alpaca_instructions``: the loaded ``alpaca_eval`` set's instructions (None when it is not
    loaded); ``pairs_val``: ``preference_pairs/val.parquet``; ``limit``: at most this many.
    """
    if _section(profile).get("win_rate", "alpaca_eval") == "alpaca_eval":
        return [[{"role": "user", "content": t}] for t in alpaca_instructions or []]
    if not pairs_val.is_file() or limit <= 0:
        return []
    prompts = pl.read_parquet(pairs_val, columns=["prompt"])["prompt"].to_list()
    out: list[Messages] = []
    seen: set[str] = set()
    for messages in prompts:
        if len(messages) != 1 or messages[0]["role"] != "user":
            continue  # multi-turn prompts: the judges compare single-turn replies
        text = messages[0]["content"]
        if text not in seen:
            seen.add(text)
            out.append([{"role": "user", "content": text}])
        if len(out) == limit:
            break
    return out
