"""``scriptorium serve`` through the official ``openai`` client: the replies are llm_core's own
generation, concurrent streams are batched and complete, bad requests get their documented 4xx.

One real server subprocess on a tiny random model serves the whole module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from tokenizers import Tokenizer

from llm_core.generate import generate, stream
from llm_core.model import Transformer
from llm_core.sft import ChatSpecials, encode_prompt
from llm_core.tokenizer import EOT
from tests.pipeline.serve.serving import Served, one_thread, serve, tiny_chat_model

CTX = 64
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the sea"}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer, Tokenizer]:
    out = tmp_path_factory.mktemp("tiny_chat")
    model, tok = tiny_chat_model(out, ctx=CTX, long_reply=40, messages=MESSAGES)
    return out, model, tok


@pytest.fixture(scope="module")
def server(tiny: tuple[Path, Transformer, Tokenizer]) -> Iterator[Served]:
    with serve(tiny[0], "--model-name", "tiny", "--max-tokens-cap", "48") as served:
        yield served


@pytest.fixture(scope="module")
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat_reference(model: Transformer, tok: Tokenizer, n: int, **sampling: object) -> str:
    sp = ChatSpecials.from_tokenizer(tok)
    ids = encode_prompt(tok, MESSAGES)
    if sampling:
        new = list(stream(model, ids, n, stop_ids=(sp.end, sp.eot), **sampling))  # type: ignore[arg-type]
    else:
        new = generate(model, ids, n, temperature=0, stop_ids=(sp.end, sp.eot))[0]
    return tok.decode(new, skip_special_tokens=True)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_replies_equal_llm_core_greedy_generation(client: openai.OpenAI, tiny) -> None:
    _, model, tok = tiny
    expected = _chat_reference(model, tok, 30)
    assert expected  # the random model says something before any stop token
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=30
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(encode_prompt(tok, MESSAGES))

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # streamed in pieces, not one blob
    assert "".join(deltas) == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == reply.choices[0].finish_reason and finishes[:-1] == [None] * (
        len(finishes) - 1
    )
    assert chunks[-1].usage == reply.usage


def test_seeded_sampling_equals_llm_core_stream(client: openai.OpenAI, tiny) -> None:
    _, model, tok = tiny
    expected = _chat_reference(model, tok, 25, temperature=0.9, top_p=0.8, seed=11)
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0.9, top_p=0.8, seed=11, max_tokens=25
    )
    assert reply.choices[0].message.content == expected


def test_completions_and_stop_strings(client: openai.OpenAI, tiny) -> None:
    _, model, tok = tiny
    ids = tok.encode("the old king", add_special_tokens=False).ids
    new = generate(model, ids, 20, temperature=0, stop_ids=(tok.token_to_id(EOT),))[0]
    expected = tok.decode(new, skip_special_tokens=True)
    full = client.completions.create(
        model="tiny", prompt="the old king", max_tokens=20, temperature=0
    )
    assert full.choices[0].text == expected
    streamed = client.completions.create(
        model="tiny", prompt="the old king", max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    # A stop string cuts the reply before it, in both modes, with finish_reason "stop".
    stop = expected.strip()[len(expected.strip()) // 2 :][:3]
    cut = client.completions.create(
        model="tiny", prompt="the old king", max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == expected[: expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    pieces = client.completions.create(
        model="tiny", prompt="the old king", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == cut.choices[0].text


def test_two_concurrent_streams_complete_while_the_server_answers(
    client: openai.OpenAI, server: Served, tiny
) -> None:
    _, model, tok = tiny
    prompts = [
        [{"role": "user", "content": "the sea"}],
        [{"role": "user", "content": "the old king and the river"}],
    ]
    results: list[tuple[str, str | None]] = [("", None), ("", None)]
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        parts, finish = [], None
        for c in client.chat.completions.create(
            model="tiny", messages=prompts[i], temperature=0, max_tokens=30, stream=True
        ):
            parts.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
        results[i] = ("".join(parts), finish)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    started = time.monotonic()
    assert requests.get(f"{server.url}/v1/models", timeout=5).status_code == 200
    assert time.monotonic() - started < 5
    for t in threads:
        t.join(timeout=60)
    sp = ChatSpecials.from_tokenizer(tok)
    for (text, finish), messages in zip(results, prompts, strict=True):
        ids = encode_prompt(tok, messages)
        new = generate(model, ids, 30, temperature=0, stop_ids=(sp.end, sp.eot))[0]
        assert finish in ("stop", "length")
        assert text == tok.decode(new, skip_special_tokens=True)
    health = requests.get(f"{server.url}/health", timeout=5).json()
    assert health["running"] == 0 and health["waiting"] == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        ({"model": "gpt-4o", "messages": MESSAGES}, 404, "model_not_found"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": 49}, 400, "max_tokens_too_large"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "the sea " * 40}]},
            400,
            "context_length_exceeded",
        ),
        (
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "the sea " * 12}],
                "max_tokens": 40,
            },
            400,
            "context_length_exceeded",
        ),
        ({"model": "tiny", "messages": []}, 400, "invalid_value"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
        ({"model": "tiny", "messages": MESSAGES, "temperature": 3}, 400, "invalid_value"),
        ({"model": "tiny", "messages": MESSAGES, "n": 2}, 400, "invalid_value"),
        ({"model": "tiny", "messages": MESSAGES, "stop": ["a"] * 5}, 400, "invalid_value"),
        ({"model": "tiny", "messages": MESSAGES, "pad": "x" * (1 << 20)}, 413, "request_too_large"),
    ],
    ids=[
        "malformed-json",
        "not-an-object",
        "unknown-model",
        "max-tokens-cap",
        "prompt-overflows-context",
        "prompt-plus-max-tokens-overflow",
        "no-messages",
        "unknown-role",
        "temperature-range",
        "n-above-one",
        "too-many-stops",
        "body-too-large",
    ],
)
def test_bad_requests_get_their_documented_status(
    server: Served, body: object, status: int, code: str
) -> None:
    url = f"{server.url}/v1/chat/completions"
    r = (
        requests.post(url, data=body, timeout=10)
        if isinstance(body, bytes)
        else requests.post(url, json=body, timeout=10)
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_client_errors_surface_as_openai_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="the sea " * 40, max_tokens=10)


def test_routes_and_methods(server: Served) -> None:
    assert requests.get(f"{server.url}/v1/chat/completions", timeout=5).status_code == 405
    assert requests.get(f"{server.url}/v1/nothing", timeout=5).status_code == 404
    page = requests.get(f"{server.url}/", timeout=5)
    assert page.status_code == 200 and "<script>" in page.text
    assert "://" not in page.text  # no CDN, no external request
