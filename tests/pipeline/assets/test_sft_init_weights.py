"""``sft_weights`` from an imported checkpoint (``SFTConfig.init_weights``): the way a user
fine-tunes an existing small model (here a GPT-2-variant model, as ``scriptorium import`` leaves
it) through the same SFT asset, and the alignment stages then use its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
import yaml

from llm_core.checkpoint import load_weights, save_weights
from llm_core.config import ModelConfig
from llm_core.model import Transformer
from pipeline.assets.sft import SFTConfig, chat_tokenizer, init_weights_dir, sft_weights
from pipeline.resources import Compute, MlflowTracking, Paths, Profile
from tests.llm_core.training_helpers import chat_tokenizer as train_chat_tokenizer

CONVERSATION = [
    {"role": "user", "content": "Tell me about the ship."},
    {"role": "assistant", "content": "The ship sails on the sea."},
]
PROFILE = {
    "name": "test-sft-init",
    "vocab_size": 300,
    "context_length": 64,
    "seed": 3,
    "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "ffn_hidden": 64},  # not the import's
    "sft_train": {
        "steps": 6,
        "batch_size": 2,
        "lr": 3.0e-3,
        "warmup_steps": 1,
        "eval_every": 6,
        "eval_batches": 2,
        "checkpoint_every": 6,
        "log_every": 2,
        "dtype": "float32",
    },
}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, dict[str, object]]:
    data, imported = tmp_path / "data", tmp_path / "imported"
    tok = train_chat_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(tok.get_vocab_size(), 64, n_layer=2, n_head=2, d_model=32, ffn_hidden=64,
                      arch="gpt2")  # fmt: skip
    save_weights(Transformer(cfg), imported)
    tok.save(str(imported / "tokenizer.json"))
    mix = pl.DataFrame({"messages": [CONVERSATION] * 8})
    (data / "sft_mixture").mkdir(parents=True)
    mix.write_parquet(data / "sft_mixture" / "train.parquet")
    mix.write_parquet(data / "sft_mixture" / "val.parquet")
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(PROFILE))
    resources = {
        "paths": Paths(data_root=str(data)),
        "profile": Profile(name=str(tmp_path / "profile.yaml")),
        "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"),
        "compute": Compute(device="cpu"),
        "pipes": dg.PipesSubprocessClient(),
    }
    return data, imported, resources


def test_sft_weights_starts_from_an_imported_checkpoint(setup, monkeypatch) -> None:
    from mlflow import MlflowClient

    data, imported, resources = setup
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = SFTConfig(init_weights=str(imported))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [sft_weights],
            resources=resources,
            instance=instance,
            run_config=dg.RunConfig({"sft_weights": config}),
        )
    assert result.success  # no pretrained_weights nor bpe_tokenizer exist in this data root
    tuned = load_weights(data / "sft_weights")
    assert (
        tuned.config.arch == "gpt2" and tuned.config.n_layer == 2
    )  # the import's, not the profile's
    metrics = json.loads((data / "sft_weights" / "metrics.json").read_text())
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    paths = resources["paths"]
    assert isinstance(paths, Paths)
    assert chat_tokenizer(paths) == data / "sft_weights" / "tokenizer.json"  # alignment uses it
    client = MlflowClient(tracking_uri=str(resources["mlflow"].tracking_uri))  # type: ignore[attr-defined]
    [run] = client.search_runs([client.get_experiment_by_name("scriptorium").experiment_id])
    assert run.data.params["model.arch"] == "gpt2" and run.data.params["model.n_layer"] == "2"


def test_init_weights_folder_must_be_complete(setup) -> None:
    data, imported, resources = setup
    (imported / "tokenizer.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"missing \['tokenizer.json'\].*scriptorium import"
    ):
        init_weights_dir(SFTConfig(init_weights=str(imported)), resources["paths"])  # type: ignore[arg-type]
