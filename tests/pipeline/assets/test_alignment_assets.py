"""``reward_model``, ``rlhf_weights`` (DPO, then GRPO) and ``rlhf/weighted`` through ``dg.materialize``: real Pipes
subprocesses, a real MLflow SQLite store under tmp_path, on a tiny random "SFT model", a tiny BPE
and a small pairs file in the ``preference_pairs`` layout that the tests write themselves."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from llm_core.stages import reward
from pipeline.assets.alignment import (
    RLHFConfig,
    profile_methods,
    reward_model,
    rlhf_method,
    rlhf_method_asset,
    rlhf_weights,
)
from pipeline.resources import Compute, MlflowTracking, Paths, Profile
from pipeline.text.preferences import PAIRS_SCHEMA, pair_id
from tests.llm_core.training_helpers import chat_tokenizer, marker_pairs, save_tiny_lm

TRAIN = {
    "batch_size": 8,
    "lr": 3.0e-3,
    "warmup_steps": 2,
    "weight_decay": 0.0,
    "eval_every": 10,
    "eval_batches": 4,
    "checkpoint_every": 10,
    "log_every": 5,
    "dtype": "float32",
}
PROFILE = {
    "name": "test-alignment",
    "vocab_size": 300,
    "context_length": 64,
    "seed": 5,
    "model": {"n_layer": 2, "n_head": 2, "n_kv_head": 1, "d_model": 32, "ffn_hidden": 64},
    "reward_train": {**TRAIN, "steps": 30, "pooling": "last", "lm_loss_weight": 0.1},
    "rlhf": {
        **TRAIN,
        "steps": 10,
        "method": "dpo",
        "beta": 0.1,
        "win_rate_prompts": 6,
        "max_new_tokens": 8,
        "grpo": {
            "steps": 4,
            "group_size": 4,
            "prompts_per_step": 2,
            "max_new_tokens": 6,
            "eval_prompts": 4,
        },
        "weighted": {
            "steps": 3,
            "samples": 1,
            "prompts": 12,
            "val_prompts": 4,
            "max_new_tokens": 6,
            "weighting": "advantage",
        },  # fmt: skip
    },
}


def _pairs_file(path: Path, n: int, seed: int) -> None:
    rows = marker_pairs(n, seed)
    for r in rows:
        r["source"] = "marker"
        r["pair_id"] = pair_id("marker", r["prompt"], r["chosen"], r["rejected"])
    frame = pl.DataFrame(rows, schema=PAIRS_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)


class RecordingPipes(dg.PipesSubprocessClient):
    """The real client, remembering what each launch carried: the ``pipes`` resource is what
    tests swap to see (or change) how a stage is launched."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[dict] = []

    def run(self, *, context, extras=None, **kwargs):  # noqa: ANN001, ANN202
        self.launches.append({"extras": extras, "command": kwargs.get("command")})
        return super().run(context=context, extras=extras, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """Upstream artefacts as their assets would leave them, and the resources."""
    root = tmp_path_factory.mktemp("alignment")
    data = root / "data"
    tok = chat_tokenizer()
    (data / "bpe_tokenizer").mkdir(parents=True)
    tok.save(str(data / "bpe_tokenizer" / "tokenizer.json"))
    save_tiny_lm(data / "sft_weights", tok.get_vocab_size())
    _pairs_file(data / "preference_pairs" / "train.parquet", 160, seed=1)
    _pairs_file(data / "preference_pairs" / "val.parquet", 24, seed=2)
    (root / "profile.yaml").write_text(yaml.safe_dump(PROFILE))
    resources = {
        "paths": Paths(data_root=str(data)),
        "profile": Profile(name=str(root / "profile.yaml")),
        "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"),
        "compute": Compute(device="cpu"),
        "pipes": RecordingPipes(),
    }
    return root, resources


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict[str, object]:
    [mat] = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey.from_user_string(key)
    ]
    return {k: v.value for k, v in mat.materialization.metadata.items()}


def test_rlhf_method_is_checked() -> None:
    profile = Profile(name="tiny")
    assert rlhf_method(RLHFConfig(), profile) == "dpo"
    assert rlhf_method(RLHFConfig(method="grpo"), profile) == "grpo"
    with pytest.raises(ValueError, match="'ppo' is not one of"):
        rlhf_method(RLHFConfig(method="ppo"), profile)


def test_profile_methods_leave_out_the_main_one_and_are_checked() -> None:
    rlhf = {"method": "dpo", "methods": ["rrhf", "dpo", "weighted", "rrhf"]}
    assert profile_methods({"rlhf": rlhf}) == ["rrhf", "weighted"]
    assert profile_methods({"rlhf": {"method": "dpo"}}) == [] == profile_methods({})
    with pytest.raises(ValueError, match=r"rlhf.methods: unknown method\(s\) \['ppo'\]"):
        profile_methods({"rlhf": {"methods": ["ppo"]}})


def test_an_empty_train_split_is_refused_by_name(tmp_path: Path) -> None:
    from llm_core.stages.alignment import read_preferences as _preferences

    _pairs_file(tmp_path / "train.parquet", 0, seed=1)
    _pairs_file(tmp_path / "val.parquet", 0, seed=1)
    with pytest.raises(ValueError, match=r"train\.parquet: no preference pairs"):
        _preferences(tmp_path / "train.parquet")
    assert len(_preferences(tmp_path / "val.parquet")) == 0  # validation off, not an error


