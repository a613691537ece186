"""MLflow's usage telemetry is off by default wherever the project logs (SECURITY.md item 8).

MLflow 3 disables it by itself under pytest or CI (it looks for ``PYTEST_CURRENT_TEST``, ``CI``
...), so the check runs a child process without those variables, as a user's shell would, with
its config folder in a temp dir: MLflow writes ``mlflow/telemetry.json`` there when telemetry
is on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CI_MARKERS = (
    "PYTEST_CURRENT_TEST",
    "CI",
    "GITHUB_ACTIONS",
    "DO_NOT_TRACK",
    "MLFLOW_DISABLE_TELEMETRY",
)
LOG_A_RUN = """
import sys
from llm_core.tracking import MlflowTracker
t = MlflowTracker(f"sqlite:///{sys.argv[1]}/mlflow.db", "telemetry")
with t.start_run("r", {}):
    t.log_params({"a": 1})
"""


def _run(tmp_path: Path, **extra: str) -> Path:
    env = {k: v for k, v in os.environ.items() if k not in CI_MARKERS}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), HOME=str(tmp_path), **extra)
    proc = subprocess.run(
        [sys.executable, "-c", LOG_A_RUN, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / "config" / "mlflow" / "telemetry.json"


def test_tracking_does_not_turn_on_mlflow_telemetry(tmp_path: Path) -> None:
    assert not _run(tmp_path).exists()
    # Makefile and the image say the same for the mlflow CLI processes they start.
    repo = Path(__file__).resolve().parents[2]
    assert "export MLFLOW_DISABLE_TELEMETRY ?= true" in (repo / "Makefile").read_text()
    assert "MLFLOW_DISABLE_TELEMETRY=true" in (repo / "docker" / "Dockerfile").read_text()
