"""Classification end to end on the tiny profile, from the session's one whole-graph run
(tests/e2e/tiny_graph.py): the SMS data from the files mirror (duplicates in rejects.parquet),
the paragraph-language data from the Gutenberg mirror, the spam classifier (registered as
``scriptorium-spam``, confusion matrices in MLflow and the Dagster metadata), the multi-task
classifier, ``scriptorium classify`` and the ``LlamaForSequenceClassification`` export.

The tiny model is too small for meaningful accuracy; the demo profile's figures are in the
README. What is checked here holds whatever the model learnt.
"""

from __future__ import annotations

import json
import subprocess
import sys

import dagster as dg
import polars as pl
import pytest

from tests.e2e.tiny_graph import GraphRun, latest_metadata

pytestmark = [pytest.mark.mirror, pytest.mark.slow]


def _mlflow_run(graph_run: GraphRun, asset_key: str):
    client = graph_run.mlflow_client()
    exp = client.get_experiment_by_name("scriptorium")
    runs = client.search_runs([exp.experiment_id], f"tags.`dagster.asset_key` = '{asset_key}'")
    assert len(runs) == 1, f"expected one MLflow run for {asset_key}, got {len(runs)}"
    return client, runs[0]


def test_sms_spam_from_the_files_mirror(graph_run: GraphRun) -> None:
    out = graph_run.data / "sms_spam"
    rejects = pl.read_parquet(out / "rejects.parquet")
    # The real collection: 5,574 lines, 414 exact repeats, no malformed line.
    assert rejects["reason"].value_counts().rows() == [("duplicate", 414)]
    info = json.loads((out / "labels.json").read_text())
    assert info["counts"]["balanced"]["test"] == {"ham": 128, "spam": 128}
    meta = latest_metadata(graph_run, dg.AssetKey("sms_spam"))
    assert meta["messages"] == 5160 and meta["rejected"] == 414


def test_spam_classifier(graph_run: GraphRun) -> None:
    out = graph_run.data / "spam_classifier"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json",
                 "confusion_spam_balanced.png", "confusion_spam_natural.png"):  # fmt: skip
        assert (out / name).is_file(), name
    meta = latest_metadata(graph_run, dg.AssetKey("spam_classifier"))
    for key in ("spam_balanced_test_accuracy", "spam_natural_test_f1_spam"):
        assert 0.0 <= float(str(meta[key])) <= 1.0, key
    assert "| spam |" in str(meta["spam_natural_test_table"])
    assert str(meta["confusion_spam_natural"]).startswith("![confusion_spam_natural](data:image")
    assert meta["registered_model"] == "scriptorium-spam v1"
    client, run = _mlflow_run(graph_run, "spam_classifier")
    assert "spam_balanced_test_accuracy" in run.data.metrics
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/confusion_spam_balanced.png" in files

    cli = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "classify", "--weights", str(out),
         "WINNER! Claim your prize", "see you at lunch"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = cli.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("spam: ") for line in lines)


def test_spam_classifier_exports_to_transformers(graph_run: GraphRun, tmp_path) -> None:
    from llm_core.classify import load_classifier
    from llm_core.classify_export import (
        compare_classifier_with_transformers,
        export_classifier_hf,
    )
    from llm_core.tokenizer import load_tokenizer

    out = graph_run.data / "spam_classifier"
    hf = export_classifier_hf(out, out / "tokenizer.json", tmp_path / "hf")
    tok = load_tokenizer(out / "tokenizer.json")
    texts = ["Free entry now", "ok thanks, see you at 6"]
    diff = compare_classifier_with_transformers(hf, load_classifier(out), tok, texts)
    assert diff < 1e-4


def test_text_classifier_has_both_heads(graph_run: GraphRun) -> None:
    paragraphs = json.loads((graph_run.data / "language_paragraphs" / "labels.json").read_text())
    assert paragraphs["labels"] == ["de", "en", "fr", "zh"]
    config = json.loads((graph_run.data / "text_classifier" / "config.json").read_text())
    assert config["tasks"] == {"spam": ["ham", "spam"], "language": ["de", "en", "fr", "zh"]}
    meta = latest_metadata(graph_run, dg.AssetKey("text_classifier"))
    assert 0.0 <= float(str(meta["language_by_book_test_accuracy"])) <= 1.0
    assert 0.0 <= float(str(meta["spam_balanced_test_accuracy"])) <= 1.0
    _, run = _mlflow_run(graph_run, "text_classifier")
    assert "language_by_book_test_accuracy" in run.data.metrics
