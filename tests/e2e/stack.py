"""The docker-compose deployment on real processes, and the session's one whole-graph run on it.

There is no Docker engine in CI, so the services of ``docker-compose.yml`` run here as processes
with the same configuration files: a throwaway PostgreSQL cluster set up by
``docker/postgres-init.sh``; ``docker/mlflow-server.sh``; a Dagster gRPC code server, webserver and
daemon reading ``docker/dagster.yaml`` (Postgres storage, queued runs) and
``docker/workspace.yaml``. Only hosts, ports and directories differ, through the environment
variables those files already read. The data mirror is served by ``scriptorium mirror serve``.

The whole tiny graph is computed once per session, by the real CLI against the deployment's stores:
``dagster asset materialize -m pipeline.definitions --select '*'`` with the deployment's
environment (``DAGSTER_HOME`` holding ``docker/dagster.yaml``, so runs and events go to Postgres;
``MLFLOW_TRACKING_URI`` the MLflow server; ``SCRIPTORIUM_DATA`` the code server's data root). The
CLI executes the run itself, outside the run queue, so the Postgres, browser and tiny-profile tests
all read that one run; the queue, daemon and code server launch path is proven by a small queued
run (tests/e2e/test_postgres_deploy.py).

:class:`Stack` starts all of it in a background thread, at the session's first test when selected
tests use it (``_e2e_stack_early`` in tests/conftest.py, which also orders tests/e2e last), so the
rest of the suite runs meanwhile; the fixtures in tests/e2e/conftest.py wait for the part they need.

System packages (PostgreSQL, Chromium, the compose CLI) are installed by ``setup_system_deps.sh``
when missing; a test skips, with the reason, only where that is impossible (under ``CI=true`` that
skip is a failure: see tests/conftest.py; ``.ci/run`` installs the packages before the suite).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.tiny_graph import GraphRun, graph_command

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
SETUP_SCRIPT = Path(__file__).with_name("setup_system_deps.sh")
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}  # one process per run: lean on 2 cores
TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}
SERVICE_START_S = 300  # a cold Dagster or MLflow import on 2 cores busy with the rest
GRAPH_RUN_S = 1800  # the whole tiny graph, sharing 2 cores with the rest of the suite
STACK: pytest.StashKey[Stack] = pytest.StashKey()
ARTIFACTS: pytest.StashKey[Path] = pytest.StashKey()


# --- helpers -------------------------------------------------------------------------------------
def ensure_system_deps(*deps: str) -> None:
    """Install ``deps`` where missing (see setup_system_deps.sh); skip the test if impossible
    (a failure under ``CI=true``, by the hook in tests/conftest.py)."""
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


class Cancelled(Exception):
    """The session ended while the stack was still starting."""


def wait_for(
    check: Callable[[], Any],
    what: str,
    timeout: float,
    log: Path | None = None,
    cancel: threading.Event | None = None,
) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with ``log``'s tail on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            raise Cancelled(what)
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


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


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


def artifacts_path(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots and service logs go: ``$SCRIPTORIUM_TEST_ARTIFACTS`` or a temp dir (one
    per session)."""
    if ARTIFACTS not in config.stash:
        env = os.environ.get("SCRIPTORIUM_TEST_ARTIFACTS")
        path = Path(env) if env else tmp_path_factory.mktemp("artifacts")
        path.mkdir(parents=True, exist_ok=True)
        config.stash[ARTIFACTS] = path
    return config.stash[ARTIFACTS]


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


