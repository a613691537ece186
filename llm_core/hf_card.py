"""The model card of a Hugging Face folder: ``README.md``, Hub metadata as YAML front matter
and a body for readers (:func:`render_model_card`), written by :func:`llm_core.interop.export_hf`.

The card's facts come in as a plain dict; ``pipeline.model_card`` gathers them from the assets.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import yaml

from llm_core.config import ModelConfig

__all__ = ["CARD_NAME", "render_model_card"]

CARD_NAME = "README.md"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _text(text: Any) -> str:
    """Card text with ``<``, ``>``, ``&`` as entities: dataset names, licences, notes and stage
    descriptions come from configs and upstream metadata, and the Hub renders raw HTML."""
    return html.escape(str(text), quote=False)


def _cell(text: Any) -> str:
    return _text(text).replace("|", "\\|").replace("\n", " ")


def render_model_card(
    card: Mapping[str, Any], cfg: ModelConfig, n_params: int | None = None
) -> str:
    """``README.md`` for the Hub: YAML front matter (metadata) and a body for readers.

    ``card`` keys (all optional): ``model_name``; ``license`` (a Hub licence id; ``other`` needs
    ``license_name`` and may have ``license_link``); ``language`` (list); ``tags``;
    ``base_model`` (a Hub model id this one was fine-tuned from; omitted for a from-scratch
    model); ``datasets``: list of ``{name, id, licence, role, url}`` (``id`` is a Hub dataset
    id and goes into the front matter, the rest into the body's table); ``stages``: list of
    ``{name, description}``; ``eval``: ``{figure: value}`` headline numbers; ``notes``: text.
    """
    name = _text(card.get("model_name") or "scriptorium-model").replace("\n", " ")
    datasets = list(card.get("datasets") or [])
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": card.get("license") or "other",
    }
    for key in ("license_name", "license_link"):
        if card.get(key):
            meta[key] = card[key]
    if meta["license"] == "other" and "license_name" not in meta:
        meta["license_name"] = "mixed-data-licences"
    meta["language"] = list(card.get("language") or ["en"])
    arch_tag = "gpt2" if cfg.arch == "gpt2" else "mixtral" if cfg.moe else "llama"
    meta["tags"] = list(dict.fromkeys(["scriptorium", "from-scratch", arch_tag, "text-generation",
                                       *(card.get("tags") or [])]))  # fmt: skip
    hub_ids = [d["id"] for d in datasets if d.get("id")]
    if hub_ids:
        meta["datasets"] = list(dict.fromkeys(hub_ids))
    if card.get("base_model"):
        meta["base_model"] = card["base_model"]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    hf_arch = "GPT2LMHeadModel" if cfg.arch == "gpt2" else "LlamaForCausalLM"
    hf_arch = "MixtralForCausalLM" if cfg.moe is not None else hf_arch
    size = f"{n_params / 1e6:.2f}M-parameter " if n_params else ""
    lines = [
        f"---\n{front}---",
        "",
        f"# {name}",
        "",
        f"A {size}decoder-only language model built with "
        "[Scriptorium](https://github.com/scriptorium-llm/scriptorium), an open-source "
        '"LLM from scratch" factory, exported as a `transformers` '
        f"`{hf_arch}` (no `trust_remote_code`).",
        "",
        "## Model",
        "",
        "| setting | value |",
        "|---|---|",
        f"| architecture | {cfg.arch} ({hf_arch}) |",
        f"| layers / heads / kv heads | {cfg.n_layer} / {cfg.n_head} / {cfg.kv_heads} |",
        f"| d_model / ffn_hidden | {cfg.d_model} / {cfg.ffn_hidden} |",
        f"| context length | {cfg.context_length} |",
        f"| vocabulary | {cfg.vocab_size} (byte-level BPE) |",
        f"| tied embeddings | {cfg.tie_embeddings} |",
    ]
    if cfg.arch == "llama":
        lines.append(f"| RoPE theta / RMSNorm eps | {cfg.rope_theta:g} / {cfg.norm_eps:g} |")
    if cfg.moe is not None:
        lines.append(f"| experts / routed per token | {cfg.moe.n_experts} / {cfg.moe.top_k} |")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'messages = [{"role": "user", "content": "What is the capital of France?"}]',
        'ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")',
        "out = model.generate(ids, max_new_tokens=64)",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "The chat template renders `<|system|>…<|end|><|user|>…<|end|><|assistant|>`; generation "
        "stops at `<|end|>` or `<|endoftext|>` (see `generation_config.json`).",
    ]
    stages = list(card.get("stages") or [])
    if stages:
        lines += ["", "## Training stages", ""]
        for s in stages:
            desc = f": {_text(s['description'])}" if s.get("description") else ""
            lines.append(f"1. **{_text(s['name'])}**{desc}")
    if datasets:
        lines += ["", "## Training data and licences", "", "| data | role | licence | source |",
                  "|---|---|---|---|"]  # fmt: skip
        for d in datasets:
            src = d.get("id") or d.get("url") or ""
            lines.append(f"| {_cell(d.get('name', src))} | {_cell(d.get('role', ''))} | "
                         f"{_cell(d.get('licence', 'unknown'))} | {_cell(src)} |")  # fmt: skip
        if any("NC" in str(d.get("licence", "")).upper().split("-") for d in datasets):
            lines += ["", "Some training data are licensed for **non-commercial use only** "
                      "(NC licences above): check them before any other use."]  # fmt: skip
    lines += ["", "## Evaluation", ""]
    figures = dict(card.get("eval") or {})
    if figures:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_fmt(v)} |" for k, v in figures.items()]
    else:
        lines.append("No evaluation report was available when this folder was exported.")
    if card.get("notes"):
        lines += ["", _text(card["notes"])]
    lines += [
        "",
        "## Limitations",
        "",
        "A small research model trained on a small budget: it makes factual errors, may produce "
        "biased or offensive text learned from old books and web-sourced instructions, and is not "
        "suitable for any decision that matters.",
        "",
    ]
    return "\n".join(lines)
