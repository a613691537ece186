"""SFT adapters on real mirror rows, the one output schema, rejects, and the sources config."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from pipeline.text.adapters import (
    REJECTS_SCHEMA,
    ROWS_SCHEMA,
    SftConfigError,
    SftSource,
    SourceSchemaError,
    adapt_source,
    available_adapters,
    load_sft_sources,
)
from pipeline.text.adapters.registry import parse_sft_sources

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "configs" / "sft_sources.yaml"
DEFAULT_IDS = [
    "alpaca",
    "dolly",
    "gsm8k",
    "code_alpaca",
    "gpteacher_code",
    "gpteacher_toolformer",
    "self_instruct",
    "glaive_toolcall",
    "alpaca_cot_strategyqa",
    "gsm_hard",
    "rasbt_instructions",
    "alpaca_zh_demo",
]
# id -> (rows, rejects, start of the first user message, start of the first reply)
EXPECTED = {
    "alpaca": (100, 0, "Give three tips for staying healthy.", "1.Eat a balanced diet"),
    "dolly": (12, 0, "When did Virgin Australia start operating?\n\nVirgin Australia,", "Virgin"),
    "gsm8k": (3000, 0, "Natalia sold clips", "Natalia sold 48/2 = 24 clips in May."),
    "code_alpaca": (2015, 2, "What are the distinct values", "The distinct values"),
    "gpteacher_code": (3000, 0, "Write a C++ program", "#include <iostream>"),
    "gpteacher_toolformer": (3000, 0, "toolformer: enabled", "Summary of the French"),
    "self_instruct": (252, 0, "The sentence you are given", "If you have any questions"),
    "glaive_toolcall": (300, 0, "Hi, I have some ingredients", "Of course!"),
    "alpaca_cot_strategyqa": (2061, 0, "Answer the following question", "Julius Caesar"),
    "gsm_hard": (1319, 0, "Janet’s ducks lay 16 eggs", "```python\ndef solution():"),
    "rasbt_instructions": (1100, 0, "Evaluate the following phrase", "The spelling"),
    "alpaca_zh_demo": (1000, 0, "识别并解释给定列表中的两个科学理论", "细胞理论是生物科学"),
    "longform": (17, 0, "What are the positions held by Beto", "The liberal mainstream"),
}


def _twelfth_source_config() -> str:
    """The default config with the commented LongForm example switched on."""
    lines = CONFIG.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# - id: longform")
    enabled = [line.replace("  # ", "  ", 1) for line in lines[start:]]
    return "\n".join(lines[:start] + enabled) + "\n"


@pytest.fixture(scope="module")
def sources() -> dict[str, SftSource]:
    everything = parse_sft_sources(yaml.safe_load(_twelfth_source_config()))
    return {s.id: s for s in everything}


def mirror_files(mirror_dir: Path, source: SftSource) -> list[Path]:
    """The files the download step would hand over, read straight from the mirror."""
    if source.url is not None:
        return [mirror_dir / "files" / source.url.split("://", 1)[1]]
    assert source.repo is not None
    base = mirror_dir / "hf" / "datasets" / source.repo
    return sorted({p for pattern in source.patterns for p in base.glob(pattern)})


def test_default_config_has_the_twelve_sources() -> None:
    loaded = load_sft_sources(CONFIG)
    assert [s.id for s in loaded] == DEFAULT_IDS
    by_id = {s.id: s for s in loaded}
    assert by_id["gsm8k"].patterns == ("main/train-*.parquet",)
    assert by_id["rasbt_instructions"].url and by_id["rasbt_instructions"].repo is None
    assert {s.id for s in loaded if s.non_commercial} == {"alpaca", "code_alpaca"}
    assert all(s.licence and s.weight > 0 for s in loaded)
    assert {s.id for s in loaded if s.language != "en"} == {"alpaca_zh_demo"}
    assert by_id["alpaca_zh_demo"].language == "zh" and by_id["alpaca_zh_demo"].sha256


@pytest.mark.mirror
@pytest.mark.parametrize("source_id", list(EXPECTED))
def test_adapter_on_real_rows(
    mirror_dir: Path, sources: dict[str, SftSource], source_id: str
) -> None:
    source = sources[source_id]
    files = mirror_files(mirror_dir, source)
    assert files, f"no mirror files for {source_id}"
    rows, rejects = adapt_source(source, files)
    n_rows, n_rejects, user_start, reply_start = EXPECTED[source_id]
    assert rows.schema == ROWS_SCHEMA and rejects.schema == REJECTS_SCHEMA
    assert (rows.height, rejects.height) == (n_rows, n_rejects)
    assert rows["source"].unique().to_list() == [source_id]
    assert rows["source_id"].is_unique().all()
    first = rows["messages"][0].to_list()
    turns = [m for m in first if m["role"] != "system"]
    assert turns[0]["role"] == "user" and turns[0]["content"].startswith(user_start)
    assert turns[1]["role"] == "assistant" and turns[1]["content"].startswith(reply_start)
    last_roles = rows.select(pl.col("messages").list.last().struct.field("role")).to_series()
    assert (last_roles == "assistant").all()


@pytest.mark.mirror
def test_schema_specific_conversions(mirror_dir: Path, sources: dict[str, SftSource]) -> None:
    def first(source_id: str) -> list[dict[str, str]]:
        rows, _ = adapt_source(sources[source_id], mirror_files(mirror_dir, sources[source_id]))
        return rows["messages"][0].to_list()

    gsm8k = first("gsm8k")[1]["content"]
    assert "<<" not in gsm8k and "####" not in gsm8k and gsm8k.endswith("The answer is 72.")

    glaive = first("glaive_toolcall")
    roles = [m["role"] for m in glaive]
    assert roles[0] == "system" and "search_recipes" in glaive[0]["content"]
    assert roles == ["system", "user", "assistant", "user", "assistant", "tool", "assistant"] + [
        "user",
        "assistant",
    ]
    assert glaive[4]["content"].startswith('<tool_call>\n{"name": "search_recipes"')

    hard = first("gsm_hard")[1]["content"]
    assert hard.endswith("```\n\nThe answer is -9867630.") and "def solution():" in hard

    rows, _ = adapt_source(
        sources["self_instruct"], mirror_files(mirror_dir, sources["self_instruct"])
    )
    assert rows["source_id"][0] == "user_oriented_task_0:0"


@pytest.mark.mirror
def test_wrong_schema_names_the_source_and_columns(
    mirror_dir: Path, sources: dict[str, SftSource]
) -> None:
    wrong = SftSource(id="mislabelled", adapter="gsm8k", licence="MIT", repo="x/y", revision="main")
    with pytest.raises(SourceSchemaError, match=r"'mislabelled'.*\['question', 'answer'\]"):
        adapt_source(wrong, mirror_files(mirror_dir, sources["alpaca"]))


@pytest.mark.mirror
def test_rejects_carry_reasons(mirror_dir: Path, sources: dict[str, SftSource]) -> None:
    _, rejects = adapt_source(
        sources["code_alpaca"], mirror_files(mirror_dir, sources["code_alpaca"])
    )
    assert rejects["reason"].to_list() == ["empty assistant message"] * 2
    assert all(s.startswith("code_alpaca_2k.json:") for s in rejects["source_id"])
    assert rejects["source"].unique().to_list() == ["code_alpaca"]


def test_schema_specific_rejects(tmp_path: Path) -> None:
    def adapt(adapter: str, name: str, frame: pl.DataFrame) -> pl.DataFrame:
        path = tmp_path / name
        if name.endswith(".parquet"):
            frame.write_parquet(path)
        else:
            frame.write_ndjson(path)
        source = SftSource(id="t", adapter=adapter, licence="MIT", repo="x/y", revision="main")
        return adapt_source(source, [path])[1]

    gsm = pl.DataFrame({"question": ["q1", "q2"], "answer": ["no marker", "ok\n#### 3"]})
    assert adapt("gsm8k", "g.jsonl", gsm).rows() == [
        ("t", "g.jsonl:0", "answer has no '#### <final answer>' line")
    ]

    hard = pl.DataFrame({"input": ["q"], "code": ["def solution(): ..."], "target": [float("nan")]})
    assert adapt("gsm_hard", "h.jsonl", hard)["reason"].to_list() == [
        "target is not a finite number"
    ]

    glaive = pl.DataFrame(
        {
            "conversations": [
                [{"from": "human", "value": "hi"}, {"from": "wizard", "value": "poof"}],
                [{"from": "human", "value": "hi"}],
            ],
            "tools": ["[]", "[]"],
        }
    )
    assert adapt("glaive_toolcall", "c.parquet", glaive)["reason"].to_list() == [
        "unknown speaker 'wizard'",
        "last message is not from the assistant",
    ]

    instances = pl.DataFrame(
        {
            "id": ["a", "b"],
            "instruction": ["do", "do"],
            "instances": [
                {"input": ["x"], "output": []},
                {"input": ["", ""], "output": ["1", "2"]},
            ],
        }
    )
    rejected = adapt("self_instruct", "s.parquet", instances)
    assert rejected.rows() == [("t", "a", "instances have 1 inputs but 0 outputs")]

    alpaca = pl.DataFrame({"instruction": ["  ", "x"], "input": ["", ""], "output": ["y", None]})
    assert adapt("alpaca", "a.jsonl", alpaca)["reason"].to_list() == [
        "empty user message",
        "empty assistant message",
    ]


def test_twelfth_source_is_one_yaml_entry() -> None:
    loaded = parse_sft_sources(yaml.safe_load(_twelfth_source_config()))
    assert [s.id for s in loaded] == [*DEFAULT_IDS, "longform"]
    assert "longform" in available_adapters()


def test_config_errors_name_every_bad_entry(tmp_path: Path) -> None:
    bad = tmp_path / "sources.yaml"
    bad.write_text(
        """
