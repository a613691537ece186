"""The file layout under the data root, and each stage's inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_core.stages import STAGES, stage_module
from pipeline.artefacts import STAGE_ASSETS, Artefacts, data_root


def test_data_root_reads_the_documented_variable(tmp_path: Path) -> None:
    assert data_root({"SCRIPTORIUM_DATA": str(tmp_path)}) == tmp_path.resolve()
    assert data_root({}) == Path("data").resolve()


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")


def test_stage_inputs_name_the_missing_asset_then_fit_each_stage_config(tmp_path: Path) -> None:
    art = Artefacts(tmp_path)
    with pytest.raises(FileNotFoundError, match="materialise the `token_shards` asset"):
        art.stage_inputs("pretrain")
    for key, name in [
        ("token_shards", "manifest.json"),
        ("bpe_tokenizer", "tokenizer.json"),
        ("sft_mixture", "train.parquet"),
        ("sft_mixture", "val.parquet"),
        ("pretrained_weights", "model.safetensors"),
        ("preference_pairs", "train.parquet"),
        ("preference_pairs", "val.parquet"),
        ("sft_weights", "model.safetensors"),
        ("reward_model", "model.safetensors"),
        ("sms_spam", "labels.json"),
        ("language_paragraphs", "labels.json"),
    ]:
        _touch(tmp_path / key / name)
    assert art.chat_tokenizer() == tmp_path / "bpe_tokenizer" / "tokenizer.json"
    _touch(tmp_path / "sft_weights" / "tokenizer.json")
    assert art.chat_tokenizer() == tmp_path / "sft_weights" / "tokenizer.json"
    for stage in STAGES:
        inputs = art.stage_inputs(stage)
        assert set(inputs) == set(stage_module(stage).Config.INPUTS), stage
        assert all(p.exists() for p in inputs.values())
        assert art.stage_out(stage) == tmp_path / STAGE_ASSETS[stage]
    imported = tmp_path / "imported"
    assert (
        art.stage_inputs("sft", init_weights=imported)["tokenizer"] == imported / "tokenizer.json"
    )
