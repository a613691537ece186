"""Export a single-task classifier as a ``transformers`` ``LlamaForSequenceClassification`` folder.

Hugging Face's sequence classifier is the causal model's trunk plus a bias-free ``score`` layer
read at each row's last non-pad token: exactly a :class:`~llm_core.classify.ClassifierModel`
with one head and ``last`` pooling (its heads have no bias for this reason). The backbone maps
through :func:`llm_core.interop.to_hf_state_dict` like every Llama export, the LM head is dropped
and the task's head becomes ``score.weight``; ``id2label`` names the classes and
``pad_token_id`` is the padding token the classifier was trained with, which never occurs in a
text, so ``transformers`` finds the same last token. Refused, with the reason: several heads
(``transformers`` has one ``score``), ``mean``/``max`` pooling (it only reads the last token) and
the GPT-2 architecture (not written here).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from llm_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from llm_core.classify import ClassifierModel, load_classifier, pad_id
from llm_core.interop import staged_folder, to_hf_state_dict
from llm_core.tokenizer import load_tokenizer


def exportable(model: ClassifierModel) -> str | None:
    """Why ``model`` cannot be a ``LlamaForSequenceClassification`` (None when it can)."""
    cfg = model.config
    if len(cfg.tasks) != 1:
        return f"{len(cfg.tasks)} heads; LlamaForSequenceClassification has one"
    if cfg.pooling != "last":
        return f"pooling {cfg.pooling!r}; LlamaForSequenceClassification reads the last token"
    if cfg.model.arch != "llama":
        return f"architecture {cfg.model.arch!r}; only llama is exported as a classifier"
    return None


def hf_classifier_config(model: ClassifierModel, pad: int) -> dict[str, Any]:
    """``config.json`` of the ``LlamaForSequenceClassification``."""
    from llm_core.interop import hf_config
    from llm_core.sft import ChatSpecials

    cfg = model.config
    ((task, labels),) = cfg.tasks.items()
    specials = ChatSpecials(
        system=pad, user=pad, assistant=pad, end=pad, eot=pad, pad=pad
    )  # only the ids hf_config reads; the real ones are in tokenizer.json
    base = hf_config(cfg.model, specials)
    base.pop("eos_token_id", None)
    base.pop("bos_token_id", None)
    return {
        **base,
        "architectures": ["LlamaForSequenceClassification"],
        "pad_token_id": pad,
        "tie_word_embeddings": False,  # there is no LM head to tie
        "num_labels": len(labels),
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": "single_label_classification",
        "scriptorium_task": task,
    }


def export_classifier_hf(
    weights_dir: str | Path, tokenizer_path: str | Path, out_dir: str | Path
) -> Path:
    """Write the classifier at ``weights_dir`` as a Hugging Face folder at ``out_dir`` (built
    beside it and swapped into place, so no reader sees half of one); returns ``out_dir``."""
    model = load_classifier(weights_dir)
    why = exportable(model)
    if why is not None:
        raise ValueError(f"{weights_dir}: cannot export as LlamaForSequenceClassification: {why}")
    tok_file = Path(tokenizer_path)
    tok = load_tokenizer(tok_file)
    pad = pad_id(tok)
    state = {
        k.removeprefix("backbone."): v.detach()
        for k, v in model.state_dict().items()
        if k.startswith("backbone.")
    }
    hf = {
        k: v
        for k, v in to_hf_state_dict(model.config.model, state).items()
        if k != "lm_head.weight"
    }
    ((task, _),) = model.config.tasks.items()
    hf["score.weight"] = model.heads[task].weight.detach()
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in hf.items()}
    out = Path(out_dir)
    with staged_folder(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = hf_classifier_config(model, pad)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        hf_tokenizer(tok, model.config.end_token).save(str(tmp / "tokenizer.json"))
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": tok.id_to_token(pad),
                      "model_max_length": model.config.context_length}  # fmt: skip
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out


def hf_tokenizer(tok: Tokenizer, end_token: int | None) -> Tokenizer:
    """A copy of ``tok`` whose post-processor appends the classifier's end token, so
    ``AutoTokenizer(text)`` gives exactly the ids the classifier was trained on."""
    out = Tokenizer.from_str(tok.to_str())
    if end_token is not None:
        name = tok.id_to_token(end_token)
        out.post_processor = TemplateProcessing(
            single=f"$A {name}", special_tokens=[(name, end_token)]
        )
    return out


@torch.no_grad()
def compare_classifier_with_transformers(
    hf_dir: str | Path, model: ClassifierModel, tok: Tokenizer, texts: Sequence[str]
) -> float:
    """The largest absolute difference between the logits of ``transformers`` (its
    ``AutoTokenizer`` and ``LlamaForSequenceClassification`` loading the exported folder, a
    right-padded batch) and ``model``'s own path (:func:`llm_core.classify.encode_texts`)."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from llm_core.classify import collate, encode_texts

    hf = LlamaForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    enc = hf_tok(list(texts), padding=True, return_tensors="pt")
    theirs = hf(**enc).logits.float()
    cfg = model.config
    ((task, labels),) = cfg.tasks.items()
    data = encode_texts(
        tok, texts, [labels[0]] * len(texts), labels, cfg.context_length, cfg.end_token
    )
    ids, lengths = collate(data.ids, pad_id(tok))
    ours = model.eval()(ids, lengths, task).float()
    return float((theirs - ours).abs().max())
