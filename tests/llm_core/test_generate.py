"""Generation: cache equivalence, left-padded batches, stopping, sampling filters, streaming."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from llm_core.config import ModelConfig
from llm_core.generate import _penalize, generate, sample_next, stream
from llm_core.model import Transformer

V = 61


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny shapes gain nothing from threads, and on a busy shared machine spinning OpenMP
    workers can make them 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request: pytest.FixtureRequest) -> Transformer:
    """Each test runs on both block families (GPT-2: learned positions, plain multi-head)."""
    torch.manual_seed(0)
    kv = 2 if request.param == "llama" else None
    cfg = ModelConfig(vocab_size=V, context_length=24, n_layer=2, n_head=4, n_kv_head=kv,
                      d_model=32, ffn_hidden=64, tie_embeddings=False, arch=request.param)  # fmt: skip
    m = Transformer(cfg).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init: no near-ties for greedy to trip on
        m.lm_head.weight.mul_(10)
    return m


PROMPTS = [[5, 9, 2, 33, 17, 8, 1], [40, 3], [12, 12, 7, 50]]


def test_cached_greedy_equals_uncached(model: Transformer) -> None:
    a = generate(model, PROMPTS[0], 12, temperature=0, use_cache=True)
    b = generate(model, PROMPTS[0], 12, temperature=0, use_cache=False)
    assert a == b and len(a[0]) == 12


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_rows(model: Transformer, use_cache: bool) -> None:
    batch = generate(model, PROMPTS, 10, temperature=0, use_cache=use_cache, pad_id=3)
    rows = [generate(model, p, 10, temperature=0, use_cache=use_cache)[0] for p in PROMPTS]
    assert batch == rows


def test_past_context_window_slides(model: Transformer) -> None:
    # 7 prompt tokens + 30 new > context_length=24: the tail is generated on a sliding window.
    a = generate(model, PROMPTS, 30, temperature=0, use_cache=True)
    b = generate(model, PROMPTS, 30, temperature=0, use_cache=False)
    assert a == b and all(len(r) == 30 for r in a)


def test_prompt_longer_than_context_is_refused(model: Transformer) -> None:
    with pytest.raises(ValueError, match="context_length"):
        generate(model, list(range(25)), 1)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 1)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [V], 1)


def test_stop_tokens_per_row(model: Transformer) -> None:
    free = generate(model, PROMPTS, 8, temperature=0)
    stop = free[0][3]  # row 0's 4th token
    first = free[0].index(stop)
    out = generate(model, PROMPTS, 8, temperature=0, stop_ids=[stop])
    assert out[0] == free[0][:first]  # stop token excluded, nothing after it
    for got, ref in zip(out[1:], free[1:], strict=True):
        expected = ref[: ref.index(stop)] if stop in ref else ref
        assert got == expected
    assert generate(model, PROMPTS[0], 8, temperature=0, stop_ids=stop) == [free[0][:first]]
    kept = generate(model, PROMPTS, 8, temperature=0, stop_ids=[stop], keep_stop=True)
    assert kept[0] == free[0][: first + 1]  # the stop token that ended the row, and no more
    assert all(k == (o + [stop] if len(o) < 8 else o) for k, o in zip(kept, out, strict=True))


def test_chat_replies_are_batched_greedy_replies_to_the_chat_template() -> None:
    from llm_core.generate import chat_replies
    from llm_core.sft import ChatSpecials, encode_prompt
    from llm_core.tokenizer import train_bpe

    tok = train_bpe(["Tell me about the sea and the old king of the river."] * 20, 300)
    sp = ChatSpecials.from_tokenizer(tok)
    torch.manual_seed(1)
    cfg = ModelConfig(tok.get_vocab_size(), 32, n_layer=2, n_head=2, d_model=32, ffn_hidden=64)
    lm = Transformer(cfg).eval()
    prompts = [
        [{"role": "user", "content": "Tell me about the sea."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The king?"}],
        [{"role": "user", "content": "the river " * 40}],  # longer than the context
    ]
    replies = chat_replies(lm, tok, prompts, 6, batch_size=2)
    for p, r in zip(prompts, replies, strict=True):
        ids = encode_prompt(tok, p)[-(32 - 6) :]  # the prompt keeps its last tokens
        new = generate(lm, ids, 6, temperature=0, stop_ids=(sp.end, sp.eot))[0]
        assert r == tok.decode(new, skip_special_tokens=True).strip()
    assert chat_replies(lm, tok, prompts, 6, batch_size=16) == replies
    sampled = chat_replies(lm, tok, prompts * 4, 6, temperature=1.0, seed=5)
    assert sampled == chat_replies(lm, tok, prompts * 4, 6, temperature=1.0, seed=5)
    assert len(set(sampled)) > 3
    assert chat_replies(lm, tok, [], 6) == []


def test_zero_new_tokens(model: Transformer) -> None:
    assert generate(model, PROMPTS, 0) == [[], [], []]


def test_seeded_sampling_is_reproducible(model: Transformer) -> None:
    a = generate(model, PROMPTS, 10, temperature=1.0, seed=123)
    b = generate(model, PROMPTS, 10, temperature=1.0, seed=123)
    c = generate(model, PROMPTS, 10, temperature=1.0, seed=124)
    assert a == b and a != c


def test_top_k_one_and_tiny_top_p_are_greedy(model: Transformer) -> None:
    greedy = generate(model, PROMPTS, 8, temperature=0)
    assert generate(model, PROMPTS, 8, temperature=1.3, top_k=1, seed=0) == greedy
    assert generate(model, PROMPTS, 8, temperature=1.3, top_p=1e-6, seed=0) == greedy


def test_sample_next_filters() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert (sample_next(logits, temperature=0) == 0).all()
    k = sample_next(logits, top_k=3, generator=g)
    assert set(k.tolist()) == {0, 1, 2}
    # softmax mass: 0.64, 0.24, 0.09, ... -> top_p=0.8 keeps exactly the first two tokens
    p = sample_next(logits, top_p=0.8, generator=g)
    assert set(p.tolist()) == {0, 1}
    hot = sample_next(logits, temperature=100.0, generator=g)
    assert len(set(hot.tolist())) == 6  # high temperature: close to uniform


@pytest.mark.parametrize(
    "bad",
    [{"top_p": 1.5}, {"top_p": 0.0}, {"top_k": 0}, {"temperature": -1.0},
     {"repetition_penalty": 0.0}, {"max_new_tokens": -1}],
)  # fmt: skip
def test_invalid_arguments_are_refused(model: Transformer, bad: dict[str, float]) -> None:
    kwargs: dict[str, float] = {"max_new_tokens": 2, **bad}
    with pytest.raises(ValueError):
        generate(model, [1, 2], **kwargs)  # type: ignore[arg-type]


def test_repetition_penalty(model: Transformer) -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert _penalize(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    assert generate(model, PROMPTS, 12, temperature=0, repetition_penalty=1.0) == generate(
        model, PROMPTS, 12, temperature=0
    )
    plain = generate(model, PROMPTS[1], 20, temperature=0)[0]
    penalized = generate(model, PROMPTS[1], 20, temperature=0, repetition_penalty=50.0)[0]
    assert len(set(penalized)) > len(set(plain))
    assert len(set(penalized)) == len(penalized)  # with this penalty nothing repeats


def test_stream_yields_generate_tokens(model: Transformer) -> None:
    for kwargs in ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 20, "seed": 7}):
        streamed = list(stream(model, PROMPTS[2], 15, **kwargs))  # type: ignore[arg-type]
        assert streamed == generate(model, PROMPTS[2], 15, **kwargs)[0]  # type: ignore[arg-type]
    free = generate(model, PROMPTS[2], 6, temperature=0)[0]
    it = stream(model, PROMPTS[2], 6, temperature=0, stop_ids=[free[2]])
    assert next(it) == free[0]  # tokens arrive one at a time
    assert list(it) == free[1 : free.index(free[2])]
    with pytest.raises(TypeError):
        next(stream(model, PROMPTS, 3))  # type: ignore[arg-type]


def test_generate_under_bf16_autocast(model: Transformer) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = generate(model, PROMPTS, 6, temperature=0, use_cache=True)
        b = generate(model, PROMPTS, 6, temperature=0, use_cache=False)
    assert all(len(r) == 6 for r in a)
    assert (
        sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)) >= 12
    )


def test_model_state_untouched(model: Transformer) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, PROMPTS, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.is_inference_mode_enabled()
