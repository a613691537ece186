"""SFT stages: ``sft_sources/<id>`` and ``eval_sets`` -> ``sft_mixture`` -> ``sft_weights``.

* ``sft_sources/<id>``: one asset per entry of ``configs/sft_sources.yaml``, made by
  :func:`sft_sources_asset`, so each source can be refreshed alone (a changed upstream file, a new
  adapter) while ``--select '*'`` still builds everything (in one step: see the factory). Files
  come from the Hub through ``huggingface_hub`` (pinned revision, data files only, never a
  loading script) or from a plain URL (sha256-pinned); :func:`adapt_source` converts them.
* ``eval_sets``: the evaluation prompts of ``configs/eval_sets.yaml``, fetched the same way.
* ``sft_mixture``: :func:`pipeline.text.sft_mix.build_mixture` over every source, decontaminated
  against ``eval_sets``, token limits measured with ``bpe_tokenizer``.
* ``sft_weights``: fine-tuning of ``pretrained_weights`` in a Pipes subprocess
  (``pipeline.child``, stage ``sft``), like pretraining.

Thin assets: each calls tested functions, writes its files atomically and returns metadata.
"""

import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import numpy as np
import polars as pl

from llm_core.config import configs_dir
from pipeline.assets import imported
from pipeline.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    files_hash,
    sha256_file,
    version_hash,
)
from pipeline.launch import StageResources, launch_training
from pipeline.resources import (
    Compute,
    HubSource,
    MlflowTracking,
    Paths,
    Profile,
    profile_code_version,
)
from pipeline.sources.hub import FILES_MIRROR_ENV, download_dataset_files, download_url
from pipeline.text.adapters import ROWS_SCHEMA, SftSource, adapt_source, load_sft_sources
from pipeline.text.decontam import (
    PROMPTS_SCHEMA,
    EvalSet,
    NgramIndex,
    eval_prompts,
    load_eval_sets,
)
from pipeline.text.profile_data import (
    INLINE,
    enabled,
    load_time_profile,
    sft_examples,
    split_section,
)
from pipeline.text.sft_mix import MixConfig, build_mixture, check_consistent
from pipeline.text.source_languages import selected_source_ids

GROUP = "sft"
CODE_VERSION = "1"
SOURCES_PREFIX = "sft_sources"
REGISTERED_MODEL = "scriptorium-sft"


def sources_config() -> Path:
    return configs_dir() / "sft_sources.yaml"


def eval_sets_config() -> Path:
    return configs_dir() / "eval_sets.yaml"


# ------------------------------------------------------------------------------ downloads
def _mirrored(url: str, files_mirror: str) -> str:
    """``https://host/path`` -> ``<files_mirror>/host/path`` (the layout the mirror serves)."""
    parts = urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{files_mirror.rstrip('/')}/{parts.netloc}{parts.path}{query}"


def fetch_files(entry: SftSource | EvalSet, dest: Path, hub: HubSource, paths: Paths) -> list[Path]:
    """Download one SFT source or evaluation set; returns its local files, sorted.

    Hub entries land in the shared ``huggingface_hub`` cache (read-only paths); URL entries in
    ``dest/files/``. ``download_url`` itself applies ``$SCRIPTORIUM_FILES_MIRROR``; a resource
    configured with a files mirror the environment lacks rewrites the URL here instead (an empty
    one defers to the environment), and two different mirrors are refused, not applied twice.
    """
    if entry.repo is not None:
        assert entry.revision is not None
        return download_dataset_files(
            entry.repo,
            entry.revision,
            entry.patterns,
            hub.cache(paths),
            endpoint=hub.endpoint or None,
            token=hub.token or None,
        )
    assert entry.url is not None
    env_mirror = os.environ.get(FILES_MIRROR_ENV, "")
    rewrite = bool(hub.files_mirror) and hub.files_mirror.rstrip("/") != env_mirror.rstrip("/")
    if rewrite and env_mirror:
        raise ValueError(
            f"HubSource.files_mirror={hub.files_mirror!r} conflicts with "
            f"${FILES_MIRROR_ENV}={env_mirror!r}; unset one of them"
        )
    # An eval set may name several files under one URL template (EvalSet.files).
    urls = entry.urls() if isinstance(entry, EvalSet) else [entry.url]
    out = []
    for real in urls:
        url = _mirrored(real, hub.files_mirror) if rewrite else real
        name = Path(urlsplit(real).path).name
        out.append(download_url(url, dest / "files" / name, sha256=entry.sha256))
    return sorted(out)


