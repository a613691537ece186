"""Preference pairs: transcript parsing, the three adapters, filters, dedup, caps, the split, the
registry and the file interface (``read_pairs``, ``pair_problems``). Hand-made rows only; the
real mirror rows are in ``tests/pipeline/assets/test_preference_assets.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.text.adapters import (
    SftConfigError,
    SourceSchemaError,
    adapt_source,
    available_adapters,
)
from pipeline.text.adapters.preference.hh_rlhf import TranscriptError, parse_transcript, split_pair
from pipeline.text.adapters.registry import SftSource, parse_sft_sources
from pipeline.text.decontam import NgramIndex
from pipeline.text.preferences import (
    ADAPTED_PAIRS_SCHEMA,
    PAIRS_SCHEMA,
    PREFERENCE_ADAPTERS,
    PREFERENCE_KEYS,
    PreferenceConfig,
    PreferencePair,
    adapt_pairs,
    build_pairs,
    load_preference_sources,
    pair_id,
    pair_problems,
    read_pairs,
)

REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------ hh-rlhf parsing
def test_transcript_becomes_alternating_messages() -> None:
    text = "\n\nHuman: Hi there\n\nAssistant:  Hello!  \n\nHuman: Tell me a joke\n\nAssistant: No."
    assert parse_transcript(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "No."},
    ]
    # A missing leading blank line and a reply with inner blank lines are fine.
    assert parse_transcript("Human: a\n\nAssistant: b\n\nc") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b\n\nc"},
    ]
    # An empty final reply parses (the empty_reply filter names it later).
    assert parse_transcript("\n\nHuman: a\n\nAssistant:")[-1] == {
        "role": "assistant",
        "content": "",
    }


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty transcript"),
        (None, "empty transcript"),
        ("Hello\n\nHuman: a\n\nAssistant: b", "text before the first turn"),
        ("\n\nAssistant: a\n\nHuman: b\n\nAssistant: c", "first turn is not Human's"),
        ("\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "two user turns in a row"),
        ("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "two assistant turns in a row"),
        ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "last turn is not the Assistant's"),
        ("\n\nHuman: a\n\nAssistant: Human: and then I said", "speaker label inside a turn"),
    ],
)
def test_malformed_transcripts_are_refused_with_a_reason(text: str | None, reason: str) -> None:
    with pytest.raises(TranscriptError, match=f"^{reason}$"):
        parse_transcript(text)


def test_pair_prompt_is_the_shared_prefix() -> None:
    prefix = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2"
    prompt, chosen, rejected = split_pair(
        prefix + "\n\nAssistant: good", prefix + "\n\nAssistant: bad"
    )
    assert prompt == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert (chosen, rejected) == ("good", "bad")
    with pytest.raises(TranscriptError, match="differ before the last reply"):
        split_pair(
            prefix + "\n\nAssistant: x",
            "\n\nHuman: q1\n\nAssistant: other\n\nHuman: q2\n\nAssistant: y",
        )
    with pytest.raises(TranscriptError, match=r"^two user turns in a row \(rejected\)$"):
        split_pair(prefix + "\n\nAssistant: x", "\n\nHuman: q\n\nHuman: q\n\nAssistant: y")


# ------------------------------------------------------------------------------ adapters
def source(source_id: str, adapter: str, cap: int | None = None) -> SftSource:
    return SftSource(
        id=source_id, adapter=adapter, licence="MIT", url=f"https://x.org/{source_id}", cap=cap
    )


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_hh_rlhf_adapter_keeps_malformed_rows_as_rejects(tmp_path: Path) -> None:
    rows = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello",
            "rejected": "\n\nHuman: hi\n\nAssistant: go away",
        },
        {"chosen": "\n\nHuman: hi\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"},
    ]
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = adapt_pairs(source("hh", "hh_rlhf"), [path])
    assert out.schema == ADAPTED_PAIRS_SCHEMA
    assert out.row(0) == (
        "hh", "test.jsonl:0", [{"role": "user", "content": "hi"}], "hello", "go away", None
    )  # fmt: skip
    assert out.row(1)[2:] == (
        [],
        rows[1]["chosen"],  # the raw transcripts stay readable in the rejects
        rows[1]["rejected"],
        "malformed transcript: two user turns in a row (chosen)",
    )


def test_sharegpt_preference_adapter(tmp_path: Path) -> None:
    def turn(who: str, text: str) -> dict[str, str]:
        return {"from": who, "value": text}

    records = [
        {
            "conversations": [turn("system", "Be brief."), turn("human", "2+2?")],
            "chosen": turn("gpt", "4"),
            "rejected": turn("gpt", "5"),
        },
        {
            "conversations": [turn("robot", "x")],
            "chosen": turn("gpt", "a"),
            "rejected": turn("gpt", "b"),
        },
        {
            "conversations": [turn("human", "x")],
            "chosen": turn("human", "a"),
            "rejected": turn("gpt", "b"),
        },
    ]
    out = adapt_pairs(
        source("dpo", "sharegpt_preference"), [write_json(tmp_path / "d.json", records)]
    )
    assert out["prompt"][0].to_list() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
    ]
    assert out.select("chosen", "rejected").row(0) == ("4", "5")
    assert out["reason"].to_list() == [None, "unknown speaker 'robot'", "chosen reply from 'human'"]


def test_alpaca_preference_prompt_matches_the_sft_adapter(tmp_path: Path) -> None:
    """The reward model must see the prompts SFT trained on: same user turn as ``alpaca``."""
    records = [
        {"instruction": "Fix the grammar.", "input": "He go home.", "output": "He goes home.",
         "chosen": "He goes home.", "rejected": "He goes home, obviously."},
        {"instruction": "Name a colour.", "input": " ", "output": "Red.",
         "chosen": "Red.", "rejected": "Ugh. Red."},
    ]  # fmt: skip
    path = write_json(tmp_path / "p.json", records)
    pairs = adapt_pairs(source("rasbt", "alpaca_preference"), [path])
    sft_rows, _ = adapt_source(source("rasbt_sft", "alpaca"), [path])
    sft_users = [m[0] for m in sft_rows["messages"].to_list()]
    assert [p[0] for p in pairs["prompt"].to_list()] == sft_users
    assert sft_users[1] == {"role": "user", "content": "Name a colour."}  # blank input: no "\n\n"
    assert pairs["rejected"].to_list() == ["He goes home, obviously.", "Ugh. Red."]
    # rasbt's SFT file in place of the preference file: a clear error naming both.
    sft_only = write_json(tmp_path / "i.json", [{"instruction": "a", "input": "", "output": "b"}])
    with pytest.raises(
        SourceSchemaError,
        match=r"preference source 'rasbt' \(adapter 'alpaca_preference'\): i\.json lacks "
        r"column\(s\) \['chosen', 'rejected'\]",
    ):
        adapt_pairs(source("rasbt", "alpaca_preference"), [sft_only])


# ------------------------------------------------------------------------------ the build
def pair(
    src: str, i: int, user: str, chosen: str, rejected: str, reason: str | None = None
) -> dict:
    prompt = [{"role": "user", "content": user}] if user is not None else []
    return {
        "source": src,
        "source_id": f"{src}:{i:04d}",
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "reason": reason,
    }


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=ADAPTED_PAIRS_SCHEMA)


def word_counter(convs: list[list[dict[str, str]]]) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for the BPE: one token per word plus two per turn (role and end tokens)."""
    total = [sum(len(m["content"].split()) + 2 for m in c) for c in convs]
    reply = [
        sum(len(m["content"].split()) + 1 for m in c if m["role"] == "assistant") for c in convs
    ]
    return np.array(total), np.array(reply)


