"""The SFT mixture: adapted source rows in, a clean, weighted, deterministic train/val split out.

Filters run in a fixed order and each dropped row gets exactly one reason (the first that
applies), so ``rows in = train + val + rejected`` holds per source and the stats explain every
row:

1. ``empty_reply``: an assistant turn that is blank after stripping whitespace;
2. ``special_token_text``: a turn containing a reserved token's text (``<|end|>`` …), which the
   tokenizer would turn into the real control token and so corrupt the template;
3. ``duplicate``: same normalised prompt and reply as an earlier row, across sources (sources in
   registry order, a source's rows by ``source_id``);
4. ``contaminated:<eval set>``: a word n-gram overlap with an evaluation prompt (see
   :mod:`pipeline.text.decontam`);
5. ``over_cap``: beyond the source's ``cap`` (registry) or the profile's ``max_rows_per_source``
   (a seeded sample; before tokenising, which is the expensive step);
6. ``too_long`` / ``reply_too_short``: token counts with the project's BPE and chat template
   (``max_tokens`` for the whole conversation, ``min_reply_tokens`` for the replies);
7. ``below_weight``: a source with ``weight < 1`` keeps that share of its training rows (a
   ``weight > 1`` repeats rows instead). The validation share is taken first and is never
   weighted, so a repeated row cannot straddle the split.

Every random choice comes from ``numpy.random.default_rng([seed, crc32(source)])`` over rows
sorted by (registry order, ``source_id``), so the mixture is a pure function of the rows and the
seed: independent of the order the rows arrive in and of polars' hash functions.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import polars as pl

from llm_core.tokenizer import SPECIAL_TOKENS
from pipeline.text.adapters.registry import SftSource
from pipeline.text.decontam import NgramIndex

# (conversations) -> (tokens per conversation, reply tokens per conversation)
TokenCounter = Callable[[list[list[dict[str, str]]]], tuple[np.ndarray, np.ndarray]]
REJECTS_SCHEMA = pl.Schema({"source": pl.String, "source_id": pl.String, "reason": pl.String})
OUTPUT_COLUMNS = ("source", "source_id", "messages", "n_tokens", "reply_tokens")


@dataclass(frozen=True)
class MixConfig:
    """The profile's ``sft:`` section (plus the profile seed)."""

    max_tokens: int = 2048
    min_reply_tokens: int = 1
    val_fraction: float = 0.05
    max_rows_per_source: int | None = None
    decontam_min_n: int = 8
    decontam_max_n: int = 13
    decontam_min_words: int = 6
    seed: int = 1337

    def __post_init__(self) -> None:
        if self.max_tokens < 2 or self.min_reply_tokens < 1:
            raise ValueError("sft.max_tokens must be >= 2 and sft.min_reply_tokens >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"sft.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_rows_per_source is not None and self.max_rows_per_source < 1:
            raise ValueError("sft.max_rows_per_source must be positive or null")

    @classmethod
    def from_profile(cls, section: Mapping[str, Any], seed: int) -> MixConfig:
        names = {f.name for f in fields(cls)} - {"seed"}
        # the mix's data, not its settings (pipeline.text.profile_data)
        section = {k: v for k, v in section.items() if k not in ("examples", "sources")}
        if unknown := sorted(set(section) - names):
            raise ValueError(f"unknown key(s) {unknown} in the profile's sft section")
        return cls(**{**section, "seed": int(section.get("seed", seed))})


@dataclass
class MixResult:
    train: pl.DataFrame
    val: pl.DataFrame
    rejects: pl.DataFrame
    stats: dict[str, Any]


def _rng(seed: int, source: str, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(source.encode()), salt])


def _turn_text(assistant: bool) -> pl.Expr:
    """The contents of the assistant turns (or of all other turns), joined by newlines."""
    role = pl.element().struct.field("role")
    picked = role == "assistant" if assistant else role != "assistant"
    content = pl.element().filter(picked).struct.field("content")
    return pl.col("messages").list.eval(content).list.join("\n")


def normalise(text: pl.Expr) -> pl.Expr:
    """Lower case, whitespace runs collapsed: formatting differences do not make a new row."""
    return text.str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def _set_reason(
    frame: pl.DataFrame, condition: pl.Expr | pl.Series, reason: str | pl.Series
) -> pl.DataFrame:
    """Give ``reason`` (one text, or one per row) to rows that have none yet and meet
    ``condition``: the first filter that drops a row names it."""
    first = pl.col("reason").is_null() & condition
    reason_now = pl.when(first).then(pl.lit(reason)).otherwise(pl.col("reason"))
    return frame.with_columns(reason_now.alias("reason"))


def _alive(frame: pl.DataFrame) -> pl.Series:
    return frame["reason"].is_null()


