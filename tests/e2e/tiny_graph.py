"""The whole tiny graph through the real ``dagster`` CLI, run once per test session.

Both ``test_tiny_pipeline.py`` and ``test_tiny_sft.py`` read what one run leaves behind; a
module-scoped fixture imported into a second module would run the graph a second time (pytest
builds one fixture definition per module), so the run is memoised here instead, keyed by the
session's ``tmp_path_factory``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sources.mirror import MirrorServer

REPO = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).parent / "dagster"
TinyRun = tuple[Path, Path, dict[str, str], str]  # data root, DAGSTER_HOME, env, CLI log
_RUNS: dict[int, tuple[TinyRun, int]] = {}


def _run(mirror_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyRun, int]:
    data = tmp_path_factory.mktemp("data")
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    with MirrorServer(mirror_dir) as server:
        env = {
            **os.environ,
            "SCRIPTORIUM_DATA": str(data),
            "SCRIPTORIUM_PROFILE": "tiny",
            "GUTENBERG_MIRROR": server.url,
            "HF_ENDPOINT": server.url,
            "SCRIPTORIUM_FILES_MIRROR": f"{server.url}/files",
            "HF_HOME": str(tmp_path_factory.mktemp("hf_home")),  # no saved token, no user cache
            "DAGSTER_HOME": str(home),
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("MLFLOW_TRACKING_URI", "HF_TOKEN"):
            env.pop(name, None)
        proc = subprocess.run(
            [str(DAGSTER), "asset", "materialize", "-m", "pipeline.definitions", "--select", "*"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    log = proc.stdout + proc.stderr
    (data / "cli.log").write_text(log)
    return (data, home, env, log), proc.returncode


def run_tiny_graph(mirror_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The session's tiny run (started on first use); fails with the log's tail if it failed."""
    key = id(tmp_path_factory)
    if key not in _RUNS:
        _RUNS[key] = _run(mirror_dir, tmp_path_factory)
    run, returncode = _RUNS[key]
    assert returncode == 0, run[3][-6000:]
    return run
