"""``loads_in_transformers`` on a Mixture-of-Experts model: the export asset's own check (logits
within its tolerance, the same greedy tokens, the chat template's ids) passes for a Mixtral export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_core.checkpoint import save_weights
from llm_core.config import ModelConfig
from llm_core.interop import export_hf
from llm_core.model import Transformer
from llm_core.tokenizer import train_bpe
from pipeline.assets.export import verify_export


def test_loads_in_transformers_passes_for_a_moe_export(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    tok = train_bpe(["What is the capital of France? Paris is. 世界上最大的动物是什么？\n" * 30],
                    vocab_size=320)  # fmt: skip
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, context_length=64, n_layer=2, n_head=2, d_model=32,
                      ffn_hidden=32, moe={"n_experts": 4, "top_k": 2})  # fmt: skip
    model = Transformer(cfg)
    with torch.no_grad():  # routers away from their near-uniform init
        for block in model.blocks:
            block.mlp.router.weight.normal_(0.0, 0.5)
    save_weights(model, tmp_path / "w")
    out = export_hf(tmp_path / "w", tmp_path / "tokenizer.json", tmp_path / "hf")
    result = verify_export(out, tmp_path / "w", tmp_path / "tokenizer.json")
    meta = {k: v.value for k, v in result.metadata.items()}
    assert result.passed, meta
    assert meta["hf_class"] == "MixtralForCausalLM" and meta["max_abs_logit_diff"] <= 1e-4
    card = (out / "README.md").read_text()
    assert "MixtralForCausalLM" in card and "| experts / routed per token | 4 / 2 |" in card