def source_origin(entry: SftSource | EvalSet, hub: HubSource) -> str:
    if entry.repo is not None:
        base = hub.endpoint or "https://huggingface.co"
        return f"{base.rstrip('/')}/datasets/{entry.repo} @ {entry.revision}"
    return str(entry.url)


def source_display_name(path: Path) -> str:
    """A file's name as its origin knows it: the repo path for a Hub snapshot file (BLiMP has six
    ``train-00000-of-00001.parquet``, one per config folder), else the file name."""
    parts = path.parts
    if "snapshots" in parts:
        return "/".join(parts[parts.index("snapshots") + 2 :])
    return path.name


def _preview(rows: pl.DataFrame, n: int = 3, chars: int = 160) -> str:
    lines = []
    for msgs in rows["messages"].head(n).to_list():
        turns = [f"**{m['role']}**: {m['content'][:chars]!r}" for m in msgs]
        lines.append("- " + "<br>".join(turns))
    return "\n".join(lines) or "(no rows)"


# ------------------------------------------------------------------------------ sft_sources/*
def _rows_problems(rows: pl.DataFrame) -> list[str]:
    """What makes a source's rows unusable downstream (empty list when they are fine)."""
    problems = []
    if rows.schema != ROWS_SCHEMA:
        problems.append(f"schema {dict(rows.schema)} != {dict(ROWS_SCHEMA)}")
    elif rows.height == 0:
        problems.append("no rows")
    else:
        if not rows["source_id"].is_unique().all():
            problems.append("duplicate source_id values")
        last = rows.select(pl.col("messages").list.last().struct.field("role")).to_series()
        if (last != "assistant").any():
            problems.append("a conversation does not end with the assistant")
    return problems


def source_key(source: SftSource) -> dg.AssetKey:
    return dg.AssetKey([SOURCES_PREFIX, source.id])


def materialize_source(source: SftSource, paths: Paths, hub: HubSource) -> dg.MaterializeResult:
    """Download, adapt and write one source; its result carries the ``rows_valid`` check."""
    key = source_key(source)
    out = paths.asset_dir(key)
    files = fetch_files(source, out, hub, paths)
    rows, rejects = adapt_source(source, files)
    atomic_write_parquet(rows, out / "rows.parquet")
    atomic_write_parquet(rejects, out / "rejects.parquet")
    problems = _rows_problems(rows)
    reasons = dict(rejects.group_by("reason").len().iter_rows()) if rejects.height else {}
    return dg.MaterializeResult(
        asset_key=key,
        metadata={
            "rows": rows.height,
            "rejects": rejects.height,
            "reject_reasons": dg.MetadataValue.json(reasons),
            "origin": source_origin(source, hub),
            "files": dg.MetadataValue.json({source_display_name(f): sha256_file(f) for f in files}),
            "licence": source.licence,
            "non_commercial": source.non_commercial,
            "preview": dg.MetadataValue.md(_preview(rows)),
            "path": dg.MetadataValue.path(str(out / "rows.parquet")),
        },
        check_results=[
            dg.AssetCheckResult(
                asset_key=key,
                check_name="rows_valid",
                passed=not problems,
                metadata={"problems": dg.MetadataValue.json(problems)},
            )
        ],
        data_version=dg.DataVersion(version_hash(files_hash(files), source.adapter)),
    )


