"""``imported_weights``: a Hub model (Llama or GPT-2) as llm_core weights, from the profile.

    imported_weights:
      hub: openai-community/gpt2@main   # org/name[@revision]; $HF_ENDPOINT / HF_TOKEN apply
      start_sft: true                   # sft_weights fine-tunes these instead of pretrained_weights

The asset does what ``scriptorium import --hub`` does (:mod:`pipeline.sources.hub_models`),
through the ``hub`` resource (endpoint, token, cache). It exists only in code locations whose
profile has the section, so ``--select '*'`` never asks a profile without one for a model; with
``start_sft`` the ``sft_weights`` asset depends on it and starts from its folder (and its
tokenizer), as a run's ``init_weights`` would.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from pipeline.io import sha256_file
from pipeline.resources import HubSource, Paths, Profile, profile_code_version
from pipeline.sources.hub_models import ModelRef, import_hub_model
from pipeline.text.profile_data import load_time_profile

KEY = "imported_weights"
CODE_VERSION = "1"
SECTION_KEYS = {"hub", "start_sft"}


def settings(profile: Mapping[str, Any]) -> dict[str, Any] | None:
    """The profile's ``imported_weights`` section, checked; None when it has none."""
    section = profile.get(KEY)
    if section is None:
        return None
    if not isinstance(section, Mapping) or not section.get("hub"):
        raise ValueError(f"profile `{KEY}` must be a mapping with `hub: org/name[@rev]`")
    if unknown := sorted(set(section) - SECTION_KEYS):
        raise ValueError(
            f"profile `{KEY}`: unknown key(s) {unknown}; allowed {sorted(SECTION_KEYS)}"
        )
    return dict(section)


def sft_start(profile: Mapping[str, Any], paths: Paths) -> Path | None:
    """The folder ``sft_weights`` starts from when the profile says ``start_sft``; else None."""
    section = settings(profile)
    if not section or not section.get("start_sft"):
        return None
    return paths.artefacts().existing(paths.artefacts().weights(KEY)).parent


def sft_deps(profile: Mapping[str, Any]) -> list[dg.AssetKey]:
    """``[imported_weights]`` for ``sft_weights``' deps when it starts from the import."""
    section = settings(profile)
    return [dg.AssetKey(KEY)] if section and section.get("start_sft") else []


def imported_weights_asset() -> dg.AssetsDefinition:
    """The asset (a factory, so tests can build it whatever the environment's profile)."""

    @dg.asset(
        name=KEY,
        group_name="training",
        code_version=profile_code_version(CODE_VERSION, KEY),
        kinds={"huggingface", "pytorch"},
    )
    def _imported(
        context: dg.AssetExecutionContext, paths: Paths, profile: Profile, hub: HubSource
    ) -> dg.MaterializeResult:
        """A Hub model converted to llm_core weights (+ its tokenizer with the chat tokens)."""
        section = settings(profile.load())
        if section is None:
            raise ValueError(f"profile {profile.name!r} has no `{KEY}` section")
        ref = ModelRef.parse(str(section["hub"]))
        out = paths.asset_dir(KEY)
        info = import_hub_model(
            ref, out, hub.cache(paths), endpoint=hub.endpoint or None, token=hub.token or None
        )
        sha = sha256_file(out / "model.safetensors")
        context.log.info(f"imported {ref} ({info['arch']}, {info['params']:,} parameters)")
        return dg.MaterializeResult(
            metadata={
                "repo": info["repo"],
                "revision": info["revision"],
                "commit": info["commit"],
                "endpoint": info["endpoint"],
                "files": dg.MetadataValue.json(info["files"]),
                "arch": info["arch"],
                "params": info["params"],
                "weights_sha256": sha,
                "path": dg.MetadataValue.path(str(out)),
            },
            data_version=dg.DataVersion(sha[:16]),
        )

    return _imported


imported_weights = imported_weights_asset() if settings(load_time_profile()) else None
