"""The profile's ``evaluation`` section, typed: item counts, decoding and the code sandbox.

Parsed once in the Pipes child (and for the asset's code version), refusing unknown keys by name
so a typo in a profile cannot silently turn a benchmark off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Evaluation set ids (configs/eval_sets.yaml) the report can score; `items` keys must be these.
ITEM_SETS = ("blimp", "lambada", "gsm8k_test", "alpaca_eval", "mmlu", "humaneval")


def _checked(cls: type, section: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(section) - names):
        raise ValueError(f"profile `{where}`: unknown key(s) {unknown}; allowed {sorted(names)}")
    return dict(section)


@dataclass(frozen=True)
class HumanEvalSettings:
    """``evaluation.humaneval``: how completions are sampled and the sandbox they run in.

    Generated code is executed, so nothing runs unless ``execute`` is true in the profile, even
    when ``items.humaneval`` asks for problems.
    """

    execute: bool = False  # the opt-in: run generated code in the sandbox
    samples: int = 1  # completions per problem: 1 is greedy, more are sampled (pass@k)
    k: tuple[int, ...] = (1, 10)  # pass@k reported for each k <= samples
    temperature: float = 0.8  # only when samples > 1
    max_new_tokens: int = 128
    timeout_s: float = 5.0  # wall clock per program
    cpu_s: int = 5  # RLIMIT_CPU per program
    memory_mb: int = 1024  # RLIMIT_AS per program
    workers: int = 2  # programs run at once

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> HumanEvalSettings:
        raw = _checked(cls, section or {}, "evaluation.humaneval")
        if "k" in raw:
            raw["k"] = tuple(int(k) for k in raw["k"])
        out = cls(**raw)
        if out.samples < 1 or any(k < 1 for k in out.k) or out.timeout_s <= 0:
            raise ValueError(
                "profile `evaluation.humaneval`: samples and every k must be >= 1, timeout_s > 0"
            )
        return out


@dataclass(frozen=True)
class EvalSettings:
    """The profile's ``evaluation`` section (plus its ``seed``)."""

    # items per evaluation set id (blimp: per phenomenon, mmlu: per subject); 0 turns it off
    items: Mapping[str, int] = field(default_factory=dict)
    batch_size: int = 16  # sequences per forward pass when scoring and generating
    max_new_tokens: int = 48  # win-rate replies and the fixed-prompt generations
    gsm8k_max_new_tokens: int = 96  # worked answers need room
    temperature: float = 0.7  # fixed-prompt generations only; everything scored is greedy
    top_k: int | None = 50
    regression_tolerance: float = 0.02  # absolute worsening of a headline figure that flags it
    mmlu_shots: int = 5  # the k of MMLU's k-shot pass (0-shot always runs); 0: 0-shot only
    trend_runs: int = 10  # previous evaluation runs in the report's trend plot
    humaneval: HumanEvalSettings = field(default_factory=HumanEvalSettings)
    seed: int = 1337

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> EvalSettings:
        section = dict(profile.get("evaluation") or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"seed"}
        if unknown := sorted(set(section) - names):
            raise ValueError(
                f"profile `evaluation` section: unknown key(s) {unknown}; allowed {sorted(names)}"
            )
        items = {str(k): int(v) for k, v in (section.pop("items", None) or {}).items()}
        if bad := sorted(set(items) - set(ITEM_SETS)):
            raise ValueError(
                f"profile `evaluation.items`: unknown evaluation set(s) {bad}; known {sorted(ITEM_SETS)}"
            )
        humaneval = HumanEvalSettings.from_section(section.pop("humaneval", None))
        return cls(items=items, humaneval=humaneval, seed=int(profile.get("seed", 1337)), **section)

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "items": dict(self.items),
            "humaneval": {**dataclasses.asdict(self.humaneval), "k": list(self.humaneval.k)},
        }