class PgCluster:
    """PostgreSQL on loopback (a free port), its databases made by the compose init script."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.bindir = _pg_bindir()
        self.sudo = _as_db_user()
        # Not under pytest's 0700 root-owned temp tree: the postgres user must be able to enter it.
        self.base = Path(tempfile.mkdtemp(prefix="scriptorium-pg-"))
        self.data, self.log = self.base / "data", self.base / "postgres.log"
        self.started = False

    def start(self) -> PgServer:
        base, bindir, sudo = self.base, self.bindir, self.sudo
        password = secrets.token_urlsafe(16)
        (base / "pwfile").write_text(password)
        if sudo:
            shutil.chown(base, "postgres")
            shutil.chown(base / "pwfile", "postgres")
        subprocess.run(
            [*sudo, str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
             "--auth=scram-sha-256", f"--pwfile={base / 'pwfile'}", "-E", "UTF8", "--locale=C",
             "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        port = free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off"
            " -c full_page_writes=off"
        )
        self.started = True
        subprocess.run(
            [*sudo, str(bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o",
             options, "-w", "-t", "60", "start"],
            check=True, capture_output=True, timeout=90,
        )  # fmt: skip
        server = PgServer("127.0.0.1", port, "postgres", password, bindir)
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
        return server

    def stop(self) -> None:
        if self.started:
            subprocess.run(
                [*self.sudo, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                 "stop"],
                capture_output=True, timeout=60,
            )  # fmt: skip
        with contextlib.suppress(OSError):
            shutil.copy(self.log, self.logs / "postgres.log")
        shutil.rmtree(self.base, ignore_errors=True)


# --- MLflow server, Dagster deployment -----------------------------------------------------------
@dataclass
class MlflowServer:
    url: str
    port: int
    artifacts: Path
    service: Service


@dataclass
class Deployment:
    """The running stack; ``env`` is what the services got (instance + pipeline variables), and
    what the whole-graph CLI run got."""

    env: dict[str, str]
    home: Path
    data: Path
    webserver_url: str
    mlflow: MlflowServer
    postgres: PgServer
    services: list[Service]  # code server, webserver, daemon

    @property
    def code_server_port(self) -> int:
        return int(self.env["DAGSTER_CODE_SERVER_PORT"])

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

    def materialised(self, run_id: str) -> set[str]:
        """Asset keys (database strings) that the run materialised, from the Postgres event log."""
        rows = self.postgres.query(
            "dagster",
            "SELECT DISTINCT asset_key FROM event_logs"
            " WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (run_id,),
        )
        return {r[0] for r in rows}

    def logs(self) -> str:
        return "\n".join(
            f"== {s.name}\n{s.log.read_text(errors='replace')[-3000:]}" for s in self.services
        )


# --- the stack -----------------------------------------------------------------------------------
class Stack:
    """The deployment and the whole-graph CLI run, started in a background thread.

    In order: the mirror server; PostgreSQL; the MLflow server and the Dagster code server (their
    imports overlap); once MLflow and the mirror answer, ``dagster asset materialize --select
    '*'``; once the code server answers, the webserver and the daemon. Each ``wait_*`` method
    blocks until its part is up (or the CLI run has ended) and raises what stopped the start:
    a skip stays a skip (a failure under ``CI=true``), anything else fails the test that waits.
    """

    def __init__(self, mirror: Path, tmp: pytest.TempPathFactory, logs: Path) -> None:
        self.mirror_root = mirror
        self.logs = logs
        # Made here, in the test process's main thread: the rest of the suite uses the factory too.
        self.home, self.storage = tmp.mktemp("dagster_home"), tmp.mktemp("dagster_storage")
        self.data, self.hf_home = tmp.mktemp("data"), tmp.mktemp("hf_home")
        self.mlflow_artifacts = tmp.mktemp("mlartifacts")
        self._cancel = threading.Event()
        self._parts = {p: threading.Event() for p in ("postgres", "mlflow", "cli", "deployment")}
        self._error: BaseException | None = None
        self._services: list[Service] = []  # in start order
        self._pg: PgCluster | None = None
        self.postgres: PgServer | None = None
        self.mlflow: MlflowServer | None = None
        self.deployment: Deployment | None = None
        self.cli: Service | None = None
        self.cli_started = 0.0
        self.env: dict[str, str] = {}  # the deployment's and the CLI run's environment
        self._graph_run: GraphRun | None = None
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="e2e-stack", daemon=True)

    # --- the background thread --------------------------------------------------------------------
    def start(self) -> Stack:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _mark(self, what: str) -> None:
        """A line in ``stack-timings.txt`` (artefacts): when each part was up, seconds from start."""
        with (self.logs / "stack-timings.txt").open("a") as f:
            f.write(f"{time.monotonic() - self._t0:7.1f}s {what}\n")

    def _main(self) -> None:
        try:
            self._start_all()
        except BaseException as exc:  # noqa: BLE001 - a skip or a failure, handed to the waiters
            self._error = exc

    def _service(self, name: str, cmd: list[str], env: dict[str, str]) -> Service:
        service = Service.start(name, cmd, env, self.logs)
        self._services.append(service)
        return service

    def _wait(self, check: Callable[[], Any], what: str, service: Service) -> None:
        def up() -> bool:
            assert service.alive(), (
                f"{service.name} exited:\n{service.log.read_text(errors='replace')[-3000:]}"
            )
            return bool(check())

        wait_for(up, what, SERVICE_START_S, service.log, self._cancel)

    def _start_all(self) -> None:
        mirror_port = free_port()
        mirror = self._service(
            "mirror",
            [str(BIN / "scriptorium"), "mirror", "serve", str(self.mirror_root), "--host",
             "127.0.0.1", "--port", str(mirror_port)],
            {**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        mirror_url = f"http://127.0.0.1:{mirror_port}"

        ensure_system_deps("postgres")
        self._pg = PgCluster(self.logs)
        pg = self.postgres = self._pg.start()
        self._parts["postgres"].set()
        self._mark("postgres up")

        mlflow_port = free_port()
        mlflow_env = {
            **os.environ,
            "PYTHON": sys.executable,
            "MLFLOW_PG_HOST": pg.host, "MLFLOW_PG_PORT": str(pg.port),
            "MLFLOW_PG_DB": "mlflow", "MLFLOW_PG_USER": "mlflow",
            "MLFLOW_PG_PASSWORD": pg.roles["mlflow"],
            "MLFLOW_ARTIFACTS_DESTINATION": str(self.mlflow_artifacts),
            "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(mlflow_port), "MLFLOW_WORKERS": "1",
            "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{mlflow_port},localhost:{mlflow_port}",
        }  # fmt: skip
        mlflow_env.pop("MLFLOW_TRACKING_URI", None)
        mlflow = self._service("mlflow", ["bash", str(DOCKER / "mlflow-server.sh")], mlflow_env)
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"

        shutil.copy(DOCKER / "dagster.yaml", self.home / "dagster.yaml")  # verbatim: env-driven
        code_port, web_port = free_port(), free_port()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "DAGSTER_PG_HOST": pg.host, "DAGSTER_PG_PORT": str(pg.port),
            "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_USER": "dagster",
            "DAGSTER_PG_PASSWORD": pg.roles["dagster"],
            "DAGSTER_STORAGE_DIR": str(self.storage),
            "DAGSTER_COMPUTE_LOGS_DIR": str(self.storage / "logs"),
            "DAGSTER_CODE_SERVER_HOST": "127.0.0.1", "DAGSTER_CODE_SERVER_PORT": str(code_port),
            "SCRIPTORIUM_DATA": str(self.data), "SCRIPTORIUM_PROFILE": "tiny",
            "SCRIPTORIUM_DEVICE": "cpu",
            "GUTENBERG_MIRROR": mirror_url, "HF_ENDPOINT": mirror_url,
            "SCRIPTORIUM_FILES_MIRROR": f"{mirror_url}/files",
            "HF_HOME": str(self.hf_home),  # no saved token, no user cache
            "MLFLOW_TRACKING_URI": mlflow_url, "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        env.pop("HF_TOKEN", None)
        self.env = env
        code = self._service(
            "dagster-code",
            [str(BIN / "dagster"), "code-server", "start", "-h", "127.0.0.1", "-p", str(code_port),
             "-m", "pipeline.definitions", "--location-name", "scriptorium"],
            env,
        )  # fmt: skip

        self._wait(lambda: http_ok(f"{mlflow_url}/health"), "mlflow server", mlflow)
        self.mlflow = MlflowServer(mlflow_url, mlflow_port, self.mlflow_artifacts, mlflow)
        self._parts["mlflow"].set()
        self._mark("mlflow up")
        self._wait(
            lambda: http_ok(f"{mirror_url}/cache/epub/feeds/pg_catalog.csv"), "mirror", mirror
        )

        self.cli = self._service("dagster-asset-materialize", graph_command(), env)
        self.cli_started = time.monotonic()
        self._parts["cli"].set()
        self._mark("dagster asset materialize started")

        health = [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(code_port)]
        self._wait(  # the health check is a Python process: only once the port answers
            lambda: (
                port_open(code_port)
                and subprocess.run(health, capture_output=True, timeout=60).returncode == 0
            ),
            "dagster code server",
            code,
        )
        workspace = str(DOCKER / "workspace.yaml")
        web = self._service(
            "dagster-webserver",
            [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(web_port), "-w", workspace],
            env,
        )  # fmt: skip
        daemon = self._service(
            "dagster-daemon", [str(BIN / "dagster-daemon"), "run", "-w", workspace], env
        )
        url = f"http://127.0.0.1:{web_port}"
        self._wait(lambda: http_ok(f"{url}/server_info"), "dagster webserver", web)
        self.deployment = Deployment(
            env, self.home, self.data, url, self.mlflow, pg, [code, web, daemon]
        )
        self._parts["deployment"].set()
        self._mark("dagster code server, webserver and daemon up")
        cli = self.cli
        while cli.proc.poll() is None and not self._cancel.wait(1):
            pass
        if cli.proc.returncode is not None:
            self._mark(f"dagster asset materialize exited ({cli.proc.returncode})")

    # --- waiting ----------------------------------------------------------------------------------
    def _ready(self, part: str) -> None:
        """Block until ``part`` is up; raise what stopped the start if it never will be."""
        while not self._parts[part].wait(0.2):
            if self._error is not None:
                if isinstance(self._error, pytest.skip.Exception):
                    pytest.skip(self._error.msg)
                raise RuntimeError(f"the e2e stack did not start: {self._error}") from self._error
            if not self._thread.is_alive():
                raise RuntimeError("the e2e stack's start thread ended early")

    def wait_postgres(self) -> PgServer:
        self._ready("postgres")
        assert self.postgres is not None
        return self.postgres

    def wait_mlflow(self) -> MlflowServer:
        self._ready("mlflow")
        assert self.mlflow is not None
        return self.mlflow

    def wait_deployment(self) -> Deployment:
        self._ready("deployment")
        assert self.deployment is not None
        return self.deployment

    def wait_graph_run(self) -> GraphRun:
        """The whole-graph CLI run, once it has exited; fails with its log's tail if it failed."""
        if self._graph_run is None:
            self._ready("cli")
            assert self.cli is not None
            remaining = GRAPH_RUN_S - (time.monotonic() - self.cli_started)
            try:
                returncode = self.cli.proc.wait(timeout=max(remaining, 1))
            except subprocess.TimeoutExpired:
                stop_services([self.cli])
                returncode = None
            log = self.cli.log.read_text(errors="replace")
            assert returncode == 0, (
                f"dagster asset materialize: exit status {returncode}"
                f" ({time.monotonic() - self.cli_started:.0f}s)\n{log[-6000:]}"
            )
            print(f"\nwhole-graph CLI run: {time.monotonic() - self.cli_started:.0f}s")
            self._graph_run = GraphRun(self.data, self.home, dict(self.env), log)
        return self._graph_run

    # --- stopping ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the start (if still going), every process, then PostgreSQL."""
        self._cancel.set()
        self._thread.join(timeout=120)
        stop_services(self._services)  # all at once, the CLI run and its step processes included
        if self._pg is not None:
            self._pg.stop()


def session_stack(
    config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, mirror: Path
) -> tuple[Stack, bool]:
    """The session's stack, started now if it was not yet; ``True`` when the caller started it
    (and must stop it)."""
    if STACK in config.stash:
        return config.stash[STACK], False
    stack = Stack(mirror, tmp_path_factory, artifacts_path(config, tmp_path_factory)).start()
    config.stash[STACK] = stack
    return stack, True