EVAL_QUESTION = "Janet has three red apples and buys seven more green apples at the market today"
SOURCES = [source("a", "hh_rlhf"), source("b", "alpaca_preference", cap=5)]


def filter_inputs() -> pl.DataFrame:
    a = [
        pair("a", i, f"Question {i} about cats?", f"Kind answer {i}.", f"Rude answer {i}.")
        for i in range(20)
    ]
    a += [
        pair("a", 100, "q", "x", "y", reason="malformed transcript: text before the first turn"),
        pair("a", 101, "  ", "x", "y"),  # blank user turn
        pair("a", 102, "Same?", "Yes  it IS.", "yes it is."),  # a tie after normalisation
        pair("a", 103, "Blank?", "fine", "  \n"),
        pair("a", 104, "Inject <|end|> here", "no", "yes"),
        pair("a", 105, f"Tell me: {EVAL_QUESTION}?", "Ten.", "Nine."),
        pair("a", 106, "Long?", "word " * 40, "short"),  # the longer reply decides,
        pair("a", 110, "Long too?", "short", "word " * 40),  # whichever it is
    ]
    ends_with_reply = pair("a", 107, "q", "x", "y")
    ends_with_reply["prompt"] = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    bad_role = pair("a", 108, "q", "x", "y")
    bad_role["prompt"] = [{"role": "narrator", "content": "q"}]
    blank_system = pair("a", 109, "Why blank system?", "Because.", "No idea.")
    blank_system["prompt"] = [{"role": "system", "content": " "}, *blank_system["prompt"]]
    a += [ends_with_reply, bad_role, blank_system]
    b = [pair("b", i, f"Dog fact {i}?", f"Dogs {i}.", f"Cats {i}.") for i in range(10)]
    b.append(pair("b", 50, "  QUESTION 3 about   cats?", "kind ANSWER 3.", "rude answer 3."))
    return frame(a + b)


