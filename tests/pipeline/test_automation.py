"""Jobs, schedules and sensors (``pipeline.automation``) against real Dagster definitions.

The sensors run against the project's mirror server serving the test fixtures (a gutenberg.org
layout and a one-file Hub dataset built per test) and against assets really materialised with
``dagster.materialize``; staleness is read with the resolver the UI uses. A last test runs the
``dagster`` CLI commands an operator would (validate, schedule list, sensor list).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.data_version import StaleCauseCategory, StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from pipeline import automation
from pipeline.assets.gutenberg import gutenberg_books, gutenberg_catalog
from pipeline.definitions import defs
from pipeline.resources import GutenbergSource, Paths, Profile, resources_from_env
from pipeline.sources.mirror import MirrorServer

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
DAGSTER = Path(sys.executable).parent / "dagster"


def keys_of(job_name: str, definitions: dg.Definitions = defs) -> set[dg.AssetKey]:
    return set(definitions.resolve_job_def(job_name).asset_layer.selected_asset_keys)


def group_of(group: str) -> set[dg.AssetKey]:
    graph = defs.resolve_asset_graph()
    return {k for k in graph.get_all_asset_keys() if graph.get(k).group_name == group}


# --- jobs ----------------------------------------------------------------------------------------
def test_jobs_select_their_stages() -> None:
    every = set(defs.resolve_asset_graph().get_all_asset_keys())
    assert {j.name for j in automation.JOBS} >= {"data_job", "train_job", "full_pipeline"}
    assert keys_of("data_job") == group_of("data")
    assert {dg.AssetKey("gutenberg_catalog"), dg.AssetKey("token_shards")} <= keys_of("data_job")
    assert keys_of("train_job") == group_of("training")
    assert dg.AssetKey("pretrained_weights") in keys_of("train_job")
    assert keys_of("full_pipeline") == every
    # data_job carries the data assets' checks (a blocking check stops the run before shards).
    data_job = defs.resolve_job_def("data_job")
    checks = {n.name for n in data_job.nodes_in_topological_order}
    assert {"cleaned_books_no_boilerplate_left", "token_shards_shards_valid"} <= checks


def test_training_assets_share_the_train_pool() -> None:
    """Every asset train_job runs claims the `train` pool, so trainings never overlap."""
    for key in keys_of("train_job"):
        assert defs.resolve_assets_def(key).node_def.pools == {"train"}, key


def test_stages_that_land_later_join_their_jobs() -> None:
    """Selections by group and key pattern pick up assets that do not exist yet."""

    @dg.asset(key=["sft_sources", "alpaca"], group_name="sft")
    def sft_alpaca() -> None: ...

    @dg.asset(group_name="alignment", pool="train")  # another group: still found by key
    def rlhf_weights() -> None: ...

    @dg.asset(group_name="evaluation")
    def evaluation_report() -> None: ...

    later = dg.Definitions(
        assets=[gutenberg_catalog, sft_alpaca, rlhf_weights, evaluation_report],
        jobs=automation.JOBS,
        schedules=automation.SCHEDULES,
        sensors=automation.SENSORS,
        resources=resources_from_env({}),
    )
    assert keys_of("train_job", later) == {dg.AssetKey("rlhf_weights")}
    assert keys_of("evaluation_job", later) == {dg.AssetKey("evaluation_report")}
    assert keys_of("full_pipeline", later) == {
        dg.AssetKey("gutenberg_catalog"), dg.AssetKey(["sft_sources", "alpaca"]),
        dg.AssetKey("rlhf_weights"), dg.AssetKey("evaluation_report"),
    }  # fmt: skip
    sft_sensor = later.resolve_sensor_def("sft_source_revision_sensor")
    assert keys_of(sft_sensor.job_name, later) == {dg.AssetKey(["sft_sources", "alpaca"])}

    # The nightly evaluation runs once evaluation_report exists, and skips until then.
    before = dg.Definitions(
        assets=[gutenberg_catalog],
        jobs=automation.JOBS,
        schedules=automation.SCHEDULES,
        resources=resources_from_env({}),
    )
    with dg.instance_for_test() as instance:
        now = dg.build_schedule_context(
            instance=instance, repository_def=later.get_repository_def()
        )
        assert isinstance(automation.nightly_evaluation(now), dg.RunRequest)
        then = dg.build_schedule_context(
            instance=instance, repository_def=before.get_repository_def()
        )
        assert isinstance(automation.nightly_evaluation(then), dg.SkipReason)
        today = dg.build_schedule_context(
            instance=instance, repository_def=defs.get_repository_def()
        )
        assert isinstance(automation.nightly_evaluation(today), dg.RunRequest)
    assert keys_of("evaluation_job", before) == set()  # empty, and the code location still loads
    assert keys_of("evaluation_job") == {dg.AssetKey("evaluation_report")}  # it has landed


def test_schedules_and_sensors_are_declared_off() -> None:
    schedules = {s.name: s for s in automation.SCHEDULES}
    assert schedules["weekly_catalog_refresh"].cron_schedule == "0 3 * * 1"
    assert schedules["weekly_catalog_refresh"].job_name == "data_job"
    assert schedules["weekly_full_rebuild"].cron_schedule == "0 4 * * 6"
    assert schedules["weekly_full_rebuild"].job_name == "full_pipeline"
    assert schedules["nightly_evaluation"].cron_schedule == "0 2 * * *"
    for s in automation.SCHEDULES:
        assert s.default_status == dg.DefaultScheduleStatus.STOPPED, s.name
    for s in automation.SENSORS:
        assert s.default_status == dg.DefaultSensorStatus.STOPPED, s.name
    assert automation.catalog_new_books_sensor.job_name == "data_job"


# --- fixtures for the sensor and staleness tests -------------------------------------------------
@pytest.fixture
def profile_path(tmp_path: Path) -> Path:
    """The tiny profile, selecting by rule (Text, English) instead of an explicit id list."""
    profile = yaml.safe_load((REPO / "configs" / "profiles" / "tiny.yaml").read_text())
    profile["catalog"].update(ids=[], max_books=None)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A writable copy of the fixture gutenberg.org site, so a test can change its catalog."""
    root = tmp_path / "site"
    shutil.copytree(FIXTURES / "gutenberg", root / "gutenberg")
    return root


