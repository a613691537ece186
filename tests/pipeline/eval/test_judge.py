"""Judges: the reward model (pointwise, order-proof) and an OpenAI-compatible HTTP judge served
by a tiny local server in the test."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import torch

from llm_core.evaluate import reward_win_rate
from llm_core.model import Transformer
from llm_core.reward import RewardModel, score_replies
from llm_core.tokenizer import train_bpe
from pipeline.eval.judge import (
    TIE_TOLERANCE,
    http_judge,
    judge_prompt,
    parse_verdict,
    reward_judge,
)
from tests.llm_core.training_helpers import tiny_model_config

PROMPTS = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(6)]
A = ["a long and detailed answer", "no", "yes indeed, certainly", "ok", "the sea", "x"]
B = ["short", "a much longer reply here", "maybe", "fine then", "the sea", "y y y"]


def test_reward_judge_with_a_real_reward_model_agrees_in_both_orders() -> None:
    tok = train_bpe([*A, *B, "Question number"] * 3, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    rm = RewardModel(Transformer(tiny_model_config(tok.get_vocab_size(), 32))).eval()
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # spread the rewards so few pairs tie

    def score(prompts: Any, replies: Any) -> np.ndarray:
        return score_replies(rm, tok, prompts, replies, batch_size=4)

    result = reward_judge(score, PROMPTS, A, B)
    # Scored apart (other batches): the same verdicts once last-bit float noise counts as a tie.
    direct = reward_win_rate(score(PROMPTS, A), score(PROMPTS, B), tie_tolerance=TIE_TOLERANCE)
    assert result["win_rate"] == pytest.approx(direct["win_rate"])
    assert result["ties"] >= 1  # "the sea" vs "the sea": identical replies tie
    assert result["order_agreement"] == 1.0 and result["pointwise"]
    assert result["swapped_win_rate"] == pytest.approx(result["win_rate"])


def test_reward_judge_exposes_scores_that_depend_on_batch_position() -> None:
    """A scorer that leaks position (a padding or batching bug) loses order agreement."""

    def leaky(prompts: Any, replies: Any) -> np.ndarray:
        n = len(replies) // 2
        return np.array([len(r) + (5.0 if i < n else 0.0) for i, r in enumerate(replies)])

    result = reward_judge(leaky, PROMPTS, A, B)
    assert result["order_agreement"] < 1.0
    assert result["swapped_win_rate"] != pytest.approx(result["win_rate"])


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-style ``/v1/chat/completions``: picks the longer reply, or always ``A``."""

    biased = False
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), **body}
        )
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        text = body["messages"][-1]["content"]
        a, b = re.search(r"\[Reply A\]\n(.*)\n\n\[Reply B\]\n(.*)\n\nWhich", text, re.S).groups()
        verdict = "A" if self.biased or len(a) >= len(b) else "B"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_server() -> Iterator[tuple[str, type[_Judge]]]:
    handler = type("Judge", (_Judge,), {"seen": [], "biased": False})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        server.shutdown()
        server.server_close()


def test_http_judge_asks_both_orders(judge_server: tuple[str, type[_Judge]]) -> None:
    url, handler = judge_server
    result = http_judge(url, PROMPTS, A, B, model="judge-model", api_key="k-123")
    # longer wins in both orders; equal lengths ("the sea") split A/B by position -> a tie
    longer = [len(a) > len(b) for a, b in zip(A, B, strict=True)]
    shorter = [len(a) < len(b) for a, b in zip(A, B, strict=True)]
    assert (result["wins"], result["losses"], result["ties"]) == (sum(longer), sum(shorter), 1)
    assert result["order_agreement"] == pytest.approx(5 / 6)
    assert len(handler.seen) == 2 * len(PROMPTS)
    first = handler.seen[0]
    assert first["auth"] == "Bearer k-123" and first["model"] == "judge-model"
    assert first["temperature"] == 0


def test_http_judge_cancels_a_position_bias(judge_server: tuple[str, type[_Judge]]) -> None:
    url, handler = judge_server
    handler.biased = True  # always answers "A": every verdict flips when the order does
    result = http_judge(url, PROMPTS, A, B, model="m")
    assert result["win_rate"] == 0.5 and result["ties"] == len(PROMPTS)
    assert result["order_agreement"] == 0.0


def test_http_judge_reports_http_errors(judge_server: tuple[str, type[_Judge]]) -> None:
    url, _ = judge_server
    with pytest.raises(RuntimeError, match="HTTP 404"):
        http_judge(url.replace("/v1", "/nope"), PROMPTS[:1], A[:1], B[:1], model="m")


def test_verdict_parsing_and_prompt() -> None:
    assert parse_verdict("B") == "B" and parse_verdict("Answer: A.") == "A"
    assert parse_verdict("Both are bad") is None
    text = judge_prompt(PROMPTS[0], "one", "two")
    assert "[Reply A]\none" in text and "[Reply B]\ntwo" in text
