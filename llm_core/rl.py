"""Online alignment on top of generation and a reward function: GRPO and best-of-n.

A *reward function* maps ``(prompts, replies)`` (chat prompts as message lists, replies as text)
to one float per reply. In the pipeline it is the reward model
(``functools.partial(llm_core.reward.score_replies, reward_model, tokenizer)``); in tests, any
toy function of the text.

GRPO (Shao et al., 2024, "DeepSeekMath") runs on the one :class:`~llm_core.trainer.Trainer`.
The Trainer asks its sampler for a batch and its objective for a loss, and nothing in that
contract says the objective may not generate: :class:`RolloutSampler` hands out *prompt indices*,
and :class:`GRPOObjective` samples ``group_size`` replies per prompt from the current policy,
scores them, normalises the rewards within each prompt's group into advantages, and returns the
PPO-style clipped surrogate with a KL penalty to the frozen reference (the k3 estimator
``exp(q) - q - 1`` with ``q = log ref - log pi``, unbiased and never negative). Reusing the
Trainer keeps AdamW, the schedule, clipping, bf16, checkpoints and callbacks identical to every
other stage. ``updates_per_rollout`` (PPO's epochs, GRPO's μ) reuses one batch of samples for
several optimiser steps; the ratio to the sampling policy, and so the clipping, only matters then.
The old log-probs are those of the first update's forward on the rollout (the policy that
sampled it), so no extra forward pass is spent on them.

Resume note: rollouts live in the objective, not in checkpoints. A run resumed at a step that
is not a multiple of ``updates_per_rollout`` regenerates its rollout with the resumed weights.

Best-of-n (rejection sampling, "seed 003"): sample ``n`` replies per prompt from the SFT model,
keep the reply the reward function likes best, and fine-tune on the winners with the SFT code
(:func:`llm_core.finetune.run_sft`).
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

from llm_core.align import IndexSampler, Messages, frozen_copy
from llm_core.checkpoint import load_weights, unwrap_model
from llm_core.config import TrainConfig
from llm_core.data import atomic_write_bytes
from llm_core.finetune import FinetuneRun, fit_and_save, run_sft, save_chat_model, training_session
from llm_core.generate import chat_prompt_ids, chat_replies, generate
from llm_core.objectives import Metrics, _per_token_nll
from llm_core.pretrain import write_metrics
from llm_core.sft import ChatSpecials
from llm_core.tokenizer import load_tokenizer
from llm_core.trainer import TrainResult, resolve_device

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


class RolloutSampler:
    """Prompt indices for GRPO: micro-batch ``m`` of optimiser step ``u`` gets rollout
    ``(u // updates_per_rollout) * grad_accum + m``, whose prompts are global batch number
    ``rollout`` of an :class:`~llm_core.align.IndexSampler`. The same rollout id therefore
    comes back for ``updates_per_rollout`` consecutive steps."""

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
        self.index = IndexSampler(
            n_prompts, prompts_per_step, lambda i: i, seed=seed, rank=rank, world_size=world_size
        )
        self.mu, self.accum = int(updates_per_rollout), int(grad_accum)
        self.calls = 0

    def rollout_id(self, call: int) -> int:
        return (call // (self.accum * self.mu)) * self.accum + call % self.accum

    def next_batch(self) -> dict[str, Tensor]:
        """``prompt_index`` of this micro-batch, its ``rollout`` id, and ``keep_from``: the first
        rollout id still to be reused (older rollouts can be forgotten)."""
        rid = self.rollout_id(self.calls)
        first = self.rollout_id(self.calls - self.calls % (self.accum * self.mu))
        self.calls += 1
        return {
            "prompt_index": torch.from_numpy(self.index.local_indices(rid)),
            "rollout": torch.tensor(rid),
            "keep_from": torch.tensor(first),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.index.state_dict(), "step": self.calls, "mu": self.mu, "accum": self.accum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index.load_state_dict(state)
        if (state.get("mu"), state.get("accum")) != (self.mu, self.accum):
            raise ValueError("rollout sampler state mismatch on updates_per_rollout/grad_accum")
        self.calls = int(state["step"])


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


def token_logps(model: nn.Module, ids: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``log p(target)`` per position [N, W] in float32 (0 where ``mask`` is false)."""
    nll = _per_token_nll(model(ids), targets.masked_fill(~mask, 0), ignore_index=-100)
    return -nll * mask


class GRPOObjective:
    """Samples, scores and scores again: see the module docstring. ``history`` keeps one entry
    per rollout (mean reward, reply length) for the run summary."""

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
        self._cache: dict[int, Rollout] = {}  # the rollouts of the current optimiser steps

    @torch.no_grad()
    def rollout(self, policy: nn.Module, index: Sequence[int], rollout_id: int) -> Rollout:
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

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Metrics]:
        rid = int(batch["rollout"])
        keep_from = int(batch.get("keep_from", rid))
        self._cache = {k: v for k, v in self._cache.items() if k >= keep_from}
        if rid not in self._cache:
            index = batch["prompt_index"].tolist()
            self._cache[rid] = self.rollout(unwrap_model(model), index, rid)
        ro = self._cache[rid]
        logp = token_logps(model, ro.ids, ro.targets, ro.mask)
        if ro.old_logps is None:
            ro.old_logps = logp.detach()
        m = ro.mask.float()
        # Log-ratios are clamped at ±20 only so a token the policy has all but abandoned cannot
        # overflow exp() in float32; within that range the loss is the textbook one.
        ratio = torch.exp((logp - ro.old_logps).clamp(-20.0, 20.0))
        adv = ro.advantages[:, None]
        eps = self.cfg.clip_eps
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        q = (ro.ref_logps - logp).clamp(-20.0, 20.0)
        kl = torch.exp(q) - q - 1  # k3: an unbiased, non-negative estimate of KL(pi || ref)
        per_token = -(surrogate - self.cfg.kl_coef * kl) * m
        tokens = m.sum(dim=1).clamp_min(1.0)
        loss = (per_token.sum(dim=1) / tokens).mean()  # each reply weighs the same (GRPO)
        clipped = ((ratio - 1).abs() > eps).float()
        n_tok = m.sum().clamp_min(1.0)
        return loss, {
            "loss": loss.detach(),
            "reward_mean": ro.rewards.mean(),
            "reward_std": ro.rewards.std(unbiased=False),
            "kl": ((kl * m).sum() / n_tok).detach(),
            "reply_len": tokens.mean(),
            "clip_frac": (clipped * m).sum() / n_tok,
            "tokens": torch.tensor(ro.ids.numel()),  # what the trainer counts as tokens seen
        }


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


