"""Alignment, evaluation and export end to end on the tiny profile, from the session's one
``dagster asset materialize --select '*'`` run (tests/e2e/tiny_graph.py).

The tiny models are too small for meaningful win rates or accuracies (their greedy replies are
mostly empty), so these tests check what the graph promises whatever the model's quality: every
artefact file, its schema and metadata, one MLflow run per stage tagged with the Dagster run and
asset, and that the export loads in ``transformers``. Quality targets are measured on the demo
profile (README, closing notes); the learning itself is tested in tests/llm_core.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from tests.e2e.tiny_graph import run_tiny_graph

pytestmark = [pytest.mark.mirror, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny(mirror_dir, tmp_path_factory):
    return run_tiny_graph(mirror_dir, tmp_path_factory)


def _latest_metadata(home: Path, key: dg.AssetKey) -> dict[str, object]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(key)
        assert event is not None and event.asset_materialization is not None
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _mlflow_run(data: Path, asset_key: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{data / 'mlflow.db'}")
    exp = client.get_experiment_by_name("scriptorium")
    runs = client.search_runs([exp.experiment_id], f"tags.`dagster.asset_key` = '{asset_key}'")
    assert len(runs) == 1, f"expected one MLflow run for {asset_key}, got {len(runs)}"
    assert runs[0].data.tags.get("dagster.run_id")
    return client, runs[0]


def test_preference_pairs(tiny) -> None:
    data, home, _, log = tiny
    out = data / "preference_pairs"
    train, val = pl.read_parquet(out / "train.parquet"), pl.read_parquet(out / "val.parquet")
    assert train.columns == ["pair_id", "source", "prompt", "chosen", "rejected"]
    assert train.height > 0 and val.height > 0
    assert (train["chosen"] != train["rejected"]).all()
    assert train["prompt"].list.last().struct.field("role").eq("user").all()
    rejects = pl.read_parquet(out / "rejects.parquet")
    assert "reason" in rejects.columns and rejects.height > 0
    # Every source is read from the mirror: hh-rlhf through the Hub API, rasbt by plain URL.
    sources = set(train["source"]) | set(rejects["source"])
    assert {"hh_rlhf_harmless", "dpo_en_zh", "rasbt_preference"} <= sources
    assert "preference_pairs_valid" in log


def test_reward_model(tiny) -> None:
    data, home, _, _ = tiny
    out = data / "reward_model"
    for name in ("model.safetensors", "config.json", "metrics.json"):
        assert (out / name).exists()
    assert json.loads((out / "config.json").read_text())["pooling"] in {"last", "mean", "max"}
    meta = _latest_metadata(home, dg.AssetKey("reward_model"))
    for key in ("val_accuracy", "val_margin", "val_ece"):
        assert math.isfinite(float(str(meta[key]))), key
    assert 0.0 <= float(str(meta["val_ece"])) <= 1.0
    client, run = _mlflow_run(data, "reward_model")
    assert "val_reward_accuracy" in run.data.metrics or "val_accuracy" in run.data.metrics
    assert client.search_model_versions("name='scriptorium-reward'")

    from llm_core.reward import load_reward_model, score_replies
    from llm_core.tokenizer import load_tokenizer

    rm = load_reward_model(out)
    tok = load_tokenizer(data / "bpe_tokenizer" / "tokenizer.json")
    prompt = [{"role": "user", "content": "Name a colour."}]
    scores = score_replies(rm, tok, [prompt, prompt], ["Blue.", "Blue."])
    assert scores.shape == (2,) and scores[0] == pytest.approx(scores[1])  # deterministic


def test_rlhf_weights_dpo(tiny) -> None:
    data, home, _, _ = tiny
    out = data / "rlhf_weights"
    for name in ("model.safetensors", "config.json", "metrics.json"):
        assert (out / name).exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "dpo"  # the profile's default
    meta = _latest_metadata(home, dg.AssetKey("rlhf_weights"))
    assert meta["method"] == "dpo"
    assert 0.0 <= float(str(meta["win_rate"])) <= 1.0  # over sft_weights, judged by reward_model
    assert str(meta["mlflow_run"]).startswith("http")
    client, run = _mlflow_run(data, "rlhf_weights")
    assert run.data.tags["scriptorium.stage"] == "dpo"
    assert client.search_model_versions("name='scriptorium-rlhf'")


def test_hf_export_loads_in_transformers(tiny) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, home, _, log = tiny
    out = data / "hf_export"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = enc["input_ids"]  # transformers 5 returns a BatchEncoding
    assert len(ids) > 2 and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert model.config.vocab_size == len(tok)
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "Project Gutenberg" in card
    meta = _latest_metadata(home, dg.AssetKey("hf_export"))
    assert meta["source_stage"] == "rlhf_weights"  # the aligned model, not the SFT fallback
    assert "loads_in_transformers" in log
