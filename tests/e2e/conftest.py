"""The docker-compose deployment on real processes, for the Postgres and browser tests.

There is no Docker engine in CI, so the services of ``docker-compose.yml`` run here as processes
with the same configuration files: a throwaway PostgreSQL cluster set up by
``docker/postgres-init.sh``; ``docker/mlflow-server.sh``; a Dagster gRPC code server, webserver and
daemon reading ``docker/dagster.yaml`` (Postgres storage, queued runs) and
``docker/workspace.yaml``. Only hosts, ports and directories differ, through the environment
variables those files already read. Everything is session-scoped and started on first use, so
the Postgres and browser tests share one stack and one full tiny pipeline run.

System packages (PostgreSQL, Chromium, the compose CLI) are installed by ``setup_system_deps.sh``
when missing; a test skips, with the reason, only where that is impossible.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.sources.mirror import MirrorServer

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
SETUP_SCRIPT = Path(__file__).with_name("setup_system_deps.sh")
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}  # one process per run: lean on 2 cores
TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}


# --- helpers -------------------------------------------------------------------------------------
def ensure_system_deps(*deps: str) -> None:
    """Install ``deps`` where missing (see setup_system_deps.sh); skip the test if impossible."""
    proc = subprocess.run(
        ["bash", str(SETUP_SCRIPT), *deps],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if proc.returncode != 0:
        pytest.skip(f"system dependencies unavailable: {proc.stderr.strip()[-800:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], what: str, timeout: float, log: Path | None = None) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with ``log``'s tail on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except AssertionError:
            raise  # the check found something broken: waiting longer will not help
        except Exception:  # not up yet: connection refused, no table yet, ...
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s\n{tail}")


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=5
        ) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Service:
    """A started process in its own session (so its children stop with it), logging to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], env: dict[str, str], logs: Path) -> Service:
        log = logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(name, proc, log)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


