"""Continuous batched decoding for a server: many independent requests, one forward per step.

A chat server on a CPU is bound by streaming the weights from memory once per decoding step, and
that cost is the same whether the step advances one sequence or eight. :class:`BatchEngine`
therefore keeps every running request in one batch: each step feeds the last token of every row
through the model against one shared :class:`~llm_core.decode.KVCache` and samples each row with
its own settings. A request that arrives while others decode is prefilled alone (its prompt in
one forward, which is what makes the time to its first token short) and then *joins* the running
batch at the next step; a finished or cancelled request leaves it. Nobody waits for a batch to
drain.

Rows are right-aligned in the cache (left padding), as :func:`llm_core.generate.generate` does:
``start[b]`` pad columns, masked out of attention, with RoPE positions counted from each row's
first real token. A join or a leave rebuilds the cache once (a copy of the live columns, shifted
so the longest row starts at column 0): tens of kilobytes per layer at the demo shape, rare next
to the per-token steps. A row alone in the batch has no padding, so its tokens are exactly those
of :func:`llm_core.generate.stream` for the same prompt and settings (greedy, or sampling with the
same ``seed``: each row has its own generator).

The engine owns one thread (torch releases the GIL inside its kernels); callers hand it
:class:`GenRequest` objects and get each token through the request's ``on_event`` callback, from
the engine thread. Admission is bounded: at most ``max_batch`` rows decode and at most
``max_queue`` requests wait; :meth:`BatchEngine.submit` refuses more with :class:`QueueFull`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llm_core.decode import InferenceWeights, KVCache
from llm_core.generate import sample_next
from llm_core.model import Transformer

__all__ = ["BatchEngine", "GenRequest", "QueueFull", "Sampling"]


class QueueFull(RuntimeError):
    """The engine already holds ``max_batch`` running and ``max_queue`` waiting requests."""


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings (``temperature == 0`` is greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


# on_event(token, finish_reason): a token (finish_reason None), then exactly one final call with
# token None and finish_reason "stop" (a stop token), "length" (max_tokens), "cancelled" or
# "error: <message>".
EventCallback = Callable[[int | None, str | None], None]


@dataclass(eq=False)
class GenRequest:
    """A prompt, its settings and where its tokens go. ``cancel()`` is safe from any thread."""

    prompt_ids: list[int]
    sampling: Sampling
    on_event: EventCallback
    submitted: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop generating for this request: it leaves the batch before the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(eq=False)
class _Row:
    """A request in the running batch: its cached length, last token and sampler."""

    request: GenRequest
    length: int  # tokens in the KV cache for this row
    last: int  # the token sampled last, fed at the next step
    produced: int
    generator: torch.Generator | None


class BatchEngine:
    """A decoding thread serving :class:`GenRequest` objects with continuous batching."""

    def __init__(self, model: Transformer, *, max_batch: int = 8, max_queue: int = 32) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(
                f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}"
            )
        self.model = model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context_length = model.config.context_length
        self._weights = InferenceWeights(model)  # never trained while served: one snapshot
        self._pending: deque[GenRequest] = deque()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self.steps = 0  # decoding steps taken (tests, /health and the benchmark read these)
        self.max_rows_seen = 0
        self.finished: Counter[str] = Counter()  # requests ended, by finish reason

    # ------------------------------------------------------------------------------ public
    def start(self) -> BatchEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish nothing more: every running or waiting request ends ``cancelled``."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def __enter__(self) -> BatchEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(self, request: GenRequest) -> None:
        """Queue ``request``; raises ValueError for a prompt the model cannot take and
        :class:`QueueFull` when the waiting room is full."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt has no tokens")
        if n + request.sampling.max_tokens > self.context_length:
            raise ValueError(
                f"prompt of {n} tokens + max_tokens={request.sampling.max_tokens} exceeds the "
                f"model's context_length={self.context_length}"
            )
        vocab = self.model.config.vocab_size
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        with self._wake:
            if self._stopping:
                raise QueueFull("the engine is stopping")
            if len(self._pending) >= self.max_queue + max(0, self.max_batch - len(self._rows)):
                raise QueueFull(
                    f"{len(self._rows)} requests running and {len(self._pending)} waiting"
                )
            self._pending.append(request)
            self._wake.notify_all()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests: a snapshot for health checks."""
        with self._wake:
            return len(self._rows), len(self._pending)

    # ------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._pending and not self._rows:
                        self._wake.wait()
                    if self._stopping:
                        break
                self.run_once()
        except Exception as exc:  # a bug must not leave clients waiting forever
            self._fail_all(f"error: {type(exc).__name__}: {exc}")
            raise
        self._fail_all("cancelled")

    def run_once(self) -> None:
        """Admit waiting requests, then advance every running row by one token: the body of
        the engine's loop, public so that a test (or a single-threaded caller that never calls
        :meth:`start`) can drive the engine step by step."""
        self._admit()
        if self._rows:
            self._step()

    def _fail_all(self, reason: str) -> None:
        with self._wake:
            waiting, self._pending = list(self._pending), deque()
        for request in [*waiting, *(row.request for row in self._rows)]:
            self._finish(request, reason)
        self._rows, self._cache = [], None

    def _finish(self, request: GenRequest, reason: str) -> None:
        self.finished[reason.split(":")[0]] += 1
        request.on_event(None, reason)

    def _admit(self) -> None:
        """Prefill waiting requests while the batch has room; each joins the running batch."""
        joined: list[tuple[_Row, KVCache]] = []
        while len(self._rows) + len(joined) < self.max_batch:
            with self._wake:
                if not self._pending:
                    break
                request = self._pending.popleft()
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            try:
                started = self._prefill(request)
            except Exception as exc:  # neither waiting nor running: tell its client here
                self._finish(request, f"error: {type(exc).__name__}: {exc}")
                raise
            if started is not None:
                joined.append(started)
        if joined:
            self._rebuild(joined)

    @torch.inference_mode()
    def _prefill(self, request: GenRequest) -> tuple[_Row, KVCache] | None:
        """The prompt in one forward into its own cache, and the first token (sent at once)."""
        s = request.sampling
        generator = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        ids = torch.tensor([request.prompt_ids], dtype=torch.long)
        cache = self.model.new_kv_cache(1, max_len=self.context_length)
        with self._weights.installed():
            logits = self.model.lm_head(self.model.hidden_states(ids, kv_cache=cache)[:, -1])
        row = _Row(request, len(request.prompt_ids), -1, 0, generator)
        token = self._sample(row, logits.float())
        return (row, cache) if self._emit(row, token) else None

    def _sample(self, row: _Row, logits: Tensor) -> int:
        s = row.request.sampling
        if s.temperature == 0:
            return int(logits.argmax(dim=-1)[0])
        if row.generator is None:  # unseeded: a fresh generator from the OS's entropy
            row.generator = torch.Generator()
            row.generator.seed()
        picked = sample_next(
            logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, generator=row.generator
        )
        return int(picked[0])

    def _emit(self, row: _Row, token: int) -> bool:
        """Send ``token`` (or the finish); True while the row goes on decoding."""
        request, s = row.request, row.request.sampling
        if request.cancelled:
            self._finish(request, "cancelled")
            return False
        if token in s.stop_ids:
            self._finish(request, "stop")
            return False
        row.produced += 1
        row.last = token
        request.on_event(token, None)
        if row.produced >= s.max_tokens:
            self._finish(request, "length")
            return False
        return True

    @torch.inference_mode()
    def _step(self) -> None:
        """One token for every running row, then drop the rows that finished."""
        cache = self._cache
        assert cache is not None
        ids = torch.tensor([[row.last] for row in self._rows], dtype=torch.long)
        with self._weights.installed():
            h = self.model.hidden_states(ids, kv_cache=cache)[:, -1]
            logits = self.model.lm_head(h).float()
        self.steps += 1
        greedy = logits.argmax(dim=-1).tolist()
        keep: list[int] = []  # batch indices of the rows that go on
        for i, row in enumerate(self._rows):
            row.length += 1
            if row.request.sampling.temperature == 0:
                token = greedy[i]
            else:
                token = self._sample(row, logits[i : i + 1])
            if self._emit(row, token):
                keep.append(i)
        if len(keep) != len(self._rows):
            self._rebuild([], keep)

    def _rebuild(
        self, joined: Sequence[tuple[_Row, KVCache]], keep: Sequence[int] | None = None
    ) -> None:
        """One cache for the running rows at batch indices ``keep`` (default all) plus
        ``joined``, right-aligned and compacted."""
        kept = range(len(self._rows)) if keep is None else keep
        sources = [(self._rows[i], self._cache, i) for i in kept]
        sources += [(row, cache, 0) for row, cache in joined]
        self._rows = [row for row, _, _ in sources]
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        if not sources:
            self._cache = None
            return
        width = max(row.length for row in self._rows)
        starts = [width - row.length for row in self._rows]
        cfg = self.model.config
        dtype = self.model.tok_emb.weight.dtype
        new = KVCache(
            cfg.n_layer, len(self._rows), cfg.kv_heads, self.context_length, cfg.head_dim,
            start=starts, dtype=dtype,
        )  # fmt: skip
        for layer in range(cfg.n_layer):
            nk, nv = new.k[layer], new.v[layer]
            assert nk is not None and nv is not None
            for b, (row, src, i) in enumerate(sources):
                assert src is not None
                sk, sv = src.k[layer], src.v[layer]
                assert sk is not None and sv is not None
                n = row.length
                nk[b, :, width - n : width] = sk[i, :, src.pos - n : src.pos]
                nv[b, :, width - n : width] = sv[i, :, src.pos - n : src.pos]
        new.pos = width
        self._cache = new
