"""Classification: labelled texts -> ``spam_classifier`` (single task) and ``text_classifier``
(multi-task heads).

* ``sms_spam`` and ``language_paragraphs``: the data, computed by one subsettable step
  (:func:`classification_data`): a Dagster step process costs ~6-13 s on 2 cores before it does
  any work, more than building both datasets. ``sms_spam`` downloads the UCI SMS Spam Collection
  through the same plain-URL client and files mirror as every other plain-URL source
  (sha256-pinned, retried, atomic), parses it (:mod:`pipeline.text.classification`: each bad
  line and every exact repeat into ``rejects.parquet`` with its reason) and writes the
  ``balanced`` and ``natural`` splits. ``language_paragraphs`` downloads books of every language
  from the Gutenberg source (the mirror in tests), labels their paragraphs with the catalog's
  ``Language`` and splits them by book.
* ``spam_classifier``: stage ``classify`` (profile section ``classify``) from
  ``pretrained_weights``; registered as ``scriptorium-spam``; metadata: accuracy, balanced
  accuracy and spam F1 on both test splits, the per-class tables and the confusion matrices.
* ``text_classifier``: stage ``classify_multi`` (section ``classify_multi``): one backbone, a
  spam head and a language head trained jointly; registered as ``scriptorium-text-classifier``.

Multi-task is a second asset rather than a profile option of ``spam_classifier`` so that the
registered spam model keeps one meaning (one head, exportable to ``LlamaForSequenceClassification``)
whatever the multi-task settings, and a profile can size or skip either run on its own.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import polars as pl

from pipeline.artefacts import STAGE_ASSETS
from pipeline.io import atomic_write_parquet, files_hash, sha256_file, version_hash
from pipeline.launch import StageResources, launch_training
from pipeline.resources import (
    Compute,
    GutenbergSource,
    HubSource,
    MlflowTracking,
    Paths,
    Profile,
    profile_code_version,
)
from pipeline.sources import gutenberg as pg
from pipeline.sources.http import PoliteClient
from pipeline.sources.hub import FILES_MIRROR_ENV, download_url
from pipeline.text import classification as tc

GROUP = "classification"
CODE_VERSION = "1"
SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SHA256 = "1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3"
SMS_LICENCE = "CC BY 4.0 (UCI Machine Learning Repository, Almeida & Hidalgo 2011)"
SPAM_MODEL = "scriptorium-spam"
MULTI_MODEL = "scriptorium-text-classifier"
SMS, PARAGRAPHS = "sms_spam", "language_paragraphs"


def fetch_plain_url(url: str, dest: Path, hub: HubSource, sha256: str | None) -> Path:
    """``url`` into ``dest/files/`` through the files mirror: the resource's, else
    ``$SCRIPTORIUM_FILES_MIRROR`` (applied by ``download_url``); two different mirrors are
    refused, as for the SFT and evaluation sources."""
    env_mirror = os.environ.get(FILES_MIRROR_ENV, "")
    source = url
    if hub.files_mirror and hub.files_mirror.rstrip("/") != env_mirror.rstrip("/"):
        if env_mirror:
            raise ValueError(
                f"HubSource.files_mirror={hub.files_mirror!r} conflicts with "
                f"${FILES_MIRROR_ENV}={env_mirror!r}; unset one of them"
            )
        parts = urlsplit(url)
        source = f"{hub.files_mirror.rstrip('/')}/{parts.netloc}{parts.path}"
    name = Path(urlsplit(url).path).name
    return download_url(source, dest / "files" / name, sha256=sha256)


def _reasons(rejects: pl.DataFrame) -> dict[str, int]:
    return dict(rejects.group_by("reason").len().iter_rows()) if rejects.height else {}


def build_sms_spam(
    out: Path, hub: HubSource, seed: int, url: str = SMS_URL, sha256: str | None = SMS_SHA256
) -> dg.MaterializeResult:
    """Download, parse, deduplicate and split the SMS Spam Collection into ``out``."""
    archive = fetch_plain_url(url, out, hub, sha256)
    parsed = tc.parse_sms(tc.read_sms_zip(archive))
    if not parsed.rows.height:
        raise ValueError(f"{archive}: no usable messages (see {out / 'rejects.parquet'})")
    atomic_write_parquet(parsed.rejects, out / "rejects.parquet")
    splits = tc.split_sms(parsed.rows, seed)
    counts = tc.write_dataset(out, splits, tc.SMS_LABELS, "balanced", {"source": url})
    files = [out / m / f"{p}.parquet" for m in splits for p in tc.PARTS]
    return dg.MaterializeResult(
        asset_key=SMS,
        metadata={
            "messages": parsed.rows.height,
            "by_label": dg.MetadataValue.json(dict(parsed.rows.group_by("label").len().rows())),
            "rejected": parsed.rejects.height,
            "rejected_by_reason": dg.MetadataValue.json(_reasons(parsed.rejects)),
            "splits": dg.MetadataValue.json(counts),
            "origin": url,
            "sha256": sha256_file(archive),
            "licence": SMS_LICENCE,
            "preview": dg.MetadataValue.md(tc.sms_preview(splits["balanced"]["train"])),
            "path": dg.MetadataValue.path(str(out)),
        },
        data_version=dg.DataVersion(version_hash(files_hash(files), seed)),
    )


def build_language_paragraphs(
    out: Path, source: GutenbergSource, cfg: tc.ParagraphConfig, seed: int
) -> dg.MaterializeResult:
    """Gutenberg paragraphs labelled by language, split by book, into ``out``."""
    with PoliteClient(user_agent=source.user_agent) as client:
        pg.download_catalog(source.base_url, out / "pg_catalog.csv", client)
    books = tc.select_language_books(pg.parse_catalog(out / "pg_catalog.csv"), cfg)
    manifest = pg.download_books(books["id"].to_list(), source.base_url, out / "books",
                                 user_agent=source.user_agent, requests_per_second=50.0)  # fmt: skip
    failed = manifest.filter(pl.col("status") != "ok")
    if failed.height:
        raise RuntimeError(f"language_paragraphs: downloads failed: {failed.rows()}")
    paragraphs = {
        int(i): tc.book_paragraphs(
            tc.read_text_bytes((out / "books" / f"{i}.txt").read_bytes()), int(i), cfg, seed
        )
        for i in books["id"]
    }
    parts, rejects, labels = tc.split_by_book(books, paragraphs, cfg, seed)
    if len(labels) < 2:
        raise ValueError(f"language_paragraphs: {len(labels)} language(s) kept; need >= 2")
    atomic_write_parquet(rejects, out / "rejects.parquet")
    counts = tc.write_dataset(out, {"by_book": parts}, labels, "by_book")
    books_per = {p: sorted(set(df["book"].to_list())) for p, df in parts.items()}
    files = [out / "by_book" / f"{p}.parquet" for p in tc.PARTS]
    return dg.MaterializeResult(
        asset_key=PARAGRAPHS,
        metadata={
            "languages": dg.MetadataValue.json(labels),
            "paragraphs": dg.MetadataValue.json(counts["by_book"]),
            "books_per_split": dg.MetadataValue.json(books_per),
            "rejected_books": dg.MetadataValue.json(_reasons(rejects)),
            "origin": source.base_url,
            "path": dg.MetadataValue.path(str(out)),
        },
        data_version=dg.DataVersion(version_hash(files_hash(files), seed)),
    )


class ClassificationDataConfig(dg.Config):
    """Where the SMS archive comes from: the UCI URL, sha256-pinned (an empty sha256 skips the
    check, for another copy of the collection)."""

    sms_url: str = SMS_URL
    sms_sha256: str = SMS_SHA256


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            SMS, group_name=GROUP, kinds={"polars"},
            code_version=profile_code_version(CODE_VERSION, "seed"),
            description="The UCI SMS Spam Collection: parsed, deduplicated, balanced and "
            "natural train/val/test splits, rejects.parquet.",
        ),
        dg.AssetSpec(
            PARAGRAPHS, group_name=GROUP, kinds={"polars"},
            code_version=profile_code_version(CODE_VERSION, "seed", PARAGRAPHS),
            description="Gutenberg paragraphs of every language, labelled by the catalog's "
            "Language, split by book.",
        ),
    ],
    can_subset=True,
)  # fmt: skip
def classification_data(
    context: dg.AssetExecutionContext,
    config: ClassificationDataConfig,
    paths: Paths,
    profile: Profile,
    hub: HubSource,
    gutenberg: GutenbergSource,
) -> Iterator[dg.MaterializeResult]:
    """Both labelled datasets of the classifiers, each only when selected."""
    p = profile.load()
    seed = int(p.get("seed", 1337))
    selected = {k.to_user_string() for k in context.selected_asset_keys}
    if SMS in selected:
        yield build_sms_spam(paths.asset_dir(SMS), hub, seed, config.sms_url,
                             config.sms_sha256 or None)  # fmt: skip
    if PARAGRAPHS in selected:
        cfg = tc.ParagraphConfig.from_mapping(p.get(PARAGRAPHS) or {})
        yield build_language_paragraphs(paths.asset_dir(PARAGRAPHS), gutenberg, cfg, seed)


class ClassifyConfig(dg.Config):
    """Run-time knobs; everything else comes from the profile's ``classify`` section."""

    resume: bool = False
    steps: int = 0  # 0 keeps the profile's steps
    # Another weights folder to start from (one `scriptorium import` wrote); empty: the
    # pretrained_weights asset.
    init_weights: str = ""


