"""Data a profile carries itself (SFT examples, preference pairs) and what it leaves out of the
graph (registry entries, asset groups and keys): pipeline.text.profile_data."""

from __future__ import annotations

import dagster as dg
import pytest

from pipeline.text.adapters.registry import SftSource
from pipeline.text.preferences import PreferenceConfig, build_pairs
from pipeline.text.profile_data import (
    INLINE,
    enabled,
    inline_pairs,
    sft_examples,
    without_skipped,
)
from pipeline.text.sft_mix import MixConfig


def _count(convs):
    import numpy as np

    n = np.asarray([sum(len(m["content"].split()) + 2 for m in c) for c in convs])
    return n, np.ones_like(n)


def test_inline_examples_and_pairs() -> None:
    rows = sft_examples({"examples": [{"user": "does the cat like milk ?", "assistant": "yes ."}]})
    assert rows.rows() == [
        (
            "profile",
            "profile-0000",
            [
                {"role": "user", "content": "does the cat like milk ?"},
                {"role": "assistant", "content": "yes ."},
            ],
        )
    ]
    pairs = inline_pairs(
        {"pairs": [{"user": "q ?", "chosen": "yes .", "rejected": "yes , it does ."}]}
    )
    result = build_pairs(
        pairs, [INLINE], _count, None, PreferenceConfig(max_tokens=32, val_fraction=0.0)
    )
    assert result.train["chosen"].to_list() == ["yes ."] and result.val.height == 0
    with pytest.raises(ValueError, match=r"examples\[0\]"):
        sft_examples({"examples": [{"user": "q"}]})
    # the data keys are not settings: the configs read the same section without complaint
    MixConfig.from_profile({"examples": [], "sources": [], "val_fraction": 0.0}, 1)
    PreferenceConfig.from_profile(
        {"context_length": 16, "preference": {"pairs": [], "sources": []}}
    )


def test_enabled_registry_entries() -> None:
    entries = [SftSource(id=i, adapter="alpaca", licence="x", url="https://h/a") for i in "abc"]
    assert enabled(entries, None, "sft.sources") == entries
    assert [e.id for e in enabled(entries, ["c", "a"], "sft.sources")] == ["a", "c"]
    assert enabled(entries, [], "sft.sources") == []
    with pytest.raises(ValueError, match=r"sft.sources.*unknown id\(s\) \['z'\]"):
        enabled(entries, ["z"], "sft.sources")


def test_without_skipped() -> None:
    @dg.asset(group_name="data")
    def books() -> None: ...

    @dg.asset(group_name="training")
    def sft_weights() -> None: ...

    @dg.asset(group_name="classification")
    def spam() -> None: ...

    every = [books, sft_weights, spam]
    assert without_skipped(every, {}) == every
    assert without_skipped(every, {"skip_groups": ["classification"]}) == [books, sft_weights]
    assert without_skipped(every, {"skip_assets": ["sft_weights"]}) == [books, spam]
    with pytest.raises(ValueError, match="skip_groups"):
        without_skipped(every, {"skip_groups": "classification"})
