"""The tiny profile's data graph (catalog → downloads → cleaning → tokenizer → token shards, every
fan-out step included) on Dagster's Celery executor: a real Redis broker, two Celery worker
processes started with ``dagster-celery worker start`` and ``configs/executors/celery.yaml``,
and ``dagster asset materialize -c configs/executors/celery.yaml``, as the README's "Scaling
out" says. Both workers must run steps, and the artefacts must be byte for byte those of the
session's whole-graph run on the multiprocess executor (``graph_run``), served by the same
mirror."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from tests.e2e.stack import ensure_system_deps, free_port, port_open, wait_for
from tests.e2e.tiny_graph import GraphRun

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONFIG = REPO / "configs" / "executors" / "celery.yaml"
DATA_ASSETS = ("cleaned_books", "bpe_tokenizer", "token_shards")


@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own session (``dagster-celery`` starts ``celery`` as its child), whose
    whole group is stopped afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _comparable(path: Path) -> object:
    """A file's content, less the wall-clock figures a JSON summary may carry."""
    if path.suffix != ".json":
        return path.read_bytes()
    value = json.loads(path.read_text())
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if "seconds" not in k and not k.endswith("_s")}
    return value


def _workers_that_ran_steps(home: Path, env: dict[str, str]) -> Counter[str]:
    """Steps per Celery worker, from the engine events the workers wrote to the instance."""
    counts: Counter[str] = Counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.get() as instance:
            (run,) = instance.get_runs()
            assert run.status == dg.DagsterRunStatus.SUCCESS
            for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
                data = entry.get_dagster_event().engine_event_data
                worker = (data.metadata if data else {}).get("Celery worker")
                if worker is not None:
                    counts[str(worker.value)] += 1
    return counts


@pytest.mark.slow
def test_data_graph_on_celery_matches_multiprocess(graph_run: GraphRun, tmp_path: Path) -> None:
    ensure_system_deps("redis")
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text("{}\n")  # SQLite storage under home: one machine
    with dg.DagsterInstance.from_config(str(home)):
        pass  # the tables now, not raced for by the two workers and the run starting together
    redis_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # dagster-celery runs `celery`
        "DAGSTER_HOME": str(home),  # SQLite: the run and both workers on this machine share it
        "SCRIPTORIUM_DATA": str(data),
        "SCRIPTORIUM_PROFILE": "tiny",
        "SCRIPTORIUM_EXECUTOR": "celery",
        "SCRIPTORIUM_CELERY_BROKER": f"redis://127.0.0.1:{redis_port}/0",
        "SCRIPTORIUM_CELERY_BACKEND": f"redis://127.0.0.1:{redis_port}/1",
        "GUTENBERG_MIRROR": graph_run.env["GUTENBERG_MIRROR"],  # the same mirror server
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "HF_TOKEN"):
        env.pop(key, None)
    redis = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"]  # fmt: skip
    worker = [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
              "-y", str(CONFIG), "-l", "WARNING"]  # fmt: skip
    solo = ["--", "--concurrency=1", "--pool=solo"]  # one process per worker
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(_process(redis, env, tmp_path / "redis.log"))
        wait_for(lambda: port_open(redis_port), "redis", 30, tmp_path / "redis.log", None)
        assert server.poll() is None
        for name in ("w1", "w2"):
            stack.enter_context(
                _process([*worker, "-n", name, *solo], env, tmp_path / f"{name}.log")
            )
        proc = subprocess.run(
            [str(BIN / "dagster"), "asset", "materialize", "-m", "pipeline.definitions",
             "--select", "*token_shards", "-c", str(CONFIG)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        logs = {p.name: p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("w*.log")}
        assert proc.returncode == 0, (proc.stderr[-5000:], logs)

    workers = _workers_that_ran_steps(home, env)
    assert {w.split("@")[0] for w in workers} == {"w1", "w2"}, workers
    assert sum(workers.values()) >= 8, workers  # every fan-out step went through Celery

    for asset in DATA_ASSETS:
        ours = sorted(p.relative_to(data) for p in (data / asset).rglob("*") if p.is_file())
        theirs = sorted(
            p.relative_to(graph_run.data)
            for p in (graph_run.data / asset).rglob("*")
            if p.is_file()
        )
        assert ours == theirs, asset
        for rel in ours:
            assert _comparable(data / rel) == _comparable(graph_run.data / rel), rel