def _init(config: ClassifyConfig) -> Path | None:
    return Path(config.init_weights).expanduser().resolve() if config.init_weights else None


def _classify(
    context: dg.AssetExecutionContext,
    stage: str,
    config: ClassifyConfig,
    upstream: list[str],
    registered_model: str,
    resources: StageResources,
) -> Iterator[Any]:
    """Train classification ``stage`` into its asset's folder: the one launch both classifier
    assets share (its profile section is the stage's name; ``init_weights`` may override)."""
    paths = resources.paths
    yield from launch_training(
        context,
        stage,
        inputs=paths.artefacts().stage_inputs(stage, _init(config)),
        out=paths.asset_dir(STAGE_ASSETS[stage]),
        run=config,
        upstream_keys=upstream,
        version_parts=[resources.profile.load().get(stage), config.init_weights],
        registered_model=registered_model,
        resources=resources,
    )


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "classify", "seed"),
    deps=[dg.AssetKey(SMS), dg.AssetKey("pretrained_weights"), dg.AssetKey("bpe_tokenizer")],
    pool="train",
    kinds={"pytorch", "mlflow"},
)
def spam_classifier(
    context: dg.AssetExecutionContext,
    config: ClassifyConfig,
    paths: Paths,
    profile: Profile,
    mlflow: MlflowTracking,
    compute: Compute,
    pipes: dg.PipesSubprocessClient,
) -> Iterator[Any]:
    """The pretrained model fine-tuned as an SMS spam classifier (one head)."""
    resources = StageResources(paths, profile, mlflow, compute, pipes)
    upstream = [SMS, "pretrained_weights", "bpe_tokenizer"]
    yield from _classify(context, "classify", config, upstream, SPAM_MODEL, resources)


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "classify_multi", "seed"),
    deps=[
        dg.AssetKey(SMS),
        dg.AssetKey(PARAGRAPHS),
        dg.AssetKey("pretrained_weights"),
        dg.AssetKey("bpe_tokenizer"),
    ],
    pool="train",
    kinds={"pytorch", "mlflow"},
)
def text_classifier(
    context: dg.AssetExecutionContext,
    config: ClassifyConfig,
    paths: Paths,
    profile: Profile,
    mlflow: MlflowTracking,
    compute: Compute,
    pipes: dg.PipesSubprocessClient,
) -> Iterator[Any]:
    """One backbone with a spam head and a paragraph-language head, trained jointly."""
    resources = StageResources(paths, profile, mlflow, compute, pipes)
    upstream = [SMS, PARAGRAPHS, "pretrained_weights", "bpe_tokenizer"]
    yield from _classify(context, "classify_multi", config, upstream, MULTI_MODEL, resources)
