"""``preference_pairs``: the preference data of ``configs/preference_sources.yaml`` as pairs.

Files come exactly as the SFT sources' do (:func:`pipeline.assets.sft.fetch_files`: Hub datasets
through ``huggingface_hub`` at a pinned revision, plain URLs sha256-pinned, both through the
mirror when one is configured); :func:`pipeline.text.preferences.build_pairs` parses, filters,
deduplicates, decontaminates against ``eval_sets``, caps and splits them, token limits measured
with ``bpe_tokenizer`` and the chat template. Writes ``train.parquet``, ``val.parquet``,
``rejects.parquet`` (every dropped pair with its reason) and ``stats.json``.

The ``preference_pairs_valid`` check runs in the asset's own step (a separate check step would
cost more than the check on 2 cores), but on the files as written, re-read from disk; it is
blocking, so the reward model and DPO never start on pairs that break the promises.
"""

from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from llm_core.config import configs_dir
from pipeline.assets.sft import (
    eval_sets,
    fetch_files,
    source_display_name,
    source_origin,
    token_counter,
)
from pipeline.io import atomic_write_json, atomic_write_parquet, files_hash, sha256_file
from pipeline.resources import HubSource, Paths, Profile, profile_code_version
from pipeline.text.decontam import NgramIndex
from pipeline.text.preferences import (
    PreferenceConfig,
    adapt_pairs,
    build_pairs,
    load_preference_sources,
    pair_problems,
    read_pairs_frame,
)
from pipeline.text.profile_data import INLINE, enabled, inline_pairs, split_section
from pipeline.text.source_languages import selected_source_ids

GROUP = "alignment"
CODE_VERSION = "1"
KEY = "preference_pairs"
PAIRS_VALID = dg.AssetCheckSpec(
    "preference_pairs_valid",
    asset=KEY,
    blocking=True,
    description="Train is non-empty; every pair has chosen != rejected and a prompt ending with "
    "a user turn; no prompt is in both train and val.",
)


def sources_config() -> Path:
    return configs_dir() / "preference_sources.yaml"


def _sources_table(stats: dict[str, Any]) -> str:
    lines = ["| source | in | train | val | rejected | licence |", "|---|---:|---:|---:|---|---|"]
    for name, s in stats["sources"].items():
        why = ", ".join(f"{k} {v}" for k, v in s["rejected"].items()) or "-"
        lines.append(
            f"| {name} | {s['pairs_in']} | {s['train']} | {s['val']} | {why} | {s['licence']} |"
        )
    return "\n".join(lines)


@dg.asset(
    name=KEY,
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "preference", "seed", "context_length"),
    deps=[eval_sets, dg.AssetKey("bpe_tokenizer")],
    kinds={"huggingface", "polars"},
    check_specs=[PAIRS_VALID],
)
def preference_pairs(
    context: dg.AssetExecutionContext, paths: Paths, profile: Profile, hub: HubSource
) -> dg.MaterializeResult:
    """Preference pairs (prompt messages, chosen, rejected) for the reward model and DPO."""
    p = profile.load()
    section, data = split_section(p.get("preference") or {})
    cfg = PreferenceConfig.from_profile({**p, "preference": section})
    registry = load_preference_sources(sources_config())
    # The profile's list, else the sources in its languages (pipeline.text.source_languages).
    sources = enabled(
        registry, selected_source_ids(registry, p, "preference"), "preference.sources"
    )
    out = paths.asset_dir(KEY)
    parts, origins = [inline_pairs(data)], {}
    for source in sources:
        files = fetch_files(source, out / source.id, hub, paths)
        parts.append(adapt_pairs(source, files))
        origins[source.id] = {
            "origin": source_origin(source, hub),
            "files": {source_display_name(f): sha256_file(f) for f in files},
            "licence": source.licence,
        }
    index = None
    if cfg.decontaminate:
        index = NgramIndex.build(
            pl.read_parquet(paths.require("eval_sets", "prompts.parquet")),
            min_n=cfg.decontam_min_n,
            max_n=cfg.decontam_max_n,
            min_words=cfg.decontam_min_words,
        )
    count = token_counter(paths.require("bpe_tokenizer", "tokenizer.json"))
    inline_source = [INLINE] if parts[0].height else []  # the profile's own pairs, if any
    result = build_pairs(pl.concat(parts), [*sources, *inline_source], count, index, cfg)
    atomic_write_parquet(result.train, out / "train.parquet")
    atomic_write_parquet(result.val, out / "val.parquet")
    atomic_write_parquet(result.rejects, out / "rejects.parquet")
    atomic_write_json(out / "stats.json", {**result.stats, "files": origins})
    stats = result.stats
    context.log.info(f"preference pairs: {stats['totals']}; rejected {stats['reasons']}")

    problems = pair_problems(
        read_pairs_frame(out / "train.parquet"), read_pairs_frame(out / "val.parquet")
    )
    per_source = {
        k: {"train": s["train"], "val": s["val"], "rejected": sum(s["rejected"].values())}
        for k, s in stats["sources"].items()
    }
    return dg.MaterializeResult(
        metadata={
            "train_pairs": stats["totals"]["train"],
            "val_pairs": stats["totals"]["val"],
            "pairs_in": stats["totals"]["pairs_in"],
            "rejected": stats["totals"]["rejected"],
            "rejected_by_reason": dg.MetadataValue.json(stats["reasons"]),
            "pairs_per_source": dg.MetadataValue.json(per_source),
            "per_source": dg.MetadataValue.md(_sources_table(stats)),
            "licences": dg.MetadataValue.json({k: v["licence"] for k, v in origins.items()}),
            "sources": dg.MetadataValue.json(origins),
            "max_tokens": cfg.max_tokens,
            "mean_pair_tokens": round(stats["tokens"]["pair_mean"], 1),
            "decontamination": dg.MetadataValue.json(stats["decontam"]),
            "path": dg.MetadataValue.path(str(out / "train.parquet")),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=PAIRS_VALID.name,
                passed=not problems,
                metadata={"problems": dg.MetadataValue.json(problems)},
            )
        ],
        data_version=dg.DataVersion(files_hash([out / "train.parquet", out / "val.parquet"])),
    )
