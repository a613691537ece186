"""Token shards and the samplers that read them.

- :mod:`llm_core.data.shards`: the on-disk format (writer, manifest, memory-mapped reader). NumPy
  only, so the data stages can write shards without importing PyTorch.
- :mod:`llm_core.data.sampler`: :class:`~llm_core.data.sampler.StepSampler`, the step-indexed,
  rank-sliced, resumable base of every training sampler (no NumPy, no torch).
- :mod:`llm_core.data.lm`: the training/eval samplers that turn shards into tensors (PyTorch).

This package re-exports only the shard names; import the samplers from their modules.
Importing ``llm_core.data`` never imports torch.
"""

from llm_core.data.shards import (
    MANIFEST_NAME,
    SHARD_FORMAT,
    ShardWriter,
    TokenShards,
    atomic_write_bytes,
    dtype_for_vocab,
    read_manifest,
    write_manifest,
)

__all__ = [
    "MANIFEST_NAME",
    "SHARD_FORMAT",
    "ShardWriter",
    "TokenShards",
    "atomic_write_bytes",
    "dtype_for_vocab",
    "read_manifest",
    "write_manifest",
]
