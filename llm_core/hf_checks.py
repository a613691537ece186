"""Checks on Hugging Face folders before anything is allocated or overwritten.

Import: a folder from the Hub (or anywhere) is untrusted input. ``config.json`` alone decides how
much memory building the model takes, so a ``vocab_size`` of two billion would try to allocate
64 GB before any tensor was looked at. :func:`check_hf_folder` therefore reads only JSON and the
safetensors *headers* (8 bytes of length plus a JSON table: no tensor data) and refuses, with an
:class:`~llm_core.interop.HFImportError` naming the file, anything that does not add up:

* a config that cannot build a model (``n_head=0``, negative sizes) or exceeds :data:`LIMITS`;
* an index whose ``weight_map`` is not a string-to-file-name table, or names a file outside the
  folder (``../``, an absolute path, a symlink out of it);
* a header that is malformed, larger than the file, or whose tensors run past the end of the file
  (a truncated download);
* a tensor whose dtype is not a float type, or whose shape differs from what the config implies
  (shapes come from the model built on PyTorch's ``meta`` device, which allocates nothing).

Export: :func:`check_export_target` refuses an output folder that is, holds or lies inside the
weights, or that is not empty and is not a previous export, because the export replaces it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llm_core.config import ModelConfig

if TYPE_CHECKING:
    from llm_core.interop import ParamMap

__all__ = ["EXPORT_FILES", "LIMITS", "check_export_target", "check_hf_folder", "read_header"]

# Far above every real Llama/GPT-2 checkpoint this project imports, far below "allocate 64 GB".
LIMITS = {
    "vocab_size": 1 << 20,
    "d_model": 1 << 15,
    "ffn_hidden": 1 << 17,
    "n_layer": 512,
    "n_head": 1024,
    "context_length": 1 << 20,
}
MAX_PARAMS = 20_000_000_000
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# What export_hf writes: a folder holding only these (and a config.json with one of our
# architectures) is a previous export, which a new export may replace.
EXPORT_FILES = frozenset(
    {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
)
EXPORT_ARCHITECTURES = ({"LlamaForCausalLM"}, {"GPT2LMHeadModel"})


def _error(message: str) -> Exception:
    from llm_core.interop import HFImportError  # interop imports this module

    return HFImportError(message)


# ------------------------------------------------------------------------------ config
def check_config(cfg: ModelConfig, where: str) -> None:
    """Positive sizes within :data:`LIMITS` and a parameter count under :data:`MAX_PARAMS`."""
    values = {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "ffn_hidden": cfg.ffn_hidden,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "context_length": cfg.context_length,
    }
    for key, value in values.items():
        if not 0 < value <= LIMITS[key]:
            raise _error(f"{where}: {key}={value} outside (0, {LIMITS[key]}]")
    params = cfg.vocab_size * cfg.d_model * 2 + cfg.n_layer * (
        4 * cfg.d_model * cfg.d_model + 3 * cfg.d_model * cfg.ffn_hidden
    )
    if params > MAX_PARAMS:
        raise _error(f"{where}: about {params:.3g} parameters, more than {MAX_PARAMS:.3g}")


# ------------------------------------------------------------------------------ files
def _inside(root: Path, name: Any, where: str) -> Path:
    if not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name:
        raise _error(f"{where}: weight_map entry {name!r} is not a relative file name")
    path = root / name
    if ".." in Path(name).parts or not path.resolve().is_relative_to(root.resolve()):
        raise _error(f"{where}: weight_map entry {name!r} points outside {root}")
    return path


def weight_files(root: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files of ``index`` (each inside ``root``) and its ``weight_map``."""
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(f"{index}: not a readable JSON index ({exc})") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise _error(f"{index}: 'weight_map' must be a non-empty object")
    if not all(isinstance(k, str) for k in wmap):
        raise _error(f"{index}: 'weight_map' keys must be tensor names")
    files = {name: _inside(root, name, str(index)) for name in set(wmap.values())}
    absent = sorted(str(p) for p in files.values() if not p.is_file())
    if absent:
        raise FileNotFoundError(f"{index}: shards missing: {absent}")
    return sorted(files.values()), wmap


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file (no tensor data read), checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _error(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise _error(f"{path}: safetensors header of {n} bytes does not fit the file")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _error(f"{path}: malformed safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise _error(f"{path}: malformed safetensors header (not an object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise _error(f"{path}: malformed header entry for {name!r}") from None
        if dtype not in FLOAT_DTYPES:
            raise _error(f"{path}: tensor {name!r} has dtype {dtype}; expected a float type")
        if end > data_bytes or end - start != numel * FLOAT_DTYPES[dtype] or start < 0:
            raise _error(
                f"{path}: tensor {name!r} runs past the end of the file (truncated download?)"
            )
    return header


def expected_shapes(cfg: ModelConfig, pmap: ParamMap, qkv_rows: list[int]) -> dict[str, list[int]]:
    """HF tensor name -> shape, from the model built on the meta device (nothing allocated)."""
    from llm_core.model import Transformer

    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    out: dict[str, list[int]] = {}
    for ours, hf_names, transpose in pmap:
        shape = shapes[ours][::-1] if transpose else shapes[ours]
        if len(hf_names) > 1:
            for name, rows in zip(hf_names, qkv_rows, strict=True):
                out[name] = [rows, *shape[1:]]
        else:
            out[hf_names[0]] = shape
    return out


def check_hf_folder(
    cfg: ModelConfig,
    files: list[Path],
    pmap: ParamMap,
    qkv_rows: list[int],
    where: str = "config.json",
) -> None:
    """Every tensor the model needs is present once, as a float tensor of the right shape
    (``where`` names the config file in errors)."""
    check_config(cfg, where)
    want = expected_shapes(cfg, pmap, qkv_rows)
    gpt2 = cfg.arch == "gpt2"
    seen: set[str] = set()
    for f in files:
        for raw, info in read_header(f).items():
            name = raw if not gpt2 or raw.startswith(("transformer.", "lm_head.")) else (
                f"transformer.{raw}"
            )  # fmt: skip
            if name in want and list(info["shape"]) != want[name]:
                raise _error(
                    f"{f}: tensor {raw!r} has shape {info['shape']}, {where} implies {want[name]}"
                )
            if name in seen and name in want:
                raise _error(f"{f}: tensor {raw!r} appears in more than one file")
            seen.add(name)
    missing = sorted(set(want) - seen)
    if cfg.moe is not None:  # transformers 5 may store experts fused (llm_core.interop_moe)
        missing = [n for n in missing if ".block_sparse_moe." not in n]
    if missing:
        raise _error(f"{files[0].parent}: checkpoint lacks weights {missing[:8]}")


# ------------------------------------------------------------------------------ export
def _is_export(folder: Path) -> bool:
    entries = list(folder.iterdir())
    if not all(p.name in EXPORT_FILES and p.is_file() and not p.is_symlink() for p in entries):
        return False
    try:
        arch = json.loads((folder / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(arch, list) and set(arch) in EXPORT_ARCHITECTURES


def check_export_target(weights_dir: Path, tokenizer: Path, out: Path) -> None:
    """Raise ``ValueError`` unless ``out`` may be replaced by an export of ``weights_dir``.

    ``out`` must not be, contain or lie inside the weights folder (the swap would delete the
    source) nor contain the tokenizer; an existing ``out`` must be empty or a previous export
    (only the files an export writes, with one of our architectures in its ``config.json``).
    """
    w, o, t = weights_dir.resolve(), out.resolve(), tokenizer.resolve()
    if o == w or o.is_relative_to(w) or w.is_relative_to(o):
        raise ValueError(
            f"refusing --out {out}: it is, holds or lies inside the weights folder {weights_dir}"
        )
    if t.is_relative_to(o):
        raise ValueError(f"refusing --out {out}: it holds the tokenizer {tokenizer}")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"refusing --out {out}: not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_export(out):
        raise ValueError(
            f"refusing --out {out}: it is not empty and not a previous export (the export "
            "replaces the folder); choose an empty or new folder"
        )


def config_dict(path: Path) -> Mapping[str, Any]:
    """``config.json`` as a JSON object, or an error naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise _error(f"{path}: not a JSON object")
    return data
