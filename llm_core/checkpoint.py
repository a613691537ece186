"""Model weights (safetensors) and resumable training checkpoints.

Weights are only ever stored as safetensors: loading a pickle (``.bin``/``.pt``) executes
arbitrary code, and model files travel between machines and MLflow. Tied tensors (input embedding
== output head) are saved once, since safetensors rejects aliased storage, and re-tied on load.

A training checkpoint is a directory ``step_XXXXXXXX/`` written under a temporary name and renamed
into place, so ``latest_checkpoint`` never returns a half-written one even if the process dies
mid-save; the temporary folders a killed save leaves (``.tmp-step_*``) are removed by the next save
or resume. Its ``trainer_state.json`` records the SHA-256 of every file, and
``load_checkpoint`` verifies them before loading anything: a flipped byte in the weights or the
optimiser state is an error naming the file, not NaN weights. Optimiser and RNG state hold only
tensors and plain containers and are read back with ``torch.load(weights_only=True)``, which
refuses anything that would need unpickling code.

Weights and their ``config.json`` are one unit: the safetensors header carries the config it was
saved with (``scriptorium.config``), and :func:`load_config` prefers it, so a crash between the
two atomic renames can never pair new weights with an old config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llm_core.config import ModelConfig
from llm_core.data.shards import atomic_write_bytes, fsync_dir

if TYPE_CHECKING:
    from llm_core.model import Transformer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng.pt"
CKPT_FORMAT = "scriptorium-ckpt/1"
_TIED_KEY = "scriptorium.tied"
_CONFIG_KEY = "scriptorium.config"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_STALE_DIR = re.compile(r"^\.(?:tmp|old)-step_\d{8}-")
log = logging.getLogger(__name__)


class NonFiniteWeightsError(ValueError):
    """Raised instead of writing weights that contain NaN/Inf."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file whose bytes no longer match the checksum recorded when it was saved."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the first name of each aliased tensor; return ``{alias: kept_name}`` for re-tying."""
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    unique: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, tied


def _check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteWeightsError(f"refusing to save {what}: tensor {name!r} is not finite")


def save_weights(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``, each atomically.

    The model must expose ``.config`` (a ``ModelConfig``) so ``load_weights`` can rebuild it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = unwrap_model(model)
    state = {k: v.detach() for k, v in raw.state_dict().items()}
    _check_finite(state, f"weights to {out}")
    unique, tied = _dedupe_tied(state)
    tensors = {k: v.to("cpu").contiguous() for k, v in unique.items()}
    config: ModelConfig = raw.config  # type: ignore[assignment]
    config_json = json.dumps(config.to_dict(), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", suffix=".tmp", dir=out)
    os.close(fd)
    meta = {"format": "pt", _TIED_KEY: json.dumps(tied), _CONFIG_KEY: config_json}
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(out)
    atomic_write_bytes(out / CONFIG_NAME, config_json.encode())
    return out / WEIGHTS_NAME


def _weights_file(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{p}: refusing to load pickled weights; convert to safetensors first")
    if p.is_dir():
        f = p / WEIGHTS_NAME
        if not f.is_file():
            pickles = sorted(q.name for q in p.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES)
            hint = f" (found pickled {pickles}; these are never loaded)" if pickles else ""
            raise FileNotFoundError(f"{f}: no safetensors weights{hint}")
        return f
    if p.suffix != ".safetensors":
        raise ValueError(f"{p}: expected a directory or a .safetensors file")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such weights file")
    return p


def load_state_dict(
    path: str | Path, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a safetensors file and restore tied aliases (same tensor object under both names)."""
    f = _weights_file(path)
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata() or {}
    state = load_file(str(f), device=str(device))
    for alias, source in json.loads(meta.get(_TIED_KEY, "{}")).items():
        state[alias] = state[source]
    return state