CFG = PreferenceConfig(max_tokens=30, val_fraction=0.2, seed=7)


def test_filters_give_each_dropped_pair_one_reason() -> None:
    prompts = pl.DataFrame({"eval_set": ["gsm8k_test"], "prompt": [EVAL_QUESTION]})
    res = build_pairs(filter_inputs(), SOURCES, word_counter, NgramIndex.build(prompts), CFG)
    reasons = res.rejects.group_by("source", "reason").len().sort("source", "reason").rows()
    assert reasons == [
        ("a", "contaminated:gsm8k_test", 1),
        ("a", "empty_prompt", 1),
        ("a", "empty_reply", 1),
        ("a", "identical_replies", 1),
        ("a", "malformed transcript: text before the first turn", 1),
        ("a", "prompt_not_ending_with_user", 1),
        ("a", "special_token_text", 1),
        ("a", "too_long", 2),
        ("a", "unknown_role", 1),
        ("b", "duplicate", 1),  # the same pair as a:3 up to case and spacing, a comes first
        ("b", "over_cap", 5),  # registry cap 5 of 10 eligible pairs
    ]
    s = res.stats["sources"]
    for name, n_in in (("a", 31), ("b", 11)):
        assert s[name]["pairs_in"] == n_in
        assert s[name]["train"] + s[name]["val"] + sum(s[name]["rejected"].values()) == n_in
    kept = pl.concat([res.train, res.val])
    assert kept.height == 21 + 5 and kept.schema == PAIRS_SCHEMA
    # The blank system turn was dropped, the pair kept.
    why = kept.filter(pl.col("chosen") == "Because.")["prompt"].to_list()
    assert why == [[{"role": "user", "content": "Why blank system?"}]]
    # Rejects carry what is needed to read them.
    assert res.rejects.columns == [
        "source",
        "pair_id",
        "reason",
        "prompt_json",
        "chosen",
        "rejected",
    ]
    tie = res.rejects.filter(pl.col("reason") == "identical_replies").row(0, named=True)
    assert json.loads(tie["prompt_json"]) == [{"role": "user", "content": "Same?"}]
    assert pair_problems(res.train, res.val) == []


