"""Supervised fine-tuning data: conversations -> token ids + loss mask -> packed, resumable batches.

The chat template is the tokenizer's (``<|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>``,
see :func:`llm_core.tokenizer.render_chat`). Each turn is encoded piece by piece (role token,
content, ``<|end|>``) so the loss mask is exact: a token is *supervised* when it belongs to an
assistant reply, its closing ``<|end|>`` included (the model must learn to stop), and never when
it is a prompt, a role token or padding. Piecewise encoding equals encoding the rendered string,
because the specials are added tokens that split the text before BPE runs.

Batches come in two layouts, picked by ``packing``:

* packed: several conversations share a row of ``seq_len`` tokens; ``doc_ids`` give the model a
  block-diagonal causal mask and per-conversation positions, so neither attention nor the loss
  crosses a boundary. Little compute goes to padding.
* padded: one conversation per row, right-padded to the longest row of the batch; the model runs
  its plain causal path.

:class:`SFTSampler` is a :class:`~llm_core.data.sampler.StepSampler` like every training
sampler: batch ``k`` is a pure function of ``(seed, k)``, so its state is a counter and a resumed
run sees exactly the batches an unbroken run would. The loss is
:class:`llm_core.objectives.SFTObjective`; this module holds the data side and the evaluation.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import nn

from llm_core.data.sampler import StepSampler, rank_slice
from llm_core.objectives import forward_logits, per_token_nll
from llm_core.tokenizer import ASSISTANT, END, EOT, PAD, ROLE_TOKENS, SYSTEM, USER

Message = Mapping[str, str]
# There is no reserved token for tool results: they reach the model as a user turn wrapped in
# the tags below (the convention of several open chat templates), and are never supervised.
TOOL_OPEN, TOOL_CLOSE = "<tool_response>\n", "\n</tool_response>"


def template_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """``messages`` with only the template's three roles: ``tool`` turns become user turns."""
    out = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "tool":
            role, content = "user", f"{TOOL_OPEN}{content}{TOOL_CLOSE}"
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown chat role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
        out.append({"role": str(role), "content": content})
    return out


@dataclass(frozen=True)
class ChatSpecials:
    """Ids of the reserved chat tokens in one tokenizer."""

    system: int
    user: int
    assistant: int
    end: int
    eot: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> ChatSpecials:
        names = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "end": END, "eot": EOT}
        ids = {name: tok.token_to_id(token) for name, token in {**names, "pad": PAD}.items()}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"tokenizer lacks the reserved chat tokens {missing}")
        return cls(**ids)

    def role(self, role: str) -> int:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]


# ------------------------------------------------------------------------------ encoding
@dataclass
class ChatDataset:
    """Encoded conversations stored flat (CSR): ``ids[offsets[i]:offsets[i+1]]`` is conversation
    ``i`` and ``mask`` marks its supervised tokens. One array each instead of a Python list per
    conversation keeps tens of thousands of conversations cheap to hold and to ship to workers."""

    ids: np.ndarray  # int32 [total]
    mask: np.ndarray  # bool [total]
    offsets: np.ndarray  # int64 [n + 1]
    truncated: int = 0  # conversations shortened to fit ``max_tokens``

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    @property
    def supervised_tokens(self) -> int:
        return int(self.mask.sum())


