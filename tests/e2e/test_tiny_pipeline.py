"""End to end on the tiny profile: the real ``dagster`` CLI against the mirror server.

The session's one CLI run materialises the whole graph (``--select '*'``) into the deployment's
data root, Postgres-backed Dagster instance and MLflow server (tests/e2e/tiny_graph.py); the
tests then read the artefacts, the asset checks, the Dagster event log and the MLflow runs it left.
A second test re-materialises ``pretrained_weights`` alone through ``dagster.materialize()``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import polars as pl

from tests.e2e.tiny_graph import assert_checks_passed, check_evaluations, cli_run_id

REPO = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).parent / "dagster"


def test_data_stage_artefacts(graph_run) -> None:
    data, _, _, _ = graph_run
    catalog = pl.read_parquet(data / "gutenberg_catalog" / "catalog.parquet")
    assert catalog.height == 7
    manifest = pl.read_parquet(data / "gutenberg_books" / "manifest.parquet")
    assert set(manifest["status"]) == {"ok"}
    books = pl.read_parquet(data / "cleaned_books" / "books.parquet")
    rejects = pl.read_parquet(data / "cleaned_books" / "rejects.parquet")
    assert books.height + rejects["id"].n_unique() == 7
    assert set(books["language"]) == {"en"}
    assert not books["text"].str.contains("Project Gutenberg").any()
    assert (data / "bpe_tokenizer" / "tokenizer.json").exists()
    shards = json.loads((data / "token_shards" / "manifest.json").read_text())
    assert shards["dtype"] == "uint16" and shards["vocab_size"] == 1024
    assert shards["splits"]["val"]["books"] >= 1
    for entry in shards["shards"]:
        arr = np.load(data / "token_shards" / entry["file"], mmap_mode="r")
        assert arr.max() < 1024
    assert_checks_passed(
        graph_run,
        "cleaned_books:no_boilerplate_left",
        "cleaned_books:language_mix_as_configured",  # not blocking: only its outcome shows it
        "bpe_tokenizer:tokenizer_roundtrip",
        "token_shards:shards_valid",
    )


def test_make_run_view_is_concise_and_keeps_the_full_log(graph_run) -> None:
    """``scriptorium run`` (what ``make run`` calls) prints a line per step start and end, the
    training progress with tokens/s and an ETA, and a summary; Dagster's DEBUG events go to the
    full log under ``$SCRIPTORIUM_DATA/logs/`` instead of the terminal."""
    data, _, _, view = graph_run
    assert "DEBUG" not in view
    assert "▶ pretrained_weights" in view and "✓ pretrained_weights (" in view
    assert re.search(
        r"pretrained_weights \d+/40 ▕[█░]+▏ · loss [0-9.]+ · [0-9,]+ tok/s · ETA", view
    )
    assert re.search(
        r"✓ done in \d+m\d\ds; \d+ steps; orchestration overhead \d+m\d\ds \(\d+%", view
    )
    assert "evaluation_report headline" in view and "UIs: `make ui`" in view
    (full,) = (data / "logs").glob("materialize-*.log")
    text = full.read_text()
    assert "STEP_START" in text and "RUN_SUCCESS" in text and str(full) in view


def test_every_asset_check_ran_and_passed(graph_run) -> None:
    """``--select '*'`` runs every asset check of the graph once; each passed, blocking or not
    (a failed non-blocking check leaves the run successful, so the run's status cannot tell)."""
    from pipeline.definitions import defs

    expected = {k.to_user_string() for k in defs.resolve_asset_graph().asset_check_keys}
    assert set(check_evaluations(graph_run)) == expected
    assert_checks_passed(graph_run, *sorted(expected))


def test_pretrained_weights_and_mlflow(graph_run) -> None:
    data, _, _, _ = graph_run
    out = data / "pretrained_weights"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40
    client = graph_run.mlflow_client()
    exp = client.get_experiment_by_name("scriptorium")
    runs = client.search_runs(
        [exp.experiment_id],
        "tags.`dagster.asset_key` = 'pretrained_weights'"
        f" and tags.`dagster.run_id` = '{cli_run_id(graph_run)}'",
    )
    assert runs, "no MLflow run recorded"
    run = runs[0]
    assert run.data.tags["dagster.asset_key"] == "pretrained_weights"
    assert run.data.tags["dagster.run_id"]
    assert "upstream.token_shards" in run.data.tags
    assert "loss" in run.data.metrics
    assert run.data.params["model.n_layer"] == "2"
    assert run.data.params["runtime.cpu_bf16_kernels"] in ("native", "emulated")
    # The child's threads were chosen by the Compute resource, not left to OpenMP's defaults.
    cores = len(os.sched_getaffinity(0))
    assert run.data.params["runtime.threads"] == os.environ.get("OMP_NUM_THREADS", str(cores))
    assert run.data.params["runtime.omp_wait_policy"] == os.environ.get(
        "OMP_WAIT_POLICY", "PASSIVE"
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "plots"} <= artifacts
    versions = client.search_model_versions("name='scriptorium-pretrained'")
    assert versions


def test_pretrained_weights_alone_through_materialize(graph_run) -> None:
    """``materialize()`` of the one asset reuses the upstream files and reports metadata."""
    import dagster as dg

    from pipeline.assets.pretrain import pretrained_weights
    from pipeline.resources import resources_from_env

    data, home, env, _ = graph_run
    resources = resources_from_env(env)
    (home / "again").mkdir(exist_ok=True)  # instance_for_test writes its dagster.yaml there
    with dg.instance_for_test(temp_dir=str(home / "again")) as instance:
        result = dg.materialize(
            [pretrained_weights],
            resources=resources,
            instance=instance,
            run_config={"ops": {"pretrained_weights": {"config": {"steps": 6}}}},
        )
    assert result.success
    [event] = result.get_asset_materialization_events()
    meta = event.materialization.metadata
    assert meta["steps"].value == 6
    assert meta["params"].value > 0
    assert np.isfinite(meta["final_train_loss"].value)
    assert "mlflow_run" in meta and "samples" in meta
    assert meta["precision"].value == "float32"  # the tiny profile
