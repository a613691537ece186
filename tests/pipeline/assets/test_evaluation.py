"""``evaluation_report`` through Dagster (real Pipes child, real MLflow SQLite store): first with
only the base model present, then with every stage, compared with the first run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
import yaml

from llm_core.checkpoint import save_weights
from llm_core.model import Transformer
from llm_core.reward import RewardModel, save_reward_model
from llm_core.tokenizer import EOT, train_bpe
from llm_core.tracking import MlflowTracker
from pipeline.assets.evaluation import evaluation_report
from pipeline.eval.checks import CHECKS, FINITE, NO_REGRESSION, RLHF_WINS, SFT_BELOW_BASE
from pipeline.resources import Compute, MlflowTracking, Paths, Profile
from tests.llm_core.training_helpers import make_shards, tiny_model_config
from tests.pipeline.eval.eval_fixtures import ALPACA, write_eval_sets
from tests.pipeline.eval.test_report import assert_valid_html

TEXTS = [
    "The old man walked down to the sea and looked at the boat.",
    "She opened the door of the little house and saw the garden.",
    "Tom has 3 apples and buys 5 more. How many apples does he have? The answer is 8.",
    "What is the biggest animal in the world? The blue whale is the biggest animal.",
] * 3
CONTEXT = 48
PROFILE = {
    "name": "evaltest",
    "vocab_size": 320,
    "context_length": CONTEXT,
    "seed": 7,
    "pretrain": {"batch_size": 2, "eval_batches": 2},
    "sft_train": {"batch_size": 2, "eval_batches": 1},
    "evaluation": {
        "items": {
            "blimp": 2,
            "lambada": 3,
            "gsm8k_test": 2,
            "alpaca_eval": 3,
            "mmlu": 2,
            "humaneval": 2,
        },
        "mmlu_shots": 1,
        "humaneval": {"execute": True, "max_new_tokens": 8, "timeout_s": 5.0},
        "batch_size": 4,
        "max_new_tokens": 4,
        "gsm8k_max_new_tokens": 6,
        "temperature": 0.7,
        "top_k": 20,
        "regression_tolerance": 0.02,
    },
}


def _transformer(vocab: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_model_config(vocab, CONTEXT))


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Any]:
    """Tokenizer, shards, base weights and eval sets: what ``evaluation_report`` needs."""
    root = tmp_path / "data"
    tok = train_bpe(TEXTS + ALPACA, vocab_size=PROFILE["vocab_size"], min_frequency=1)
    (root / "bpe_tokenizer").mkdir(parents=True)
    tok.save(str(root / "bpe_tokenizer" / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    make_shards(root / "token_shards", train_tokens=400, val_tokens=300, vocab=vocab)
    save_weights(_transformer(vocab, 0), root / "pretrained_weights")
    write_eval_sets(root)
    profile = tmp_path / "evaltest.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    assert tok.token_to_id(EOT) == 0
    return {
        "root": root,
        "vocab": vocab,
        "profile": profile,
        "mlflow": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


def _add_later_stages(root: Path, vocab: int, mlflow_uri: str) -> None:
    """SFT/RLHF weights, a reward model, SFT validation chats and an SFT training run."""
    save_weights(_transformer(vocab, 1), root / "sft_weights")
    save_weights(_transformer(vocab, 2), root / "rlhf_weights")
    save_reward_model(RewardModel(_transformer(vocab, 3)), root / "reward_model")
    (root / "reward_model" / "metrics.json").write_text(json.dumps({"val_accuracy": 0.5}))
    convs = [
        [{"role": "user", "content": t[:30]}, {"role": "assistant", "content": t[30:]}]
        for t in TEXTS[:4]
    ]
    (root / "sft_mixture").mkdir()
    pl.DataFrame({"messages": convs}).write_parquet(root / "sft_mixture" / "val.parquet")
    tracker = MlflowTracker(mlflow_uri, "scriptorium")
    with tracker.start_run("sft-fake", {"scriptorium.stage": "sft"}) as run:
        for step, loss in enumerate([5.0, 4.0, 3.5], start=1):
            tracker.log_metrics({"loss": loss}, step)
        tracker.log_metrics({"val_loss": 3.9}, 3)
        tracker.client.log_text(run.info.run_id, "w", "model/model.safetensors")
        tracker.register_model("scriptorium-sft", run.info.run_id)


def _materialize(data: dict[str, Any]) -> tuple[dg.ExecuteInProcessResult, dict[str, Any]]:
    resources = {
        "paths": Paths(data_root=str(data["root"])),
        "profile": Profile(name=str(data["profile"])),
        "mlflow": MlflowTracking(tracking_uri=data["mlflow"]),
        "compute": Compute(device="cpu"),
        "pipes": dg.PipesSubprocessClient(),
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize([evaluation_report], resources=resources, instance=instance)
    report = json.loads((data["root"] / "evaluation_report" / "report.json").read_text())
    return result, report


def test_evaluation_report_with_base_only_then_every_stage(data: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    # --- only pretrained_weights (plus tokenizer, shards, eval sets) ---------------------------
    result, report = _materialize(data)
    assert result.success
    [mat] = result.get_asset_materialization_events()
    meta = mat.materialization.metadata
    assert set(report["stages"]["sft"]) == {"absent"} and set(report["stages"]["rlhf"]) == {
        "absent"
    }
    base = report["stages"]["base"]
    assert base["blimp"]["n"] == 4 and base["blimp"]["chance"] == 0.5  # 2 per phenomenon
    assert base["lambada"]["n"] == 3 and "absent" in base["gsm8k"]  # chat stages only
    assert "absent" in base["sft_val"]  # no sft_mixture yet
    # MMLU (2 questions of each of 2 subjects) at 0 and 1 shots; HumanEval run in the sandbox
    assert base["mmlu_0shot"]["n"] == 4 and base["mmlu_0shot"]["chance"] == 0.25
    assert base["mmlu_kshot"]["shots"] == 1 and base["mmlu_kshot"]["subjects"] == 2
    assert base["humaneval"]["n"] == 2 and sum(base["humaneval"]["outcomes"].values()) == 2
    assert base["humaneval"]["sandbox"]["timeout_s"] == 5.0
    assert meta["base_mmlu_0shot_accuracy"].value == pytest.approx(
        base["mmlu_0shot"]["macro_accuracy"]
    )
    assert meta["base_humaneval_pass_at_1"].value == base["humaneval"]["pass@1"]
    assert meta["base_bpb"].value == pytest.approx(base["heldout"]["bpb"])
    assert meta["base_blimp_accuracy"].value == pytest.approx(base["blimp"]["accuracy"])
    assert "sft_bpb" not in meta
    assert [s["prompt"] for s in base["generations"]["samples"]][0] == (
        "What is the biggest animal in the world?"
    )
    assert base["generations"]["settings"]["temperature"] == 0.7
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert set(checks) == set(CHECKS) and all(c.passed for c in checks.values())
    assert checks[SFT_BELOW_BASE].metadata["skipped"].value
    assert "absent" in report["comparison"]  # no previous evaluation
    rejects = pl.read_parquet(data["root"] / "evaluation_report" / "rejects.parquet")
    assert set(rejects["eval_set"]) == {
        "blimp",
        "lambada",
        "gsm8k_test",
        "alpaca_eval",
        "mmlu",
        "humaneval",
    }
    assert report["trend"]["runs"] == []  # no earlier evaluation in MLflow
    first_run = meta["mlflow_run_id"].value

    # --- every stage present ------------------------------------------------------------------
    _add_later_stages(data["root"], data["vocab"], data["mlflow"])
    result, report = _materialize(data)
    assert result.success
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    for stage in ("base", "sft", "rlhf"):
        assert "absent" not in report["stages"][stage], stage
        assert np.isfinite(report["stages"][stage]["sft_val"]["loss"])
    assert report["stages"]["sft"]["gsm8k"]["n"] == 2
    for pair in ("sft_vs_base", "rlhf_vs_sft"):
        judged = report["win_rates"][pair]["reward_model"]
        assert judged["n"] == 3 and judged["order_agreement"] == 1.0
        assert meta[f"{pair}_win_rate"].value == pytest.approx(judged["win_rate"])
    assert report["reward_model"]["metrics"] == {"val_accuracy": 0.5}
    # Loss curves come from the registered model's MLflow run.
    assert report["loss_curves"]["sft"]["loss"] == [[1, 5.0], [2, 4.0], [3, 3.5]]
    assert "absent" in report["loss_curves"]["rlhf"]
    # Compared with the first run: the base model's figures did not move.
    comp = report["comparison"]
    assert comp["previous_run_id"] == first_run
    assert [r["run_id"] for r in report["trend"]["runs"]] == [first_run]  # the trend's points
    assert report["stages"]["sft"]["mmlu_0shot"]["template"] == "chat"
    md = (data["root"] / "evaluation_report" / "report.md").read_text()
    assert "### Scorecard" in md and "| MMLU 0-shot (macro) ↑ | 25% |" in md
    assert comp["figures"]["base_bpb"]["change"] == 0.0 and comp["regressions"] == []
    assert "sft_bpb" in comp["new"]
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks[RLHF_WINS].metadata["skipped"].value
    assert checks[RLHF_WINS].passed == (
        report["win_rates"]["rlhf_vs_sft"]["reward_model"]["win_rate"] >= 0.5
    )
    assert checks[FINITE].passed and checks[NO_REGRESSION].passed
    assert_valid_html((data["root"] / "evaluation_report" / "report.html").read_text())
    # The evaluation's own MLflow run: tagged, with the headline metrics and the report files.
    tracker = MlflowTracker(data["mlflow"], "scriptorium")
    run = tracker.get_run(meta["mlflow_run_id"].value)
    assert run.data.tags["scriptorium.stage"] == "evaluation"
    assert run.data.tags["dagster.asset_key"] == "evaluation_report"
    assert run.data.metrics["rlhf_bpb"] == pytest.approx(report["stages"]["rlhf"]["heldout"]["bpb"])
    logged = {f.path for f in tracker.client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.json", "report/report.md", "report/report.html"} <= logged


@pytest.mark.mirror
def test_eval_sets_keeps_whole_files_for_the_benchmarks(
    mirror_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``eval_sets`` against the mirror's Hub API and files: every benchmark loads from what it
    keeps under ``eval_sets/<id>/files/``, with the real record counts."""
    from pipeline.assets.sft import eval_sets
    from pipeline.eval.run import EvalSettings, load_sets
    from pipeline.eval.settings import HumanEvalSettings
    from pipeline.resources import HubSource
    from pipeline.sources.mirror import MirrorServer

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SCRIPTORIUM_FILES_MIRROR", raising=False)
    root = tmp_path / "data"
    with MirrorServer(mirror_dir) as server, dg.instance_for_test() as instance:
        hub = HubSource(endpoint=server.url, files_mirror=f"{server.url}/files")
        result = dg.materialize(
            [eval_sets],
            resources={
                "paths": Paths(data_root=str(root)),
                "hub": hub,
                "profile": Profile(name="tiny"),  # every set of configs/eval_sets.yaml
            },
            instance=instance,
        )
    assert result.success
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert (
        "anaphor_gender_agreement/train-00000-of-00001.parquet"
        in meta["sets"].value["blimp"]["files"]
    )
    settings = EvalSettings(
        items={
            "blimp": 1000,
            "lambada": 10,
            "gsm8k_test": 10,
            "alpaca_eval": 10,
            "mmlu": 1,
            "humaneval": 10,
        },
        humaneval=HumanEvalSettings(execute=True),
    )
    sets, rejects = load_sets(root / "eval_sets", settings)
    assert {k: v.available for k, v in sets.items()} == {
        "blimp": 6000,
        "lambada": 5153,
        "gsm8k_test": 1319,
        "alpaca_eval": 805,
        "mmlu": 12508,  # 56 subjects, professional_law not mirrored
        "humaneval": 164,
    }
    assert sets["mmlu"].items.height == 56  # one question per subject
    assert sets["blimp"].items.height == 6000 and rejects.height == 0