def build_mixture(
    rows: pl.DataFrame,
    sources: Sequence[SftSource],
    count_tokens: TokenCounter,
    index: NgramIndex | None,
    cfg: MixConfig,
) -> MixResult:
    """Filter, deduplicate, decontaminate, cap, split and weight ``rows`` (``source``,
    ``source_id``, ``messages``), whose sources must all be in ``sources``."""
    by_id = {s.id: s for s in sources}
    unknown = sorted(set(rows["source"].unique()) - set(by_id))
    if unknown:
        raise ValueError(f"rows from sources not in the registry: {unknown}")
    rank = {s.id: i for i, s in enumerate(sources)}
    frame = (
        rows.with_columns(
            pl.col("source").replace_strict(rank, return_dtype=pl.Int32).alias("_rank")
        )
        .sort("_rank", "source_id")
        .drop("_rank")
        .with_columns(pl.lit(None, dtype=pl.String).alias("reason"))
    )
    role = pl.element().struct.field("role")
    content = pl.element().struct.field("content").fill_null("")
    blank_reply = (role == "assistant") & (content.str.strip_chars() == "")
    frame = _set_reason(frame, pl.col("messages").list.eval(blank_reply).list.any(), "empty_reply")
    specials = pl.col("messages").list.eval(content.str.contains_any(list(SPECIAL_TOKENS)))
    frame = _set_reason(frame, specials.list.any(), "special_token_text")
    frame = _drop_duplicates(frame)
    hits: dict[str, int] = {}
    if index is not None:
        frame, hits = _decontaminate(frame, index)
    frame = _apply_caps(frame, by_id, cfg)
    frame = _token_limits(frame, count_tokens, cfg)
    frame, train, val = _split_and_weight(frame, by_id, cfg)
    rejects = frame.filter(pl.col("reason").is_not_null()).select(REJECTS_SCHEMA.names())
    stats = mixture_stats(rows, train, val, rejects, sources, cfg, index, hits)
    return MixResult(train, val, rejects, stats)


def _drop_duplicates(frame: pl.DataFrame, key: pl.Expr | None = None) -> pl.DataFrame:
    """``duplicate``: the same normalised (prompt, reply) as an earlier surviving row, or the
    same ``key`` (the preference pairs compare prompt, chosen and rejected)."""
    if key is None:
        key = pl.concat_str(
            normalise(_turn_text(False)), normalise(_turn_text(True)), separator="\x00"
        )
    first = (
        frame.with_row_index("_i")
        .filter(pl.col("reason").is_null())
        .group_by(key.alias("_key"), maintain_order=True)
        .agg(pl.col("_i").first())["_i"]
    )
    is_first = np.zeros(frame.height, dtype=bool)
    is_first[first.to_numpy()] = True
    return _set_reason(frame, pl.Series(~is_first), "duplicate")


def _decontaminate(frame: pl.DataFrame, index: NgramIndex) -> tuple[pl.DataFrame, dict[str, int]]:
    """``contaminated:<set>``: every turn of a surviving row is checked, replies included."""
    alive = _alive(frame)
    content = pl.element().struct.field("content")
    text = frame.filter(alive).select(pl.col("messages").list.eval(content).list.join("\n"))
    matched = pl.Series([None] * frame.height, dtype=pl.String).scatter(
        np.flatnonzero(alive.to_numpy()), index.match(text.to_series())
    )
    hits = {k: int(v) for k, v in matched.drop_nulls().value_counts().iter_rows()}
    return _set_reason(frame, matched.is_not_null(), "contaminated:" + matched), hits


def _source_rows(frame: pl.DataFrame, source_id: str, seed: int, salt: int) -> np.ndarray:
    """Indices of the surviving rows of one source, in a seeded random order."""
    live = (frame["source"] == source_id).to_numpy() & _alive(frame).to_numpy()
    idx = np.flatnonzero(live)
    return idx[_rng(seed, source_id, salt).permutation(len(idx))]


def _with_reasons(frame: pl.DataFrame, updates: dict[int, str]) -> pl.DataFrame:
    if not updates:
        return frame
    reasons = frame["reason"].to_list()
    for i, reason in updates.items():
        reasons[i] = reason
    return frame.with_columns(pl.Series("reason", reasons, dtype=pl.String))


def _apply_caps(
    frame: pl.DataFrame, by_id: Mapping[str, SftSource], cfg: MixConfig
) -> pl.DataFrame:
    """``over_cap``: a seeded sample of ``min(cap, max_rows_per_source)`` rows per source.

    Caps come before token counting because tokenising is the expensive step: a capped source
    (the tiny profile caps every one) is only tokenised for the rows it can contribute.
    """
    updates: dict[int, str] = {}
    for source_id, source in by_id.items():
        caps = [c for c in (source.cap, cfg.max_rows_per_source) if c is not None]
        idx = _source_rows(frame, source_id, cfg.seed, 1)
        if caps and len(idx) > min(caps):
            updates |= dict.fromkeys(idx[min(caps) :].tolist(), "over_cap")
    return _with_reasons(frame, updates)


