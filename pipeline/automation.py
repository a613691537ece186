"""Jobs, schedules and sensors: what runs together, when, and what starts it.

Selections are by group name or by key *pattern* (``key:"sft_sources/*"``), never by Python
object, so the stages that do not exist yet (``sft_sources/<source>``, ``sft_mixture``,
``sft_weights``, ``reward_model``, ``rlhf_weights``, ``evaluation_report``...) join the right job
the day their module is added to ``definitions.py``; until then a pattern resolves to nothing
instead of failing the code location. Every schedule and sensor is declared STOPPED: turning
automation on is an operator's decision in the UI, not a side effect of deploying code.

Concurrency is the instance's business (``dagster_home/dagster.yaml``, ``docker/dagster.yaml``):
training assets declare ``pool="train"`` and the pool's limit of 1 keeps two trainings off one
machine; the run queue's ``max_concurrent_runs`` bounds whole runs.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import dagster as dg
import polars as pl

from llm_core.config import configs_dir
from pipeline.io import version_hash
from pipeline.resources import GutenbergSource, Paths, Profile
from pipeline.sources import gutenberg as pg
from pipeline.sources.http import PoliteClient
from pipeline.sources.hub import hub_endpoint, hub_token
from pipeline.text.adapters.registry import SftSource, load_sft_sources

log = logging.getLogger(__name__)

STOPPED = dg.DefaultScheduleStatus.STOPPED
SENSOR_STOPPED = dg.DefaultSensorStatus.STOPPED
TIMEZONE = "UTC"

EVALUATION_REPORT = dg.AssetKey("evaluation_report")
SFT_PREFIX = "sft_sources"
SFT_SOURCES_FILE = "sft_sources.yaml"
CATALOG_POLL_S = 6 * 3600  # gutenberg.org regenerates pg_catalog.csv daily; be polite
SFT_POLL_S = 6 * 3600
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")

# --- selections ----------------------------------------------------------------------------------
# Group names first; the key patterns make a stage land in its job even if it picks another group.
DATA_SELECTION = dg.AssetSelection.groups("data")
TRAINING_SELECTION = dg.AssetSelection.groups("training") | dg.AssetSelection.from_string(
    'key:"pretrained_weights" or key:"sft_weights" or key:"reward_model" or key:"rlhf_weights"'
)
EVALUATION_SELECTION = dg.AssetSelection.groups("evaluation") | dg.AssetSelection.from_string(
    'key:"evaluation_report"'
)
SFT_SOURCES_SELECTION = dg.AssetSelection.from_string(f'key:"{SFT_PREFIX}/*"')

# --- jobs ----------------------------------------------------------------------------------------
data_job = dg.define_asset_job(
    "data_job",
    selection=DATA_SELECTION,
    description="Catalog -> books -> cleaned -> tokenizer -> shards (group `data`), with checks.",
)
train_job = dg.define_asset_job(
    "train_job",
    selection=TRAINING_SELECTION,
    description="Pretraining -> SFT -> RLHF on the current shards; one training at a time (pool).",
)
full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all(),
    description="Every asset and check, books to evaluation: the weekly rebuild.",
)
evaluation_job = dg.define_asset_job(
    "evaluation_job",
    selection=EVALUATION_SELECTION,
    description="The evaluation report (evaluation_report) on the latest weights of every stage.",
)

JOBS = [data_job, train_job, full_pipeline, evaluation_job]


def _defined_keys(repository: dg.RepositoryDefinition | None) -> set[dg.AssetKey]:
    """Asset keys the code location defines (empty when evaluated without one)."""
    if repository is None:
        return set()
    return set(repository.asset_graph.get_all_asset_keys())


# --- schedules -----------------------------------------------------------------------------------
weekly_catalog_refresh = dg.ScheduleDefinition(
    name="weekly_catalog_refresh",
    cron_schedule="0 3 * * 1",
    job=data_job,
    execution_timezone=TIMEZONE,
    default_status=STOPPED,
    description=(
        "Mondays 03:00 UTC: refresh the catalog and carry what it adds through to the shards "
        "(a new catalog alone changes nothing downstream; reruns download only missing books)."
    ),
)
weekly_full_rebuild = dg.ScheduleDefinition(
    name="weekly_full_rebuild",
    cron_schedule="0 4 * * 6",
    job=full_pipeline,
    execution_timezone=TIMEZONE,
    default_status=STOPPED,
    description="Saturdays 04:00 UTC: rebuild everything, so the weekend absorbs the training.",
)


@dg.schedule(
    name="nightly_evaluation",
    cron_schedule="0 2 * * *",
    job=evaluation_job,
    execution_timezone=TIMEZONE,
    default_status=STOPPED,
    description="02:00 UTC: re-score the latest weights; skips while evaluation_report is absent.",
)
def nightly_evaluation(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    """A run of ``evaluation_job`` once ``evaluation_report`` exists; before that, a skip.

    Declared now so the schedule, its cron and its on/off state are in place when the asset lands;
    the guard keeps it from launching an empty run in the meantime.
    """
    if EVALUATION_REPORT not in _defined_keys(context.repository_def):
        return dg.SkipReason("evaluation_report is not defined in this code location yet")
    return dg.RunRequest()


SCHEDULES = [weekly_catalog_refresh, weekly_full_rebuild, nightly_evaluation]


# --- sensor: the catalog gains books -------------------------------------------------------------
def selected_upstream_ids(gutenberg: GutenbergSource, profile: Profile) -> set[int]:
    """Ids the profile's rules select from the site's *current* catalog (fetched to a temp dir)."""
    rules = pg.CatalogRules.from_mapping(profile.section("catalog"))
    with tempfile.TemporaryDirectory(prefix="scriptorium-catalog-") as tmp:
        csv = Path(tmp) / "pg_catalog.csv"
        with PoliteClient(user_agent=gutenberg.user_agent) as client:
            pg.download_catalog(gutenberg.base_url, csv, client)
        selected = pg.select_books(pg.parse_catalog(csv), rules)
    return set(selected["id"].to_list())


@dg.sensor(
    name="catalog_new_books_sensor",
    job=data_job,
    minimum_interval_seconds=CATALOG_POLL_S,
    default_status=SENSOR_STOPPED,
    description="Runs data_job when the live catalog selects books the last catalog lacked.",
)
def catalog_new_books_sensor(
    context: dg.SensorEvaluationContext,
    paths: Paths,
    profile: Profile,
    gutenberg: GutenbergSource,
) -> dg.SensorResult | dg.SkipReason:
    """Compare the live catalog's selection with the last materialised ``catalog.parquet``.

    Only additions trigger a run: a book that leaves the catalog does not make the corpus worse.
    The cursor holds a hash of the new ids last requested, so a set that is waiting in the queue
    (or failed) is not requested again every tick; a different set of new books is.
    """
    last = paths.asset_dir("gutenberg_catalog", create=False) / "catalog.parquet"
    if not last.exists():
        return dg.SkipReason(f"{last} does not exist: materialise gutenberg_catalog first")
    known = set(pl.read_parquet(last, columns=["id"])["id"].to_list())
    new = sorted(selected_upstream_ids(gutenberg, profile) - known)
    if not new:
        return dg.SkipReason(f"the live catalog selects no book beyond the {len(known)} known")
    fingerprint = version_hash(new)
    if fingerprint == context.cursor:
        return dg.SkipReason(
            f"{len(new)} new books already requested (run key catalog-{fingerprint})"
        )
    context.log.info(f"{len(new)} new books selected, e.g. {new[:10]}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"catalog-{fingerprint}",
                tags={"scriptorium/trigger": "catalog", "scriptorium/new_books": str(len(new))},
            )
        ],
        cursor=fingerprint,
    )


# --- sensor: an SFT source's revision changes ----------------------------------------------------
def sft_asset_key(source_id: str) -> dg.AssetKey:
    return dg.AssetKey([SFT_PREFIX, source_id])


def source_revision(source: SftSource) -> str:
    """What identifies a source's data: the commit a Hub revision resolves to now, or URL + sha.

    A branch (``main``) is resolved through the Hub API (``$HF_ENDPOINT`` honoured, so the mirror
    answers in tests), so a branch that moves counts as a change as much as an edited config;
    a pinned 40-hex commit needs no request. Patterns are part of it: they pick the files.
    """
    if source.repo is None:
        return version_hash(source.url, source.sha256)
    revision = source.revision or "main"
    if not _COMMIT_SHA.fullmatch(revision):
        from huggingface_hub import HfApi  # heavy: imported only when a branch must be resolved

        endpoint = hub_endpoint()  # the token only where hub_token allows it (https, not loopback)
        api = HfApi(endpoint=endpoint, token=hub_token(endpoint))
        revision = api.dataset_info(source.repo, revision=revision).sha or revision
    return version_hash(source.repo, revision, list(source.patterns))


def current_revisions(sources: Iterable[SftSource], previous: dict[str, str]) -> dict[str, str]:
    """``{source id: revision}``; a source whose lookup fails keeps its previous value (logged)."""
    out: dict[str, str] = {}
    for source in sources:
        try:
            out[source.id] = source_revision(source)
        except Exception as exc:  # one unreachable source must not hide changes in the others
            log.warning("sft source %s: revision lookup failed: %s", source.id, exc)
            if source.id in previous:
                out[source.id] = previous[source.id]
    return out


@dg.sensor(
    name="sft_source_revision_sensor",
    target=SFT_SOURCES_SELECTION,
    minimum_interval_seconds=SFT_POLL_S,
    default_status=SENSOR_STOPPED,
    description="Re-fetches an SFT source when its configured or upstream revision changes.",
)
def sft_source_revision_sensor(
    context: dg.SensorEvaluationContext,
) -> dg.SensorResult | dg.SkipReason:
    """Watch ``configs/sft_sources.yaml`` and each source's upstream revision.

    The first evaluation records a baseline (the cursor: ``{source id: revision}``) and requests
    nothing; later ones request one run of the ``sft_sources/<id>`` assets whose revision changed.
    Until the file or the ``sft_sources/*`` assets exist, it skips without touching the network.
    """
    path = configs_dir() / SFT_SOURCES_FILE
    if not path.exists():
        return dg.SkipReason(f"{path} does not exist: no SFT sources to watch")
    defined = {k for k in _defined_keys(context.repository_def) if k.path[0] == SFT_PREFIX}
    if not defined:
        return dg.SkipReason(f"no {SFT_PREFIX}/* assets are defined yet")
    previous: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    current = current_revisions(load_sft_sources(path), previous)
    cursor = json.dumps(current, sort_keys=True)
    if not previous:
        return dg.SensorResult(
            skip_reason=f"baseline recorded for {len(current)} SFT sources", cursor=cursor
        )
    changed = sorted(
        sid
        for sid, rev in current.items()
        if previous.get(sid) != rev and sft_asset_key(sid) in defined
    )
    if not changed:
        return dg.SensorResult(skip_reason="no SFT source revision changed", cursor=cursor)
    names = ",".join(changed)
    context.log.info(f"SFT sources with a new revision: {names}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"sft-{version_hash(cursor)}",
                asset_selection=[sft_asset_key(sid) for sid in changed],
                tags={"scriptorium/trigger": "sft_revision", "scriptorium/sft_sources": names},
            )
        ],
        cursor=cursor,
    )


SENSORS = [catalog_new_books_sensor, sft_source_revision_sensor]
