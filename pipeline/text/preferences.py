"""Preference pairs: (prompt messages, chosen reply, rejected reply) for reward models and DPO.

Sources are listed in ``configs/preference_sources.yaml``, validated by the SFT registry's code
(:func:`load_preference_sources`) and converted by the adapters of
:mod:`pipeline.text.adapters.preference`. :func:`build_pairs` then gives every dropped pair exactly
one reason (the first that applies), so ``pairs in = train + val + rejected`` holds per source:

1. the adapter's own reason (``malformed transcript: …``, ``unknown speaker '…'``);
2. ``unknown_role``: a prompt role outside system/user/assistant;
3. ``empty_prompt``: no prompt turn, or a blank one (blank *system* turns are dropped first:
   they condition on nothing);
4. ``prompt_not_ending_with_user``: the replies would not answer the user;
5. ``empty_reply``: a blank chosen or rejected reply;
6. ``special_token_text``: text containing a reserved token (``<|end|>`` …), which the tokenizer
   would turn into a control token and so corrupt the template;
7. ``identical_replies``: chosen and rejected equal after normalisation (a tie teaches nothing);
8. ``duplicate``: same normalised prompt, chosen and rejected as an earlier pair, across sources
   (sources in registry order, a source's pairs by ``source_id``);
9. ``contaminated:<eval set>``: a word n-gram overlap with an evaluation prompt (the rule of
   :mod:`pipeline.text.decontam`, as for the SFT mix; prompt and replies are checked);
10. ``too_long``: prompt + the longer reply, in tokens with the project's BPE and chat template,
    exceeds ``max_tokens`` (default: the model's ``context_length``);
11. ``over_cap``: beyond ``min(registry cap, max_pairs_per_source)`` for the source, a seeded
    choice among the pairs that passed everything else (so a cap keeps that many usable pairs).

The split hashes the normalised *prompt* with the seed: the same prompt (from any source, with
any replies) always lands on the same side, so a held-out win rate or reward accuracy is never
measured on a prompt the model trained on. Every choice is a pure function of the pairs and the
seed, independent of row order and of polars' hash functions (``hashlib`` throughout).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llm_core.tokenizer import SPECIAL_TOKENS
from pipeline.text.adapters.base import MESSAGES, tidy_text
from pipeline.text.adapters.preference import ADAPTED_PAIR_SCHEMA
from pipeline.text.adapters.registry import SftSource, convert_files, load_sft_sources
from pipeline.text.decontam import NgramIndex
from pipeline.text.sft_mix import (
    TokenCounter,
    _alive,
    _decontaminate,
    _drop_duplicates,
    _set_reason,
    normalise,
)

PREFERENCE_ADAPTERS = "pipeline.text.adapters.preference"
# The SFT registry's keys without `weight`: pairs are not mixed by weight, only capped.
PREFERENCE_KEYS = frozenset(
    {"id", "repo", "url", "revision", "patterns", "sha256", "adapter", "cap", "licence", "language"}
)
PROMPT_ROLES = ("system", "user", "assistant")
# What adapt_pairs returns and build_pairs takes.
ADAPTED_PAIRS_SCHEMA = pl.Schema({"source": pl.String, **ADAPTED_PAIR_SCHEMA})
# The files of the preference_pairs asset (the interface the alignment stages read).
PAIRS_SCHEMA = pl.Schema(
    {
        "pair_id": pl.String,
        "source": pl.String,
        "prompt": MESSAGES,
        "chosen": pl.String,
        "rejected": pl.String,
    }
)
PAIR_REJECTS_SCHEMA = pl.Schema(
    {
        "source": pl.String,
        "pair_id": pl.String,
        "reason": pl.String,
        "prompt_json": pl.String,
        "chosen": pl.String,
        "rejected": pl.String,
    }
)


# ------------------------------------------------------------------------------ sources
def load_preference_sources(path: Path | str) -> list[SftSource]:
    """Read and validate ``configs/preference_sources.yaml`` (the SFT registry's format and
    checks, with the preference adapters and without ``weight``)."""
    return load_sft_sources(path, keys=PREFERENCE_KEYS, adapters=PREFERENCE_ADAPTERS)


def adapt_pairs(source: SftSource, files: Sequence[Path]) -> pl.DataFrame:
    """``source``'s files as :data:`ADAPTED_PAIRS_SCHEMA` rows (``reason`` set by the adapter).

    Raises :class:`~pipeline.text.adapters.base.SourceSchemaError`, naming the source and file,
    when a file lacks a column the adapter needs.
    """
    adapted = convert_files(
        source,
        files,
        ADAPTED_PAIR_SCHEMA,
        adapters=PREFERENCE_ADAPTERS,
        kind="preference source",
    )
    return adapted.with_columns(pl.lit(source.id).alias("source")).select(
        ADAPTED_PAIRS_SCHEMA.names()
    )


# ------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class PreferenceConfig:
    """The profile's ``preference:`` section (plus the profile's seed and context length)."""

    max_tokens: int
    val_fraction: float = 0.05
    max_pairs_per_source: int | None = None
    decontaminate: bool = True
    decontam_min_n: int = 8
    decontam_max_n: int = 13
    decontam_min_words: int = 6
    seed: int = 1337

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise ValueError(f"preference.max_tokens must be >= 2, got {self.max_tokens}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"preference.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_pairs_per_source is not None and self.max_pairs_per_source < 1:
            raise ValueError("preference.max_pairs_per_source must be positive or null")

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> PreferenceConfig:
        """``max_tokens: null`` (or absent) means the profile's ``context_length``: a pair the
        model cannot see whole would be scored on a truncated reply."""
        section = dict(profile.get("preference") or {})
        for data_key in ("pairs", "sources"):  # the pairs themselves (pipeline.text.profile_data)
            section.pop(data_key, None)
        names = {f.name for f in fields(cls)} - {"seed"}
        if unknown := sorted(set(section) - names):
            raise ValueError(f"unknown key(s) {unknown} in the profile's preference section")
        max_tokens = section.pop("max_tokens", None)
        if max_tokens is None:
            if "context_length" not in profile:
                raise ValueError(
                    "preference.max_tokens is null and the profile has no context_length"
                )
            max_tokens = profile["context_length"]
        return cls(max_tokens=int(max_tokens), seed=int(profile.get("seed", 1337)), **section)


# ------------------------------------------------------------------------------ ids and keys
def pair_id(
    source: str,
    prompt: Sequence[Mapping[str, str]] | None,
    chosen: str | None,
    rejected: str | None,
) -> str:
    """A stable 16-hex-digit id of one pair: sha256 of its source, prompt and both replies
    (rejected rows may lack some of them, and still get an id)."""
    turns = [[m["role"], m["content"]] for m in prompt or []]
    blob = json.dumps([source, turns, chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _unit_hash(seed: int, salt: str, texts: Sequence[str]) -> np.ndarray:
    """A seeded, platform-independent uniform number in [0, 1) per text."""
    out = np.empty(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        digest = hashlib.blake2b(f"{seed}\x00{salt}\x00{text}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def prompt_key(prompt: pl.Expr) -> pl.Expr:
    """The normalised text of a prompt, roles included: what "the same prompt" means for the
    split and for deduplication."""
    turn = pl.concat_str(
        pl.element().struct.field("role"),
        pl.element().struct.field("content").fill_null(""),
        separator=": ",
    )
    return normalise(prompt.list.eval(turn).list.join("\n"))


def _prompt_text(prompt: pl.Expr) -> pl.Expr:
    return prompt.list.eval(pl.element().struct.field("content").fill_null("")).list.join("\n")


# ------------------------------------------------------------------------------ the build
@dataclass
class PairsResult:
    train: pl.DataFrame
    val: pl.DataFrame
    rejects: pl.DataFrame
    stats: dict[str, Any]


def _tidy(frame: pl.DataFrame) -> pl.DataFrame:
    """Whitespace tidied as the SFT adapters do; blank system turns dropped."""
    role = pl.element().struct.field("role")
    content = pl.element().struct.field("content")
    turn = pl.struct(role, tidy_text(content))
    blank_system = (role == "system") & (content.is_null() | (content.str.strip_chars() == ""))
    return frame.with_columns(
        pl.col("prompt").list.eval(pl.element().filter(~blank_system)).list.eval(turn),
        tidy_text(pl.col("chosen")),
        tidy_text(pl.col("rejected")),
    )


def _structural_reasons(frame: pl.DataFrame) -> pl.DataFrame:
    """Reasons 2-7 of the module docstring: each pair on its own."""
    role = pl.element().struct.field("role")
    content = pl.element().struct.field("content")
    prompt = pl.col("prompt")
    blank = content.is_null() | (content.str.strip_chars() == "")
    frame = _set_reason(
        frame,
        prompt.list.eval(~role.is_in(PROMPT_ROLES) | role.is_null()).list.any(),
        "unknown_role",
    )
    no_turns = prompt.is_null() | (prompt.list.len() == 0)
    frame = _set_reason(frame, no_turns | prompt.list.eval(blank).list.any(), "empty_prompt")
    last_role = prompt.list.last().struct.field("role")
    frame = _set_reason(frame, last_role != "user", "prompt_not_ending_with_user")
    replies = [pl.col(c).fill_null("").str.strip_chars() == "" for c in ("chosen", "rejected")]
    frame = _set_reason(frame, replies[0] | replies[1], "empty_reply")
    text = pl.concat_str(_prompt_text(prompt), pl.col("chosen"), pl.col("rejected"), separator="\n")
    frame = _set_reason(frame, text.str.contains_any(list(SPECIAL_TOKENS)), "special_token_text")
    same = normalise(pl.col("chosen")) == normalise(pl.col("rejected"))
    return _set_reason(frame, same, "identical_replies")


def _decontaminate_pairs(
    frame: pl.DataFrame, index: NgramIndex
) -> tuple[pl.DataFrame, dict[str, int]]:
    """``contaminated:<set>`` over the prompt and both replies (the SFT mix's own function, on
    the pair viewed as one conversation)."""
    as_messages = pl.concat_list(
        pl.col("prompt"),
        *(
            pl.struct(pl.lit("assistant").alias("role"), pl.col(c).alias("content"))
            for c in ("chosen", "rejected")
        ),
    )
    frame, hits = _decontaminate(frame.with_columns(as_messages.alias("messages")), index)
    return frame.drop("messages"), hits


def _token_limits(frame: pl.DataFrame, count_tokens: TokenCounter, max_tokens: int) -> pl.DataFrame:
    """``too_long``: prompt + the longer reply, with the real tokenizer and template."""
    n_tokens = np.zeros(frame.height, dtype=np.int64)
    live = np.flatnonzero(_alive(frame).to_numpy())
    if len(live):
        rows = frame[live]
        prompts = rows["prompt"].to_list()
        convs = [
            [*p, {"role": "assistant", "content": reply}]
            for column in ("chosen", "rejected")
            for p, reply in zip(prompts, rows[column].to_list(), strict=True)
        ]
        total, _ = count_tokens(convs)
        n_tokens[live] = np.maximum(total[: len(live)], total[len(live) :])
    frame = frame.with_columns(pl.Series("_n_tokens", n_tokens))
    return _set_reason(frame, pl.col("_n_tokens") > max_tokens, "too_long")


def _apply_caps(
    frame: pl.DataFrame, sources: Sequence[SftSource], cfg: PreferenceConfig
) -> pl.DataFrame:
    """``over_cap``: per source, a seeded choice of ``min(cap, max_pairs_per_source)`` pairs."""
    over = np.zeros(frame.height, dtype=bool)
    alive = _alive(frame).to_numpy()
    for source in sources:
        caps = [c for c in (source.cap, cfg.max_pairs_per_source) if c is not None]
        idx = np.flatnonzero(alive & (frame["source"] == source.id).to_numpy())
        if not caps or len(idx) <= min(caps):
            continue
        order = np.argsort(_unit_hash(cfg.seed, "cap", frame["pair_id"].gather(idx).to_list()))
        over[idx[order[min(caps) :]]] = True
    return _set_reason(frame, pl.Series(over), "over_cap")


def build_pairs(
    pairs: pl.DataFrame,
    sources: Sequence[SftSource],
    count_tokens: TokenCounter,
    index: NgramIndex | None,
    cfg: PreferenceConfig,
) -> PairsResult:
    """Filter, deduplicate, decontaminate, cap and split ``pairs`` (:data:`ADAPTED_PAIRS_SCHEMA`,
    from :func:`adapt_pairs`), whose sources must all be in ``sources``."""
    if pairs.schema != ADAPTED_PAIRS_SCHEMA:
        raise ValueError(
            f"pairs have schema {dict(pairs.schema)}, expected {dict(ADAPTED_PAIRS_SCHEMA)}"
        )
    rank = {s.id: i for i, s in enumerate(sources)}
    if unknown := sorted(set(pairs["source"].unique()) - set(rank)):
        raise ValueError(f"pairs from sources not in the registry: {unknown}")
    frame = _tidy(
        pairs.with_columns(
            pl.col("source").replace_strict(rank, return_dtype=pl.Int32).alias("_rank")
        )
        .sort("_rank", "source_id")
        .drop("_rank")
    )
    ids = [
        pair_id(*row) for row in frame.select("source", "prompt", "chosen", "rejected").iter_rows()
    ]
    frame = frame.with_columns(
        pl.Series("pair_id", ids, dtype=pl.String),
        prompt_key(pl.col("prompt")).alias("_prompt_key"),
    )
    frame = _structural_reasons(frame)
    duplicate_key = pl.concat_str(
        pl.col("_prompt_key"),
        normalise(pl.col("chosen")),
        normalise(pl.col("rejected")),
        separator="\x00",
    )
    frame = _drop_duplicates(frame, duplicate_key)
    hits: dict[str, int] = {}
    if index is not None:
        frame, hits = _decontaminate_pairs(frame, index)
    frame = _token_limits(frame, count_tokens, cfg.max_tokens)
    frame = _apply_caps(frame, sources, cfg)

    alive = _alive(frame).to_numpy()
    in_val = _unit_hash(cfg.seed, "split", frame["_prompt_key"].to_list()) < cfg.val_fraction
    order = np.argsort(_unit_hash(cfg.seed, "order", frame["pair_id"].to_list()), kind="stable")
    ordered = frame[order]
    train = ordered.filter(pl.Series(alive[order] & ~in_val[order]))
    val = ordered.filter(pl.Series(alive[order] & in_val[order]))
    rejects = frame.filter(~pl.Series(alive))
    prompt_json = [json.dumps(p, ensure_ascii=False) for p in rejects["prompt"].to_list()]
    rejects = rejects.with_columns(pl.Series("prompt_json", prompt_json, dtype=pl.String))
    stats = pair_stats(frame, train, val, sources, cfg, index, hits)
    return PairsResult(
        train.select(PAIRS_SCHEMA.names()),
        val.select(PAIRS_SCHEMA.names()),
        rejects.select(PAIR_REJECTS_SCHEMA.names()),
        stats,
    )


def pair_stats(
    frame: pl.DataFrame,
    train: pl.DataFrame,
    val: pl.DataFrame,
    sources: Sequence[SftSource],
    cfg: PreferenceConfig,
    index: NgramIndex | None,
    hits: Mapping[str, int],
) -> dict[str, Any]:
    """Pairs in/out per source and per reason, token sizes, the decontamination summary."""

    def count(f: pl.DataFrame) -> dict[str, int]:
        return dict(f.group_by("source").len().iter_rows()) if f.height else {}

    rejected = frame.filter(pl.col("reason").is_not_null())
    by_reason: dict[tuple[str, str], int] = {}
    if rejected.height:
        for source, reason, n in rejected.group_by("source", "reason").len().iter_rows():
            by_reason[(source, reason)] = int(n)
    pairs_in, n_train, n_val = count(frame), count(train), count(val)
    per_source = {}
    for s in sources:
        caps = [c for c in (s.cap, cfg.max_pairs_per_source) if c is not None]
        per_source[s.id] = {
            "pairs_in": pairs_in.get(s.id, 0),
            "train": n_train.get(s.id, 0),
            "val": n_val.get(s.id, 0),
            "rejected": {r: n for (src, r), n in sorted(by_reason.items()) if src == s.id},
            "cap": min(caps) if caps else None,
            "licence": s.licence,
        }
    reasons: dict[str, int] = {}
    for (_, reason), n in by_reason.items():
        reasons[reason] = reasons.get(reason, 0) + n
    kept = pl.concat([train, val])
    return {
        "sources": per_source,
        "reasons": dict(sorted(reasons.items())),
        "totals": {
            "pairs_in": frame.height,
            "train": train.height,
            "val": val.height,
            "rejected": rejected.height,
        },
        "tokens": {
            "max_tokens": cfg.max_tokens,
            "pair_mean": float(kept["_n_tokens"].mean() or 0.0) if kept.height else 0.0,
            "pair_max": int(kept["_n_tokens"].max() or 0) if kept.height else 0,
        },
        "decontam": {
            "n_per_set": index.n_per_set if index is not None else {},
            "hits_per_set": dict(hits),
        },
        "config": asdict(cfg),
        "non_commercial_sources": sorted(s.id for s in sources if s.non_commercial),
    }


# ------------------------------------------------------------------------------ reading, checks
@dataclass(frozen=True)
class PreferencePair:
    """One pair as the alignment stages use it (plain Python: llm_core takes lists and strings)."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str
    pair_id: str


