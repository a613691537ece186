"""Typed configuration for models and training runs, and profile loading.

A *profile* (``configs/profiles/<name>.yaml``) names every knob once. ``vocab_size`` and
``context_length`` live at the top level of the profile because the tokenizer, the token shards and
the model all need them: reading them from one place is what keeps the three consistent.

This module is plain Python (no Dagster, no torch) so notebooks, ``torchrun`` scripts and the
pipeline share it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILE_ENV = "SCRIPTORIUM_PROFILE"
DEFAULT_PROFILE = "demo"


def configs_dir() -> Path:
    """The ``configs/`` folder: ``SCRIPTORIUM_CONFIGS`` if set, else the one beside the packages."""
    env = os.environ.get("SCRIPTORIUM_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


ARCHS = ("llama", "gpt2")


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts in place of the SwiGLU MLP (``model.moe`` in a profile; see
    :mod:`llm_core.moe`). Each expert is a SwiGLU MLP of width ``ffn_hidden``; each token goes
    to its ``top_k`` experts, so the active feed-forward width per token is
    ``top_k * ffn_hidden``. ``aux_loss_coef`` weighs the Switch/Mixtral load-balancing loss
    (1.0 when perfectly balanced), ``z_loss_coef`` the router z-loss (ST-MoE; 0 turns it off).
    """

    n_experts: int
    top_k: int = 2
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.n_experts < 2:
            raise ValueError(f"model.moe.n_experts must be >= 2, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"model.moe.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}"
            )
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("model.moe.aux_loss_coef and z_loss_coef must be >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(d) - names:
            raise ValueError(f"unknown model.moe keys: {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only transformer.

    ``arch`` picks the block family. ``"llama"`` (the default, what the pipeline trains): RMSNorm,
    RoPE, grouped KV heads, SwiGLU, no biases. ``"gpt2"``: the GPT-2 blocks as nanoGPT writes them
    (LayerNorm with bias, learned absolute positions, tanh-GELU MLP of width ``ffn_hidden``, biases
    on every linear layer but the LM head, multi-head attention), so OpenAI's GPT-2 checkpoints
    and their descendants can be imported (``llm_core.interop``) and fine-tuned by the same
    trainer. ``rope_theta`` means nothing to ``gpt2``; ``norm_eps`` is LayerNorm's epsilon there.
    """

    vocab_size: int
    context_length: int
    n_layer: int
    n_head: int
    d_model: int
    ffn_hidden: int
    n_kv_head: int | None = None  # None means plain multi-head attention (n_kv_head == n_head)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    arch: str = "llama"  # one of ARCHS
    moe: MoEConfig | None = None  # routed experts instead of the MLP (a dict is converted)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown model arch {self.arch!r}; expected one of {list(ARCHS)}")
        if isinstance(self.moe, dict):  # from a profile or a saved config.json
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if self.moe is not None and self.arch != "llama":
            raise ValueError(f"model.moe needs arch 'llama', got {self.arch!r}")
        kv = self.kv_heads
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.arch == "llama" and (self.d_model // self.n_head) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")
        if self.n_head % kv:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={kv}")
        if self.arch == "gpt2" and kv != self.n_head:
            raise ValueError(f"arch 'gpt2' has multi-head attention: n_kv_head={kv} != n_head")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["moe"] is None:  # dense configs (and their hashes) stay as they were before MoE
            del d["moe"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The same fields serve pretraining, SFT and alignment stages."""

    steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    log_every: int = 10
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    compile: bool = False
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    peak_flops: float | None = None  # for MFU; None picks a per-device default
    # The recipe (llm_core.optim, llm_core.schedule). The defaults are the old one: AdamW, cosine.
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: the last fraction of the updates decays to min_lr_ratio
    minutes: float | None = None  # train for this long (steps, if > 0, caps the updates)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per update
    muon_weight_decay: float = 0.0
    # Across ranks (llm_core.distributed): ddp replicates the model; fsdp shards it (fully_shard).
    parallel: str = "ddp"  # ddp | fsdp
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"train.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"train.schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"train.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"train.minutes must be > 0 (or null), got {self.minutes}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if extra:
            known["extra"] = {**known.get("extra", {}), **extra}
        return cls(**known)


def profile_name() -> str:
    return os.environ.get(PROFILE_ENV, DEFAULT_PROFILE)


def profile_path(ref: str) -> Path:
    """Where profile ``ref`` (a name in ``configs/profiles/`` or a YAML path) lives."""
    path = Path(ref)
    return path if path.suffix in {".yaml", ".yml"} else configs_dir() / "profiles" / f"{ref}.yaml"


def load_profile(name_or_path: str | None = None) -> dict[str, Any]:
    """Load a profile by name (``tiny``, ``demo`` …) or by path to a YAML file.

    Raises a ``FileNotFoundError`` that lists the available profiles when the name is unknown.
    """
    ref = name_or_path or profile_name()
    path = profile_path(ref)
    if not path.exists():
        available = sorted(p.stem for p in (configs_dir() / "profiles").glob("*.yaml"))
        raise FileNotFoundError(f"profile {ref!r} not found at {path}; available: {available}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "vocab_size" not in data:
        raise ValueError(f"profile {path} must be a mapping with at least 'vocab_size'")
    return data


def model_config_from_profile(profile: dict[str, Any]) -> ModelConfig:
    """The model shape: the ``model`` section plus the profile-wide vocab and context sizes."""
    return ModelConfig(
        vocab_size=int(profile["vocab_size"]),
        context_length=int(profile["context_length"]),
        **profile["model"],
    )


def train_config_from_profile(profile: dict[str, Any], stage: str = "pretrain") -> TrainConfig:
    """The training run of ``stage`` (``pretrain``, ``sft`` …), seeded by the profile's seed."""
    section = dict(profile.get(stage) or {})
    section.setdefault("seed", profile.get("seed", 1337))
    return TrainConfig.from_dict(section)