def catalog_csv(site: Path) -> Path:
    return site / "gutenberg" / "cache" / "epub" / "feeds" / "pg_catalog.csv"


def drop_catalog_rows(site: Path, ids: set[int]) -> None:
    """Rewrite the site's catalog without ``ids`` (csv keeps quoted multi-line titles intact)."""
    path = catalog_csv(site)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) not in ids]
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(kept)


@pytest.fixture
def resources(tmp_path: Path, profile_path: Path, site: Path) -> Iterator[dict[str, object]]:
    with MirrorServer(site) as server:
        yield {
            "paths": Paths(data_root=str(tmp_path / "data")),
            "profile": Profile(name=str(profile_path)),
            "gutenberg": GutenbergSource(base_url=server.url),
        }


def materialise(assets: list, resources: dict[str, object], instance: dg.DagsterInstance) -> None:
    result = dg.materialize(assets, resources=resources, instance=instance)
    assert result.success


# --- sensor: the catalog gains books -------------------------------------------------------------
def test_catalog_sensor_requests_data_job_once_per_new_book_set(
    resources: dict[str, object], site: Path
) -> None:
    sensor = automation.catalog_new_books_sensor
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None = None) -> dg.SensorResult | dg.SkipReason:
            context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
            return sensor(context)

        never = tick()
        assert (
            isinstance(never, dg.SkipReason)
            and "materialise gutenberg_catalog" in never.skip_message
        )

        drop_catalog_rows(site, {1008})  # the catalog as it was at the last materialisation
        materialise([gutenberg_catalog], resources, instance)
        unchanged = tick()
        assert (
            isinstance(unchanged, dg.SkipReason)
            and "selects no book beyond" in unchanged.skip_message
        )

        shutil.copy(
            FIXTURES / "gutenberg" / "cache" / "epub" / "feeds" / "pg_catalog.csv",
            catalog_csv(site),
        )
        result = tick()
        assert isinstance(result, dg.SensorResult)
        [request] = result.run_requests
        assert request.tags["scriptorium/new_books"] == "1"
        assert request.run_key == f"catalog-{result.cursor}"

        again = tick(result.cursor)  # the same new book, before data_job has picked it up
        assert isinstance(again, dg.SkipReason) and "already requested" in again.skip_message

        materialise([gutenberg_catalog], resources, instance)  # what data_job does first
        assert isinstance(tick(result.cursor), dg.SkipReason)