def _token_limits(frame: pl.DataFrame, count_tokens: TokenCounter, cfg: MixConfig) -> pl.DataFrame:
    """``too_long`` / ``reply_too_short`` with the real tokenizer and template."""
    n_tokens = np.zeros(frame.height, dtype=np.int64)
    reply_tokens = np.zeros(frame.height, dtype=np.int64)
    live = np.flatnonzero(_alive(frame).to_numpy())
    if len(live):
        n, r = count_tokens(frame["messages"].gather(live).to_list())
        n_tokens[live], reply_tokens[live] = n, r
    frame = frame.with_columns(
        pl.Series("n_tokens", n_tokens, dtype=pl.Int32),
        pl.Series("reply_tokens", reply_tokens, dtype=pl.Int32),
    )
    frame = _set_reason(frame, pl.col("n_tokens") > cfg.max_tokens, "too_long")
    return _set_reason(frame, pl.col("reply_tokens") < cfg.min_reply_tokens, "reply_too_short")


def _split_and_weight(
    frame: pl.DataFrame, by_id: Mapping[str, SftSource], cfg: MixConfig
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Per source: a seeded validation share, then the weight applied to the training rows.

    Validation is taken before weighting so that repeated rows can never straddle the split.
    """
    updates: dict[int, str] = {}
    train_idx: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    val_idx: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for source_id, source in by_id.items():
        idx = _source_rows(frame, source_id, cfg.seed, 2)
        n_val = 0
        if cfg.val_fraction > 0 and len(idx) >= 2:
            n_val = min(len(idx) - 1, max(1, round(len(idx) * cfg.val_fraction)))
        val_idx.append(idx[:n_val])
        train = idx[n_val:]
        whole, frac = divmod(source.weight, 1.0)
        extra = round(frac * len(train))
        if whole == 0:
            updates |= dict.fromkeys(train[extra:].tolist(), "below_weight")
        train_idx.append(np.concatenate([np.tile(train, int(whole)), train[:extra]]))
    cols = list(OUTPUT_COLUMNS)
    train = _shuffle(frame[np.concatenate(train_idx)].select(cols), cfg.seed, "train")
    val = _shuffle(frame[np.concatenate(val_idx)].select(cols), cfg.seed, "val")
    return _with_reasons(frame, updates), train, val


def _shuffle(frame: pl.DataFrame, seed: int, split: str) -> pl.DataFrame:
    return frame[_rng(seed, split, 2).permutation(frame.height)] if frame.height else frame


def mixture_stats(
    rows: pl.DataFrame,
    train: pl.DataFrame,
    val: pl.DataFrame,
    rejects: pl.DataFrame,
    sources: Sequence[SftSource],
    cfg: MixConfig,
    index: NgramIndex | None,
    hits: Mapping[str, int],
) -> dict[str, Any]:
    """Rows in/out per source and per reason, token totals, the decontamination summary."""

    def counts(frame: pl.DataFrame, *by: str) -> dict[Any, int]:
        if not frame.height:
            return {}
        grouped = frame.group_by(*by).len()
        return {tuple(r[:-1]) if len(by) > 1 else r[0]: int(r[-1]) for r in grouped.iter_rows()}

    rows_in, n_train, n_val = counts(rows, "source"), counts(train, "source"), counts(val, "source")
    n_unique = counts(train.unique(["source", "source_id"]), "source")
    by_reason = counts(rejects, "source", "reason")
    per_source = {}
    for s in sources:
        rejected = {reason: n for (src, reason), n in sorted(by_reason.items()) if src == s.id}
        per_source[s.id] = {
            "rows_in": rows_in.get(s.id, 0),
            "train": n_train.get(s.id, 0),
            "train_unique": n_unique.get(s.id, 0),
            "val": n_val.get(s.id, 0),
            "rejected": rejected,
            "weight": s.weight,
            "cap": s.cap,
            "licence": s.licence,
        }
    return {
        "sources": per_source,
        "reasons": dict(sorted(counts(rejects, "reason").items())),
        "totals": {
            "rows_in": rows.height,
            "train": train.height,
            "val": val.height,
            "rejected": rejects.height,
        },
        "tokens": {
            "train_total": int(train["n_tokens"].sum() or 0),
            "train_reply": int(train["reply_tokens"].sum() or 0),
            "train_mean": float(train["n_tokens"].mean() or 0.0) if train.height else 0.0,
            "val_total": int(val["n_tokens"].sum() or 0),
        },
        "decontam": {
            "n_per_set": index.n_per_set if index is not None else {},
            "hits_per_set": dict(hits),
        },
        "config": asdict(cfg),
        "non_commercial_sources": sorted(
            s.id for s in sources if s.non_commercial and n_train.get(s.id)
        ),
    }


def check_consistent(stats: Mapping[str, Any]) -> list[str]:
    """Accounting problems: per source, ``rows_in`` must equal distinct training rows plus
    validation rows plus rejected rows (empty list when every row is accounted for)."""
    problems = []
    for source, s in stats["sources"].items():
        dropped = sum(s["rejected"].values())
        if s["train_unique"] + s["val"] + dropped != s["rows_in"]:
            problems.append(
                f"{source}: {s['rows_in']} in != {s['train_unique']} train + {s['val']} val "
                f"+ {dropped} rejected"
            )
    return problems