def sft_sources_asset(sources: Sequence[SftSource]) -> dg.AssetsDefinition:
    """One asset ``sft_sources/<id>`` per registry entry, all computed by one subsettable step.

    Each source is its own asset (own key, metadata, data version and ``rows_valid`` check, and
    it can be materialised alone: ``--select 'sft_sources/dolly'``), but a run that selects
    several shares one step, where they download concurrently. On 2 cores a Dagster step process
    costs ~6-13 s before it does any work, far more than fetching and adapting a source, so
    eleven steps would make this stage ten times slower than its work. A failing source does not
    stop the others: their results are reported, then the step fails naming the failures.
    """
    specs = [
        dg.AssetSpec(
            source_key(s),
            group_name=GROUP,
            code_version=CODE_VERSION,
            kinds={"huggingface" if s.repo else "http", "polars"},
            description=f"SFT source `{s.id}` ({s.licence}) as `messages` rows.",
            metadata={"licence": s.licence, "adapter": s.adapter, "weight": s.weight},
            skippable=True,
        )
        for s in sources
    ]
    checks = [dg.AssetCheckSpec("rows_valid", asset=source_key(s), blocking=True) for s in sources]

    @dg.multi_asset(name=SOURCES_PREFIX, specs=specs, check_specs=checks, can_subset=True)
    def _sources(
        context: dg.AssetExecutionContext, paths: Paths, hub: HubSource
    ) -> Iterator[dg.MaterializeResult]:
        selected = [s for s in sources if source_key(s) in context.selected_asset_keys]
        failed: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=min(4, len(selected) or 1)) as pool:
            futures = {s.id: pool.submit(materialize_source, s, paths, hub) for s in selected}
            for source in selected:
                try:
                    result = futures[source.id].result()
                except Exception as exc:  # one bad source must not hide the others' results
                    failed[source.id] = f"{type(exc).__name__}: {exc}"
                    context.log.error(f"SFT source {source.id} failed: {failed[source.id]}")
                    continue
                meta = result.metadata or {}
                context.log.info(f"{source.id}: {meta['rows']} rows, {meta['rejects']} rejected")
                yield result
        if failed:
            raise RuntimeError(f"SFT sources failed: {failed}")

    return _sources


# Only the sources the profile trains on (``sft.sources``; see pipeline.text.profile_data).
_ALL_SOURCES = load_sft_sources(sources_config())
SFT_SOURCES = enabled(  # the profile's list, else its languages' sources (source_languages)
    _ALL_SOURCES, selected_source_ids(_ALL_SOURCES, load_time_profile(), "sft"), "sft.sources"
)
sft_sources = sft_sources_asset(SFT_SOURCES) if SFT_SOURCES else None
SOURCE_KEYS = [source_key(s) for s in SFT_SOURCES]


# ------------------------------------------------------------------------------ eval_sets
def keep_local_copies(files: Sequence[Path], dest: Path) -> list[Path]:
    """Copies of Hub snapshot files under ``dest/<repo path>``, replacing what ``dest`` held.

    The evaluation reads whole records (answers, minimal pairs), not only the prompts, and must
    not depend on the shared Hub cache, which may be pruned or live on another machine.
    """
    if dest.exists():
        shutil.rmtree(dest)
    out = []
    for f in files:
        target = dest / source_display_name(f)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, f.read_bytes())
        out.append(target)
    return sorted(out)


@dg.asset(group_name=GROUP, code_version=CODE_VERSION, kinds={"huggingface", "polars"})
def eval_sets(
    context: dg.AssetExecutionContext, paths: Paths, hub: HubSource, profile: Profile
) -> dg.MaterializeResult:
    """Prompts of the evaluation sets (``prompts.parquet``): what the SFT mix must not contain.

    Each set's whole files are kept under ``<id>/files/`` (Hub files copied out of the shared
    cache, by their repo path): ``evaluation_report`` scores the models on them.
    """
    out, prompts_path = paths.asset_dir("eval_sets"), paths.artefacts().eval_prompts
    parts, files_by_set = [PROMPTS_SCHEMA.to_frame()], {}
    sets = enabled(load_eval_sets(eval_sets_config()), profile.load().get("eval_sets"), "eval_sets")
    for entry in sets:
        files = fetch_files(entry, out / entry.id, hub, paths)
        names = [source_display_name(f) for f in files]
        if entry.repo is not None:
            files = keep_local_copies(files, out / entry.id / "files")
        parts.append(eval_prompts(entry, files))
        files_by_set[entry.id] = {
            "origin": source_origin(entry, hub),
            "files": names,
            "licence": entry.licence,
        }
    prompts = pl.concat(parts)
    atomic_write_parquet(prompts, prompts_path)
    counts = dict(prompts.group_by("eval_set", maintain_order=True).len().iter_rows())
    context.log.info(f"evaluation prompts: {counts}")
    return dg.MaterializeResult(
        metadata={
            "prompts": prompts.height,
            "prompts_per_set": dg.MetadataValue.json(counts),
            "sets": dg.MetadataValue.json(files_by_set),
            "path": dg.MetadataValue.path(str(prompts_path)),
        },
        data_version=dg.DataVersion(sha256_file(prompts_path)[:16]),
    )


