"""Data a profile carries itself, and the registry entries it turns off.

A teaching profile (``toy``) trains on a handful of sentences, SFT examples and preference pairs
written in the profile, and needs none of the Hub sources or benchmark files that the other
profiles fetch. The profile says so rather than the code faking them:

* ``sft.examples``: ``[{user, assistant}]`` conversations, mixed as the source ``profile``;
* ``sft.sources``: the ids of ``configs/sft_sources.yaml`` to use (absent: all). The
  ``sft_sources/<id>`` assets exist only for these (:func:`enabled`), so ``--select '*'`` never
  downloads a source the profile does not train on;
* ``preference.pairs``: ``[{user, chosen, rejected}]``; ``preference.sources`` as ``sft.sources``;
* ``eval_sets``: the ids of ``configs/eval_sets.yaml`` to fetch (absent: all).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import polars as pl

from pipeline.text.adapters.base import MESSAGES
from pipeline.text.adapters.registry import SftSource

PROFILE_SOURCE = "profile"
# What build_mixture / build_pairs need to know of the inline source.
INLINE = SftSource(id=PROFILE_SOURCE, adapter="profile", licence="as the profile's")
T = TypeVar("T")


def load_time_profile(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The profile of ``$SCRIPTORIUM_PROFILE``, read when the code location loads (as
    :func:`pipeline.resources.profile_code_version` does): the asset graph itself depends on it
    (which ``sft_sources/<id>`` exist). An unreadable profile gives ``{}``: every asset."""
    from pipeline.resources import cached_profile

    env = os.environ if env is None else env
    try:
        return cached_profile(env.get("SCRIPTORIUM_PROFILE", "demo"))
    except (FileNotFoundError, ValueError):
        return {}


def enabled(entries: Sequence[T], wanted: Any, where: str) -> list[T]:
    """``entries`` (each with an ``id``) whose id is in ``wanted``; ``None`` keeps all. An id
    that no entry has is an error naming the profile key."""
    if wanted is None:
        return list(entries)
    if isinstance(wanted, str) or not isinstance(wanted, Sequence):
        raise ValueError(f"profile `{where}` must be a list of ids, got {wanted!r}")
    ids = [e.id for e in entries]
    if unknown := sorted(set(map(str, wanted)) - set(ids)):
        raise ValueError(f"profile `{where}`: unknown id(s) {unknown}; known {ids}")
    return [e for e in entries if e.id in set(map(str, wanted))]


def _items(section: Mapping[str, Any], key: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
    items = section.get(key) or []
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ValueError(f"profile `{key}` must be a list of mappings")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or set(item) != set(fields):
            raise ValueError(f"profile `{key}[{i}]` must have exactly the keys {list(fields)}")
        out.append({f: str(item[f]) for f in fields})
    return out


def sft_examples(section: Mapping[str, Any]) -> pl.DataFrame:
    """The ``sft`` section's ``examples`` as SFT rows (``source, source_id, messages``)."""
    rows = [
        {
            "source": PROFILE_SOURCE,
            "source_id": f"{PROFILE_SOURCE}-{i:04d}",
            "messages": [
                {"role": "user", "content": e["user"]},
                {"role": "assistant", "content": e["assistant"]},
            ],
        }
        for i, e in enumerate(_items(section, "examples", ("user", "assistant")))
    ]
    schema = {"source": pl.String, "source_id": pl.String, "messages": MESSAGES}
    return pl.DataFrame(rows, schema=schema)


def inline_pairs(section: Mapping[str, Any]) -> pl.DataFrame:
    """The ``preference`` section's ``pairs`` as adapted pairs (``source, source_id, prompt,
    chosen, rejected, reason``), as :func:`pipeline.text.preferences.adapt_pairs` returns."""
    rows = [
        {
            "source": PROFILE_SOURCE,
            "source_id": f"{PROFILE_SOURCE}-{i:04d}",
            "prompt": [{"role": "user", "content": p["user"]}],
            "chosen": p["chosen"],
            "rejected": p["rejected"],
            "reason": None,
        }
        for i, p in enumerate(_items(section, "pairs", ("user", "chosen", "rejected")))
    ]
    schema = {
        "source": pl.String,
        "source_id": pl.String,
        "prompt": MESSAGES,
        "chosen": pl.String,
        "rejected": pl.String,
        "reason": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def split_section(section: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the section's own settings, its data keys ``examples``/``pairs``/``sources``)."""
    data_keys = {"examples", "pairs", "sources"}
    own = {k: v for k, v in section.items() if k not in data_keys}
    return own, {k: v for k, v in section.items() if k in data_keys}


def without_skipped(assets: Sequence[T], profile: Mapping[str, Any]) -> list[T]:
    """``assets`` minus the asset definitions the profile leaves out of its graph: those whose
    every key is in a ``skip_groups`` group (e.g. ``[classification]`` for a toy run that has no
    use for a spam classifier) or listed in ``skip_assets`` (e.g. a pretraining-only profile's
    ``[sft_weights, reward_model, rlhf_weights]``). The code location simply lacks them."""
    groups, keys = profile.get("skip_groups") or [], profile.get("skip_assets") or []
    for name, value in (("skip_groups", groups), ("skip_assets", keys)):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"profile `{name}` must be a list of names, got {value!r}")
    skip_groups, skip_keys = set(map(str, groups)), set(map(str, keys))
    if not skip_groups and not skip_keys:
        return list(assets)
    kept = []
    for a in assets:
        by_key = getattr(a, "group_names_by_key", None) or {}
        skipped = [
            k for k, g in by_key.items() if g in skip_groups or k.to_user_string() in skip_keys
        ]
        if not by_key or len(skipped) < len(by_key):
            kept.append(a)
    return kept
