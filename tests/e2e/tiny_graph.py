"""The session's one whole-graph run, ``dagster asset materialize --select '*'``, and its readers.

The run is the real ``dagster`` CLI on the tiny profile, against the deployment of
tests/e2e/stack.py: Dagster's runs and events in its PostgreSQL, MLflow on its server, artefacts
in its code server's data root. It starts in the background with the session and the
``graph_run`` fixture (tests/e2e/conftest.py) waits for it; the tiny-profile, stage, Postgres and
browser tests all read what it left. Asset check outcomes are read from the run's Dagster
instance (:func:`check_evaluations`), not from the CLI log: a non-blocking check that fails
leaves the run successful and its name in the log.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).parent / "dagster"
SCRIPTORIUM = Path(sys.executable).parent / "scriptorium"
CLI_JOB = "__ASSET_JOB"  # the implicit job that `dagster asset materialize` runs


def graph_command() -> list[str]:
    """The whole graph through the CLI, as ``make run`` does: ``scriptorium run`` wraps
    ``dagster asset materialize -m pipeline.definitions --select '*'`` with the concise view (its
    full event log goes to ``$SCRIPTORIUM_DATA/logs/``)."""
    return [str(SCRIPTORIUM), "run", "--select", "*"]


class GraphRun(NamedTuple):
    """What the whole-graph run left: its data root, ``DAGSTER_HOME`` (``docker/dagster.yaml``,
    resolved against ``env``), the environment it ran with, and the CLI's log."""

    data: Path
    home: Path
    env: dict[str, str]
    log: str

    @property
    def tracking_uri(self) -> str:
        """The MLflow server the run tracked to."""
        return self.env["MLFLOW_TRACKING_URI"]

    def mlflow_client(self) -> Any:  # an mlflow.MlflowClient
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    @contextlib.contextmanager
    def instance(self) -> Iterator[dg.DagsterInstance]:
        """The run's Dagster instance (Postgres-backed): ``docker/dagster.yaml`` reads its
        settings from ``DAGSTER_*`` variables, set in this process while the instance is open."""
        with pytest.MonkeyPatch.context() as mp:
            for key, value in self.env.items():
                if key.startswith("DAGSTER_"):
                    mp.setenv(key, value)
            with dg.DagsterInstance.from_config(str(self.home)) as instance:
                yield instance


_RUN_IDS: dict[Path, str] = {}


def cli_run_id(run: GraphRun) -> str:
    """The id of the CLI run: the one ``__ASSET_JOB`` run of every asset in the instance (the
    queued test run is a ``full_pipeline`` run, the UI's catalog run selects one asset, and
    ``test_tiny_pipeline.py``'s second materialisation uses its own instance)."""
    if run.home not in _RUN_IDS:
        from pipeline.definitions import defs

        every_asset = set(defs.resolve_asset_graph().get_all_asset_keys())
        with run.instance() as instance:
            runs = [
                r
                for r in instance.get_runs(dg.RunsFilter(job_name=CLI_JOB))
                if set(r.asset_selection or ()) == every_asset
            ]
        assert len(runs) == 1, [(r.run_id, r.asset_selection) for r in runs]
        _RUN_IDS[run.home] = runs[0].run_id
    return _RUN_IDS[run.home]


def check_evaluations(run: GraphRun) -> dict[str, dg.AssetCheckEvaluation]:
    """Every asset check evaluation of the CLI run, by ``asset:check`` name, from the event log of
    the Dagster instance the run used. Non-blocking checks included: their failure does not fail
    the run, so only their recorded outcome shows it."""
    run_id = cli_run_id(run)
    with run.instance() as instance:
        entries = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    evaluations = [e.get_dagster_event().event_specific_data for e in entries]
    out = {ev.asset_check_key.to_user_string(): ev for ev in evaluations}
    assert len(out) == len(evaluations), "a check was evaluated twice in one run"
    return out


def assert_checks_passed(run: GraphRun, *names: str) -> None:
    """Each named check (``asset:check``) was evaluated in the CLI run, and passed."""
    evaluations = check_evaluations(run)
    missing = [n for n in names if n not in evaluations]
    assert not missing, f"checks never evaluated: {missing}; evaluated: {sorted(evaluations)}"
    failed = {
        n: (evaluations[n].severity.value, {k: v.value for k, v in evaluations[n].metadata.items()})
        for n in names
        if not evaluations[n].passed
    }
    assert not failed, f"asset checks failed: {failed}"


def latest_metadata(run: GraphRun, key: dg.AssetKey) -> dict[str, object]:
    """The metadata of the asset's materialisation in the CLI run (its latest, as in a one-run
    instance: later test runs in the deployment materialise other assets, or into their own
    instance)."""
    run_id = cli_run_id(run)
    with run.instance() as instance:
        entries = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    events = [e.asset_materialization for e in entries if e.asset_materialization is not None]
    mats = [m for m in events if m.asset_key == key]
    assert mats, f"{key.to_user_string()} not materialised in the CLI run {run_id}"
    return {k: v.value for k, v in mats[-1].metadata.items()}
