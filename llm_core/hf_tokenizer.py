"""The tokenizer side of a Hugging Face folder: the chat template, the tokenizer configs, and
the chat tokens an imported tokenizer lacks.

:data:`CHAT_TEMPLATE` is :func:`llm_core.tokenizer.render_chat`'s template in Jinja (tool turns
wrapped as :func:`llm_core.sft.template_messages` does), for ``tokenizer.apply_chat_template``;
:func:`tokenizer_files` gives the ``tokenizer_config.json`` and ``special_tokens_map.json`` that
:func:`llm_core.interop.export_hf` writes beside ``tokenizer.json``; :func:`add_chat_tokens`
gives an imported model (GPT-2's tokenizer, say) the reserved tokens llm_core's chat and SFT need.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Tokenizer

from llm_core.config import ModelConfig
from llm_core.sft import TOOL_CLOSE, TOOL_OPEN
from llm_core.tokenizer import (
    ASSISTANT,
    END,
    EOT,
    PAD,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
)

if TYPE_CHECKING:
    from llm_core.model import Transformer

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS_MAP_NAME",
    "TOKENIZER_CONFIG_NAME",
    "add_chat_tokens",
    "tokenizer_files",
]

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"


def _jinja(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The template of llm_core.tokenizer.render_chat (plus the tool-turn wrapping of
# llm_core.sft.template_messages), in Jinja for tokenizer.apply_chat_template, built from the same
# constants. Whitespace control ({%- -%}) keeps the template's own line breaks out of the output:
# only the tokens and the message contents are emitted.
_ROLES = "{" + ", ".join(f"{_jinja(r)}: {_jinja(t)}" for r, t in ROLE_TOKENS.items()) + "}"
CHAT_TEMPLATE = (
    f"{{%- set role_tokens = {_ROLES} -%}}\n"
    "{%- for message in messages -%}\n"
    "{%- set content = message['content'] if message['content'] is string else '' -%}\n"
    "{%- if message['role'] == 'tool' -%}\n"
    f"{{{{- {_jinja(USER + TOOL_OPEN)} + content + {_jinja(TOOL_CLOSE + END)} -}}}}\n"
    "{%- elif message['role'] in role_tokens -%}\n"
    f"{{{{- role_tokens[message['role']] + content + {_jinja(END)} -}}}}\n"
    "{%- else -%}\n"
    "{{- raise_exception('unknown chat role ' + message['role'] + "
    f"'; expected one of {', '.join(sorted(ROLE_TOKENS))} or tool') -}}}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    f"{{%- if add_generation_prompt -%}}{{{{- {_jinja(ASSISTANT)} -}}}}{{%- endif -%}}\n"
)


def tokenizer_files(tok: Tokenizer, cfg: ModelConfig) -> dict[str, Any]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` contents for ``tok``.

    ``tokenizer_class`` is the generic fast tokenizer, so transformers loads ``tokenizer.json`` as
    it is (a model-specific class could rebuild the pre-tokenizer its own way). ``eos_token`` is
    ``<|end|>``, the end of a chat turn, as chat models on the Hub declare theirs.
    """
    specials = {"bos_token": EOT, "eos_token": END, "pad_token": PAD}
    extra = [SYSTEM, USER, ASSISTANT, END]
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = {
        str(tok.token_to_id(t)): {"content": t, **flags, "special": True} for t in SPECIAL_TOKENS
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.context_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
        "chat_template": CHAT_TEMPLATE,
        **specials,
    }
    return {
        TOKENIZER_CONFIG_NAME: config,
        SPECIAL_TOKENS_MAP_NAME: {**specials, "additional_special_tokens": extra},
    }


def add_chat_tokens(tokenizer: Tokenizer, model: Transformer) -> tuple[Tokenizer, Transformer]:
    """Give an imported model the reserved tokens llm_core's chat template and SFT need.

    A GPT-2 (or other) tokenizer lacks ``<|pad|>``, ``<|system|>`` … ``<|end|>``; without them
    ``run_sft`` and ``scriptorium chat`` refuse the tokenizer. The missing ones are appended as
    special added tokens (ids after the tokenizer's vocabulary), and the embedding (and an untied
    LM head) grows to fit. Each new row is the mean of the existing rows, the usual choice: the
    new tokens start as an "average" token instead of noise, and every logit the model gave the
    old vocabulary is unchanged. Returns new objects; the inputs are left as they were.
    """
    from llm_core.model import Transformer

    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if not missing:
        return tokenizer, model
    old_size = tokenizer.get_vocab_size()
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    new_ids = [int(tok.token_to_id(t)) for t in missing]
    cfg = model.config
    grown = Transformer(dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, max(new_ids) + 1)))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = ["tok_emb.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    for name in names:
        old = state[name]
        new = old.new_empty((grown.config.vocab_size, old.shape[1]))
        new[: old.shape[0]] = old
        new[new_ids] = old[: min(old_size, old.shape[0])].mean(dim=0)
        state[name] = new
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    grown.load_state_dict(state, strict=True)
    return tok, grown.to(model.tok_emb.weight.device)
