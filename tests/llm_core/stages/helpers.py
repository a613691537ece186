"""Input files for the stage tests: the stages read their data from files, never from objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer


def write_pairs(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """A ``preference_pairs`` split file: ``prompt`` ([{role, content}]), ``chosen``, ``rejected``.

    Name it ``train.parquet`` or ``val.parquet`` (an empty *train* split is refused)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(
        [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    )
    pq.write_table(table, path)
    return path


def prompt_pairs(prompts: Sequence[Sequence[Mapping[str, str]]]) -> list[dict[str, Any]]:
    """Pairs that only carry prompts (GRPO and best-of-n read the pairs' distinct prompts)."""
    return [{"prompt": list(p), "chosen": "yes", "rejected": "no"} for p in prompts]


def write_tokenizer(tok: Tokenizer, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.to_str())
    return path


PRETRAIN_VOCAB = 336


def sample_tokenizer(path: Path) -> Path:
    """A small BPE (at most ``PRETRAIN_VOCAB`` ids) for the pretrain stage's samples step: trained
    on its fixed prompts, so each is a few tokens and fits a 16-token context."""
    from llm_core.stages.samples import SAMPLE_PROMPTS
    from llm_core.tokenizer import train_bpe

    tok = train_bpe([" ".join(SAMPLE_PROMPTS)] * 50, PRETRAIN_VOCAB, min_frequency=1)
    return write_tokenizer(tok, path)
