"""How a model is spread over the ranks of a ``torchrun`` job: replicated (DDP) or sharded (FSDP).

``TrainConfig.parallel`` picks one. ``ddp`` (the default) keeps a full copy of the weights,
gradients and optimiser state on every rank and averages gradients after each backward: the
fastest choice whenever the model and its AdamW state fit one device. ``fsdp`` shards all three
over the ranks with PyTorch's ``fully_shard`` (FSDP2: every ``Block`` is one unit, the
embeddings and head the root unit), so a model that does not fit one device can still train;
each forward and backward all-gathers a block's weights just before it needs them.

The trainer talks to a :class:`Parallel` only, so its loop is the same for both. The parts that
differ are here:

- FSDP must shard *before* the optimiser is built (the parameters become ``DTensor`` shards).
- Gradient clipping needs the global norm: FSDP's is a ``DTensor`` reduced over the shards.
- Checkpoints keep one format whatever the mode: the full weights (``model.safetensors``) and the
  full optimiser state in ``torch.optim`` id order. Under FSDP every rank takes part in gathering
  them (rank 0 receives them, on the CPU) and every rank loads its own shard back from the same
  files, so a DDP checkpoint resumes under FSDP and the other way round. The price: rank 0's host
  memory must hold the full weights and optimiser state once while a checkpoint is written (a
  sharded ``torch.distributed.checkpoint`` layout would lift that; nothing here needs it yet).
- The final weights: :meth:`Parallel.export` gathers them into a plain module on rank 0 (a
  meta-device template taken before sharding, its parameters then assigned the gathered CPU
  tensors), which the stage saves as usual.

Muon (``optimizer: muon``) orthogonalises whole matrices, which FSDP splits over ranks: that
combination is refused by name rather than trained wrongly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from llm_core.checkpoint import CheckpointState, load_checkpoint

log = logging.getLogger(__name__)
PARALLEL_MODES = ("ddp", "fsdp")


def check_parallel(mode: str, optimizer: str = "adamw") -> None:
    """Refuse an unknown mode, or FSDP with an optimiser that needs whole matrices."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    if mode == "fsdp" and optimizer == "muon":
        raise ValueError(
            "train.parallel 'fsdp' with train.optimizer 'muon': Muon orthogonalises whole "
            "weight matrices, which FSDP shards over ranks; use optimizer 'adamw' or parallel "
            "'ddp'"
        )


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: every transformer ``Block`` (a reward or classifier model
    wraps the same blocks in its backbone, so this finds them there too)."""
    from llm_core.model import Block  # the model module is heavy; import it where it is needed

    return [m for m in model.modules() if isinstance(m, Block)]


class Parallel:
    """The model as the training loop calls it, and what DDP and FSDP do differently.

    Build it with :meth:`wrap` *before* the optimiser. ``module`` is what the loop calls
    (the DDP wrapper, the sharded model, or the model itself in a single process).
    """

    def __init__(
        self,
        raw: nn.Module,
        mode: str,
        module: nn.Module,
        ddp: DDP | None = None,
        *,
        fsdp: bool = False,
        template: nn.Module | None = None,
    ) -> None:
        self.raw, self.mode, self.module, self.ddp = raw, mode, module, ddp
        self.is_fsdp = fsdp  # sharded over the ranks (mode fsdp in a distributed run)
        self._template = template  # FSDP: a meta-device copy of the unsharded model (rank 0)

    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        mode: str,
        *,
        distributed: bool,
        device: torch.device,
        optimizer: str = "adamw",
    ) -> Parallel:
        """DDP or FSDP over the current process group; the bare model in a single process."""
        check_parallel(mode, optimizer)
        if not distributed:
            return cls(model, mode, model)
        if mode == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            ddp = DDP(model, device_ids=ids)
            return cls(model, mode, ddp, ddp=ddp)
        from torch.distributed.fsdp import fully_shard

        template = _meta_copy(model) if dist.get_rank() == 0 else None
        units = _shard_units(model)
        for unit in units:
            fully_shard(unit)
        fully_shard(model)  # the root: embeddings, final norm, head (and anything else left)
        if dist.get_rank() == 0:
            log.info("FSDP: %d block units + root over %d ranks", len(units),
                     dist.get_world_size())  # fmt: skip
        return cls(model, mode, model, fsdp=True, template=template)

    # -- the step ----------------------------------------------------------------------------
    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient exchange on all but the last micro-batch of an accumulated step."""
        if sync:
            return contextlib.nullcontext()
        if self.ddp is not None:
            return self.ddp.no_sync()
        if self.is_fsdp:
            return _fsdp_no_sync(self.module)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to ``max_norm`` by the *global* gradient norm, returned as a float."""
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm)
        full = getattr(norm, "full_tensor", None)  # FSDP: a DTensor reduced over the shards
        return float(full() if callable(full) else norm)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_views(self, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """What ``save_checkpoint`` writes: the model and optimiser themselves under DDP; under
        FSDP, their full states gathered to rank 0 (every rank must call this)."""
        if not self.is_fsdp:
            return self.raw, optimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.module, optimizer, options=options)
        if not optim_sd:  # ranks other than 0 receive nothing (and save nothing)
            return _StateView(model_sd, self.raw), _StateView({})
        return _StateView(model_sd, self.raw), _StateView(_fqn_to_ids(optim_sd))

    def load_checkpoint(
        self, path: Path, optimizer: torch.optim.Optimizer, *, map_location: torch.device
    ) -> CheckpointState:
        """Load a checkpoint (written by either mode); under FSDP each rank keeps its shard."""
        if not self.is_fsdp:
            return load_checkpoint(path, self.raw, optimizer, map_location=map_location)
        return load_checkpoint(
            path, _FsdpModelLoader(self.module), _FsdpOptimLoader(self.module, optimizer)
        )

    def export(self) -> nn.Module | None:
        """The trained model as a plain module: the model itself under DDP; under FSDP a copy
        gathered to rank 0 (``None`` on the other ranks; every rank must call this)."""
        if not self.is_fsdp:
            return self.raw
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)
        if self._template is None:
            return None
        plain = self._template
        plain.load_state_dict(state, strict=True, assign=True)  # the gathered CPU tensors
        _retie(plain)
        return plain


def _meta_copy(model: nn.Module) -> nn.Module:
    """The module tree with every parameter on the meta device: a template to load the gathered
    weights into, made without allocating a second copy of the model. Buffers (small: RoPE
    tables and the like, some not in the state dict) are copied to the CPU as they are."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)  # type: ignore[operator]


