"""``scriptorium classify``: one line per text with each head's label and probability, texts
from the arguments or stdin, and the export refusing what transformers cannot hold."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from llm_core.classify import ClassifierModel, save_classifier
from llm_core.config import ModelConfig
from llm_core.model import Transformer
from pipeline.cli import main
from tests.llm_core.training_helpers import chat_tokenizer


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = chat_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(tok.get_vocab_size(), 32, n_layer=1, n_head=2, n_kv_head=1, d_model=16,
                      ffn_hidden=32)  # fmt: skip
    out = tmp_path_factory.mktemp("clf")
    model = ClassifierModel(Transformer(cfg), {"spam": ("ham", "spam"), "language": ("de", "en")})
    save_classifier(model, out)
    (out / "tokenizer.json").write_text(tok.to_str())
    return out


def test_texts_from_arguments_and_stdin(
    weights: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["classify", "--weights", str(weights), "the sea", "a king"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in lines] == ["the sea", "a king"]
    for line in lines:
        heads = line.split("\t")[0].split("  ")
        assert heads[0].split()[:2] in (["spam:", "ham"], ["spam:", "spam"])
        assert heads[1].startswith("language: ") and 0.5 <= float(heads[1].split()[-1]) <= 1.0
    monkeypatch.setattr("sys.stdin", io.StringIO("the river\n\nold stone\n"))
    assert main(["classify", "--weights", str(weights)]) == 0
    assert [x.split("\t")[1] for x in capsys.readouterr().out.splitlines()] == [
        "the river",
        "old stone",
    ]


def test_export_of_two_heads_is_refused_with_the_reason(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["classify", "--weights", str(weights), "--export-hf", str(tmp_path / "hf")])
    assert code == 2
    assert "2 heads; LlamaForSequenceClassification has one" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert main(["classify", "--weights", str(tmp_path / "missing"), "x"]) == 2
