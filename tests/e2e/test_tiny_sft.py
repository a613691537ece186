"""SFT end to end on the tiny profile, from the session's one ``dagster asset materialize`` run.

The CLI run (tests/e2e/tiny_graph.py, on the deployment's stores) builds every ``sft_sources/<id>`` against the mirror's Hub
API and files, ``eval_sets``, ``sft_mixture`` and ``sft_weights`` after pretraining; these tests
read what it left (files, Dagster event log, MLflow) and chat with the result through
``scriptorium chat``. (Exact resume of SFT is covered in tests/llm_core/test_sft.py; re-running
the step here would cost ~20 s for little more.)
"""

from __future__ import annotations

import io
import json

import dagster as dg
import polars as pl
import pytest

from pipeline.assets.sft import SFT_SOURCES
from tests.e2e.tiny_graph import assert_checks_passed, latest_metadata

pytestmark = [pytest.mark.mirror, pytest.mark.slow]


def test_sources_and_mixture(graph_run) -> None:
    data, _, _, _ = graph_run
    for source in SFT_SOURCES:
        rows = pl.read_parquet(data / "sft_sources" / source.id / "rows.parquet")
        assert rows.height > 0 and rows["source"].unique().to_list() == [source.id]
        assert (data / "sft_sources" / source.id / "rejects.parquet").exists()
    assert_checks_passed(
        graph_run, *(f"sft_sources/{source.id}:rows_valid" for source in SFT_SOURCES)
    )
    mix = data / "sft_mixture"
    train, val = pl.read_parquet(mix / "train.parquet"), pl.read_parquet(mix / "val.parquet")
    stats = json.loads((mix / "stats.json").read_text())
    assert stats["totals"]["train"] == train.height > 0 and val.height > 0
    assert pl.read_parquet(mix / "rejects.parquet").columns == ["source", "source_id", "reason"]
    # gsm-hard is GSM8K's test set with new numbers, and self_instruct's human_eval set is part of
    # AlpacaEval: decontamination removes both whole.
    # (A row may be counted against another set it also overlaps, e.g. one MMLU question.)
    gsm_hard = stats["sources"]["gsm_hard"]["rejected"]
    assert sum(gsm_hard.values()) == 1319 and gsm_hard["contaminated:gsm8k_test"] >= 1300
    assert all(reason.startswith("contaminated:") for reason in gsm_hard)
    assert stats["sources"]["self_instruct"]["rejected"] == {"contaminated:alpaca_eval": 252}
    assert max(s["train_unique"] + s["val"] for s in stats["sources"].values()) <= 200  # tiny cap
    meta = latest_metadata(graph_run, dg.AssetKey("sft_mixture"))
    assert meta["train_rows"] == train.height and "per_source" in meta
    assert_checks_passed(
        graph_run, "sft_mixture:sft_mixture_clean", "sft_mixture:sft_mixture_trainable"
    )


def test_sft_weights_end_to_end(graph_run) -> None:
    data, _, _, _ = graph_run
    out = data / "sft_weights"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["packing"] is True
    assert metrics["val_loss_after"] < metrics["val_loss_before"]  # SFT helped on replies
    assert_checks_passed(graph_run, "sft_weights:sft_beats_pretrained")  # not blocking
    meta = latest_metadata(graph_run, dg.AssetKey("sft_weights"))
    assert meta["val_loss_pretrained"] == pytest.approx(metrics["val_loss_before"])
    assert meta["final_val_loss"] == pytest.approx(metrics["val_loss_after"])
    assert "What is the capital of France?" in str(meta["answers"])
    assert str(meta["mlflow_run"]).startswith("http")
    assert float(str(meta["wall_time_s"])) < 60, "tiny SFT should take well under a minute"
    client = graph_run.mlflow_client()
    exp = client.get_experiment_by_name("scriptorium")
    [run] = client.search_runs([exp.experiment_id], "tags.`dagster.asset_key` = 'sft_weights'")
    assert {"upstream.sft_mixture", "upstream.pretrained_weights"} <= set(run.data.tags)
    assert run.data.params["sft_train.steps"] == "30" and "val_loss" in run.data.metrics
    assert client.search_model_versions("name='scriptorium-sft'")


def test_chat_cli_multi_turn(graph_run, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from llm_core.sft import encode_prompt
    from llm_core.tokenizer import load_tokenizer
    from pipeline.cli import _fit_history, main

    weights = graph_run.data / "sft_weights"
    turns = "Hello!\nWhat is two plus two?\n/reset\nWrite a poem.\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    args = ["chat", "--weights", str(weights), "--temperature", "0", "--max-new-tokens", "12"]
    assert main([*args, "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 3  # one streamed reply per user turn, then /exit
    # Multi-turn context: the oldest exchange goes first when the window is full, the system
    # message and the newest question stay.
    tok = load_tokenizer(weights / "tokenizer.json")
    system = {"role": "system", "content": "Be brief."}
    history = [system]
    for i in range(6):
        history += [
            {"role": "user", "content": f"Question {i} about the sea?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    history.append({"role": "user", "content": "Last question?"})
    ids = _fit_history(tok, history, budget=48)
    system_ids = encode_prompt(tok, [system])[:-1]  # without the trailing <|assistant|>
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(ids) <= 48 and ids[: len(system_ids)] == system_ids
    assert "Last question?" in text and "Question 0" not in text and "Answer 5." in text