def _window_mean(history: Sequence[Mapping[str, float]], key: str, last: bool) -> float | None:
    """Mean of ``key`` over the first (or last) tenth of the rollouts, at least one."""
    if not history:
        return None
    n = max(1, len(history) // 10)
    part = history[-n:] if last else history[:n]
    return float(np.mean([h[key] for h in part]))


def run_grpo(
    train_prompts: Sequence[Messages],
    val_prompts: Sequence[Messages],
    init_weights: str | Path,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    train_cfg: TrainConfig,
    reward_fn: RewardFn,
    grpo: GRPOConfig,
    *,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    device: str | None = None,
) -> FinetuneRun:
    """GRPO of the model in ``init_weights`` against ``reward_fn`` on ``train_prompts``.

    The frozen reference is the starting model. ``val_prompts`` (the first
    ``grpo.eval_prompts``) are answered greedily before and after for ``val_reward``. Writes the
    policy (``model.safetensors``, ``config.json``, ``tokenizer.json``), ``checkpoints/`` and
    ``metrics.json`` (``method: grpo``) into ``out_dir``.
    """
    if not train_prompts:
        raise ValueError("run_grpo: no training prompts")
    out = Path(out_dir)
    with training_session(init_weights, tokenizer_path, device or train_cfg.device) as (
        info,
        tok,
        model,
    ):
        objective = GRPOObjective(
            frozen_copy(model), tok, train_prompts, reward_fn, grpo, seed=train_cfg.seed
        )
        sampler = RolloutSampler(
            len(train_prompts),
            grpo.prompts_per_step,
            updates_per_rollout=grpo.updates_per_rollout,
            grad_accum=train_cfg.grad_accum,
            seed=train_cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        held_out = list(val_prompts)[: grpo.eval_prompts]
        evaluator = None
        if held_out:
            evaluator = make_policy_reward_evaluator(tok, held_out, reward_fn, grpo.max_new_tokens)

        def summary(result: TrainResult, before: dict[str, float]) -> dict[str, Any]:
            hist = objective.history
            return {
                "method": "grpo",
                "grpo": dataclasses.asdict(grpo),
                "reward_first": _window_mean(hist, "reward_mean", last=False),
                "reward_last": _window_mean(hist, "reward_mean", last=True),
                "reply_len_last": _window_mean(hist, "reply_len", last=True),
                "kl_last": result.final_metrics.get("kl"),
                "val_reward_before": before.get("val_reward"),
                "val_reward_after": (result.eval_history or [{}])[-1].get("val_reward"),
                "rollouts": hist,
                "train_prompts": len(train_prompts),
                "model_config": model.config.to_dict(),
                "init_weights": str(init_weights),
            }

        return fit_and_save(
            model,
            objective,
            train_cfg,
            sampler,
            info=info,
            out=out,
            save=lambda m, o: save_chat_model(m, o, tokenizer_path),
            summary=summary,
            evaluator=evaluator,
            callbacks=callbacks,
            resume=resume,
        )


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


def _write_conversations(path: Path, conversations: list[Messages]) -> None:
    """A ``messages`` parquet file (the SFT mixture's layout), written atomically."""
    table = pa.table({"messages": conversations})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def run_best_of_n(
    train_prompts: Sequence[Messages],
    val_prompts: Sequence[Messages],
    init_weights: str | Path,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    train_cfg: TrainConfig,
    reward_fn: RewardFn,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    device: str | None = None,
) -> FinetuneRun:
    """Rejection sampling, then SFT on the winners.

    The model in ``init_weights`` answers every prompt ``n`` times; the winners become
    ``out_dir/best_of_n/{train,val}.parquet`` (``messages`` rows) and
    :func:`llm_core.finetune.run_sft` fine-tunes the same model on them. ``metrics.json`` holds
    the SFT summary plus ``method: best_of_n`` and the rewards of the samples and the winners.
    """
    out = Path(out_dir)
    tok = load_tokenizer(tokenizer_path)
    policy = load_weights(init_weights, device=resolve_device(device or train_cfg.device)).eval()
    picks = {}
    for split, prompts, seed in (("train", train_prompts, 0), ("val", val_prompts, 1)):
        picks[split] = sample_best_of_n(
            policy,
            tok,
            prompts,
            reward_fn,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=train_cfg.seed * 2 + seed,
        )
        _write_conversations(out / "best_of_n" / f"{split}.parquet", picks[split].conversations())
    del policy
    if not picks["train"].conversations():
        raise ValueError("best-of-n: every winning reply is empty; nothing to fine-tune on")
    run = run_sft(
        out / "best_of_n" / "train.parquet",
        out / "best_of_n" / "val.parquet",
        init_weights,
        tokenizer_path,
        out,
        train_cfg,
        packing=bool(train_cfg.extra.get("packing", True)),
        callbacks=callbacks,
        resume=resume,
        device=device,
    )
    summary = run.summary
    if summary:
        t = picks["train"]
        best = t.rewards[np.arange(len(t.prompts)), t.best] if len(t.prompts) else np.zeros(0)
        summary = {
            **summary,
            "method": "best_of_n",
            "n": n,
            "train_prompts": len(t.prompts),
            "winners": len(t.conversations()),
            "empty_winners": len(t.prompts) - len(t.conversations()),
            "sample_reward_mean": float(t.rewards.mean()) if t.rewards.size else None,
            "winner_reward_mean": float(best.mean()) if best.size else None,
        }
        write_metrics(out, summary)
    return FinetuneRun(run.result, summary)
