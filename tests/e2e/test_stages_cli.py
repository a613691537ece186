"""Every training stage runs without Dagster, on the artefacts of the session's whole-graph run:
``python -m llm_core.stages.<stage>`` with explicit paths, and ``scriptorium train <stage>``
with the paths taken from ``$SCRIPTORIUM_DATA`` (tracked in MLflow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_core.stages import STAGES
from pipeline.artefacts import Artefacts

pytestmark = [pytest.mark.mirror, pytest.mark.slow]
SCRIPTORIUM = Path(sys.executable).parent / "scriptorium"


def _last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", STAGES)
def test_python_m_stage(graph_run, stage: str, tmp_path: Path) -> None:
    data, _, env, _ = graph_run
    inputs = Artefacts(data).stage_inputs(stage)
    flags = [x for k, v in inputs.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    proc = subprocess.run(
        [sys.executable, "-m", f"llm_core.stages.{stage}", "--profile", "tiny", "--steps", "2",
         "--device", "cpu", "--out", str(tmp_path / stage), *flags],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = _last_json(proc)
    assert out["steps"] == 2 and out["tokens_seen"] > 0 and out["mlflow_run_id"] is None
    assert (tmp_path / stage / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / stage / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["train_config"]["steps"] == 2


@pytest.mark.parametrize("stage", STAGES)
def test_scriptorium_train(graph_run, stage: str, tmp_path: Path) -> None:
    import mlflow

    data, _, env, _ = graph_run
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [str(SCRIPTORIUM), "train", stage, "--profile", "tiny", "--steps", "2", "--device", "cpu",
         "--out", str(tmp_path / "out")],
        env={**env, "MLFLOW_TRACKING_URI": store}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = _last_json(proc)
    assert out["stage"] == stage and out["steps"] == 2
    run = mlflow.MlflowClient(store).get_run(out["mlflow_run_id"])
    assert run.data.tags["scriptorium.launcher"] == "scriptorium train"
    assert run.data.params["stage"] == stage and "loss" in run.data.metrics
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_scriptorium_train_names_the_missing_artefact(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(SCRIPTORIUM), "train", "sft", "--profile", "tiny", "--no-mlflow"],
        env={"SCRIPTORIUM_DATA": str(tmp_path), "PATH": str(Path(sys.executable).parent)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "pretrained_weights" in proc.stderr and "materialise" in proc.stderr