# ------------------------------------------------------------------------------ sft_mixture
def token_counter(tokenizer_path: Path) -> Any:
    """``conversations -> (tokens, reply tokens)`` with the BPE and the training template."""
    from llm_core.sft import encode_conversations
    from llm_core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)

    def count(conversations: list[list[dict[str, str]]]) -> tuple[np.ndarray, np.ndarray]:
        data = encode_conversations(tok, conversations)
        reply = np.add.reduceat(data.mask.astype(np.int64), data.offsets[:-1])
        return data.lengths(), reply

    return count


def _sources_table(stats: dict[str, Any]) -> str:
    lines = ["| source | in | train | val | rejected |", "|---|---:|---:|---:|---|"]
    for name, s in stats["sources"].items():
        why = ", ".join(f"{k} {v}" for k, v in s["rejected"].items()) or "-"
        lines.append(f"| {name} | {s['rows_in']} | {s['train']} | {s['val']} | {why} |")
    return "\n".join(lines)


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "sft", "seed", "vocab_size"),
    deps=[*SOURCE_KEYS, eval_sets, dg.AssetKey("bpe_tokenizer")],
    kinds={"polars"},
)
def sft_mixture(
    context: dg.AssetExecutionContext, paths: Paths, profile: Profile
) -> dg.MaterializeResult:
    """The SFT training mix: filtered, deduplicated, decontaminated, capped, weighted, split."""
    p = profile.load()
    section, _ = split_section(p.get("sft") or {})
    cfg = MixConfig.from_profile(section, int(p.get("seed", 1337)))
    files = paths.artefacts()
    inline = sft_examples(p.get("sft") or {})
    rows = pl.concat(
        [
            *(
                pl.read_parquet(paths.require(f"{SOURCES_PREFIX}/{s.id}", "rows.parquet"))
                for s in SFT_SOURCES
            ),
            inline,
        ]
    )
    prompts = pl.read_parquet(files.existing(files.eval_prompts))
    index = NgramIndex.build(
        prompts,
        min_n=cfg.decontam_min_n,
        max_n=cfg.decontam_max_n,
        min_words=cfg.decontam_min_words,
    )
    count = token_counter(files.existing(files.tokenizer))
    inline_source = [INLINE] if inline.height else []  # the profile's own examples, if any
    result = build_mixture(rows, [*SFT_SOURCES, *inline_source], count, index, cfg)
    if problems := check_consistent(result.stats):
        raise RuntimeError(f"SFT mixture accounting is off: {problems}")
    if result.train.height == 0:
        raise RuntimeError(f"the SFT mixture is empty; rejected: {result.stats['reasons']}")
    out = paths.asset_dir("sft_mixture")
    train, val = files.sft_split("train"), files.sft_split("val")
    atomic_write_parquet(result.train, train)
    atomic_write_parquet(result.val, val)
    atomic_write_parquet(result.rejects, out / "rejects.parquet")
    atomic_write_json(files.mixture_stats, result.stats)
    totals = result.stats["totals"]
    context.log.info(f"SFT mixture: {totals}; rejected {result.stats['reasons']}")
    return dg.MaterializeResult(
        metadata={
            "train_rows": totals["train"],
            "val_rows": totals["val"],
            "rows_in": totals["rows_in"],
            "rejected": totals["rejected"],
            "rejected_by_reason": dg.MetadataValue.json(result.stats["reasons"]),
            "per_source": dg.MetadataValue.md(_sources_table(result.stats)),
            "train_tokens": result.stats["tokens"]["train_total"],
            "train_reply_tokens": result.stats["tokens"]["train_reply"],
            "decontamination": dg.MetadataValue.json(result.stats["decontam"]),
            "non_commercial_sources": dg.MetadataValue.json(result.stats["non_commercial_sources"]),
            "path": dg.MetadataValue.path(str(train)),
        },
        data_version=dg.DataVersion(files_hash([train, val])),
    )


