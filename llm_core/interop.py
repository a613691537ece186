"""Hugging Face interop: export llm_core weights as a ``transformers`` folder, import Llama and GPT-2.

Export (:func:`export_hf`) writes a folder that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load without ``trust_remote_code`` and that
``huggingface_hub.upload_folder`` can publish as it is:

* ``config.json``: a ``LlamaForCausalLM`` config mapped from ours (a ``GPT2LMHeadModel`` one for
  ``arch="gpt2"``), with the chat specials as bos/eos/pad ids;
* ``model.safetensors``: our tensors under Hugging Face's names. The fused QKV projection is
  split into ``q_proj``/``k_proj``/``v_proj``. No RoPE permutation is needed: our rotation is
  the "half-split" layout (dimension ``i`` pairs with ``i + D/2``), which is exactly HF Llama's
  ``rotate_half``, and both take ``inv_freq = theta^(-2i/D)``. (Meta's original checkpoints
  rotate interleaved pairs; HF's conversion script permutes q/k *into* this layout, so an HF Llama
  folder imports with a plain split as well.) GPT-2's ``Conv1D`` stores weights as [in, out],
  so those are transposed both ways;
* ``tokenizer.json`` (our byte-level BPE, unchanged), ``tokenizer_config.json`` with the chat
  template in Jinja and ``special_tokens_map.json`` (:mod:`llm_core.hf_tokenizer`),
  ``generation_config.json`` (stop at ``<|end|>`` or ``<|endoftext|>``) and ``README.md``, a
  model card whose YAML front matter is Hub metadata (:mod:`llm_core.hf_card`).

Import (:func:`import_hf`, :func:`load_hf_model`) reads ``config.json`` and safetensors directly
(single file or sharded with an index), so it needs neither ``transformers`` nor any pickle:
a folder holding only ``pytorch_model.bin`` (or another pickle) is refused with an error naming
the file, because unpickling runs arbitrary code. Weights are converted to float32, the dtype
llm_core trains in. An imported tokenizer gets llm_core's chat tokens from
:func:`llm_core.hf_tokenizer.add_chat_tokens`. ``transformers`` is only imported inside
:func:`compare_with_transformers`, which verifies an export (a test/extra dependency, never needed
to export or import).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llm_core.checkpoint import (
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    load_config,
    load_state_dict,
)
from llm_core.config import ModelConfig
from llm_core.data.shards import fsync_dir
from llm_core.hf_card import CARD_NAME, render_model_card
from llm_core.hf_checks import check_export_target, check_hf_folder, config_dict, weight_files
from llm_core.hf_tokenizer import tokenizer_files
from llm_core.interop_moe import config_from_mixtral, mixtral_config, moe_param_map, unfuse_experts
from llm_core.sft import ChatSpecials
from llm_core.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from llm_core.model import Transformer

__all__ = [
    "HFImportError",
    "compare_with_transformers",
    "config_from_hf",
    "export_hf",
    "from_hf_state_dict",
    "hf_config",
    "import_hf",
    "load_hf_model",
    "to_hf_state_dict",
]

HF_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"


class HFImportError(ValueError):
    """A Hugging Face folder llm_core cannot (or will not) load: pickles, unknown architectures,
    features our model does not have. The message names the file or the config key."""


# ------------------------------------------------------------------------------ weight names
# One table per architecture: (our name, HF name(s), transpose). Several HF names mean our tensor
# is their concatenation along dim 0 (the fused QKV projection); transpose marks GPT-2's Conv1D.
ParamMap = list[tuple[str, tuple[str, ...], bool]]


def _param_map(cfg: ModelConfig) -> ParamMap:
    if cfg.arch == "gpt2":
        out: ParamMap = [
            ("tok_emb.weight", ("transformer.wte.weight",), False),
            ("pos_emb.weight", ("transformer.wpe.weight",), False),
        ]
        for i in range(cfg.n_layer):
            ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b, t in (
                ("attn_norm", "ln_1", False),
                ("attn.qkv", "attn.c_attn", True),
                ("attn.proj", "attn.c_proj", True),
                ("mlp_norm", "ln_2", False),
                ("mlp.c_fc", "mlp.c_fc", True),
                ("mlp.c_proj", "mlp.c_proj", True),
            ):
                out.append((f"{ours}{a}.weight", (f"{hf}{b}.weight",), t))
                out.append((f"{ours}{a}.bias", (f"{hf}{b}.bias",), False))
        out += [
            ("norm.weight", ("transformer.ln_f.weight",), False),
            ("norm.bias", ("transformer.ln_f.bias",), False),
        ]
    else:
        out = [("tok_emb.weight", ("model.embed_tokens.weight",), False)]
        for i in range(cfg.n_layer):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            qkv = tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv")
            out += [
                (f"{ours}attn_norm.weight", (f"{hf}input_layernorm.weight",), False),
                (f"{ours}attn.qkv.weight", qkv, False),
                (f"{ours}attn.proj.weight", (f"{hf}self_attn.o_proj.weight",), False),
                (f"{ours}mlp_norm.weight", (f"{hf}post_attention_layernorm.weight",), False),
                (f"{ours}mlp.gate.weight", (f"{hf}mlp.gate_proj.weight",), False),
                (f"{ours}mlp.up.weight", (f"{hf}mlp.up_proj.weight",), False),
                (f"{ours}mlp.down.weight", (f"{hf}mlp.down_proj.weight",), False),
            ]
        out.append(("norm.weight", ("model.norm.weight",), False))
    if cfg.moe is not None:  # routed experts: Mixtral's names (llm_core.interop_moe)
        out = moe_param_map(cfg, out)
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("lm_head.weight",), False))
    return out


def _qkv_rows(cfg: ModelConfig) -> list[int]:
    return [cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]


def to_hf_state_dict(
    cfg: ModelConfig, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Our state dict under Hugging Face names: contiguous float tensors, none sharing storage
    (safetensors refuses aliases; a tied LM head is simply not written, as HF itself does)."""
    out: dict[str, torch.Tensor] = {}
    for ours, hf_names, transpose in _param_map(cfg):
        t = state[ours].detach().cpu()
        t = t.t() if transpose else t
        parts = t.split(_qkv_rows(cfg), dim=0) if len(hf_names) > 1 else (t,)
        for name, part in zip(hf_names, parts, strict=True):
            out[name] = part.contiguous().clone()
    return out


