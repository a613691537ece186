"""Benchmark loaders: hand-made files with broken records, and the real files of the mirror."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.eval.sets import (
    EvalSetMissing,
    final_number,
    load_alpaca_eval,
    load_blimp,
    load_gsm8k,
    load_lambada,
    set_files,
    split_last_word,
    subset,
)
from tests.pipeline.eval.eval_fixtures import write_eval_sets


@pytest.fixture
def eval_dir(tmp_path: Path) -> Path:
    return write_eval_sets(tmp_path)


def test_blimp_samples_per_phenomenon_and_rejects_broken_pairs(eval_dir: Path) -> None:
    loaded = load_blimp(set_files(eval_dir, "blimp"), per_phenomenon=2, seed=1)
    counts = dict(loaded.items.group_by("phenomenon").len().iter_rows())
    assert counts == {"anaphor_gender_agreement": 2, "determiner_noun_agreement_1": 2}
    assert loaded.available == 7
    assert sorted(loaded.rejects["reason"].to_list()) == [
        "empty sentence",
        "good and bad sentences are identical",
    ]
    assert set(loaded.rejects.columns) == {"eval_set", "item", "reason"}
    again = load_blimp(set_files(eval_dir, "blimp"), per_phenomenon=2, seed=1)
    assert again.items.equals(loaded.items)  # seeded: the same items every run


def test_lambada_splits_off_the_last_word_with_its_space(eval_dir: Path) -> None:
    loaded = load_lambada(set_files(eval_dir, "lambada"), n=10, seed=0)
    assert loaded.items.height == 4 and loaded.rejects["reason"].to_list() == [
        "no last word to predict"
    ]
    first = loaded.items.row(0, named=True)
    assert first["context"] == "The old man walked down to the sea and looked at the"
    assert first["target"] == " boat"
    assert split_last_word("one\ntwo ") == ("one", " two")


def test_gsm8k_reference_numbers(eval_dir: Path) -> None:
    loaded = load_gsm8k(set_files(eval_dir, "gsm8k_test"), n=10, seed=0)
    assert loaded.items["reference"].to_list() == [8.0, 24.0, 6.0]
    assert loaded.rejects["reason"].to_list() == ["answer has no '#### <final answer>' line"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("The answer is 72.", 72.0),
        ("She makes $1,234 a day, so the answer is 1,234.", 1234.0),
        ("#### 18 and then 5 more words", 18.0),
        ("It is -3.5 degrees", -3.5),
        ("no number at all", None),
    ],
)
def test_final_number(reply: str, expected: float | None) -> None:
    assert final_number(reply) == expected


def test_alpaca_eval_and_subset(eval_dir: Path) -> None:
    loaded = load_alpaca_eval(set_files(eval_dir, "alpaca_eval"), n=3, seed=5)
    assert loaded.items.height == 3 and loaded.available == 4
    assert loaded.rejects["reason"].to_list() == ["empty instruction"]
    items = loaded.items["item"].to_list()
    assert items == sorted(items, key=lambda s: int(s.rsplit(":", 1)[1]))  # file order kept
    assert subset(loaded.items, 10, seed=0).equals(loaded.items)


def test_missing_set_names_the_asset(tmp_path: Path) -> None:
    with pytest.raises(EvalSetMissing, match="materialise the `eval_sets` asset"):
        set_files(tmp_path, "blimp")


@pytest.mark.mirror
def test_loaders_read_the_real_files(mirror_dir: Path) -> None:
    """The mirror's copies of the Hub and URL files, in their own formats and schemas."""
    hf = mirror_dir / "hf" / "datasets"
    blimp = load_blimp(sorted((hf / "nyu-mll" / "blimp").rglob("*.parquet")), 10, seed=1)
    assert blimp.items.height == 60 and blimp.available == 6000 and blimp.rejects.height == 0
    lambada_file = (
        mirror_dir / "files" / "openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
    )
    lambada = load_lambada([lambada_file], 20, seed=1)
    assert lambada.available == 5153 and lambada.items.height == 20
    assert all(t.startswith(" ") and " " not in t[1:] for t in lambada.items["target"])
    gsm = load_gsm8k([hf / "openai/gsm8k/main/test-00000-of-00001.parquet"], 20, seed=1)
    assert gsm.available == 1319 and gsm.rejects.height == 0
    alpaca = load_alpaca_eval([hf / "tatsu-lab/alpaca_eval/alpaca_eval.json"], 20, seed=1)
    assert alpaca.available == 805 and alpaca.items["dataset"].n_unique() > 1