def stop_services(services: list[Service], grace: float = 5) -> None:
    """SIGTERM every service's process group at once, then SIGKILL whatever is left in them."""
    for service in services:
        service.send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for service in services:
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    for service in services:  # children (run workers, training) may outlive their leader
        service.send(signal.SIGKILL)
        service.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots and service logs go: ``$SCRIPTORIUM_TEST_ARTIFACTS`` or a temp dir."""
    env = os.environ.get("SCRIPTORIUM_TEST_ARTIFACTS")
    path = Path(env) if env else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- PostgreSQL ----------------------------------------------------------------------------------
@dataclass
class PgServer:
    host: str
    port: int
    superuser: str
    password: str
    bindir: Path
    # role/database name -> password, as created by docker/postgres-init.sh
    roles: dict[str, str] = field(default_factory=dict)

    def connect(self, db: str, user: str | None = None) -> Any:  # a psycopg2 connection
        import psycopg2

        user = user or db
        password = self.password if user == self.superuser else self.roles[user]
        return psycopg2.connect(
            host=self.host, port=self.port, dbname=db, user=user, password=password
        )

    def query(self, db: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self.connect(db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()


def _pg_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
    )
    if not candidates:
        pytest.skip("PostgreSQL server binaries not found after setup")
    return candidates[-1].parent


def _as_db_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its commands as the `postgres` user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres(artifacts_dir: Path) -> Iterator[PgServer]:
    """PostgreSQL on loopback (a free port), its databases made by the compose init script."""
    ensure_system_deps("postgres")
    bindir = _pg_bindir()
    sudo = _as_db_user()
    # Not under pytest's 0700 root-owned temp tree: the postgres user must be able to enter it.
    base = Path(tempfile.mkdtemp(prefix="scriptorium-pg-"))
    password = secrets.token_urlsafe(16)
    (base / "pwfile").write_text(password)
    if sudo:
        shutil.chown(base, "postgres")
        shutil.chown(base / "pwfile", "postgres")
    data, log = base / "data", base / "postgres.log"
    subprocess.run(
        [*sudo, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
         f"--pwfile={base / 'pwfile'}", "-E", "UTF8", "--locale=C", "--no-sync"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    port = free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c full_page_writes=off"
    )
    subprocess.run(
        [*sudo, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
        check=True, capture_output=True, timeout=90,
    )  # fmt: skip
    server = PgServer("127.0.0.1", port, "postgres", password, bindir)
    try:
        # Quotes and URI delimiters prove the init script and both URIs escape passwords.
        server.roles = {
            "dagster": secrets.token_urlsafe(12) + "'@:",
            "mlflow": secrets.token_urlsafe(12) + "'@:/",
        }
        env = {
            **os.environ,
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "PGHOST": server.host, "PGPORT": str(port), "PGPASSWORD": password,
            "POSTGRES_USER": "postgres", "POSTGRES_DB": "postgres",
            "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_USER": "dagster",
            "DAGSTER_PG_PASSWORD": server.roles["dagster"],
            "MLFLOW_PG_DB": "mlflow", "MLFLOW_PG_USER": "mlflow",
            "MLFLOW_PG_PASSWORD": server.roles["mlflow"],
        }  # fmt: skip
        init = subprocess.run(
            ["bash", str(DOCKER / "postgres-init.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert init.returncode == 0, init.stdout + init.stderr
        yield server
    finally:
        subprocess.run(
            [*sudo, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        with contextlib.suppress(OSError):
            shutil.copy(log, artifacts_dir / "postgres.log")
        shutil.rmtree(base, ignore_errors=True)


# --- MLflow server -------------------------------------------------------------------------------
@dataclass
class MlflowServer:
    url: str
    port: int
    artifacts: Path
    service: Service


@pytest.fixture(scope="session")
def mlflow_server(
    postgres: PgServer, tmp_path_factory: pytest.TempPathFactory, artifacts_dir: Path
) -> Iterator[MlflowServer]:
    """``docker/mlflow-server.sh``: Postgres backend, proxied artefacts, explicit allowed hosts."""
    port = free_port()
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "MLFLOW_PG_HOST": postgres.host, "MLFLOW_PG_PORT": str(postgres.port),
        "MLFLOW_PG_DB": "mlflow", "MLFLOW_PG_USER": "mlflow",
        "MLFLOW_PG_PASSWORD": postgres.roles["mlflow"],
        "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
        "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
        "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{port},localhost:{port}",
    }  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    service = Service.start(
        "mlflow", ["bash", str(DOCKER / "mlflow-server.sh")], env, artifacts_dir
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: service.alive() and http_ok(f"{url}/health"), "mlflow server", 120, service.log
        )
        yield MlflowServer(url, port, artifacts, service)
    finally:
        stop_services([service])


# --- Dagster: code server, webserver, daemon -----------------------------------------------------
@pytest.fixture(scope="session")
def mirror_server(mirror_dir: Path) -> Iterator[MirrorServer]:
    with MirrorServer(mirror_dir) as server:
        yield server


@dataclass
class Deployment:
    """The running stack; ``env`` is what the services got (instance + pipeline variables)."""

    env: dict[str, str]
    home: Path
    data: Path
    webserver_url: str
    mlflow: MlflowServer
    postgres: PgServer
    services: list[Service]

    def dagster(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A ``dagster`` CLI command against this deployment's instance and workspace."""
        return subprocess.run(
            [str(BIN / "dagster"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def run_status(self, run_id: str) -> str | None:
        """The run's status as stored in Dagster's Postgres ``runs`` table."""
        rows = self.postgres.query(
            "dagster", "SELECT status FROM runs WHERE run_id = %s", (run_id,)
        )
        return rows[0][0] if rows else None

    def wait_for_run(self, run_id: str, timeout: float = 600) -> str:
        def done() -> str | None:
            for s in self.services:
                assert s.alive(), f"{s.name} died:\n{s.log.read_text(errors='replace')[-3000:]}"
            status = self.run_status(run_id)
            return status if status in TERMINAL_RUN_STATUSES else None

        return wait_for(done, f"run {run_id}", timeout)

    def run_events(self, run_id: str) -> list[str]:
        """Dagster event types of the run, in order, from the Postgres event log."""
        rows = self.postgres.query(
            "dagster",
            "SELECT dagster_event_type FROM event_logs"
            " WHERE run_id = %s AND dagster_event_type IS NOT NULL ORDER BY id",
            (run_id,),
        )
        return [r[0] for r in rows]

    def logs(self) -> str:
        return "\n".join(
            f"== {s.name}\n{s.log.read_text(errors='replace')[-3000:]}" for s in self.services
        )


@pytest.fixture(scope="session")
def deployment(
    postgres: PgServer,
    mlflow_server: MlflowServer,
    mirror_server: MirrorServer,
    tmp_path_factory: pytest.TempPathFactory,
    artifacts_dir: Path,
) -> Iterator[Deployment]:
    """Code server (gRPC), webserver and daemon on the tiny profile, wired as in compose."""
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(DOCKER / "dagster.yaml", home / "dagster.yaml")  # verbatim: env-driven
    storage, data = tmp_path_factory.mktemp("dagster_storage"), tmp_path_factory.mktemp("data")
    code_port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": postgres.host, "DAGSTER_PG_PORT": str(postgres.port),
        "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_USER": "dagster",
        "DAGSTER_PG_PASSWORD": postgres.roles["dagster"],
        "DAGSTER_STORAGE_DIR": str(storage), "DAGSTER_COMPUTE_LOGS_DIR": str(storage / "logs"),
        "DAGSTER_CODE_SERVER_HOST": "127.0.0.1", "DAGSTER_CODE_SERVER_PORT": str(code_port),
        "SCRIPTORIUM_DATA": str(data), "SCRIPTORIUM_PROFILE": "tiny", "SCRIPTORIUM_DEVICE": "cpu",
        "GUTENBERG_MIRROR": mirror_server.url, "HF_ENDPOINT": mirror_server.url,
        "SCRIPTORIUM_FILES_MIRROR": f"{mirror_server.url}/files",
        "HF_HOME": str(tmp_path_factory.mktemp("hf_home")),  # no saved token, no user cache
        "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    env.pop("HF_TOKEN", None)
    workspace = str(DOCKER / "workspace.yaml")
    services: list[Service] = []
    try:
        code = Service.start(
            "dagster-code",
            [str(BIN / "dagster"), "code-server", "start", "-h", "127.0.0.1", "-p", str(code_port),
             "-m", "pipeline.definitions", "--location-name", "scriptorium"],
            env, artifacts_dir,
        )  # fmt: skip
        services.append(code)
        health = [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(code_port)]

        def code_ready() -> bool:
            return (
                code.alive()
                and subprocess.run(health, capture_output=True, timeout=30).returncode == 0
            )

        wait_for(code_ready, "dagster code server", 180, code.log)
        web = Service.start(
            "dagster-webserver",
            [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(web_port), "-w", workspace],
            env, artifacts_dir,
        )  # fmt: skip
        daemon = Service.start(
            "dagster-daemon",
            [str(BIN / "dagster-daemon"), "run", "-w", workspace],
            env,
            artifacts_dir,
        )
        services += [web, daemon]
        url = f"http://127.0.0.1:{web_port}"
        wait_for(
            lambda: web.alive() and http_ok(f"{url}/server_info"), "dagster webserver", 180, web.log
        )
        yield Deployment(env, home, data, url, mlflow_server, postgres, services)
    finally:
        stop_services(services)


@dataclass
class PipelineRun:
    run_id: str
    status: str
    deployment: Deployment


@pytest.fixture(scope="session")
def full_run(deployment: Deployment) -> PipelineRun:
    """``full_pipeline`` submitted to the run queue; the daemon launches it via the code server."""
    run_id = str(uuid.uuid4())
    t0 = time.monotonic()
    proc = deployment.dagster(
        "job", "launch", "-w", str(DOCKER / "workspace.yaml"), "-j", "full_pipeline",
        "--run-id", run_id, "--config-json", json.dumps(IN_PROCESS),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = deployment.wait_for_run(run_id, timeout=900)
    print(f"\nfull_pipeline run {run_id}: {status} in {time.monotonic() - t0:.0f}s")
    return PipelineRun(run_id, status, deployment)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell a failed test in teardown."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
