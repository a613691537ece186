"""SFT assets and their pure parts: one source through Dagster against the mirror server, the
mixture's filters/caps/weights/split, decontamination, and the eval-set registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from pipeline.assets.sft import SFT_SOURCES, sft_sources
from pipeline.resources import HubSource, Paths, resources_from_env
from pipeline.sources.mirror import MirrorServer
from pipeline.text.adapters import SftSource
from pipeline.text.decontam import EvalSetConfigError, NgramIndex, load_eval_sets
from pipeline.text.sft_mix import MixConfig, build_mixture, check_consistent

REPO = Path(__file__).resolve().parents[3]
SECRET = "hf_sentinel_token_that_must_never_be_logged"


@pytest.fixture
def isolated_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user cache, token or mirror variable may leak in; the token is a sentinel."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("SCRIPTORIUM_FILES_MIRROR", raising=False)


@pytest.fixture
def hub_server(mirror_dir: Path) -> Iterator[MirrorServer]:
    with MirrorServer(mirror_dir) as server:
        yield server


def _materialize_source(source_id: str, data: Path, hub: HubSource) -> dg.ExecuteInProcessResult:
    resources = {"paths": Paths(data_root=str(data)), "hub": hub}
    with dg.instance_for_test() as instance:
        key = dg.AssetKey(["sft_sources", source_id])
        result = dg.materialize(
            [sft_sources], selection=[key], resources=resources, instance=instance
        )
        events = [str(e) for e in instance.all_logs(result.run_id)]
    assert SECRET not in "\n".join(events)  # the token never reaches the event log
    return result


@pytest.mark.mirror
def test_one_source_materialises_alone(
    isolated_hf: None, hub_server: MirrorServer, tmp_path: Path
) -> None:
    """``sft_sources/dolly`` alone, through ``huggingface_hub`` against the mirror's Hub API."""
    hub = resources_from_env({"HF_ENDPOINT": hub_server.url, "HF_TOKEN": SECRET})["hub"]
    assert isinstance(hub.token, dg.EnvVar)  # resolved in the step, never a plain config value
    result = _materialize_source("dolly", tmp_path / "data", hub)
    assert result.success
    [mat] = result.get_asset_materialization_events()
    assert mat.asset_key == dg.AssetKey(["sft_sources", "dolly"])
    meta = mat.materialization.metadata
    assert meta["rows"].value == 12 and meta["rejects"].value == 0
    assert meta["licence"].value == "CC-BY-SA-3.0"
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "rows_valid" and check.passed
    rows = pl.read_parquet(tmp_path / "data" / "sft_sources" / "dolly" / "rows.parquet")
    assert rows.height == 12 and rows["source"].unique().to_list() == ["dolly"]
    assert (tmp_path / "data" / "sft_sources" / "dolly" / "rejects.parquet").exists()
    fetched = [p for p in hub_server.faults.requested_paths("GET") if "/resolve/" in p]
    assert fetched and all("databricks-dolly-15k" in p for p in fetched)  # nothing else


@pytest.mark.mirror
def test_url_source_through_the_resource_files_mirror(
    isolated_hf: None, hub_server: MirrorServer, tmp_path: Path
) -> None:
    """A plain-URL source, sha256-pinned, rewritten by ``HubSource.files_mirror``."""
    hub = HubSource(files_mirror=f"{hub_server.url}/files")
    result = _materialize_source("rasbt_instructions", tmp_path / "data", hub)
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["rows"].value == 1100
    assert hub_server.faults.requested_paths("GET") == [
        "/files/raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
        "01_main-chapter-code/instruction-data.json"
    ]


def test_factory_makes_one_asset_per_registry_entry() -> None:
    keys = [dg.AssetKey(["sft_sources", s.id]) for s in SFT_SOURCES]
    assert set(sft_sources.keys) == set(keys) and len(keys) == 11 and sft_sources.can_subset
    assert set(sft_sources.group_names_by_key.values()) == {"sft"}
    assert {k.asset_key for k in sft_sources.check_keys} == set(keys)


