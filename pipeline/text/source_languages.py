"""Which registry sources a profile trains on, by language.

``configs/sft_sources.yaml`` and ``configs/preference_sources.yaml`` hold sources in several
languages (each entry's ``language``, ``en`` by default). A profile that lists its ``sources``
gets exactly those; one that does not gets the sources in its languages (``clean.languages``,
the languages its books are kept in), so the English profiles never mix in the Chinese sources
and a mixed ``[en, zh]`` profile takes both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.text.adapters.registry import SftSource

__all__ = ["profile_languages", "selected_source_ids"]


def profile_languages(profile: Mapping[str, Any]) -> list[str]:
    """The languages a profile trains on: ``clean.languages`` (default ``[en]``)."""
    langs = (profile.get("clean") or {}).get("languages") or ["en"]
    if isinstance(langs, str) or not all(isinstance(x, str) for x in langs):
        raise ValueError(f"profile `clean.languages` must be a list of codes, got {langs!r}")
    return list(langs)


def selected_source_ids(
    entries: Sequence[SftSource], profile: Mapping[str, Any], section: str
) -> Any:
    """The profile's ``<section>.sources`` when it lists them (validated by
    :func:`pipeline.text.profile_data.enabled`), else the ids of ``entries`` in its languages."""
    wanted = (profile.get(section) or {}).get("sources")
    if wanted is not None:
        return wanted
    languages = set(profile_languages(profile))
    return [e.id for e in entries if e.language in languages]
