"""Raw HTML in generations and dataset text is escaped in report.md and the model card too
(SECURITY.md item 12); report.html already escaped it."""

from __future__ import annotations

from llm_core.config import ModelConfig
from llm_core.hf_card import render_model_card
from pipeline.eval.report import render_markdown
from tests.pipeline.eval.test_report import full_report

XSS = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def test_report_markdown_escapes_generations_and_notes() -> None:
    report = full_report()
    report["stages"]["sft"]["generations"]["samples"] = [{"prompt": f"say {XSS}", "reply": XSS}]
    report["checks"] = [{"name": "c", "passed": False, "note": f"bad set {XSS}"}]
    md = render_markdown(report)
    assert "<script>" not in md and "<img" not in md and "<b>" not in md
    assert '&lt;script&gt;alert("pwned")&lt;/script&gt;' in md
    assert "&lt;b&gt;whale&lt;/b&gt;" in md  # the other stages' replies too


def test_model_card_escapes_dataset_text() -> None:
    cfg = ModelConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=16,
                      ffn_hidden=32)  # fmt: skip
    card = render_model_card(
        {
            "model_name": f"m{XSS}",
            "datasets": [{"name": XSS, "role": "sft", "licence": XSS, "url": "https://x/y"}],
            "stages": [{"name": "sft", "description": XSS}],
            "eval": {XSS: 1.0},
            "notes": XSS,
        },
        cfg,
    )
    body = card.split("---", 2)[2]
    assert "<script>" not in body and "<img" not in body
    assert body.count("&lt;script&gt;") >= 5