def test_pair_ids_are_stable_hashes() -> None:
    res = build_pairs(filter_inputs(), SOURCES, word_counter, None, CFG)
    row = res.train.row(0, named=True)
    assert row["pair_id"] == pair_id(row["source"], row["prompt"], row["chosen"], row["rejected"])
    assert pair_id("a", [{"role": "user", "content": "q"}], "x", "y") == pair_id(
        "a", [{"role": "user", "content": "q"}], "x", "y"
    )
    assert pair_id("a", [{"role": "user", "content": "q"}], "x", "y") != pair_id(
        "a", [{"role": "user", "content": "q"}], "y", "x"
    )
    assert res.rejects["pair_id"].is_unique().all() and len(row["pair_id"]) == 16


def many_prompts(n: int = 400, replies: int = 3) -> pl.DataFrame:
    """``n`` prompts with ``replies`` different pairs each, spread over two sources."""
    rows = [
        pair("a" if k % 2 else "b", i * replies + k, f"Prompt number {i}", f"good {k}", f"bad {k}")
        for i in range(n)
        for k in range(replies)
    ]
    return frame(rows)


def test_split_is_by_prompt_deterministic_and_seeded() -> None:
    sources = [source("a", "hh_rlhf"), source("b", "hh_rlhf")]
    cfg = PreferenceConfig(max_tokens=100, val_fraction=0.2, seed=11)
    pairs = many_prompts()
    one = build_pairs(pairs, sources, word_counter, None, cfg)
    assert one.train.height + one.val.height == pairs.height
    # Every reply of a prompt, from either source, lands on one side.
    train_prompts = {p[0]["content"] for p in one.train["prompt"].to_list()}
    val_prompts = {p[0]["content"] for p in one.val["prompt"].to_list()}
    assert not train_prompts & val_prompts
    assert 0.14 < len(val_prompts) / 400 < 0.26  # 80 expected; binomial sd 8
    assert one.val.height == 3 * len(val_prompts)
    # Row order in, seed and prompt text decide: a shuffled input gives the same files.
    two = build_pairs(
        pairs.sample(fraction=1.0, shuffle=True, seed=3), sources, word_counter, None, cfg
    )
    assert one.train.equals(two.train) and one.val.equals(two.val)
    other = build_pairs(
        pairs,
        sources,
        word_counter,
        None,
        PreferenceConfig(max_tokens=100, val_fraction=0.2, seed=12),
    )
    assert set(other.val["pair_id"]) != set(one.val["pair_id"])
    assert pair_problems(one.train, one.val) == []


def test_cap_keeps_that_many_usable_pairs() -> None:
    """The profile cap and the registry cap: the smaller applies, after the length filter."""
    pairs = many_prompts(n=15, replies=2)  # 15 pairs per source
    too_long = frame([pair("a", 900 + i, f"Long {i} " + "word " * 50, "x", "y") for i in range(10)])
    sources = [source("a", "hh_rlhf", cap=12), source("b", "hh_rlhf", cap=40)]
    cfg = PreferenceConfig(max_tokens=20, val_fraction=0.0, max_pairs_per_source=8, seed=1)
    res = build_pairs(pl.concat([pairs, too_long]), sources, word_counter, None, cfg)
    s = res.stats["sources"]
    assert (s["a"]["train"], s["a"]["rejected"]) == (8, {"over_cap": 7, "too_long": 10})
    assert (s["b"]["train"], s["b"]["rejected"]) == (8, {"over_cap": 7})
    assert s["a"]["cap"] == 8 and res.val.height == 0


def test_build_refuses_unknown_sources_and_bad_schemas() -> None:
    with pytest.raises(ValueError, match=r"not in the registry: \['zzz'\]"):
        build_pairs(frame([pair("zzz", 0, "q", "x", "y")]), SOURCES, word_counter, None, CFG)
    with pytest.raises(ValueError, match="expected"):
        build_pairs(
            frame([pair("a", 0, "q", "x", "y")]).drop("reason"), SOURCES, word_counter, None, CFG
        )


