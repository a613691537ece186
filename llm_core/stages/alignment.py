"""What the alignment stages (``dpo``, ``grpo``, ``best_of_n``, ``rrhf``, ``weighted``) share: the ``rlhf`` profile
section, the preference splits they read, and the reward-model win rate over the SFT model that
each reports, so the methods can be compared on one figure."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_core.align import PairTraining, Preferences, prepare_pairs, unique_prompts
from llm_core.stages.base import Markdown, StageConfig, StageResult, is_main_rank
from llm_core.stages.samples import chat_answers
from llm_core.stages.session import FitResult, Session, training_session
from llm_core.trainer import resolve_device

Messages = list[dict[str, str]]


def read_preferences(path: Path) -> Preferences:
    """A preference split; a train split must not be empty (an empty val split only turns
    validation off)."""
    prefs = Preferences.read_parquet(path)
    if not len(prefs) and path.name.startswith("train"):
        raise ValueError(f"{path}: no preference pairs to train on (see its rejects.parquet)")
    return prefs


@dataclass(frozen=True, kw_only=True)
class PairsConfig(StageConfig):
    """A stage trained from the SFT model on the preference pairs."""

    INPUTS = ("train_path", "val_path", "init_weights", "tokenizer")

    train_path: Path
    val_path: Path
    init_weights: Path
    tokenizer: Path


@dataclass(frozen=True, kw_only=True)
class RLHFConfig(PairsConfig):
    """Profile section ``rlhf``: shared keys first, a method's own block overrides them."""

    SECTION = "rlhf"
    INPUTS = ("train_path", "val_path", "init_weights", "tokenizer", "reward_model")
    # The section's keys for the win rate or for a sibling method.
    SHARED = frozenset({"method", "methods", "beta", "win_rate_prompts", "max_new_tokens"})
    BLOCKS = frozenset({"dpo", "grpo", "best_of_n", "rrhf", "weighted"})

    reward_model: Path
    win_rate_prompts: int = 8  # held-out prompts for the reward-model win rate over SFT; 0: off
    win_rate_max_new_tokens: int = 32  # greedy reply length for that win rate

    @classmethod
    def profile_fields(cls, profile: Mapping[str, Any], section: Mapping[str, Any]) -> dict:
        # The win rate reads the section's shared keys, never a method's override.
        out = {}
        if "win_rate_prompts" in section:
            out["win_rate_prompts"] = int(section["win_rate_prompts"])
        if "max_new_tokens" in section:
            out["win_rate_max_new_tokens"] = int(section["max_new_tokens"])
        return out

    def held_out_prompts(self, n: int) -> list[Messages]:
        """The first ``n`` distinct prompts of the held-out pairs (the same for every method)."""
        return unique_prompts(read_preferences(self.val_path).prompts)[:n]

    def reward_fn(self) -> Any:
        """``(prompts, replies) -> rewards`` from the ``reward_model`` folder."""
        from llm_core.reward import load_reward_model, score_replies
        from llm_core.tokenizer import load_tokenizer

        model = load_reward_model(self.reward_model, device=resolve_device(self.train.device))
        return functools.partial(score_replies, model, load_tokenizer(self.tokenizer))


def win_rate(config: RLHFConfig) -> dict[str, Any]:
    """Reward-model win rate of the aligned model (``out_dir``) over the SFT model on held-out
    prompts (greedy replies of ``win_rate_max_new_tokens``)."""
    from llm_core.checkpoint import load_weights
    from llm_core.reward import load_reward_model, policy_win_rate
    from llm_core.tokenizer import load_tokenizer

    dev = resolve_device(config.train.device)
    return policy_win_rate(
        load_reward_model(config.reward_model, device=dev),
        load_tokenizer(config.tokenizer),
        load_weights(config.out_dir, device=dev).eval(),
        load_weights(config.init_weights, device=dev).eval(),
        config.held_out_prompts(config.win_rate_prompts),
        max_new_tokens=config.win_rate_max_new_tokens,
    )


def with_win_rate(
    config: RLHFConfig, summary: dict[str, Any], callbacks: Any, steps: int
) -> dict[str, Any]:
    """Add the win rate to the summary (and ``metrics.json``) and report it to the callbacks as
    the run's last evaluation, so MLflow records it with the other metrics."""
    from llm_core.stages.base import write_metrics

    if not is_main_rank() or not summary or config.win_rate_prompts <= 0:
        return summary
    win = win_rate(config)
    summary = {**summary, "win_rate": win}
    write_metrics(config.out_dir, summary)
    scalars = {
        "win_rate": win["win_rate"],
        "policy_reward": win["reward_mean"],
        "sft_reward": win["baseline_reward_mean"],
    }
    for cb in callbacks:
        if hasattr(cb, "on_eval"):
            cb.on_eval(steps, scalars)
    return summary


def win_rate_figures(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The method, and its win rate over the SFT model with counts and examples."""
    win = summary.get("win_rate") or {}
    examples = "\n\n".join(
        f"**{e['prompt'][:200]}**<br>aligned: {e['reply']!r}<br>sft: {e['baseline_reply']!r}"
        for e in win.get("examples", [])
    )
    return {
        "method": summary.get("method"),
        "win_rate": win.get("win_rate"),
        "win_rate_ci95": win.get("ci95"),
        "win_rate_counts": (
            {k: win.get(k) for k in ("wins", "ties", "losses", "n")} if win else None
        ),
        "policy_reward_mean": win.get("reward_mean"),
        "sft_reward_mean": win.get("baseline_reward_mean"),
        "reply_tokens_mean": win.get("reply_tokens_mean"),
        "sft_reply_tokens_mean": win.get("baseline_reply_tokens_mean"),
        "win_rate_examples": Markdown(examples) if examples else None,
    }


@contextlib.contextmanager
def pairs_session(config: PairsConfig) -> Iterator[tuple[Session, PairTraining]]:
    """The run's session (process group, tokenizer, starting model) and the encoded pairs."""
    cfg = config.train
    train, val = read_preferences(config.train_path), read_preferences(config.val_path)
    with training_session(config.init_weights, config.tokenizer, cfg.device, cfg.seed) as s:
        assert s.tokenizer is not None
        ctx = s.model.config.context_length
        yield s, prepare_pairs(s.tokenizer, train, val, cfg, ctx, s.info)


def aligned_result(
    config: RLHFConfig,
    fit: FitResult,
    callbacks: Sequence[Any],
    figures: Callable[[dict[str, Any]], dict[str, Any]],
) -> StageResult:
    """An alignment stage's result: the win rate over SFT added to its summary, its figures
    (the win rate's, then the method's own) and the aligned model's answers."""
    summary = with_win_rate(config, fit.summary, callbacks, fit.train.steps)
    result = StageResult(fit.train, config.out_dir, summary, samples_key="answers")
    if summary:
        result.figures = {**win_rate_figures(summary), **figures(summary)}
        result.samples = chat_answers(config.out_dir, config.tokenizer)
    return result