def _retie(model: nn.Module) -> None:
    """Restore the embedding/head tie that loading with ``assign`` splits (two state entries)."""
    tie = getattr(getattr(model, "config", None), "tie_embeddings", False)
    head, emb = getattr(model, "lm_head", None), getattr(model, "tok_emb", None)
    if tie and head is not None and emb is not None and head.weight is not emb.weight:
        head.weight = emb.weight


class _StateView:
    """A gathered state dict standing in for the module or optimiser ``save_checkpoint`` reads
    (``state_dict()`` plus the model's ``config``), so the file format stays the one format."""

    def __init__(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        self._state = state
        if model is not None:
            self.config = getattr(model, "config", None)

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _fqn_to_ids(optim_sd: dict[str, Any]) -> dict[str, Any]:
    """``torch.distributed.checkpoint``'s optimiser state (keyed by parameter name) in
    ``Optimizer.state_dict()``'s layout (ids numbered across the groups in order): what a DDP
    run's checkpoint holds for the same optimiser."""
    ids: dict[str, int] = {}
    groups = []
    for group in optim_sd["param_groups"]:
        numbered = []
        for name in group["params"]:
            ids.setdefault(name, len(ids))
            numbered.append(ids[name])
        groups.append({**group, "params": numbered})
    state = {ids[name]: value for name, value in optim_sd["state"].items()}
    return {"state": state, "param_groups": groups}


class _FsdpModelLoader:
    """What ``load_checkpoint`` loads the weights into: each rank takes its shard of the full
    state (all ranks read the same files, so they need a shared or copied checkpoint folder)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def parameters(self) -> Iterator[torch.Tensor]:
        yield torch.empty(0)  # load_checkpoint reads the full tensors onto the CPU

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=strict)
        set_model_state_dict(self.module, state, options=options)


class _FsdpOptimLoader:
    """The optimiser side of :class:`_FsdpModelLoader`: ids back to parameter names, then each
    rank keeps the shard of every state tensor that matches its parameter shards."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        # FSDP2 keeps the module tree, so parameter names are the plain model's; numbered in
        # optimiser order, as _fqn_to_ids numbered them when saving.
        name_of = {id(p): n for n, p in self.module.named_parameters()}
        names = [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
            raise ValueError(
                f"checkpoint optimiser state has "
                f"{sum(len(g['params']) for g in state['param_groups'])} parameters, the model "
                f"{len(names)}: not a checkpoint of this model"
            )
        by_name = {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(
            self.module,
            self.optimizer,
            by_name,
            options=StateDictOptions(full_state_dict=True),
        )
