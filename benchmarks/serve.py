"""Serving: time to first token and tokens/s of ``scriptorium serve``, one client against four.

A real ``scriptorium serve`` subprocess serves the model; the clients here stream
``/v1/completions`` (server-sent events) over loopback with a small ``http.client`` reader (the
``openai`` client's own parsing would cost the 2 shared cores more than the server's work at
these rates). Every request sends the same ~100-token prompt and asks for ``--max-tokens``
tokens (sampled, a different seed per request, so no two rows are identical; a reply that meets
the end-of-text token ends early and only the tokens received count).

Each round runs both sides back to back in rotating order (``benchmarks/common.py``):

- ``one``: one client, one request;
- ``four``: four clients at once, one request each (the batching engine decodes them together).

Figures: aggregate tokens/s of ``four`` over ``one`` (target >= 2x: batching pays), the time to
first token (TTFT) of the single client (target <= 0.5 s for the 100-token prompt) and of the
four (the worst of each round), per-stream tokens/s, and the server's own record (largest batch
seen, steps). The last line is one JSON object with every figure.

Usage: python benchmarks/serve.py [--weights /tmp/demo_data/rlhf_weights] [--rounds 5]
       python benchmarks/serve.py --smoke     # a random tiny model: seconds
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    add_common_args,
    compare,
    describe,
    emit,
    interleave,
    machine_info,
    summarize,
)

SCRIPTORIUM = Path(sys.executable).parent / "scriptorium"
PROMPT_SEED = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the "
    "winter of despair, we had everything before us, we had nothing before us, we were all going "
    "direct to Heaven, we were all going direct the other way. "
)


@contextlib.contextmanager
def server(weights: Path, threads: int | None) -> Iterator[tuple[str, int, str]]:
    """``scriptorium serve --port 0`` until the block ends: (host, port, model id)."""
    cmd = [str(SCRIPTORIUM), "serve", "--weights", str(weights), "--port", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if m := re.search(r"serving (\S+) at http://([\d.]+):(\d+)/", line):
                threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
                yield m[2], int(m[3]), m[1]
                return
        raise RuntimeError(f"scriptorium serve exited with {proc.wait()}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def prompt_of(tokenizer_path: Path, n_tokens: int) -> str:
    """A text that encodes to about ``n_tokens`` tokens with the served tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    ids = tok.encode(PROMPT_SEED * (1 + n_tokens // 20), add_special_tokens=False).ids
    return tok.decode(ids[:n_tokens])


class Client:
    """One streaming request: its time to first token, tokens received and duration."""

    def __init__(self, host: str, port: int, body: dict[str, Any]) -> None:
        self.host, self.port, self.body = host, port, body
        self.ttft = float("nan")
        self.tokens = 0
        self.seconds = float("nan")
        self.prompt_tokens = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        t0 = time.perf_counter()
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps(self.body),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "usage" in chunk and chunk["usage"]:
                self.tokens = chunk["usage"]["completion_tokens"]
                self.prompt_tokens = chunk["usage"]["prompt_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"] and self.ttft != self.ttft:
                self.ttft = time.perf_counter() - t0
        self.seconds = time.perf_counter() - t0
        conn.close()


def run_clients(host: str, port: int, bodies: list[dict[str, Any]]) -> tuple[list[Client], float]:
    clients = [Client(host, port, b) for b in bodies]
    threads = [threading.Thread(target=c.run) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients, time.perf_counter() - t0


def smoke_model(out: Path) -> Path:
    """A random tiny model and a small BPE (the smoke run's figures mean nothing)."""
    import torch

    from llm_core.checkpoint import save_weights
    from llm_core.config import ModelConfig
    from llm_core.model import Transformer
    from llm_core.tokenizer import train_bpe

    tok = train_bpe(iter([PROMPT_SEED * 50]), vocab_size=300)
    tok.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig(tok.get_vocab_size(), 256, n_layer=2, n_head=2, d_model=32, ffn_hidden=64)
    save_weights(Transformer(cfg), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--weights", type=Path, default=Path("/tmp/demo_data/rlhf_weights"))
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    args = ap.parse_args()
    info = machine_info()
    print(f"{info['cpu_model']} @ {info['cpu_mhz']} MHz, load average {info['loadavg']}")
    scratch = tempfile.TemporaryDirectory(prefix="serve-bench-")
    if args.smoke:
        args.weights = smoke_model(Path(scratch.name))
        args.max_tokens, args.rounds, args.warmup = 24, 2, 1
    tokenizer = args.weights / "tokenizer.json"
    prompt = prompt_of(tokenizer, args.prompt_tokens)

    with server(args.weights, args.threads) as (host, port, model):
        seeds = iter(range(10**6))

        def body() -> dict[str, Any]:
            return {
                "model": model,
                "prompt": prompt,
                "max_tokens": args.max_tokens,
                "temperature": 0.8,
                "seed": next(seeds),
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        record: dict[str, list[list[Client] | float]] = {"one": [], "four": []}

        def side(name: str, n: int) -> Any:
            def run() -> float:
                clients, wall = run_clients(host, port, [body() for _ in range(n)])
                record[name].append((clients, wall))  # type: ignore[arg-type]
                return wall

            return run

        interleave(
            {"one": side("one", 1), "four": side("four", args.clients)},
            rounds=args.rounds,
            warmup=args.warmup,
        )
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())

    def rounds(name: str) -> list[tuple[list[Client], float]]:
        return record[name][args.warmup :]  # type: ignore[return-value]

    def rate(clients: list[Client], wall: float) -> float:
        return sum(c.tokens for c in clients) / wall

    one_rates = [rate(c, w) for c, w in rounds("one")]
    four_rates = [rate(c, w) for c, w in rounds("four")]
    ttft_one = [c[0].ttft for c, _ in rounds("one")]
    ttft_four = [max(x.ttft for x in c) for c, _ in rounds("four")]
    per_stream_four = [x.tokens / x.seconds for c, _ in rounds("four") for x in c]
    aggregate = compare(
        four_rates,
        one_rates,
        lower_is_better=False,
        target=2.0,
        a_name=f"{args.clients} clients, aggregate tokens/s",
        b_name="1 client, tokens/s",
    )
    ttft = summarize(ttft_one, target=0.5, at_most=True)
    print(f"aggregate tokens/s, {args.clients} clients vs 1: {describe(aggregate)}")
    print(f"TTFT, 1 client: {describe(ttft, ' s')}")
    prompt_tokens = rounds("one")[0][0][0].prompt_tokens
    emit(
        {
            "benchmark": "serve",
            "smoke": args.smoke,
            "machine": info,
            "loadavg_end": machine_info()["loadavg"],
            "weights": str(args.weights) if not args.smoke else "random tiny model",
            "server_threads": args.threads or "torch default",
            "prompt_tokens": prompt_tokens,
            "max_tokens": args.max_tokens,
            "clients": args.clients,
            "one_client_tokens_per_s": summarize(one_rates),
            "four_clients_aggregate_tokens_per_s": summarize(four_rates),
            "four_clients_per_stream_tokens_per_s": round(statistics.median(per_stream_four), 1),
            "aggregate_speedup": aggregate,
            "ttft_s_one_client": ttft,
            "ttft_s_four_clients_worst": summarize(ttft_four),
            "tokens_per_request": {
                "one": [c[0].tokens for c, _ in rounds("one")],
                "four": [[x.tokens for x in c] for c, _ in rounds("four")],
            },
            "server": health,
            "pid": os.getpid(),
        }
    )
    scratch.cleanup()


if __name__ == "__main__":
    main()