def test_reward_model_then_dpo_then_grpo(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    root, resources = setup
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the Pipes children: tiny shapes, shared cores
    data = root / "data"
    with dg.instance_for_test() as instance:
        first = dg.materialize([reward_model, rlhf_weights], resources=resources, instance=instance)
        assert first.success
        launches = resources["pipes"].launches
        assert [x["extras"]["stage"] for x in launches] == ["reward", "dpo"]
        assert all(x["command"][-2:] == ["-m", "pipeline.child"] for x in launches)
        typed = reward.Config.from_dict(launches[0]["extras"]["config"])  # the typed config
        assert typed.pooling == "last" and typed.train.steps == PROFILE["reward_train"]["steps"]
        assert launches[0]["extras"]["tracking"]["registered_model"] == "scriptorium-reward"
        rm = _metadata(first, "reward_model")
        assert rm["val_accuracy"] >= 0.75 and rm["val_pairs"] == 24 and rm["pooling"] == "last"
        assert 0 <= rm["val_ece"] <= 1 and rm["val_margin"] > 0
        assert rm["registered_model"] == "scriptorium-reward v1"
        assert str(rm["mlflow_run"]).startswith("http") and "chosen" in str(rm["val_pair_rewards"])
        cfg = json.loads((data / "reward_model" / "config.json").read_text())
        assert cfg["pooling"] == "last" and cfg["d_model"] == 32

        dpo = _metadata(first, "rlhf_weights")
        assert dpo["method"] == "dpo" and dpo["registered_model"] == "scriptorium-rlhf v1"
        assert 0.0 <= dpo["win_rate"] <= 1.0 and dpo["win_rate_counts"]["n"] == 6
        assert dpo["val_reward_accuracy"] is not None and dpo["beta"] == 0.1
        metrics = json.loads((data / "rlhf_weights" / "metrics.json").read_text())
        assert metrics["method"] == "dpo" and metrics["win_rate"]["n"] == 6

        second = dg.materialize(
            [rlhf_weights],
            resources=resources,
            instance=instance,
            run_config=dg.RunConfig({"rlhf_weights": RLHFConfig(method="grpo")}),
        )
        assert second.success
        grpo = _metadata(second, "rlhf_weights")
        assert grpo["method"] == "grpo" and grpo["steps"] == 4 and grpo["tokens_seen"] > 0
        assert grpo["reward_first"] is not None and grpo["kl_last"] >= 0
        assert grpo["registered_model"] == "scriptorium-rlhf v2"
        assert json.loads((data / "rlhf_weights" / "metrics.json").read_text())["method"] == "grpo"

        # A method kept side by side: its own asset, folder and registered model.
        third = dg.materialize(
            [rlhf_method_asset("weighted")], resources=resources, instance=instance
        )
        assert third.success
        weighted = _metadata(third, "rlhf/weighted")
        assert weighted["method"] == "weighted" and weighted["weighting"] == "advantage"
        assert weighted["registered_model"] == "scriptorium-rlhf-weighted v1"
        assert weighted["win_rate_counts"]["n"] == 6 and weighted["ranked_groups"] > 0
        assert (data / "rlhf" / "weighted" / "ranked" / "train.parquet").is_file()
        assert json.loads((data / "rlhf" / "weighted" / "metrics.json").read_text())["steps"] == 3
        assert json.loads((data / "rlhf_weights" / "metrics.json").read_text())["method"] == "grpo"
        assert "reliability diagram" in str(rm["reliability_diagram"])

    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    exp = client.get_experiment_by_name("scriptorium")
    runs = {
        r.data.tags["scriptorium.stage"]: r
        for r in client.search_runs([exp.experiment_id], "tags.`dagster.asset_key` != ''")
    }
    assert set(runs) == {"reward", "dpo", "grpo", "weighted"}  # each method is its own run
    assert runs["weighted"].data.tags["dagster.asset_key"] == "rlhf/weighted"
    artifacts = [a.path for a in client.list_artifacts(runs["reward"].info.run_id, "evaluation")]
    assert artifacts == ["evaluation/reliability.png"]
    assert runs["reward"].data.tags["dagster.asset_key"] == "reward_model"
    assert runs["dpo"].data.tags["dagster.run_id"] == first.run_id
    assert runs["grpo"].data.tags["dagster.run_id"] == second.run_id
    assert "upstream.reward_model" in runs["grpo"].data.tags
    assert {"val_reward_accuracy", "val_ece", "loss"} <= set(runs["reward"].data.metrics)
    assert {"win_rate", "reward_margin", "logps_chosen"} <= set(runs["dpo"].data.metrics)
    assert {"win_rate", "reward_mean", "kl", "reply_len"} <= set(runs["grpo"].data.metrics)
    assert runs["grpo"].data.params["stage"] == "grpo"
    assert runs["grpo"].data.params["rlhf.grpo.group_size"] == "4"  # typed, from rlhf.grpo
    assert runs["grpo"].data.params["rlhf.steps"] == "4"
    assert runs["reward"].data.params["reward_train.pooling"] == "last"
    for name in ("scriptorium-reward", "scriptorium-rlhf"):
        assert client.search_model_versions(f"name='{name}'")
