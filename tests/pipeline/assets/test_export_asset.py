"""``hf_export`` through real ``dg.materialize``: source stage fallback, files and hashes, the
``loads_in_transformers`` check, the model card from the data root; and the card's data helpers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch

from llm_core.checkpoint import save_weights
from llm_core.config import ModelConfig
from llm_core.interop import import_hf
from llm_core.model import Transformer
from llm_core.tokenizer import train_bpe
from pipeline.assets.export import hf_export, verify_export
from pipeline.io import sha256_file
from pipeline.model_card import card_info, data_sources, eval_figures, with_mixture_counts
from pipeline.resources import Paths, Profile

VOCAB = 320


def _save_model(folder: Path, seed: int, metrics: dict[str, object]) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, context_length=64, n_layer=1, n_head=2, d_model=32,
                      ffn_hidden=64)  # fmt: skip
    model = Transformer(cfg)
    save_weights(model, folder)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return model


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data root holding what hf_export reads: tokenizer, sft weights, an evaluation report."""
    root = tmp_path / "data"
    tok = train_bpe(["What is the capital of France? Paris is. The sea and the ship.\n" * 30],
                    vocab_size=VOCAB)  # fmt: skip
    (root / "bpe_tokenizer").mkdir(parents=True)
    tok.save(str(root / "bpe_tokenizer" / "tokenizer.json"))
    _save_model(root / "sft_weights", 0, {"steps": 30})
    (root / "pretrained_weights").mkdir()
    (root / "pretrained_weights" / "metrics.json").write_text(json.dumps({"steps": 40}))
    (root / "evaluation_report").mkdir()
    report = {"headline": {"val_bpb": 2.25, "win_rate_vs_sft": 0.6}, "details": {"n": 3}}
    (root / "evaluation_report" / "report.json").write_text(json.dumps(report))
    return root


def _materialize(root: Path) -> dg.ExecuteInProcessResult:
    resources = {"paths": Paths(data_root=str(root)), "profile": Profile(name="tiny")}
    with dg.instance_for_test() as instance:
        return dg.materialize([hf_export], resources=resources, instance=instance,
                              raise_on_error=False)  # fmt: skip


def test_exports_sft_weights_then_prefers_rlhf(data: Path) -> None:
    result = _materialize(data)
    assert result.success
    [mat] = result.get_asset_materialization_events()
    meta = mat.materialization.metadata
    out = data / "hf_export"
    assert meta["source_stage"].value == "sft_weights"
    assert meta["tokenizer"].value == str(data / "bpe_tokenizer" / "tokenizer.json")
    listing = meta["file_hashes"].value
    assert set(listing) == {p.name for p in out.iterdir()}
    assert all(sha256_file(out / n) == v["sha256"] for n, v in listing.items())
    assert meta["eval_figures"].value == {"val_bpb": 2.25, "win_rate_vs_sft": 0.6}
    card = (out / "README.md").read_text()
    assert "| win_rate_vs_sft | 0.6 |" in card and "public domain in the USA" in card
    assert "1. **sft**" in card and "rlhf" not in card
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "loads_in_transformers"
    if importlib.util.find_spec("transformers") is not None:
        assert check.passed, check.metadata
        assert check.metadata["max_abs_logit_diff"].value <= 1e-4
        assert check.metadata["chat_template_ids_match"].value is True

    # Once the alignment stage has written its weights, those are the ones exported.
    rlhf = _save_model(data / "rlhf_weights", 1, {"steps": 5, "method": "dpo"})
    beside = data / "rlhf_weights" / "tokenizer.json"  # the tokenizer travels with the weights
    beside.write_bytes((data / "bpe_tokenizer" / "tokenizer.json").read_bytes())
    result = _materialize(data)
    assert result.success
    [mat] = result.get_asset_materialization_events()
    assert mat.materialization.metadata["source_stage"].value == "rlhf_weights"
    assert mat.materialization.metadata["tokenizer"].value == str(beside)
    _, state = import_hf(out)
    assert all(torch.equal(state[k], v) for k, v in rlhf.state_dict().items())
    card = (out / "README.md").read_text()
    assert "preference alignment, method dpo (5 steps)" in card


def test_missing_weights_name_the_assets_to_materialise(data: Path) -> None:
    for f in (data / "sft_weights").iterdir():
        f.unlink()
    result = _materialize(data)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = str(failure.event_specific_data.error)  # type: ignore[union-attr]
    assert "materialise `rlhf_weights` or `sft_weights` first" in message


def test_check_without_transformers_is_a_warning_not_a_pass(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm_core.interop import export_hf

    tokenizer = data / "bpe_tokenizer" / "tokenizer.json"
    out = export_hf(data / "sft_weights", tokenizer, data / "hf_export")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    result = verify_export(out, data / "sft_weights", tokenizer)
    assert not result.passed and result.severity == dg.AssetCheckSeverity.WARN
    assert "not verified" in (result.description or "")


def test_graph_orders_hf_export_after_the_training_stages() -> None:
    from pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("hf_export")).parent_keys}
    assert parents == {"rlhf_weights", "sft_weights", "evaluation_report", "bpe_tokenizer"}
    selected = dg.AssetSelection.all().resolve(graph)
    assert dg.AssetKey("hf_export") in selected


# ------------------------------------------------------------------------------ card helpers
def test_eval_figures_are_the_reports_headline() -> None:
    assert eval_figures({"headline": {"a": 1, "b": "x", "c": True}, "d": 2}) == {"a": 1}
    # A report without the flat mapping: the evaluation's own headline() recomputes it.
    report = {"stages": {"base": {"heldout": {"bpb": 2.0}}, "sft": {"absent": "not run"}}}
    assert eval_figures(report) == {"base_bpb": 2.0}


def test_card_info_lists_data_by_stage_with_a_conservative_licence(data: Path) -> None:
    pre = card_info(data, "pretrained_weights", profile_name="tiny")
    assert pre["model_name"] == "scriptorium-tiny-pretrain" and pre["license"] == "other"
    assert [d["role"] for d in pre["datasets"]] == ["pretraining"]
    sft = card_info(data, "sft_weights")
    roles = {d["role"] for d in sft["datasets"]}
    assert roles == {"pretraining", "sft"} and sft["license"] == "cc-by-nc-4.0"  # alpaca is NC
    assert [s["name"] for s in sft["stages"]] == ["pretrain", "sft"]
    assert sft["stages"][0]["description"].endswith("(40 steps)")
    assert (
        card_info(data, None)["datasets"] == []
        and card_info(data, None, licence="mit")["license"] == "mit"
    )
    with pytest.raises(ValueError, match="unknown stage 'x'"):
        card_info(data, "x")


def test_data_sources_and_mixture_counts(tmp_path: Path) -> None:
    cfg = tmp_path / "prefs.yaml"
    cfg.write_text(
        "sources:\n  - {id: hh, repo: Anthropic/hh-rlhf, licence: MIT}\n"
        "  - {id: rasbt, url: 'https://example.org/p.json', licence: Apache-2.0}\n"
    )
    rows = data_sources(cfg, "preference")
    assert rows == [
        {"name": "hh", "role": "preference", "licence": "MIT", "id": "Anthropic/hh-rlhf"},
        {"name": "rasbt", "role": "preference", "licence": "Apache-2.0",
         "url": "https://example.org/p.json"},
    ]  # fmt: skip
    assert data_sources(tmp_path / "absent.yaml", "sft") == []
    counted = with_mixture_counts(rows, {"sources": {"hh": {"train": 7}, "rasbt": {"train": 0}}})
    assert [r["name"] for r in counted] == ["hh (7 conversations)"]
