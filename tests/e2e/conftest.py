"""Fixtures on the session's stack (tests/e2e/stack.py): the docker-compose deployment on real
processes, and the one whole-graph ``dagster asset materialize --select '*'`` run on it.

Everything is session-scoped. The stack starts in the background at the session's first test
(``_e2e_stack_early`` in tests/conftest.py, which also runs the tests that use it last); each
fixture here waits only for the part it hands out, so ``test_mlflow_rejects_hosts_not_allowed``
runs once MLflow is up, the queued-run and asset-graph tests once the Dagster services are, and
the tests that read the whole-graph run once it has finished.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import (
    Deployment,
    MlflowServer,
    PgServer,
    Stack,
    artifacts_path,
    session_stack,
)
from tests.e2e.tiny_graph import GraphRun


@pytest.fixture(scope="session")
def artifacts_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots and service logs go: ``$SCRIPTORIUM_TEST_ARTIFACTS`` or a temp dir."""
    return artifacts_path(request.config, tmp_path_factory)


@pytest.fixture(scope="session")
def e2e_stack(
    request: pytest.FixtureRequest, mirror_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The session's stack: started early by tests/conftest.py, or here if it was not."""
    stack, started_here = session_stack(request.config, tmp_path_factory, mirror_dir)
    try:
        yield stack
    finally:
        if started_here:
            stack.stop()


@pytest.fixture(scope="session")
def postgres(e2e_stack: Stack) -> PgServer:
    """PostgreSQL on loopback (a free port), its databases made by the compose init script."""
    return e2e_stack.wait_postgres()


@pytest.fixture(scope="session")
def mlflow_server(e2e_stack: Stack) -> MlflowServer:
    """``docker/mlflow-server.sh``: Postgres backend, proxied artefacts, explicit allowed hosts."""
    return e2e_stack.wait_mlflow()


@pytest.fixture(scope="session")
def deployment(e2e_stack: Stack) -> Deployment:
    """Code server (gRPC), webserver and daemon on the tiny profile, wired as in compose."""
    return e2e_stack.wait_deployment()


@pytest.fixture(scope="session")
def graph_run(e2e_stack: Stack) -> GraphRun:
    """The session's one ``dagster asset materialize --select '*'``, finished and successful."""
    return e2e_stack.wait_graph_run()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell a failed test in teardown."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
