"""A tiny chat model on disk and ``scriptorium serve`` on it as a real subprocess (shared by the
API tests and the browser test)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llm_core.checkpoint import save_weights
from llm_core.config import ModelConfig
from llm_core.generate import generate
from llm_core.model import Transformer
from llm_core.sft import ChatSpecials, encode_prompt
from tests.llm_core.training_helpers import chat_tokenizer

SCRIPTORIUM = Path(sys.executable).parent / "scriptorium"


def tiny_chat_model(
    out: Path,
    ctx: int = 64,
    seed: int = 0,
    long_reply: int = 0,
    messages: Sequence[Mapping[str, str]] = ({"role": "user", "content": "hello"},),
    never_stop: bool = False,
) -> tuple[Transformer, Tokenizer]:
    """A random tiny Llama with the chat BPE saved beside it (``scriptorium serve`` reads both).

    ``long_reply`` > 0 picks the first seed whose greedy reply to ``messages`` runs that many
    tokens without a stop token: a random model may well stop at once, which would leave the
    tests nothing to compare. ``never_stop`` zeroes the LM-head rows of the stop tokens instead,
    so a greedy reply to any conversation runs to ``max_tokens`` (a browser can watch it stream
    and stop it midway).
    """
    tok = chat_tokenizer()
    sp = ChatSpecials.from_tokenizer(tok)
    prompt = encode_prompt(tok, messages)
    for s in range(seed, seed + 20):
        torch.manual_seed(s)
        cfg = ModelConfig(  # untied: a tied random model mostly echoes its last (special) token
            tok.get_vocab_size(), ctx, n_layer=2, n_head=2, n_kv_head=1, d_model=32,
            ffn_hidden=64, tie_embeddings=False,
        )  # fmt: skip
        model = Transformer(cfg).eval()
        if never_stop:
            with torch.no_grad():
                model.lm_head.weight[[sp.end, sp.eot]] = 0.0  # logit 0: never the argmax
        if not long_reply:
            break
        reply = generate(model, prompt, long_reply, temperature=0, stop_ids=(sp.end, sp.eot))[0]
        if len(reply) == long_reply and len(set(tok.decode(reply, skip_special_tokens=True))) > 8:
            break
    else:
        raise AssertionError(f"no seed gives a {long_reply}-token greedy reply")
    save_weights(model, out)
    tok.save(str(out / "tokenizer.json"))
    return model, tok


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny shapes gain nothing from threads, and on a busy machine spinning OpenMP workers make
    them many times slower (the reference generations of these tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Served:
    url: str
    process: subprocess.Popen[str]
    model_id: str


@contextlib.contextmanager
def serve(weights: Path, *extra: str, timeout: float = 60.0) -> Iterator[Served]:
    """``scriptorium serve --port 0`` until the block ends; yields once it prints its URL."""
    cmd = [str(SCRIPTORIUM), "serve", "--weights", str(weights), "--port", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:  # drain stdout for the life of the server, noting the URL line
        assert proc.stdout is not None
        for line in proc.stdout:
            found.append(line)
            if re.search(r"serving \S+ at http://", line):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(timeout) or proc.poll() is not None:
            raise AssertionError(f"scriptorium serve did not start: {''.join(found)}")
        match = next(
            m for line in found if (m := re.search(r"serving (\S+) at (http://\S+?)/?$", line))
        )
        yield Served(match[2], proc, match[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
