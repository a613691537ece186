"""Fixtures shared by the llm_core tests (opt-in: none is autouse)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tokenizers import Tokenizer

from tests.llm_core.training_helpers import chat_tokenizer


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny shapes gain nothing from threads, and on a busy shared machine spinning OpenMP
    workers can make them many times slower. Use with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chat_tok() -> Tokenizer:
    """The small chat BPE of ``training_helpers.chat_tokenizer`` (trained once per module)."""
    return chat_tokenizer()