sources:
  - {id: ok, repo: a/b, revision: main, patterns: ["*.json"], adapter: alpaca, licence: MIT}
  - {id: Bad-Id, repo: a/b, revision: main, patterns: ["*.json"], adapter: alpaca, licence: MIT}
  - {id: both, repo: a/b, url: "https://x.org/f.json", adapter: alpaca, licence: MIT}
  - {id: norev, repo: a/b, patterns: [], adapter: nope, licence: MIT, weight: 0}
  - {id: ok, repo: a/b, revision: main, patterns: ["*"], adapter: alpaca, licence: MIT, extra: 1}
""",
        encoding="utf-8",
    )
    with pytest.raises(SftConfigError) as info:
        load_sft_sources(bad)
    message = str(info.value)
    assert "source #2 ('Bad-Id'): 'id' must match" in message
    assert "source #3 ('both'): set exactly one of 'repo'" in message
    assert "source #4 ('norev'): 'revision' is required" in message
    assert "source #4 ('norev'): 'patterns' must be a non-empty list" in message
    assert "source #4 ('norev'): unknown adapter 'nope'; available: [" in message
    assert "source #4 ('norev'): 'weight' must be a positive number" in message
    assert "source #5 ('ok'): unknown key(s) ['extra']" in message
    assert "source #1" not in message

    dup = tmp_path / "dup.yaml"
    dup.write_text(
        "sources:\n"
        + "  - {id: a, url: 'https://x.org/f.json', adapter: alpaca, licence: MIT}\n" * 2,
        encoding="utf-8",
    )
    with pytest.raises(SftConfigError, match=r"source #2 \('a'\): duplicate id 'a'"):
        load_sft_sources(dup)
    with pytest.raises(SftConfigError, match="'sources' list"):
        parse_sft_sources({"source": []})