def read_pairs_frame(path: str | Path) -> pl.DataFrame:
    """``train.parquet`` / ``val.parquet`` of ``preference_pairs``, schema checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no preference pairs file here (materialise preference_pairs)"
        )
    frame = pl.read_parquet(path)
    wrong = {
        name: str(frame.schema.get(name, "missing"))
        for name, dtype in PAIRS_SCHEMA.items()
        if frame.schema.get(name) != dtype
    }
    if wrong:
        raise ValueError(f"{path}: not a preference pairs file; bad or missing column(s) {wrong}")
    return frame.select(PAIRS_SCHEMA.names())


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """The pairs of one split file as :class:`PreferencePair` objects, in file order."""
    return [
        PreferencePair(
            prompt=[{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
            chosen=row["chosen"],
            rejected=row["rejected"],
            source=row["source"],
            pair_id=row["pair_id"],
        )
        for row in read_pairs_frame(path).iter_rows(named=True)
    ]


def pair_problems(train: pl.DataFrame, val: pl.DataFrame) -> list[str]:
    """What breaks the promises of ``preference_pairs`` (empty list when none): a non-empty
    train split, distinct replies, prompts that end with the user, unique ids, and no prompt in
    both splits."""
    problems = []
    for name, split in (("train", train), ("val", val)):
        if split.schema != PAIRS_SCHEMA:
            problems.append(f"{name}: schema {dict(split.schema)} != {dict(PAIRS_SCHEMA)}")
            continue
        same = split.filter(normalise(pl.col("chosen")) == normalise(pl.col("rejected"))).height
        if same:
            problems.append(f"{name}: {same} pair(s) with chosen == rejected")
        last = split.select(pl.col("prompt").list.last().struct.field("role") == "user").to_series()
        if not last.fill_null(False).all():
            problems.append(
                f"{name}: {int((~last.fill_null(False)).sum())} prompt(s) not ending with a user turn"
            )
        if not split["pair_id"].is_unique().all():
            problems.append(f"{name}: duplicate pair_id values")
    if problems:
        return problems
    if train.height == 0:
        problems.append("train is empty")
    keys = [set(s.select(prompt_key(pl.col("prompt"))).to_series()) for s in (train, val)]
    if shared := len(keys[0] & keys[1]):
        problems.append(f"{shared} prompt(s) in both train and val")
    return problems
