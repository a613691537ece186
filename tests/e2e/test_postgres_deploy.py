"""The docker-compose deployment, proven on real processes (there is no Docker engine here).

``docker compose config`` validates the compose file itself. The rest runs the same configuration
files as the containers would (see ``conftest.py``): PostgreSQL with the init script's two
databases, the MLflow server script, and Dagster's code server, webserver and daemon on
``docker/dagster.yaml``. The session's whole-graph run (``dagster asset materialize --select '*'``
with the deployment's environment, tests/e2e/tiny_graph.py) is recorded in both Postgres databases
and in the MLflow server's proxied artefact store; a small ``full_pipeline`` run (its
``gutenberg_catalog`` op, into a data root of its own) goes through the run queue, the daemon and
the gRPC code server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.e2e.stack import (
    DOCKER,
    IN_PROCESS,
    REPO,
    Deployment,
    MlflowServer,
    ensure_system_deps,
)
from tests.e2e.tiny_graph import CLI_JOB, GraphRun, cli_run_id

SERVICES = {"postgres", "mlflow", "dagster-code", "dagster-webserver", "dagster-daemon", "chat"}
SCRIPTORIUM_SERVICES = SERVICES - {"postgres"}
SECRETS = ("POSTGRES_PASSWORD", "DAGSTER_PG_PASSWORD", "MLFLOW_PG_PASSWORD")


def compose_command() -> list[str]:
    """``docker compose`` (v2 plugin) where it works, else the Debian ``docker-compose``."""
    ensure_system_deps("compose")
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    return [str(shutil.which("docker-compose"))]


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [*compose_command(), "--env-file", str(env_file), "-f", str(REPO / "docker-compose.yml"), "config"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_compose_file_accepted_and_wired(tmp_path: Path) -> None:
    proc = compose_config(REPO / ".env.example")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert set(services) == SERVICES
    images = {services[s]["image"] for s in SCRIPTORIUM_SERVICES}
    assert len(images) == 1, f"one image for every Scriptorium service, got {images}"
    for name in SCRIPTORIUM_SERVICES:
        assert services[name]["build"]["dockerfile"].endswith("docker/Dockerfile")
    assert "10-scriptorium.sh" in str(services["postgres"]["volumes"])
    assert "postgres-init.sh" in str(services["postgres"]["volumes"])
    assert services["mlflow"]["command"] == ["/opt/scriptorium/docker/mlflow-server.sh"]
    assert services["mlflow"]["environment"]["MLFLOW_ALLOWED_HOSTS"]
    assert services["dagster-code"]["command"][:3] == ["dagster", "code-server", "start"]
    assert services["dagster-code"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for name in ("dagster-webserver", "dagster-daemon"):
        assert "/opt/scriptorium/docker/workspace.yaml" in services[name]["command"]
        assert services[name]["environment"]["DAGSTER_CODE_SERVER_HOST"] == "dagster-code"
    assert (
        services["dagster-webserver"]["environment"]["DAGSTER_PG_PASSWORD"] == "change-me-dagster"
    )
    chat = services["chat"]  # the newest aligned model, read-only from the data volume
    assert "scriptorium serve --weights" in " ".join(chat["command"])
    assert "/data/rlhf_weights" in " ".join(chat["command"])
    assert any(  # the short syntax (docker-compose v1) or the long one (compose v2)
        str(v).endswith(":/data:ro")
        or (isinstance(v, dict) and v["target"] == "/data" and v.get("read_only"))
        for v in chat["volumes"]
    )

    # No default password anywhere: without them in the environment, compose refuses to start.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = compose_config(empty)
    assert refused.returncode != 0
    assert "POSTGRES_PASSWORD" in refused.stderr or "PASSWORD" in refused.stderr
    for path in [REPO / "docker" / "Dockerfile", *sorted((REPO / "docker").glob("*.yaml"))]:
        text = path.read_text()
        assert "change-me" not in text and "PASSWORD=" not in text, (
            f"secret-looking value in {path}"
        )


@contextlib.contextmanager
def deployed_instance(deployment: Deployment) -> Iterator[dg.DagsterInstance]:
    """The deployment's instance (docker/dagster.yaml, resolved against its environment)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in deployment.env.items():
            if key.startswith("DAGSTER_"):
                mp.setenv(key, value)
        instance = dg.DagsterInstance.get()
        try:
            yield instance
        finally:
            instance.dispose()


@dataclass
class QueuedRun:
    run_id: str
    status: str
    data: Path  # the run's own data root (run config), apart from the whole-graph run's