def load_config(path: str | Path) -> ModelConfig:
    """The config the weights at ``path`` were saved with.

    The copy inside the safetensors header wins over ``config.json`` (files written before it
    existed have only the latter): weights and config then always match, even after a crash
    between their two renames left a ``config.json`` from another save beside them.
    """
    f = _weights_file(path)
    with safe_open(str(f), framework="pt") as fh:
        embedded = (fh.metadata() or {}).get(_CONFIG_KEY)
    cfg_path = f.parent / CONFIG_NAME
    if embedded is not None:
        cfg = ModelConfig.from_dict(json.loads(embedded))
        if cfg_path.is_file() and json.loads(cfg_path.read_text()) != cfg.to_dict():
            log.warning("%s does not match the config saved in %s; using the latter", cfg_path, f)
        return cfg
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing model config beside {f.name}")
    return ModelConfig.load(cfg_path)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild a ``Transformer`` from a directory written by ``save_weights`` (safetensors only)."""
    from llm_core.model import Transformer

    f = _weights_file(path)
    model = Transformer(load_config(f))
    model.load_state_dict(load_state_dict(f), strict=True)
    return model.to(device)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors/plain containers."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state`` (missing entries are left alone)."""
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointState:
    """Everything besides the weights that a resumed run needs."""

    path: Path
    step: int
    scheduler_state: dict[str, Any] = field(default_factory=dict)
    sampler_state: dict[str, Any] = field(default_factory=dict)
    rng_states: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_stale_temps(ckpt_dir: str | Path) -> int:
    """Delete the ``.tmp-step_*``/``.old-step_*`` folders of killed saves; returns how many.

    Only the process that saves (rank 0) may call this: it assumes no save is in flight.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if _STALE_DIR.match(p.name) and p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log.info("removed %d folder(s) of interrupted checkpoint saves in %s", len(stale), root)
    return len(stale)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CorruptCheckpointError` naming the first file whose SHA-256 differs from
    ``trainer_state.json``'s record (checkpoints saved before the record are accepted as is)."""
    p = Path(path)
    recorded = json.loads((p / STATE_NAME).read_text()).get("checksums", {})
    for name, digest in recorded.items():
        f = p / name
        if Path(name).name != name or not f.is_file():
            raise CorruptCheckpointError(f"{f}: listed in {STATE_NAME} but missing")
        if _sha256(f) != digest:
            raise CorruptCheckpointError(
                f"{f}: SHA-256 differs from the one recorded at save time (the file changed on "
                "disk); delete this checkpoint folder to resume from the previous one"
            )


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``."""
    dirs = _step_dirs(Path(ckpt_dir))
    return dirs[-1][1] if dirs else None


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler_state: dict[str, Any] | None,
    sampler_state: dict[str, Any] | None,
    rng_states: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    *,
    keep_last: int = 3,
) -> Path:
    """Atomically write ``ckpt_dir/step_{step:08d}`` and prune all but the newest ``keep_last``.

    Non-finite weights raise ``NonFiniteWeightsError`` before anything is written, so the previous
    good checkpoint always survives a diverged run.
    """
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_weights(model, tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        if rng_states is not None:
            torch.save(rng_states, tmp / RNG_NAME)
        state = {
            "format": CKPT_FORMAT,
            "step": int(step),
            "scheduler": scheduler_state or {},
            "sampler": sampler_state or {},
            "extra": extra or {},
            "checksums": {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()},
        }
        atomic_write_bytes(tmp / STATE_NAME, (json.dumps(state, indent=2) + "\n").encode())
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
            trash = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _step_dirs(root)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> CheckpointState:
    """Load weights (and optimiser state) into existing objects; return the remaining state."""
    p = Path(path)
    state_file = p / STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: not a complete checkpoint")
    meta = json.loads(state_file.read_text())
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(f"{state_file}: unsupported checkpoint format {meta.get('format')!r}")
    verify_checkpoint(p)
    raw = unwrap_model(model)
    device = next(raw.parameters()).device
    raw.load_state_dict(load_state_dict(p, device=device), strict=True)
    if optimizer is not None:
        opt_file = p / OPTIMIZER_NAME
        if not opt_file.is_file():
            raise FileNotFoundError(f"{opt_file}: checkpoint has no optimiser state")
        optimizer.load_state_dict(
            torch.load(opt_file, map_location=map_location, weights_only=True)
        )
    rng_file = p / RNG_NAME
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else {}
    return CheckpointState(
        path=p,
        step=int(meta["step"]),
        scheduler_state=meta.get("scheduler", {}),
        sampler_state=meta.get("sampler", {}),
        rng_states=rng,
        extra=meta.get("extra", {}),
    )