def truncate_conversation(
    ids: np.ndarray, mask: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a conversation to ``max_len`` tokens without losing every supervised token.

    Keeping the head is right whenever the first reply starts early enough to keep some of it.
    When a long prompt would push the whole reply out, the prompt is cut from the *left* instead,
    so the window ends with the start of the first reply (up to a quarter of ``max_len`` of it).
    Position 0 is never a prediction target, so at least one supervised token sits at index >= 1.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if len(ids) <= max_len:
        return ids, mask
    supervised = np.flatnonzero(mask[1:]) + 1  # token 0 is never a target
    if supervised.size == 0:
        raise ValueError("conversation has no supervised token after its first")
    first = int(supervised[0])
    run = int(np.argmin(mask[first:])) if not mask[first:].all() else len(mask) - first
    keep = max(1, min(run, max_len // 4))
    if first + keep <= max_len:
        return ids[:max_len], mask[:max_len]
    start = first + keep - max_len
    return ids[start : start + max_len], mask[start : start + max_len]


def truncate_left(ids: np.ndarray, mask: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a prompt + final reply to ``max_len`` tokens, dropping the *oldest* prompt tokens.

    What scores or compares replies (a reward model pooling the last token, DPO summing the
    reply's log-probabilities) needs the reply whole and its nearest context, not the start of
    the conversation. A reply too long for the window keeps its start, after at most a quarter
    window of prompt, so the pair still says which reply this is.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if len(ids) <= max_len:
        return ids, mask
    supervised = np.flatnonzero(mask)
    if supervised.size == 0:
        raise ValueError("conversation has no supervised token")
    reply_start = max(int(supervised[0]) - 1, 0)  # the <|assistant|> token before the reply
    if len(ids) - reply_start <= max_len:
        start = len(ids) - max_len
    else:
        start = max(0, reply_start - max_len // 4)
    return ids[start : start + max_len], mask[start : start + max_len]


def encode_conversations(
    tok: Tokenizer,
    conversations: Sequence[Sequence[Message]],
    *,
    max_tokens: int | None = None,
    last_reply_only: bool = False,
    truncation: str = "head",
) -> ChatDataset:
    """Token ids and loss mask of each conversation, truncated to ``max_tokens`` if given.

    All message contents go through one ``encode_batch`` call (the tokenizer's threads do the
    work), then each conversation is assembled as role token + content + ``<|end|>`` per turn.
    Raises ``ValueError`` for a conversation with no assistant reply: it would train nothing.

    ``last_reply_only`` supervises only the final assistant turn (earlier ones are context, as in
    a preference pair whose prompt holds a dialogue). ``truncation`` picks how an over-long
    conversation is cut: ``"head"`` (:func:`truncate_conversation`, for SFT) or ``"left"``
    (:func:`truncate_left`, for scoring a final reply).
    """
    cut = {"head": truncate_conversation, "left": truncate_left}.get(truncation)
    if cut is None:
        raise ValueError(f"truncation must be 'head' or 'left', got {truncation!r}")
    sp = ChatSpecials.from_tokenizer(tok)
    turns = [template_messages(c) for c in conversations]
    flat = [m["content"] for conv in turns for m in conv]
    encoded = tok.encode_batch(flat, add_special_tokens=False) if flat else []
    ids_parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    lengths = np.zeros(len(turns), dtype=np.int64)
    truncated = k = 0
    for i, conv in enumerate(turns):
        ids: list[int] = []
        mask: list[bool] = []
        for j, m in enumerate(conv):
            content = encoded[k].ids
            k += 1
            reply = m["role"] == "assistant" and (not last_reply_only or j == len(conv) - 1)
            ids += [sp.role(m["role"]), *content, sp.end]
            mask += [False] + [reply] * (len(content) + 1)
        if not any(mask):
            raise ValueError(f"conversation #{i} has no assistant reply to learn from")
        a, b = np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)
        if max_tokens is not None and len(a) > max_tokens:
            a, b = cut(a, b, max_tokens)
            truncated += 1
        ids_parts.append(a)
        mask_parts.append(b)
        lengths[i] = len(a)
    offsets = np.zeros(len(turns) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return ChatDataset(
        ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32),
        mask=np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=bool),
        offsets=offsets,
        truncated=truncated,
    )


def encode_replies(
    tok: Tokenizer,
    prompts: Sequence[Sequence[Message]],
    replies: Sequence[str],
    *,
    max_tokens: int | None = None,
) -> ChatDataset:
    """Each prompt followed by its assistant reply, with only that reply supervised.

    The ids are exactly what SFT trains on for the same conversation (one template, one
    encoder); over-long ones lose the oldest prompt tokens (:func:`truncate_left`). This is the
    encoding of everything that scores a reply: the reward model, DPO and GRPO. Each prompt must
    end with a user turn.
    """
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    for i, p in enumerate(prompts):
        if not p or p[-1].get("role") not in ("user", "tool"):
            raise ValueError(f"prompt #{i} must end with a user turn")
    convs = [
        [*p, {"role": "assistant", "content": r}] for p, r in zip(prompts, replies, strict=True)
    ]
    return encode_conversations(
        tok, convs, max_tokens=max_tokens, last_reply_only=True, truncation="left"
    )


def encode_prompt(tok: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of a chat prompt ending in ``<|assistant|>``, for generation (same template)."""
    sp = ChatSpecials.from_tokenizer(tok)
    turns = template_messages(messages)
    encoded = tok.encode_batch([m["content"] for m in turns], add_special_tokens=False)
    ids: list[int] = []
    for m, enc in zip(turns, encoded, strict=True):
        ids += [sp.role(m["role"]), *enc.ids, sp.end]
    return [*ids, sp.assistant]


# ------------------------------------------------------------------------------ packing
def plan_rows(
    lengths: np.ndarray, order: np.ndarray, row_len: int, *, packing: bool, open_rows: int = 32
) -> list[tuple[int, ...]]:
    """Group conversations (visited in ``order``) into rows of at most ``row_len`` tokens.

    Packing is first-fit over the ``open_rows`` most recently opened rows: a short conversation
    can fill a gap left earlier, which wastes far fewer tokens than next-fit, while rows stay
    close to the shuffled order. Without packing every conversation is its own row.
    """
    if not packing:
        return [(int(i),) for i in order]
    rows: list[list[int]] = []
    free: list[int] = []
    first_open = 0
    for i in order:
        n = min(int(lengths[i]), row_len)
        for r in range(first_open, len(rows)):
            if free[r] >= n:
                rows[r].append(int(i))
                free[r] -= n
                break
        else:
            rows.append([int(i)])
            free.append(row_len - n)
            first_open = max(first_open, len(rows) - open_rows)
    return [tuple(r) for r in rows]


def collate(
    data: ChatDataset, rows: Sequence[Sequence[int]], seq_len: int, pad_id: int, *, packing: bool
) -> dict[str, torch.Tensor]:
    """Rows of conversations -> ``input_ids``/``targets``/``loss_mask`` [B, T] (+ ``doc_ids``).

    A row holds ``T + 1`` tokens; the target of position ``t`` is token ``t + 1`` and is
    supervised only when that token is and it belongs to the same conversation, so the last token
    of one conversation never learns to predict the first of the next. Packed rows are ``T =
    seq_len`` wide and padding forms a document of its own; padded rows are as wide as the
    longest row of the batch and carry no ``doc_ids`` (plain causal attention suffices).
    """
    width = seq_len + 1
    if not packing:
        longest = max(int(data.offsets[r[0] + 1] - data.offsets[r[0]]) for r in rows)
        width = min(width, longest)
    b = len(rows)
    tokens = np.full((b, width), pad_id, dtype=np.int64)
    sup = np.zeros((b, width), dtype=bool)
    docs = np.zeros((b, width), dtype=np.int64)
    for i, row in enumerate(rows):
        pos = 0
        for d, conv in enumerate(row):
            ids, mask = data.get(conv)
            n = min(len(ids), width - pos)
            tokens[i, pos : pos + n] = ids[:n]
            sup[i, pos : pos + n] = mask[:n]
            docs[i, pos : pos + n] = d
            pos += n
        docs[i, pos:] = len(row)
    same_doc = docs[:, 1:] == docs[:, :-1]
    batch = {
        "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
        "targets": torch.from_numpy(tokens[:, 1:].copy()),
        "loss_mask": torch.from_numpy(sup[:, 1:] & same_doc),
    }
    if packing:
        batch["doc_ids"] = torch.from_numpy(docs[:, :-1].copy())
    return batch


def _check_fits(data: ChatDataset, seq_len: int) -> None:
    """Rows hold ``seq_len + 1`` tokens; longer conversations must be truncated when encoded
    (``max_tokens=seq_len + 1``), where truncation keeps a supervised token."""
    longest = int(data.lengths().max()) if len(data) else 0
    if longest > seq_len + 1:
        raise ValueError(
            f"a conversation has {longest} tokens, more than seq_len + 1 = {seq_len + 1}; "
            "encode with max_tokens=seq_len + 1"
        )


class SFTSampler(StepSampler):
    """Seeded, resumable batches of conversations, packed or padded.

    Each epoch shuffles the conversations with its own permutation (``rng([seed, epoch])``) and
    plans its rows; batches take ``global_batch_size`` consecutive rows of the endless sequence of
    epochs. Rank ``r`` takes its slice of every global batch, so the data per optimiser step does
    not depend on the number of processes.
    """

    KIND = "sft"

    def __init__(
        self,
        data: ChatDataset,
        global_batch_size: int,
        seq_len: int,
        pad_id: int,
        *,
        packing: bool = True,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(data) == 0:
            raise ValueError("no conversations to sample from")
        if global_batch_size <= 0 or seq_len <= 0:
            raise ValueError("global_batch_size and seq_len must be positive")
        _check_fits(data, seq_len)
        super().__init__(global_batch_size, seed=seed, rank=rank, world_size=world_size)
        self.data, self.seq_len, self.pad_id = data, int(seq_len), int(pad_id)
        self.packing = packing
        self._lengths = data.lengths()
        self._row_starts = [0]  # global index of each planned epoch's first row (+ one past)
        self._plans: dict[int, list[tuple[int, ...]]] = {}

    def _plan(self, epoch: int) -> list[tuple[int, ...]]:
        """Rows of ``epoch``; only the last two planned epochs are kept in memory."""
        if epoch not in self._plans:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            plan = plan_rows(self._lengths, order, self.seq_len + 1, packing=self.packing)
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = plan
        return self._plans[epoch]

    def _row(self, r: int) -> tuple[int, ...]:
        while self._row_starts[-1] <= r:  # plan epochs until row r is covered
            epoch = len(self._row_starts) - 1
            self._row_starts.append(self._row_starts[-1] + len(self._plan(epoch)))
        epoch = bisect.bisect_right(self._row_starts, r) - 1
        return self._plan(epoch)[r - self._row_starts[epoch]]

    def rows(self, step: int) -> list[tuple[int, ...]]:
        """The conversation rows of global batch ``step`` (a pure function of seed and step)."""
        b = self.global_batch_size
        return [self._row(r) for r in range(step * b, (step + 1) * b)]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rows = self.local(self.rows(step))
        return collate(self.data, rows, self.seq_len, self.pad_id, packing=self.packing)

    def geometry(self) -> dict[str, Any]:
        return {
            **super().geometry(),
            "seq_len": self.seq_len,
            "packing": self.packing,
            "conversations": len(self.data),
            "tokens": int(self.data.offsets[-1]),
        }


class SFTEvalBatches:
    """Deterministic, re-iterable validation batches: conversations in file order, no shuffle,
    at most ``max_batches`` global batches, identical on every call and world size."""

    def __init__(
        self,
        data: ChatDataset,
        global_batch_size: int,
        seq_len: int,
        pad_id: int,
        *,
        packing: bool = True,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_fits(data, seq_len)
        order = np.arange(len(data))
        rows = plan_rows(data.lengths(), order, seq_len + 1, packing=packing)
        b = int(global_batch_size)
        self.batches = [rows[i : i + b] for i in range(0, len(rows), b)][:max_batches]
        self.data, self.seq_len, self.pad_id, self.packing = data, seq_len, pad_id, packing
        self._slice = rank_slice(b, rank, world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows in self.batches:
            mine = list(rows)[self._slice]
            if mine:
                yield collate(self.data, mine, self.seq_len, self.pad_id, packing=self.packing)


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_sft(
    model: nn.Module, batches: SFTEvalBatches, *, device: torch.device | None = None
) -> dict[str, float]:
    """Token-weighted mean loss over every supervised (assistant) token of ``batches``.

    Under ``torch.distributed`` the sums are all-reduced, so every rank returns the numbers a
    single process would. The model's train/eval mode is restored afterwards.
    """
    dev = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dev)  # [sum of nll, supervised tokens]
    try:
        for batch in batches:
            batch = {k: v.to(dev) for k, v in batch.items()}
            logits = forward_logits(model, batch)
            mask = batch["loss_mask"]
            nll = per_token_nll(logits, batch["targets"].masked_fill(~mask, 0), -100)
            total[0] += (nll * mask).double().sum()
            total[1] += mask.sum()
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    if total[1] == 0:
        raise ValueError("evaluate_sft: the validation batches hold no supervised token")
    loss = float(total[0] / total[1])
    return {"loss": loss, "tokens": float(total[1])}


def make_sft_evaluator(batches: SFTEvalBatches) -> Callable[[nn.Module], dict[str, float]]:
    """An ``evaluator(model)`` for the trainer (which applies autocast around it): ``val_loss``
    and ``val_perplexity`` on the assistant tokens of the validation conversations."""

    def evaluator(model: nn.Module) -> dict[str, float]:
        m = evaluate_sft(model, batches)
        ppl = math.exp(m["loss"]) if m["loss"] < 700 else float("inf")
        return {"val_loss": m["loss"], "val_perplexity": ppl, "val_tokens": m["tokens"]}

    return evaluator
