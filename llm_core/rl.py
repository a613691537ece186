"""Online alignment on top of generation and a reward function: GRPO and best-of-n.

A *reward function* maps ``(prompts, replies)`` (chat prompts as message lists, replies as text)
to one float per reply. In the pipeline it is the reward model
(``functools.partial(llm_core.reward.score_replies, reward_model, tokenizer)``); in tests, any
toy function of the text.

GRPO (Shao et al., 2024, "DeepSeekMath") runs on the one :class:`~llm_core.trainer.Trainer`.
The Trainer asks its sampler for a batch and its objective for a loss, and nothing in that
contract says the objective may not generate: :class:`RolloutSampler` (a
:class:`~llm_core.data.sampler.StepSampler`) hands out *prompt indices*, and
:class:`llm_core.objectives.GRPOObjective` has :class:`GroupRollouts` (here) sample
``group_size`` replies per prompt from the current policy, score them and normalise the rewards
within each prompt's group into advantages, then returns the PPO-style clipped surrogate with a
KL penalty to the frozen reference. Reusing the Trainer keeps AdamW, the schedule, clipping,
bf16, checkpoints and callbacks identical to every other stage. ``updates_per_rollout`` (PPO's
epochs, GRPO's μ) reuses one batch of samples for several optimiser steps.

Resume note: rollouts live in the objective, not in checkpoints. A run resumed at a step that
is not a multiple of ``updates_per_rollout`` regenerates its rollout with the resumed weights.

Best-of-n (rejection sampling, "seed 003"): sample ``n`` replies per prompt from the SFT model,
keep the reply the reward function likes best, and fine-tune on the winners with the SFT code
(the ``sft`` stage, :mod:`llm_core.stages.best_of_n`).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from llm_core.align import IndexSampler, Messages
from llm_core.data import atomic_write_bytes
from llm_core.generate import chat_prompt_ids, chat_replies, generate
from llm_core.objectives import token_logps
from llm_core.sft import ChatSpecials

RewardFn = Callable[[list[Messages], list[str]], "np.ndarray | Sequence[float]"]


def _rewards(fn: RewardFn, prompts: list[Messages], replies: list[str]) -> np.ndarray:
    r = np.asarray(fn(prompts, replies), dtype=np.float64).reshape(-1)
    if r.size != len(replies):
        raise ValueError(f"reward function returned {r.size} values for {len(replies)} replies")
    if not np.isfinite(r).all():
        raise ValueError("reward function returned a non-finite reward")
    return r


# ------------------------------------------------------------------------------ GRPO
@dataclass(frozen=True)
class GRPOConfig:
    """GRPO's own knobs (the optimiser's are the TrainConfig's)."""

    group_size: int = 4  # replies sampled per prompt (k)
    prompts_per_step: int = 4  # prompts per optimiser step (per micro-batch)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    clip_eps: float = 0.2
    kl_coef: float = 0.05
    updates_per_rollout: int = 1  # optimiser steps per batch of samples (μ)
    eval_prompts: int = 16  # held-out prompts answered greedily for ``val_reward``

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: advantages are relative to the group")
        if self.prompts_per_step < 1 or self.max_new_tokens < 1 or self.updates_per_rollout < 1:
            raise ValueError("prompts_per_step, max_new_tokens, updates_per_rollout must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: GRPO needs varied samples")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GRPOConfig:
        """The known keys of ``d`` (a profile section also holds the TrainConfig's)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class RolloutSampler(IndexSampler):
    """Prompt indices for GRPO: micro-batch ``m`` of optimiser step ``u`` gets rollout
    ``(u // updates_per_rollout) * grad_accum + m``, whose prompts are global batch number
    ``rollout`` of the underlying :class:`~llm_core.align.IndexSampler`. The same rollout id
    therefore comes back for ``updates_per_rollout`` consecutive steps; ``step`` counts
    micro-batches."""

    KIND = "rollout"

    def __init__(
        self,
        n_prompts: int,
        prompts_per_step: int,
        *,
        updates_per_rollout: int = 1,
        grad_accum: int = 1,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(
            n_prompts,
            prompts_per_step,
            torch.from_numpy,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        self.mu, self.accum = int(updates_per_rollout), int(grad_accum)

    def rollout_id(self, call: int) -> int:
        return (call // (self.accum * self.mu)) * self.accum + call % self.accum

    def batch(self, step: int) -> dict[str, Tensor]:
        """``prompt_index`` of micro-batch ``step``, its ``rollout`` id, and ``keep_from``: the
        first rollout id still to be reused (older rollouts can be forgotten)."""
        rid = self.rollout_id(step)
        first = self.rollout_id(step - step % (self.accum * self.mu))
        return {
            "prompt_index": self.collate(self.local_indices(rid)),
            "rollout": torch.tensor(rid),
            "keep_from": torch.tensor(first),
        }

    def geometry(self) -> dict[str, Any]:
        return {**super().geometry(), "mu": self.mu, "accum": self.accum}


@dataclass
class Rollout:
    """One batch of sampled replies, ready for the policy-gradient loss."""

    ids: Tensor  # [N, W] prompt + reply, right-padded
    targets: Tensor  # [N, W] next token
    mask: Tensor  # [N, W] bool: the target is a reply token (the stop token included)
    advantages: Tensor  # [N]
    rewards: Tensor  # [N]
    ref_logps: Tensor  # [N, W] reference log-probs of the targets
    old_logps: Tensor | None = None  # [N, W] the sampling policy's, set by the first update


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """``(r - mean) / std`` within each consecutive group of ``group_size`` rewards; a group
    whose rewards are all equal carries no signal and gets zero advantages."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    std = r.std(axis=1, keepdims=True)
    adv = np.where(std > eps, (r - r.mean(axis=1, keepdims=True)) / np.maximum(std, eps), 0.0)
    return adv.reshape(-1)


class GroupRollouts:
    """The sampling half of GRPO: ``group_size`` replies to each prompt from the current policy,
    their rewards, group-normalised advantages and the reference's log-probs. ``history`` keeps
    one entry per rollout (mean reward, reply length) for the run summary. The loss over a
    rollout is :class:`llm_core.objectives.GRPOObjective`'s."""

    def __init__(
        self,
        reference: nn.Module,
        tokenizer: Tokenizer,
        prompts: Sequence[Messages],
        reward_fn: RewardFn,
        cfg: GRPOConfig,
        *,
        seed: int = 0,
    ) -> None:
        self.reference, self.tok, self.cfg, self.seed = reference, tokenizer, cfg, int(seed)
        self.prompts = list(prompts)
        self.reward_fn = reward_fn
        self.sp = ChatSpecials.from_tokenizer(tokenizer)
        ctx = reference.config.context_length  # type: ignore[union-attr]
        if cfg.max_new_tokens >= ctx:
            raise ValueError(f"max_new_tokens={cfg.max_new_tokens} leaves no room in context {ctx}")
        self.prompt_ids = chat_prompt_ids(tokenizer, self.prompts, ctx - cfg.max_new_tokens)
        self.history: list[dict[str, float]] = []

    @torch.no_grad()
    def sample(self, policy: nn.Module, index: Sequence[int], rollout_id: int) -> Rollout:
        """Sample ``group_size`` replies to each prompt of ``index`` and score them."""
        k = self.cfg.group_size
        rows = [self.prompt_ids[i] for i in index for _ in range(k)]
        prompts = [self.prompts[i] for i in index for _ in range(k)]
        new = generate(
            policy,  # type: ignore[arg-type]
            rows,
            self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_k=self.cfg.top_k,
            stop_ids=(self.sp.end, self.sp.eot),
            seed=self.seed * 1_000_003 + rollout_id,
            pad_id=self.sp.pad,
            keep_stop=True,
        )
        texts = [self.tok.decode(r, skip_special_tokens=True).strip() for r in new]
        rewards = _rewards(self.reward_fn, prompts, texts)
        width = max(len(p) + len(r) for p, r in zip(rows, new, strict=True))
        ids = torch.full((len(rows), width), self.sp.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for j, (p, r) in enumerate(zip(rows, new, strict=True)):
            ids[j, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask[j, len(p) - 1 : len(p) + len(r) - 1] = True  # positions predicting reply tokens
        targets = torch.full_like(ids, self.sp.pad)
        targets[:, :-1] = ids[:, 1:]
        device = next(policy.parameters()).device
        ids, targets, mask = ids.to(device), targets.to(device), mask.to(device)
        ref = token_logps(self.reference, ids, targets, mask).float()
        adv = group_advantages(rewards, k)
        self.history.append(
            {
                "rollout": float(rollout_id),
                "reward_mean": float(rewards.mean()),
                "reply_len": float(np.mean([len(r) for r in new])),
            }
        )
        return Rollout(
            ids=ids,
            targets=targets,
            mask=mask,
            advantages=torch.as_tensor(adv, dtype=torch.float32, device=device),
            rewards=torch.as_tensor(rewards, dtype=torch.float32, device=device),
            ref_logps=ref,
        )


def make_policy_reward_evaluator(
    tokenizer: Tokenizer,
    prompts: Sequence[Messages],
    reward_fn: RewardFn,
    max_new_tokens: int,
    batch_size: int = 16,
) -> Callable[[nn.Module], dict[str, float]]:
    """``val_reward``: mean reward of the policy's greedy replies to held-out prompts."""
    prompts = list(prompts)

    def evaluator(model: nn.Module) -> dict[str, float]:
        replies = chat_replies(
            model,  # type: ignore[arg-type]
            tokenizer,
            prompts,
            max_new_tokens,
            batch_size=batch_size,
        )
        return {"val_reward": float(_rewards(reward_fn, prompts, replies).mean())}

    return evaluator


def window_mean(history: Sequence[Mapping[str, float]], key: str, last: bool) -> float | None:
    """Mean of ``key`` over the first (or last) tenth of the rollouts, at least one."""
    if not history:
        return None
    n = max(1, len(history) // 10)
    part = history[-n:] if last else history[:n]
    return float(np.mean([h[key] for h in part]))


# ------------------------------------------------------------------------------ best-of-n
@dataclass
class BestOfN:
    """``n`` sampled replies per prompt, their rewards, and the winner of each prompt."""

    prompts: list[Messages]
    candidates: list[list[str]]  # [P][n]
    rewards: np.ndarray  # [P, n]

    @property
    def best(self) -> np.ndarray:
        """Index of each prompt's highest-reward reply (the first one on ties)."""
        return self.rewards.argmax(axis=1)

    @property
    def winners(self) -> list[str]:
        return [c[i] for c, i in zip(self.candidates, self.best, strict=True)]

    def conversations(self) -> list[Messages]:
        """Prompt + winning reply, for SFT; prompts whose winner is empty are left out."""
        return [
            [*p, {"role": "assistant", "content": w}]
            for p, w in zip(self.prompts, self.winners, strict=True)
            if w.strip()
        ]


def sample_best_of_n(
    policy: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Messages],
    reward_fn: RewardFn,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> BestOfN:
    """Sample ``n`` replies to each prompt and score them all with ``reward_fn``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prompts = [list(p) for p in prompts]
    repeated = [p for p in prompts for _ in range(n)]
    replies = chat_replies(
        policy,  # type: ignore[arg-type]
        tokenizer,
        repeated,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        batch_size=batch_size,
    )
    rewards = _rewards(reward_fn, repeated, replies).reshape(len(prompts), n)
    candidates = [replies[i * n : (i + 1) * n] for i in range(len(prompts))]
    return BestOfN(prompts, candidates, rewards)


def write_conversations(path: Path, conversations: list[Messages]) -> None:
    """A ``messages`` parquet file (the SFT mixture's layout), written atomically."""
    table = pa.table({"messages": conversations})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())