def _strip_gpt2_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI's own ``gpt2`` repository names tensors without ``transformer.``; add it back."""
    return {
        (k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
        for k, v in state.items()
    }


def from_hf_state_dict(
    cfg: ModelConfig, hf_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our state dict (float32), refusing missing or unexpected weights.

    Non-parameter buffers some checkpoints carry (GPT-2's causal ``attn.bias`` masks, Llama's
    ``rotary_emb.inv_freq``) are ignored, and so is a stored ``lm_head.weight`` when the
    embeddings are tied (it is the embedding again).
    """
    state = _strip_gpt2_prefix(hf_state) if cfg.arch == "gpt2" else unfuse_experts(cfg, hf_state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, hf_names, transpose in _param_map(cfg):
        missing = [n for n in hf_names if n not in state]
        if missing:
            raise HFImportError(f"checkpoint lacks weights {missing} (for our {ours!r})")
        parts = [state[n].to(torch.float32) for n in hf_names]
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        out[ours] = (t.t() if transpose else t).contiguous()
        used.update(hf_names)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
        used.add("lm_head.weight")
    buffers = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
    unexpected = sorted(k for k in state if k not in used and not k.endswith(buffers))
    if unexpected:
        raise HFImportError(f"checkpoint has weights llm_core does not map: {unexpected[:8]}")
    return out


# ------------------------------------------------------------------------------ configs
def hf_config(cfg: ModelConfig, specials: ChatSpecials) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM`` (or ``GPT2LMHeadModel`` for ``arch="gpt2"``).

    ``<|endoftext|>`` is the bos id, ``<|end|>`` and ``<|endoftext|>`` the eos ids (a chat reply
    ends with the first, a plain text with the second). ``rope_theta`` is written both flat
    (transformers 4.x, vLLM, llama.cpp read it there) and in ``rope_parameters``
    (transformers 5); both ``dtype`` spellings are written for the same reason.
    """
    common = {
        "vocab_size": cfg.vocab_size,
        "bos_token_id": specials.eot,
        "eos_token_id": [specials.end, specials.eot],
        "pad_token_id": specials.pad,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    if cfg.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.ffn_hidden,
            "n_positions": cfg.context_length,
            "n_ctx": cfg.context_length,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            **common,
        }
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        **common,
    }
    return mixtral_config(llama, cfg) if cfg.moe is not None else llama


def _require(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise HFImportError(f"{where}: missing {key!r}")
    return hf[key]


def config_from_hf(hf: Mapping[str, Any], *, where: str = CONFIG_NAME) -> ModelConfig:
    """Our :class:`ModelConfig` from a Hugging Face ``config.json`` (Llama or GPT-2 family).

    Anything our model would compute differently is refused rather than silently dropped:
    RoPE scaling, biases in a Llama, an activation other than SiLU (Llama) or tanh-GELU (GPT-2),
    GPT-2's per-layer attention scaling, a head size that is not hidden/heads.
    """
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise HFImportError(
                f"{where}: activation_function={act!r}; llm_core's GPT-2 is tanh-GELU"
            )
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise HFImportError(f"{where}: non-standard GPT-2 attention scaling is not supported")
        if hf.get("add_cross_attention"):
            raise HFImportError(f"{where}: cross-attention is not supported")
        d_model = int(_require(hf, "n_embd", where))
        return ModelConfig(
            vocab_size=int(_require(hf, "vocab_size", where)),
            context_length=int(_require(hf, "n_positions", where)),
            n_layer=int(_require(hf, "n_layer", where)),
            n_head=int(_require(hf, "n_head", where)),
            d_model=d_model,
            ffn_hidden=int(hf.get("n_inner") or 4 * d_model),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            arch="gpt2",
        )
    if model_type == "mixtral":
        return config_from_mixtral(hf, where, config_from_hf, HFImportError)
    if model_type != "llama":
        raise HFImportError(
            f"{where}: model_type={model_type!r}; llm_core imports 'llama' and 'gpt2' checkpoints"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"{where}: hidden_act={hf.get('hidden_act')!r}; Llama blocks use silu")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFImportError(f"{where}: attention_bias/mlp_bias are not supported (no biases)")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling or rope_type != "default":
        raise HFImportError(f"{where}: RoPE scaling ({scaling or rope_type!r}) is not supported")
    d_model = int(_require(hf, "hidden_size", where))
    n_head = int(_require(hf, "num_attention_heads", where))
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != d_model // n_head:
        raise HFImportError(f"{where}: head_dim={head_dim} != hidden_size/num_attention_heads")
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size", where)),
        context_length=int(_require(hf, "max_position_embeddings", where)),
        n_layer=int(_require(hf, "num_hidden_layers", where)),
        n_head=n_head,
        n_kv_head=int(hf.get("num_key_value_heads") or n_head),
        d_model=d_model,
        ffn_hidden=int(_require(hf, "intermediate_size", where)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


# ------------------------------------------------------------------------------ import
def _hf_weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a folder (one, or the shards named by the index); pickles refused."""
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: not a directory")
    index = hf_dir / HF_INDEX_NAME
    if index.is_file():
        return weight_files(hf_dir, index)[0]
    single = hf_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise HFImportError(
            f"{hf_dir / pickles[0]}: refusing to load pickled weights (unpickling can run "
            "arbitrary code); convert the checkpoint to safetensors first"
        )
    raise FileNotFoundError(f"{hf_dir}: no {WEIGHTS_NAME} or {HF_INDEX_NAME}")


def import_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face Llama or GPT-2 folder into ``(ModelConfig, state_dict)`` (float32).

    Only ``config.json`` and safetensors are read; see :func:`config_from_hf` for what is refused.
    Before any tensor is read (or a model allocated), the config's sizes and every tensor's
    shape and dtype in the safetensors headers are checked (:mod:`llm_core.hf_checks`).
    """
    root = Path(hf_dir)
    files = _hf_weight_files(root)
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing model config")
    try:
        cfg = config_from_hf(config_dict(cfg_path), where=str(cfg_path))
    except HFImportError:
        raise
    except (ArithmeticError, TypeError, ValueError) as exc:  # n_head=0, "64" * 2, ...
        raise HFImportError(f"{cfg_path}: invalid model config ({exc})") from None
    check_hf_folder(cfg, files, _param_map(cfg), _qkv_rows(cfg), where=str(cfg_path))
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                hf_state[key] = fh.get_tensor(key)
    return cfg, from_hf_state_dict(cfg, hf_state)


def load_hf_model(hf_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """A :class:`~llm_core.model.Transformer` from a Hugging Face folder (see :func:`import_hf`).

    Save it with :func:`llm_core.checkpoint.save_weights` to start SFT or alignment from it.
    """
    from llm_core.model import Transformer

    cfg, state = import_hf(hf_dir)
    model = Transformer(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device)


# ------------------------------------------------------------------------------ export
def export_hf(
    weights_dir: str | Path,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``weights_dir`` (as :func:`~llm_core.checkpoint.save_weights` left it) and its
    tokenizer as a Hugging Face model folder at ``out_dir``; returns ``out_dir``.

    The folder is built under a temporary name beside ``out_dir`` and swapped into place, so a
    reader (or ``upload_folder``) never sees half of one. ``out_dir`` must be new, empty or a
    previous export, and apart from the weights (:func:`llm_core.hf_checks.check_export_target`).
    ``card`` feeds the model card (:func:`llm_core.hf_card.render_model_card`).
    """
    weights_dir, out = Path(weights_dir), Path(out_dir)
    tok_file = Path(tokenizer_path)
    tok_file = tok_file / "tokenizer.json" if tok_file.is_dir() else tok_file
    check_export_target(weights_dir, tok_file, out)  # the swap below replaces ``out``
    cfg_path = weights_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing model config beside the weights")
    cfg = load_config(weights_dir)
    state = load_state_dict(weights_dir)
    tok = load_tokenizer(tok_file)  # refuses a tokenizer without the reserved chat tokens
    specials = ChatSpecials.from_tokenizer(tok)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok_file} has {tok.get_vocab_size()} tokens, more than the "
            f"model's vocab_size={cfg.vocab_size}"
        )
    n_params = sum(
        t.numel() for k, t in state.items() if k != "lm_head.weight" or not cfg.tie_embeddings
    )

    with staged_folder(out) as tmp:
        save_file(to_hf_state_dict(cfg, state), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        files: dict[str, Any] = {
            CONFIG_NAME: hf_config(cfg, specials),
            GENERATION_CONFIG_NAME: {
                "bos_token_id": specials.eot,
                "eos_token_id": [specials.end, specials.eot],
                "pad_token_id": specials.pad,
                "do_sample": False,
            },
            **tokenizer_files(tok, cfg),
        }
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        shutil.copyfile(tok_file, tmp / "tokenizer.json")
        (tmp / CARD_NAME).write_text(render_model_card(card or {}, cfg, n_params))
    return out


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill. When the block ends, its files are fsynced
    and made shareable and it is swapped into place (a previous ``out`` removed), so a reader
    (or ``upload_folder``) never sees half a folder; if the block raises, it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o644)  # a folder to share, whatever the writer's umask or mkstemp did
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():
            trash = out.parent / f".old-{out.name}-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------ verification
@torch.no_grad()
def compare_with_transformers(
    hf_dir: str | Path, model: Transformer, ids: Sequence[int]
) -> dict[str, Any]:
    """Logits of ``transformers``' load of ``hf_dir`` vs ``model``'s on ``ids``.

    Imports ``transformers`` (an optional dependency: ``ImportError`` when absent). Returns the
    max absolute logit difference, whether both pick the same greedy next token at every
    position, and the class and version that loaded the folder.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    x = torch.tensor([list(ids)], dtype=torch.long)
    theirs = hf(input_ids=x).logits.float()
    ours = model.eval()(x).float()
    return {
        "max_abs_diff": float((theirs - ours).abs().max()),
        "same_argmax": bool((theirs.argmax(-1) == ours.argmax(-1)).all()),
        "tokens": len(ids),
        "hf_class": type(hf).__name__,
        "transformers_version": transformers.__version__,
    }