@pytest.fixture(scope="module")
def queued_run(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> QueuedRun:
    """``full_pipeline`` reduced to its ``gutenberg_catalog`` op, submitted to the run queue by
    ``dagster job launch``; the daemon launches it via the code server. Its ``paths`` resource
    points at a data root of its own, so it can run beside the whole-graph CLI run."""
    run_id, data = str(uuid.uuid4()), tmp_path_factory.mktemp("queued_data")
    config = {**IN_PROCESS, "resources": {"paths": {"config": {"data_root": str(data)}}}}
    t0 = time.monotonic()
    proc = deployment.dagster(
        "job", "launch", "-w", str(DOCKER / "workspace.yaml"), "-j", "full_pipeline",
        "-o", "gutenberg_catalog", "--run-id", run_id, "--config-json", json.dumps(config),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = deployment.wait_for_run(run_id, timeout=600)
    print(f"\nqueued full_pipeline[gutenberg_catalog] run {run_id}: {status}"
          f" in {time.monotonic() - t0:.0f}s")  # fmt: skip
    return QueuedRun(run_id, status, data)


def test_queued_run_launched_by_daemon_via_code_server(
    queued_run: QueuedRun, deployment: Deployment
) -> None:
    dep = deployment
    assert queued_run.status == "SUCCESS", dep.logs()
    events = dep.run_events(queued_run.run_id)
    # Queued by the CLI, then launched by the daemon's run queue through the code server.
    assert events.index("PIPELINE_ENQUEUED") < events.index("PIPELINE_STARTING")
    assert "PIPELINE_SUCCESS" in events and "PIPELINE_FAILURE" not in events
    daemon = next(s for s in dep.services if s.name == "dagster-daemon")
    assert any(
        "QueuedRunCoordinatorDaemon" in line and "Launched 1 runs" in line
        for line in daemon.log.read_text().splitlines()
    )
    assert dep.materialised(queued_run.run_id) == {dg.AssetKey("gutenberg_catalog").to_string()}
    assert (queued_run.data / "gutenberg_catalog" / "catalog.parquet").is_file()

    with deployed_instance(dep) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        record = instance.get_run_record_by_id(queued_run.run_id)
        assert record is not None and record.dagster_run.job_name == "full_pipeline"
        # The job came from the gRPC code server of docker/workspace.yaml.
        origin = record.dagster_run.remote_job_origin
        assert origin is not None and origin.location_name == "scriptorium"
        location = origin.repository_origin.code_location_origin
        assert type(location).__name__ == "GrpcServerCodeLocationOrigin"
        assert location.port == dep.code_server_port


def test_whole_graph_run_recorded_in_postgres(graph_run: GraphRun, deployment: Deployment) -> None:
    from pipeline.definitions import defs

    dep = deployment
    run_id = cli_run_id(graph_run)
    events = dep.run_events(run_id)
    # Executed by the CLI itself, not through the queue, into the deployment's Postgres.
    assert "PIPELINE_ENQUEUED" not in events
    assert "PIPELINE_SUCCESS" in events and "PIPELINE_FAILURE" not in events
    materialised = {dg.AssetKey.from_db_string(k) for k in dep.materialised(run_id)}
    assert materialised == set(defs.resolve_asset_graph().get_all_asset_keys())
    assert events.count("ASSET_CHECK_EVALUATION") == len(
        defs.resolve_asset_graph().asset_check_keys
    )

    with deployed_instance(dep) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        # The `train` pool that pretrained_weights claimed allows one step at a time.
        assert instance.event_log_storage.get_concurrency_info("train").slot_count == 1
        record = instance.get_run_record_by_id(run_id)
        assert record is not None and record.dagster_run.job_name == CLI_JOB


def test_pretraining_tracked_in_postgres_backed_mlflow(
    graph_run: GraphRun, deployment: Deployment
) -> None:
    from mlflow import MlflowClient

    dep = deployment
    run_id = cli_run_id(graph_run)
    assert graph_run.tracking_uri == dep.mlflow.url
    client = MlflowClient(tracking_uri=dep.mlflow.url)
    experiment = client.get_experiment_by_name("scriptorium")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artefacts not proxied"
    [run] = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`dagster.run_id` = '{run_id}' "
            "and tags.`dagster.asset_key` = 'pretrained_weights'"
        ),
    )
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster.asset_key"] == "pretrained_weights"
    assert len(client.get_metric_history(run.info.run_id, "loss")) > 1
    assert {"model", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.search_model_versions("name='scriptorium-pretrained'")
    # Stored where the compose file puts them: run rows in Postgres, files behind the proxy.
    rows = dep.postgres.query(
        "mlflow", "SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)
    )
    assert rows == [("FINISHED",)]
    assert any(dep.mlflow.artifacts.rglob("model.safetensors")), "no artefact in the proxy store"


def test_mlflow_rejects_hosts_not_allowed(mlflow_server: MlflowServer) -> None:
    url = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    with urllib.request.urlopen(url, timeout=10) as ok:
        assert ok.status == 200
    request = urllib.request.Request(url, headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code in (400, 403)
