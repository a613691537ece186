"""llm_core.batching: requests that join and leave a running batch decode exactly as alone."""

from __future__ import annotations

import threading

import pytest
import torch

from llm_core.batching import BatchEngine, GenRequest, QueueFull, Sampling
from llm_core.config import ModelConfig
from llm_core.generate import generate, stream
from llm_core.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(3)
    cfg = ModelConfig(97, 64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64)
    return Transformer(cfg).eval()


class Collector:
    """A request's tokens and its finish reason, as the engine reports them."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, token: int | None, finish: str | None) -> None:
        if token is not None:
            assert self.finish is None, "a token after the finish"
            self.tokens.append(token)
        else:
            self.finish = finish
            self.done.set()


def _request(prompt: list[int], n: int, **kw: object) -> tuple[GenRequest, Collector]:
    sink = Collector()
    return GenRequest(prompt, Sampling(n, **kw), sink), sink  # type: ignore[arg-type]


PROMPTS = [[5, 6, 7], list(range(10, 31)), [42], list(range(60, 70))]


def test_rows_joining_and_leaving_decode_as_alone(model: Transformer) -> None:
    engine = BatchEngine(model, max_batch=4)
    lengths = [30, 12, 25, 20]  # different lengths: rows leave while others run on
    sinks = []
    for step, (prompt, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
        request, sink = _request(prompt, n, temperature=0)
        engine.submit(request)
        sinks.append(sink)
        for _ in range(step * 3):  # later requests join a batch that is already decoding
            engine.run_once()
    while any(not s.done.is_set() for s in sinks):
        engine.run_once()
    for prompt, n, sink in zip(PROMPTS, lengths, sinks, strict=True):
        assert sink.tokens == generate(model, prompt, n, temperature=0)[0]
        assert sink.finish == "length"
    assert engine.max_rows_seen == 4
    assert engine.finished["length"] == 4


def test_threaded_engine_batches_concurrent_requests(model: Transformer) -> None:
    engine = BatchEngine(model, max_batch=8)
    pairs = [_request(p, 16, temperature=0) for p in PROMPTS]
    for request, _ in pairs:
        engine.submit(request)  # all waiting before the thread starts: one batch of four
    with engine:
        for _, sink in pairs:
            assert sink.done.wait(30)
    assert engine.max_rows_seen == 4
    assert engine.steps == 15  # 16 tokens: one from each prefill, 15 batched steps
    for prompt, (_, sink) in zip(PROMPTS, pairs, strict=True):
        assert sink.tokens == generate(model, prompt, 16, temperature=0)[0]


def test_seeded_sampling_and_stop_tokens_match_stream(model: Transformer) -> None:
    engine = BatchEngine(model)
    settings = dict(temperature=0.8, top_p=0.9, seed=5)
    reference = list(stream(model, PROMPTS[1], 30, stop_ids=(7,), **settings))  # type: ignore[arg-type]
    request, sink = _request(PROMPTS[1], 30, stop_ids=(7,), **settings)
    other, _ = _request(PROMPTS[0], 30, temperature=1.0)  # another row sampling beside it
    engine.submit(other)
    engine.submit(request)
    while not sink.done.is_set():
        engine.run_once()
    assert sink.tokens == reference
    assert sink.finish == ("stop" if len(reference) < 30 else "length")


def test_cancel_frees_the_slot_and_others_continue(model: Transformer) -> None:
    engine = BatchEngine(model)
    a, sink_a = _request(PROMPTS[0], 40, temperature=0)
    b, sink_b = _request(PROMPTS[1], 20, temperature=0)
    engine.submit(a)
    engine.submit(b)
    for _ in range(3):
        engine.run_once()
    a.cancel()
    engine.run_once()
    assert sink_a.finish == "cancelled" and len(sink_a.tokens) == 4
    assert engine.load == (1, 0)
    while not sink_b.done.is_set():
        engine.run_once()
    assert sink_b.tokens == generate(model, PROMPTS[1], 20, temperature=0)[0]


def test_admission_limits(model: Transformer) -> None:
    engine = BatchEngine(model, max_batch=1, max_queue=1)
    with pytest.raises(ValueError, match="context_length=64"):
        engine.submit(_request(list(range(50)), 15)[0])
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(_request([1, 500], 5)[0])
    engine.submit(_request([1], 5)[0])
    engine.submit(_request([2], 5)[0])  # one running slot + one queue place
    with pytest.raises(QueueFull):
        engine.submit(_request([3], 5)[0])
    with pytest.raises(ValueError, match="max_tokens"):
        Sampling(0)