# ------------------------------------------------------------------------------ the mixture
def conv(user: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def rows_of(source: str, convs: list[list[dict[str, str]]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "source": [source] * len(convs),
            "source_id": [f"{source}:{i}" for i in range(len(convs))],
            "messages": convs,
        }
    )


def word_counter(convs: list[list[dict[str, str]]]) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for the BPE: one token per word plus one per turn."""
    total = [sum(len(m["content"].split()) + 1 for m in c) for c in convs]
    reply = [sum(len(m["content"].split()) for m in c if m["role"] == "assistant") for c in convs]
    return np.array(total), np.array(reply)


EVAL_QUESTION = "Janet has three red apples and buys seven more green apples at the market today"


def mixture_inputs() -> tuple[pl.DataFrame, list[SftSource], NgramIndex]:
    a = [conv(f"Question number {i} about cats?", f"Answer {i} about cats.") for i in range(40)]
    a += [
        conv("Blank reply?", "   \n "),
        conv("Inject <|end|> here", "no"),
        conv(f"Tell me: {EVAL_QUESTION}?", "Ten apples."),
    ]
    b = [conv(f"Dog fact {i}?", f"Dogs {i}.") for i in range(30)]
    b.append(conv("  QUESTION NUMBER 3 about   cats?", "answer 3 ABOUT cats."))  # a duplicate of a
    c = [conv(f"Bird {i}?", f"Birds {i}.") for i in range(10)] + [conv("Long?", "word " * 500)]
    rows = pl.concat([rows_of("a", a), rows_of("b", b), rows_of("c", c)])
    sources = [
        SftSource(id="a", adapter="alpaca", licence="MIT", url="https://x.org/a.json", cap=30),
        SftSource(id="b", adapter="alpaca", licence="MIT", url="https://x.org/b.json", weight=0.5),
        SftSource(
            id="c", adapter="alpaca", licence="CC-BY-NC-4.0", url="https://x.org/c", weight=2.0
        ),
    ]
    prompts = pl.DataFrame({"eval_set": ["gsm8k_test"], "prompt": [EVAL_QUESTION]})
    return rows, sources, NgramIndex.build(prompts)


def test_mixture_filters_caps_weights_and_accounts_for_every_row() -> None:
    rows, sources, index = mixture_inputs()
    cfg = MixConfig(max_tokens=100, val_fraction=0.1, seed=7)
    res = build_mixture(rows, sources, word_counter, index, cfg)
    by_reason = res.rejects.group_by("source", "reason").len().sort("source", "reason").rows()
    assert by_reason == [
        ("a", "contaminated:gsm8k_test", 1),
        ("a", "empty_reply", 1),
        ("a", "over_cap", 10),  # 40 rows left for a cap of 30
        ("a", "special_token_text", 1),
        ("b", "below_weight", 13),
        ("b", "duplicate", 1),
        ("c", "too_long", 1),
    ]
    s = res.stats["sources"]
    assert (s["a"]["train"], s["a"]["val"]) == (27, 3)  # cap 30, 10% val
    assert (s["b"]["train"], s["b"]["val"]) == (14, 3)  # 30 -> 27 train, weight 0.5 -> 14
    assert (s["c"]["train"], s["c"]["train_unique"], s["c"]["val"]) == (18, 9, 1)  # weight 2
    assert check_consistent(res.stats) == []
    assert res.stats["non_commercial_sources"] == ["c"]
    # No conversation is in both splits, repeats included.
    assert not set(res.train["source_id"]) & set(res.val["source_id"])
    assert res.train.columns == ["source", "source_id", "messages", "n_tokens", "reply_tokens"]


def test_mixture_is_deterministic_and_seeded() -> None:
    rows, sources, index = mixture_inputs()
    cfg = MixConfig(max_tokens=100, val_fraction=0.1, seed=7)
    one = build_mixture(rows, sources, word_counter, index, cfg)
    shuffled = rows.sample(fraction=1.0, shuffle=True, seed=3)
    two = build_mixture(shuffled, sources, word_counter, index, cfg)
    assert one.train.equals(two.train) and one.val.equals(two.val)
    other = build_mixture(rows, sources, word_counter, index, MixConfig(max_tokens=100, seed=8))
    assert not one.train["source_id"].equals(other.train["source_id"])
    with pytest.raises(ValueError, match="unknown key"):
        MixConfig.from_profile({"max_tokenz": 3}, seed=1)


def test_decontamination_rule() -> None:
    long_q = (
        "natalia sold clips to forty eight of her friends in april and then half as many in may"
    )
    prompts = pl.DataFrame(
        {
            "eval_set": ["gsm", "gsm", "short"],
            "prompt": [long_q, long_q.replace("april", "june"), "Who is Larry Page, really?"],
        }
    )
    index = NgramIndex.build(prompts, min_n=8, max_n=13, min_words=4)
    assert index.n_per_set == {"gsm": 13, "short": 8}
    texts = pl.Series(
        [
            "Q: NATALIA sold clips to forty-eight of her friends in April, and then half as many",
            "natalia sold clips to forty eight of her friends",  # 10 words < 13: no match
            "So... who is Larry Page, really? Nobody knows.",  # a short prompt, whole
            "who is larry page",  # only part of the short prompt
            "friends in april and then half",
        ]
    )
    assert index.match(texts).to_list() == ["gsm", None, "short", None, None]


def test_eval_sets_registry(tmp_path: Path) -> None:
    sets = load_eval_sets(REPO / "configs" / "eval_sets.yaml")
    assert [s.id for s in sets] == [
        "gsm8k_test",
        "alpaca_eval",
        "humaneval",
        "lambada",
        "blimp",
        "mmlu",
    ]
    assert sets[3].url and sets[3].sha256 and sets[0].patterns == ("main/test-*.parquet",)
    # MMLU: one url template, one CSV per subject, headerless
    urls = sets[5].urls()
    assert len(urls) == 56 and urls[0].endswith("/MMLU-data/test/abstract_algebra_test.csv")
    assert sets[5].columns == ("question", "A", "B", "C", "D", "answer")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "eval_sets:\n"
        "  - {id: ok, repo: a/b, revision: main, patterns: ['*'], prompt_fields: [q], licence: MIT}\n"
        "  - {id: Bad, url: 'https://x.org/f', prompt_fields: [], licence: MIT, extra: 1}\n"
        "  - {id: many, url: 'https://x.org/f.csv', files: [a], prompt_fields: [q], licence: MIT}\n"
    )
    with pytest.raises(EvalSetConfigError) as info:
        load_eval_sets(bad)
    message = str(info.value)
    assert "eval set #2 ('Bad')" in message and "unknown key(s) ['extra']" in message
    assert "'prompt_fields'" in message and "eval set #1" not in message
    assert "eval set #3 ('many'): 'files'" in message  # no {file} in its url