# ------------------------------------------------------------------------------ config, registry
def test_config_from_profile() -> None:
    cfg = PreferenceConfig.from_profile(
        {"context_length": 64, "seed": 5, "preference": {"max_tokens": None}}
    )
    assert (cfg.max_tokens, cfg.seed, cfg.val_fraction) == (64, 5, 0.05)
    assert (
        PreferenceConfig.from_profile(
            {"context_length": 64, "preference": {"max_tokens": 99}}
        ).max_tokens
        == 99
    )
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_pairs'\]"):
        PreferenceConfig.from_profile({"context_length": 64, "preference": {"max_pairs": 3}})
    with pytest.raises(ValueError, match="val_fraction"):
        PreferenceConfig.from_profile({"context_length": 64, "preference": {"val_fraction": 1.0}})


def test_registry_of_preference_sources(tmp_path: Path) -> None:
    loaded = load_preference_sources(REPO / "configs" / "preference_sources.yaml")
    assert [(s.id, s.adapter) for s in loaded] == [
        ("hh_rlhf_harmless", "hh_rlhf"),
        ("dpo_en_zh", "sharegpt_preference"),
        ("rasbt_preference", "alpaca_preference"),
        ("dpo_zh_demo", "sharegpt_preference"),
    ]
    assert [s.id for s in loaded if s.language == "zh"] == ["dpo_zh_demo"]
    assert loaded[2].url and loaded[2].sha256 and loaded[0].revision == "main"
    # The preference adapters are not SFT adapters, and the other way round.
    assert not {"hh_rlhf", "sharegpt_preference", "alpaca_preference"} & set(available_adapters())
    bad = {
        "sources": [
            {"id": "x", "url": "https://x.org/f.json", "adapter": "alpaca", "licence": "MIT"},
            {
                "id": "y",
                "url": "https://x.org/g.json",
                "adapter": "hh_rlhf",
                "licence": "MIT",
                "weight": 2,
            },
        ]
    }
    with pytest.raises(SftConfigError) as info:
        parse_sft_sources(bad, "prefs.yaml", keys=PREFERENCE_KEYS, adapters=PREFERENCE_ADAPTERS)
    message = str(info.value)
    assert (
        "prefs.yaml: source #1 ('x'): unknown adapter 'alpaca'; available: ['alpaca_preference',"
        in message
    )
    assert "source #2 ('y'): unknown key(s) ['weight']" in message


# ------------------------------------------------------------------------------ the files
def test_read_pairs_and_problems(tmp_path: Path) -> None:
    res = build_pairs(filter_inputs(), SOURCES, word_counter, None, CFG)
    res.train.write_parquet(tmp_path / "train.parquet")
    pairs = read_pairs(tmp_path / "train.parquet")
    assert len(pairs) == res.train.height and isinstance(pairs[0], PreferencePair)
    first = res.train.row(0, named=True)
    assert pairs[0] == PreferencePair(
        prompt=first["prompt"], chosen=first["chosen"], rejected=first["rejected"],
        source=first["source"], pair_id=first["pair_id"],
    )  # fmt: skip
    assert pairs[0].prompt[-1]["role"] == "user"

    res.train.drop("pair_id").write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(
        ValueError, match=r"bad\.parquet: not a preference pairs file.*'pair_id': 'missing'"
    ):
        read_pairs(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match="materialise preference_pairs"):
        read_pairs(tmp_path / "nope.parquet")

    # Each promise, broken on purpose, is reported.
    train, val = res.train, res.val
    leaked = pl.concat([val, train.head(1)])
    assert pair_problems(train, leaked) == ["1 prompt(s) in both train and val"]
    assert pair_problems(train.head(0), val) == ["train is empty"]
    tie = train.with_columns(pl.col("chosen").alias("rejected"))
    assert pair_problems(tie, val) == [f"train: {train.height} pair(s) with chosen == rejected"]
    reply_last = train.with_columns(
        pl.concat_list(
            "prompt",
            pl.struct(pl.lit("assistant").alias("role"), pl.col("chosen").alias("content")),
        )
    )
    assert pair_problems(reply_last, val) == [
        f"train: {train.height} prompt(s) not ending with a user turn"
    ]
    assert "train: duplicate pair_id values" in pair_problems(pl.concat([train, train]), val)