# ------------------------------------------------------------------------------ sft_weights
class SFTConfig(dg.Config):
    """Run-time knobs; the schedule comes from the profile's ``sft_train`` section."""

    resume: bool = False  # continue from the latest checkpoint of the same config
    steps: int = 0  # 0 keeps the profile's sft_train.steps
    # Start from these llm_core weights instead of pretrained_weights: e.g. a Hugging Face
    # Llama or GPT-2 checkpoint brought in with `scriptorium import --hf DIR --out DIR`. Its
    # tokenizer.json (beside the weights) replaces bpe_tokenizer for this and later stages.
    init_weights: str = ""


def init_weights_dir(config: SFTConfig, paths: Paths) -> tuple[Path, Path]:
    """(weights folder, tokenizer) that SFT starts from: the run's ``init_weights`` when given,
    else ``pretrained_weights`` with ``bpe_tokenizer``."""
    if not config.init_weights:
        files = paths.artefacts()
        pretrained = files.existing(files.weights("pretrained_weights")).parent
        return pretrained, files.existing(files.tokenizer)
    init = Path(config.init_weights).expanduser()
    missing = [
        n
        for n in ("model.safetensors", "config.json", "tokenizer.json")
        if not (init / n).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"sft_weights init_weights={init}: missing {missing}; write the folder with "
            "`scriptorium import --hf HF_DIR --out DIR`"
        )
    return init, init / "tokenizer.json"


def chat_tokenizer(paths: Paths) -> Path:
    """The tokenizer of the chat model: the one SFT saved beside its weights (an imported model's
    own), else ``bpe_tokenizer``."""
    return paths.artefacts().chat_tokenizer()


@dg.asset(
    group_name="training",
    code_version=profile_code_version(CODE_VERSION, "sft_train", "seed"),
    deps=[
        sft_mixture,
        dg.AssetKey("pretrained_weights"),
        dg.AssetKey("bpe_tokenizer"),
        *imported.sft_deps(load_time_profile()),  # profile `imported_weights.start_sft`
    ],
    pool="train",
    kinds={"pytorch", "mlflow"},
)
def sft_weights(
    context: dg.AssetExecutionContext,
    config: SFTConfig,
    paths: Paths,
    profile: Profile,
    mlflow: MlflowTracking,
    compute: Compute,
    pipes: dg.PipesSubprocessClient,
) -> Iterator[Any]:
    """The chat model: ``pretrained_weights`` (or an imported checkpoint, see ``SFTConfig``)
    fine-tuned on ``sft_mixture`` (assistant-only loss)."""
    files = paths.artefacts()
    train, val = files.existing(files.sft_split("train")), files.existing(files.sft_split("val"))
    if not config.init_weights and (start := imported.sft_start(profile.load(), paths)):
        config = config.model_copy(update={"init_weights": str(start)})
    pretrained, tokenizer = init_weights_dir(config, paths)
    yield from launch_training(
        context,
        "sft",
        inputs={
            "train_path": train,
            "val_path": val,
            "init_weights": pretrained,
            "tokenizer": tokenizer,
        },
        out=paths.asset_dir("sft_weights"),
        run=config,
        upstream_keys=["sft_mixture", "pretrained_weights", "bpe_tokenizer"],
        version_parts=[
            profile.load().get("sft_train"),
            *([config.init_weights] if config.init_weights else []),
        ],
        registered_model=REGISTERED_MODEL,
        resources=StageResources(paths, profile, mlflow, compute, pipes),
    )
