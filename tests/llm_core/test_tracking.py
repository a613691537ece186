"""MLflow tracking against a real SQLite store in tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llm_core.checkpoint import save_weights
from llm_core.model import Transformer
from llm_core.tracking import MlflowTracker, default_tracking_uri, flatten_params
from tests.llm_core.training_helpers import tiny_model_config


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module: creating one runs MLflow's schema migrations (slow)."""
    return tmp_path_factory.mktemp("mlflow")


def test_flatten_and_default_uri(tmp_path: Path) -> None:
    assert flatten_params({"model": {"d": 64, "tie": True}, "lr": 0.1}) == {
        "model.d": "64",
        "model.tie": "True",
        "lr": "0.1",
    }
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_run_holds_params_metrics_artifacts_and_model_version(store: Path, tmp_path: Path) -> None:
    tracker = MlflowTracker(default_tracking_uri(store), "unit")
    torch.manual_seed(0)
    save_weights(Transformer(tiny_model_config()), tmp_path / "weights")
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    history = [
        {"step": s, "loss": 4.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 11)
    ]
    with tracker.start_run("unit-run", {"stage": "pretrain"}) as run:
        rid = run.info.run_id
        tracker.log_params({"model": tiny_model_config().to_dict(), "pretrain": {"steps": 10}})
        cb = tracker.callback()
        cb.on_metrics(
            5,
            {
                "loss": 3.5,
                "lr": 1e-3,
                "grad_norm": 0.9,
                "tokens_per_s": 1e4,
                "mfu": float("nan"),
                "tokens_seen": 123.0,
            },
        )
        cb.on_metrics(
            10, {"loss": 3.0, "lr": 5e-4, "grad_norm": 0.5, "tokens_per_s": 2e4, "mfu": 0.01}
        )
        cb.on_eval(10, {"val_loss": 3.2, "val_perplexity": 24.5, "val_bpb": 1.1})
        cb.on_checkpoint(10, tmp_path / "ckpt")
        tracker.log_artifacts(
            weights_dir=tmp_path / "weights", config={"name": "tiny"}, tokenizer_file=tokenizer
        )
        tracker.log_loss_curve_png(history, [{"step": 10, "val_loss": 3.2}])
        version = tracker.register_model("scriptorium-test", rid)
    assert version == 1
    assert "matplotlib.pyplot" in sys.modules  # imported lazily, on first plot

    # Read everything back through a fresh client, as the MLflow UI would.
    fresh = MlflowTracker(tracker.tracking_uri, "unit")
    data = fresh.get_run(rid)
    assert data.info.status == "FINISHED" and data.info.run_name == "unit-run"
    assert data.data.tags["stage"] == "pretrain" and "step 10" in data.data.tags["last_checkpoint"]
    assert data.data.params["model.d_model"] == "32" and data.data.params["pretrain.steps"] == "10"
    assert data.data.metrics["loss"] == 3.0 and data.data.metrics["val_bpb"] == 1.1
    assert "tokens_seen" not in data.data.metrics  # only the tracked keys
    assert [m.step for m in fresh.client.get_metric_history(rid, "loss")] == [5, 10]
    assert [m.step for m in fresh.client.get_metric_history(rid, "mfu")] == [10]  # NaN dropped
    listed = {a.path for a in fresh.client.list_artifacts(rid)}
    assert listed == {"model", "config", "tokenizer", "plots"}
    assert {a.path for a in fresh.client.list_artifacts(rid, "model")} == {
        "model/model.safetensors",
        "model/config.json",
    }
    png = Path(fresh.client.download_artifacts(rid, "plots/loss_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (store / "mlartifacts").is_dir()  # beside the DB, not in the CWD

    mv = fresh.client.get_model_version("scriptorium-test", "1")
    assert mv.run_id == rid and mv.source.endswith("/model")
    with fresh.start_run("second") as run2:
        assert fresh.register_model("scriptorium-test", run2.info.run_id) == 2


def test_failed_block_marks_run_failed(store: Path) -> None:
    tracker = MlflowTracker(default_tracking_uri(store), "unit")
    try:
        with tracker.start_run("boom") as run:
            raise RuntimeError("training blew up")
    except RuntimeError:
        pass
    assert tracker.get_run(run.info.run_id).info.status == "FAILED"
    assert tracker.run_id is None