# --- sensor: an SFT source's revision changes ----------------------------------------------------
@pytest.fixture
def hub_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hub mirror with one tiny dataset, and a configs dir whose sft_sources.yaml points at it."""
    data = tmp_path / "hub" / "hf" / "datasets" / "testorg" / "tiny"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n')
    configs = tmp_path / "configs"
    configs.mkdir()
    source = {
        "id": "tiny", "repo": "testorg/tiny", "revision": "main", "patterns": ["*.jsonl"],
        "adapter": "alpaca", "weight": 1.0, "cap": None, "licence": "MIT",
    }  # fmt: skip
    (configs / "sft_sources.yaml").write_text(yaml.safe_dump({"sources": [source]}))
    monkeypatch.setenv("SCRIPTORIUM_CONFIGS", str(configs))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path


def test_sft_sensor_requests_the_source_whose_revision_moved(
    hub_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @dg.asset(key=["sft_sources", "tiny"], group_name="sft")
    def sft_tiny() -> None: ...

    with_asset = dg.Definitions(assets=[sft_tiny], sensors=[automation.sft_source_revision_sensor])
    without = dg.Definitions(
        assets=[gutenberg_catalog],
        sensors=[automation.sft_source_revision_sensor],
        resources=resources_from_env({}),
    )
    sensor = automation.sft_source_revision_sensor

    def tick(
        definitions: dg.Definitions, cursor: str | None = None
    ) -> dg.SensorResult | dg.SkipReason:
        with dg.instance_for_test() as instance:
            return sensor(
                dg.build_sensor_context(instance=instance, cursor=cursor, definitions=definitions)
            )

    none = tick(without)
    assert isinstance(none, dg.SkipReason) and "no sft_sources/* assets" in none.skip_message

    with MirrorServer(hub_site / "hub") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        baseline = tick(with_asset)
        assert isinstance(baseline, dg.SensorResult) and not baseline.run_requests
        assert set(json.loads(baseline.cursor)) == {"tiny"}
        same = tick(with_asset, baseline.cursor)
        assert not same.run_requests and same.cursor == baseline.cursor

    # Upstream `main` moves: the mirror's commit sha follows its files.
    with (hub_site / "hub" / "hf" / "datasets" / "testorg" / "tiny" / "train.jsonl").open("a") as f:
        f.write('{"instruction": "Say bye", "input": "", "output": "bye"}\n')
    with MirrorServer(hub_site / "hub") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        moved = tick(with_asset, baseline.cursor)
    [request] = moved.run_requests
    assert request.asset_selection == [dg.AssetKey(["sft_sources", "tiny"])]
    assert request.tags["scriptorium/sft_sources"] == "tiny"

    # An unreachable Hub is not a change: the source keeps its last known revision.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    offline = tick(with_asset, moved.cursor)
    assert not offline.run_requests and offline.cursor == moved.cursor

    monkeypatch.setenv("SCRIPTORIUM_CONFIGS", str(hub_site / "nowhere"))
    absent = tick(with_asset, moved.cursor)
    assert isinstance(absent, dg.SkipReason) and "does not exist" in absent.skip_message


# --- staleness -----------------------------------------------------------------------------------
def stale_status(assets: list, instance: dg.DagsterInstance, key: str) -> StaleStatus:
    """What the UI shows for ``key`` (Dagster's own resolver over these asset definitions)."""
    return get_stale_status_resolver(instance, assets).get_status(dg.AssetKey(key))


def test_profile_and_code_version_changes_show_as_stale(
    resources: dict[str, object], profile_path: Path
) -> None:
    graph = [gutenberg_catalog, gutenberg_books]
    with dg.instance_for_test() as instance:
        materialise([gutenberg_catalog, gutenberg_books], resources, instance)
        assert stale_status(graph, instance, "gutenberg_books") == StaleStatus.FRESH

        # Same catalog, same rules: same data version, so nothing downstream goes stale.
        materialise([gutenberg_catalog], resources, instance)
        assert stale_status(graph, instance, "gutenberg_books") == StaleStatus.FRESH

        # A profile value changes the catalog's data version: downstream is stale.
        profile = yaml.safe_load(profile_path.read_text())
        profile["catalog"]["max_books"] = 3
        profile_path.write_text(yaml.safe_dump(profile))
        materialise([gutenberg_catalog], resources, instance)
        assert stale_status(graph, instance, "gutenberg_books") == StaleStatus.STALE
        materialise([gutenberg_books], resources, instance)
        assert stale_status(graph, instance, "gutenberg_books") == StaleStatus.FRESH

        # A new code version makes the asset itself stale. Dagster flags its dependents once it
        # has re-run with a different data version; the same rules give the same catalog here.
        bumped = dg.map_asset_specs(
            lambda s: s.replace_attributes(code_version="2"), [gutenberg_catalog]
        )
        new_code = [*bumped, gutenberg_books]
        assert stale_status(new_code, instance, "gutenberg_catalog") == StaleStatus.STALE
        [cause] = get_stale_status_resolver(instance, new_code).get_stale_causes(
            dg.AssetKey("gutenberg_catalog")
        )
        assert cause.category == StaleCauseCategory.CODE
        materialise(bumped, resources, instance)
        assert stale_status(new_code, instance, "gutenberg_catalog") == StaleStatus.FRESH
        assert stale_status(new_code, instance, "gutenberg_books") == StaleStatus.FRESH


# --- the CLI an operator uses --------------------------------------------------------------------
def test_cli_validates_and_lists_schedules_and_sensors(tmp_path: Path) -> None:
    commands = {
        "validate": ["definitions", "validate", "-m", "pipeline.definitions"],
        "schedules": ["schedule", "list", "-m", "pipeline.definitions"],
        "sensors": ["sensor", "list", "-m", "pipeline.definitions"],
    }

    def run(name: str) -> subprocess.CompletedProcess[str]:
        home = tmp_path / name  # one instance each: SQLite storage is created on first use
        home.mkdir()
        shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
        env = {**os.environ, "DAGSTER_HOME": str(home), "SCRIPTORIUM_DATA": str(tmp_path / "data")}
        return subprocess.run(
            [str(DAGSTER), *commands[name]], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=180,
        )  # fmt: skip

    with ThreadPoolExecutor(len(commands)) as pool:  # three imports of the code location at once
        done = dict(zip(commands, pool.map(run, commands), strict=True))
    for name, proc in done.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout}\n{proc.stderr}"
    assert (
        "All code locations passed validation" in done["validate"].stdout + done["validate"].stderr
    )
    for schedule in automation.SCHEDULES:
        assert f"Schedule: {schedule.name} [STOPPED]" in done["schedules"].stdout
    for sensor in automation.SENSORS:
        assert f"Sensor: {sensor.name} [STOPPED]" in done["sensors"].stdout
