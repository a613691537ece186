"""`scriptorium export`/`import` against crafted folders (SECURITY.md items 1 and 11).

Export replaces its output folder, so it must refuse one that is (or holds, or lies inside) the
weights, and any non-empty folder that is not a previous export. Import reads untrusted folders:
every crafted one below must end in one line ``scriptorium: error: …`` naming the file, exit
status 2, no traceback and no output folder, before any model is allocated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llm_core.checkpoint import save_weights
from llm_core.config import ModelConfig
from llm_core.interop import export_hf, hf_config, to_hf_state_dict
from llm_core.model import Transformer
from llm_core.sft import ChatSpecials
from llm_core.tokenizer import train_bpe
from pipeline.cli import main

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([TEXT], vocab_size=300).save(str(path))
    return path


def _cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        vocab_size=320, context_length=32, n_layer=1, n_head=2, d_model=16, ffn_hidden=32
    )
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
def weights(tmp_path: Path, tokenizer: Path) -> Path:
    torch.manual_seed(0)
    out = tmp_path / "weights"
    save_weights(Transformer(_cfg()), out)
    (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return out


def _export(weights: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["export", "--weights", str(weights), "--out", str(out), "--stage", "sft"])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------------- item 1
def test_export_refuses_out_equal_to_or_inside_the_weights(
    weights: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCRIPTORIUM_DATA", str(weights.parent / "data"))
    before = sorted(p.name for p in weights.iterdir())
    for out in (weights, weights / "hf", weights.parent):
        rc, err = _export(weights, out, capsys)
        assert rc == 2 and "weights folder" in err, (out, err)
    assert sorted(p.name for p in weights.iterdir()) == before  # source weights untouched


def test_export_refuses_a_non_empty_folder_but_replaces_a_previous_export(
    weights: Path, tokenizer: Path, tmp_path: Path
) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not empty and not a previous export"):
        export_hf(weights, tokenizer, precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    out = export_hf(weights, tokenizer, tmp_path / "hf")
    (out / "README.md").write_text("old card")
    assert export_hf(weights, tokenizer, out) == out  # a previous export is replaced
    assert "old card" not in (out / "README.md").read_text()
    (out / "notes.txt").write_text("mine")  # ... unless something else was put in it
    with pytest.raises(ValueError, match="not a previous export"):
        export_hf(weights, tokenizer, out)


# ---------------------------------------------------------------------------------- item 11
def _hf_folder(root: Path, tokenizer: Path) -> Path:
    """A valid Hugging Face Llama folder (config, safetensors, tokenizer) of a tiny model."""
    torch.manual_seed(0)
    model = Transformer(_cfg())
    root.mkdir()
    save_file(to_hf_state_dict(model.config, model.state_dict()), str(root / "model.safetensors"))
    specials = ChatSpecials(eot=0, end=1, pad=2, system=3, user=4, assistant=5)
    (root / "config.json").write_text(json.dumps(hf_config(model.config, specials)))
    (root / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return root


def _set_config(**changes: object) -> Callable[[Path], str]:
    def apply(d: Path) -> str:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))
        return "config.json"

    return apply


def _index(weight_map: object) -> Callable[[Path], str]:
    def apply(d: Path) -> str:
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return "model.safetensors.index.json"

    return apply


def _truncate(d: Path) -> str:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "model.safetensors"


def _int_tensor(d: Path) -> str:
    save_file({"model.embed_tokens.weight": torch.zeros(320, 16, dtype=torch.int64)},
              str(d / "model.safetensors"))  # fmt: skip
    return "model.safetensors"


def _bad_tokenizer(d: Path) -> str:
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    return "tokenizer.json"


def _not_json_index(d: Path) -> str:
    (d / "model.safetensors.index.json").write_text("{not json")
    return "model.safetensors.index.json"


CASES = {
    "vocab-12M": (_set_config(vocab_size=12_000_000), "vocab_size=12000000"),
    "vocab-2e9": (_set_config(vocab_size=2_000_000_000), "vocab_size=2000000000"),
    "vocab-mismatch": (_set_config(vocab_size=640), "implies [640, 16]"),
    "n_head-0": (_set_config(num_attention_heads=0), "invalid model config"),
    "index-escapes": (_index({"a": "../../../etc/passwd"}), "points outside"),
    "index-not-a-map": (_index(["model.safetensors"]), "weight_map"),
    "index-not-json": (_not_json_index, "not a readable JSON index"),
    "truncated": (_truncate, "truncated"),
    "int-dtype": (_int_tensor, "dtype I64"),
    "bad-tokenizer": (_bad_tokenizer, "not a readable tokenizer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_of_a_crafted_folder_is_one_clear_error(
    case: str, tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _hf_folder(tmp_path / "hf", tokenizer)
    craft, expected = CASES[case]
    named = craft(folder)
    start = time.monotonic()
    rc = main(["import", "--hf", str(folder), "--out", str(tmp_path / "out")])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scriptorium: error: "), err
    assert str(folder / named) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert elapsed < 10  # refused from the headers, before any allocation


def test_a_valid_folder_still_imports(
    tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _hf_folder(tmp_path / "hf", tokenizer)
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
