"""SFT data: the template's ids and loss mask, truncation, packing isolation, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from llm_core.config import ModelConfig
from llm_core.model import Transformer
from llm_core.objectives import SFTObjective
from llm_core.sft import (
    TOOL_CLOSE,
    TOOL_OPEN,
    ChatSpecials,
    SFTEvalBatches,
    SFTSampler,
    collate,
    encode_conversations,
    encode_prompt,
    evaluate_sft,
    plan_rows,
    truncate_conversation,
)
from llm_core.tokenizer import render_chat, train_bpe
from llm_core.trainer import Trainer
from tests.llm_core.training_helpers import tiny_train_config

TEXT = [
    "The quick brown fox jumps over the lazy dog. Tell me a story about a king and a queen.",
    "Answer the question: what is two plus two? The answer is four, said the assistant.",
    "You are a helpful assistant. Write a poem about the sea and the old man who loved it.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, 320, min_frequency=1)


def conv(user: str, reply: str, system: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": reply}]


CONVS = [
    conv("Tell me a story.", "Once a king ruled the sea.", system="You are a helpful assistant."),
    conv("What is two plus two?", "Four."),
    conv("Write a poem about the sea.", "The sea, the sea, the old man loved it.")
    + [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "The sea!"}],
    conv("Who jumps over the dog?", "The quick brown fox."),
    conv("Say hi.", "Hi."),
]


def tiny_model(vocab: int, ctx: int = 64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab, ctx, n_layer=2, n_head=2, n_kv_head=1, d_model=32, ffn_hidden=64)
    return Transformer(cfg)


def test_ids_equal_the_rendered_template_and_mask_marks_replies(tok) -> None:
    data = encode_conversations(tok, CONVS)
    sp = ChatSpecials.from_tokenizer(tok)
    for i, c in enumerate(CONVS):
        ids, mask = data.get(i)
        assert ids.tolist() == tok.encode(render_chat(c), add_special_tokens=False).ids
        # Supervised tokens are exactly the replies, each followed by its <|end|>.
        replies = [m["content"] for m in c if m["role"] == "assistant"]
        expected = []
        for r in replies:
            expected += [*tok.encode(r, add_special_tokens=False).ids, sp.end]
        assert ids[mask].tolist() == expected
        assert not mask[ids == sp.assistant].any() and not mask[ids == sp.user].any()
    prompt = encode_prompt(tok, CONVS[1][:1])
    assert prompt == tok.encode(render_chat(CONVS[1][:1], add_generation_prompt=True)).ids


def test_tool_results_are_unsupervised_user_turns(tok) -> None:
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "<tool_call>\n{}\n</tool_call>"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    ids, mask = encode_conversations(tok, [msgs]).get(0)
    as_user = [*msgs[:2], {"role": "user", "content": f"{TOOL_OPEN}sunny{TOOL_CLOSE}"}, msgs[3]]
    assert ids.tolist() == tok.encode(render_chat(as_user)).ids
    tool_text = tok.decode(ids[~mask].tolist(), skip_special_tokens=False)
    assert "sunny" in tool_text and "Sunny." not in tool_text


class _LogitsModel(nn.Module):
    """Returns a trainable logits tensor: its gradient shows which positions carry loss."""

    def __init__(self, b: int, t: int, v: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(b, t, v))

    def forward(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits


def test_loss_only_on_assistant_tokens(tok) -> None:
    data = encode_conversations(tok, CONVS)
    sp = ChatSpecials.from_tokenizer(tok)
    batch = collate(data, [[0, 1], [2], [3, 4]], seq_len=80, pad_id=sp.pad, packing=True)
    model = _LogitsModel(3, 80, tok.get_vocab_size())
    loss, _ = SFTObjective()(model, batch)
    loss.backward()
    has_grad = model.logits.grad.abs().sum(-1) > 0
    assert torch.equal(has_grad, batch["loss_mask"])
    # Every supervised target is a reply token or <|end|>; none is a role token or padding.
    targets = batch["targets"][batch["loss_mask"]]
    assert not torch.isin(targets, torch.tensor([sp.user, sp.system, sp.assistant, sp.pad])).any()
    assert int(batch["loss_mask"].sum()) == data.supervised_tokens  # nothing lost, nothing added


def test_packed_neighbours_do_not_attend_to_each_other(tok) -> None:
    data = encode_conversations(tok, CONVS)
    sp = ChatSpecials.from_tokenizer(tok)
    model = tiny_model(tok.get_vocab_size(), ctx=128).eval()
    packed = collate(data, [[0, 1, 3]], seq_len=127, pad_id=sp.pad, packing=True)
    with torch.no_grad():
        logits = model(packed["input_ids"], doc_ids=packed["doc_ids"])
        start = 0
        for i in (0, 1, 3):
            n = len(data.get(i)[0])
            alone = collate(data, [[i]], seq_len=127, pad_id=sp.pad, packing=False)
            ref = model(alone["input_ids"])[0]
            # The last token's target crosses into the next conversation: compare all but it.
            torch.testing.assert_close(logits[0, start : start + n - 1], ref[: n - 1])
            assert torch.equal(
                packed["loss_mask"][0, start : start + n - 1], alone["loss_mask"][0, : n - 1]
            )
            assert not packed["loss_mask"][0, start + n - 1]  # never predict the neighbour
            start += n
    # Packed and padded evaluation therefore agree on the loss.
    args = (data, 4, 127, sp.pad)
    a = evaluate_sft(model, SFTEvalBatches(*args, packing=True))
    b = evaluate_sft(model, SFTEvalBatches(*args, packing=False))
    assert a["tokens"] == b["tokens"] == data.supervised_tokens
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_truncation_keeps_a_supervised_token(tok) -> None:
    long_prompt = "Tell me a story about a king and a queen. " * 40
    cases = [
        conv(long_prompt, "Yes."),  # the reply would fall off the end: cut the prompt instead
        conv("Hi.", "The sea, the sea, the old man loved it. " * 30),  # keep the head
        conv(long_prompt, "The old man loved the sea. " * 30, system=long_prompt),
    ]
    for max_len in (2, 3, 8, 17, 64):
        data = encode_conversations(tok, cases, max_tokens=max_len)
        assert data.truncated == len(cases)
        for i in range(len(cases)):
            ids, mask = data.get(i)
            assert len(ids) == max_len
            assert mask[1:].any(), f"case {i} at {max_len} lost every supervised token"
    ids, mask = encode_conversations(tok, cases[1:2], max_tokens=32).get(0)
    full, _ = encode_conversations(tok, cases[1:2]).get(0)
    assert ids.tolist() == full[:32].tolist()  # a short prompt: plain head truncation
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(3, 80))
        m = np.zeros(n, dtype=bool)
        a = int(rng.integers(1, n))
        m[a : a + int(rng.integers(1, n - a + 1))] = True
        cut_ids, cut_mask = truncate_conversation(np.arange(n), m, int(rng.integers(2, n + 1)))
        assert cut_mask[1:].any() and np.all(np.diff(cut_ids) == 1)


def test_rows_cover_every_conversation_once_per_epoch(tok) -> None:
    lengths = np.random.default_rng(1).integers(5, 60, size=300)
    order = np.random.default_rng(2).permutation(300)
    rows = plan_rows(lengths, order, 64, packing=True)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    fill = lengths.sum() / (len(rows) * 64)
    assert fill > 0.9, f"packing fills only {fill:.0%} of the rows"
    assert plan_rows(lengths, order, 64, packing=False) == [(int(i),) for i in order]


@pytest.mark.parametrize("packing", [True, False])
def test_sampler_resumes_exactly(tok, packing: bool) -> None:
    data = encode_conversations(tok, CONVS * 3, max_tokens=33)
    a = SFTSampler(data, 4, 32, 1, packing=packing, seed=5)
    batches = [a.next_batch() for _ in range(9)]  # several epochs
    b = SFTSampler(data, 4, 32, 1, packing=packing, seed=5)
    b.load_state_dict({**a.state_dict(), "step": 4})
    for want in batches[4:]:
        got = b.next_batch()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="seed"):
        SFTSampler(data, 4, 32, 1, packing=packing, seed=6).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="max_tokens"):
        SFTSampler(encode_conversations(tok, CONVS), 4, 8, 1)


def test_training_lowers_assistant_loss_and_resume_is_exact(tok, tmp_path) -> None:
    data = encode_conversations(tok, CONVS * 4, max_tokens=33)
    sp = ChatSpecials.from_tokenizer(tok)
    cfg = tiny_train_config(steps=6, checkpoint_every=3, eval_every=0, lr=1e-2)

    def fit(steps: int, out, resume: bool = False) -> Transformer:
        model = tiny_model(tok.get_vocab_size(), ctx=32)
        sampler = SFTSampler(data, 4, 32, sp.pad, seed=3)
        run_cfg = tiny_train_config(**{**cfg.to_dict(), "steps": steps})
        Trainer(model, SFTObjective(), run_cfg, sampler, out_dir=out).fit(resume=resume)
        return model

    batches = SFTEvalBatches(data, 4, 32, sp.pad)
    before = evaluate_sft(tiny_model(tok.get_vocab_size(), ctx=32), batches)["loss"]
    straight = fit(6, tmp_path / "a")
    assert evaluate_sft(straight, batches)["loss"] < before
    fit(3, tmp_path / "b")
    resumed = fit(6, tmp_path / "b", resume=True)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
