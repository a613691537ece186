"""Chinese through the text stages: language ID (traditional and simplified), character shingles
in MinHash dedup and in decontamination, the clean stage on the mirror's Chinese books under
``zh`` and ``en``, and which registry sources a profile takes by language."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.eval.prompts import generation_prompts, win_rate_prompts
from pipeline.text.adapters.registry import load_sft_sources
from pipeline.text.boilerplate import strip_boilerplate
from pipeline.text.clean import clean_books
from pipeline.text.decontam import NgramIndex
from pipeline.text.dedup import exact_similarity, find_near_duplicates, shingle_hashes, sketch_text
from pipeline.text.encoding import decode_text
from pipeline.text.language import chinese_script, detect_language
from pipeline.text.preferences import load_preference_sources
from pipeline.text.source_languages import selected_source_ids
from tests.conftest import MirrorBooks
from tests.pipeline.text.test_clean import mirror_inputs

REPO = Path(__file__).resolve().parents[3]
SIMPLIFIED = (
    "世界上最大的动物是蓝鲸。它们生活在海洋里，这个时候我们说它们是哺乳动物，因为它们用肺呼吸。"
)
TRADITIONAL = (
    "世界上最大的動物是藍鯨。牠們生活在海洋裡，這個時候我們說牠們是哺乳動物，因為牠們用肺呼吸。"
)
CHAPTER = re.compile(r"(?m)^\s*第[一二三四五六七八九十百零〇]+回")


def mirror_body(mirror_dir: Path, book_id: int) -> str:
    raw = mirror_dir / "gutenberg" / "cache" / "epub" / str(book_id) / f"pg{book_id}.txt"
    return strip_boilerplate(decode_text(raw.read_bytes()).text).body


def without_chapter(body: str, n: int) -> str:
    """``body`` with its ``n``-th chapter (第…回 heading to the next heading) cut out."""
    starts = [m.start() for m in CHAPTER.finditer(body)]
    return body[: starts[n]] + body[starts[n + 1] :]


def test_both_scripts_are_chinese_and_told_apart() -> None:
    for text in (SIMPLIFIED, TRADITIONAL):
        assert detect_language(text * 3).code == "zh"
    assert chinese_script(SIMPLIFIED) == "Hans" and chinese_script(TRADITIONAL) == "Hant"
    assert chinese_script("no Chinese here") == "und"


def test_chinese_is_shingled_in_characters_and_english_as_before() -> None:
    # Ten characters, no spaces: six character 5-grams (one "word" before the change).
    assert len(shingle_hashes("天色已晚，老人回到家中")) == 6
    # Punctuation, full-width or not, does not separate two editions.
    assert np.array_equal(
        shingle_hashes("天色已晚，老人回到家中。"), shingle_hashes("天色已晚 老人回到家中")
    )
    # English (ASCII or typographic) shingles are untouched: words, not characters.
    assert len(shingle_hashes("the old man looked at the sea and said")) == 5
    # Mixed text: each Han character is a word beside the English words.
    assert len(shingle_hashes("Python 是一种 language 吗")) == 2  # Python 是 一 种 language 吗


@pytest.mark.mirror
def test_a_chinese_book_with_one_chapter_removed_is_a_near_duplicate(mirror_dir: Path) -> None:
    books = {i: mirror_body(mirror_dir, i) for i in (24113, 24170)}
    cut = without_chapter(books[24113], 5)
    assert len(books[24113]) - len(cut) > 1500  # a real chapter went
    ids, texts = [24113, 24170, 999_001], [books[24113], books[24170], cut]
    dups = find_near_duplicates(
        ids, [len(t) for t in texts], [sketch_text(t) for t in texts], 0.8,
        verify=lambda a, b: exact_similarity(
            shingle_hashes(texts[ids.index(a)]), shingle_hashes(texts[ids.index(b)])
        ),
    )  # fmt: skip
    assert [(d.dropped, d.kept) for d in dups] == [(999_001, 24113)]
    assert dups[0].similarity.containment > 0.99
    # The two different books share almost no character 5-grams.
    other = exact_similarity(shingle_hashes(books[24113]), shingle_hashes(books[24170]))
    assert other.containment < 0.1


@pytest.mark.mirror
@pytest.mark.slow
def test_clean_keeps_the_chinese_books_under_zh_and_rejects_them_under_en(
    mirror_dir: Path, mirror_books: MirrorBooks, tmp_path: Path
) -> None:
    chinese = mirror_books.in_language("zh")
    assert len(chinese) >= 7
    english = [11, 1952]
    manifest, catalog = mirror_inputs(mirror_dir)
    keep = pl.col("id").is_in([*chinese, *english])
    manifest, catalog = manifest.filter(keep), catalog.filter(keep)
    # An edition of 24113 with one chapter missing, as another book id: a near-duplicate.
    copy = tmp_path / "pg999001.txt"
    raw = (mirror_dir / "gutenberg" / "cache" / "epub" / "24113" / "pg24113.txt").read_bytes()
    copy.write_text(without_chapter(decode_text(raw).text, 5), encoding="utf-8")
    manifest = pl.concat(
        [manifest, pl.DataFrame({"id": [999_001], "path": [str(copy)], "status": ["ok"]})]
    )
    catalog = pl.concat(
        [
            catalog,
            catalog.filter(pl.col("id") == 24113).with_columns(
                pl.lit(999_001, pl.Int64).alias("id")
            ),
        ]
    )
    out = {}
    for lang in ("zh", "en", "en+zh"):
        stats = clean_books(
            manifest, catalog, tmp_path / lang, languages=lang.split("+"), min_chars=2000,
            near_duplicate_threshold=0.8, workers=1,
        )  # fmt: skip
        books = pl.read_parquet(tmp_path / lang / "books.parquet")
        rejects = pl.read_parquet(tmp_path / lang / "rejects.parquet")
        out[lang] = (stats, set(books["id"]), dict(rejects.select("id", "reason").iter_rows()))
    stats, kept, reason = out["zh"]
    # Per-language counts (what cleaned_books' metadata shows) cover every book read.
    assert stats.languages == {"en": 2, "zh": len(chinese) + 1}
    assert kept == set(chinese)
    assert reason == {11: "language_mismatch", 1952: "language_mismatch", 999_001: "near_duplicate"}
    stats, kept, reason = out["en"]
    assert kept == set(english) and stats.languages == {"en": 2, "zh": len(chinese) + 1}
    assert {i: reason[i] for i in chinese} == dict.fromkeys(chinese, "language_mismatch")
    stats, kept, reason = out["en+zh"]  # a mixed profile keeps both
    assert kept == {*chinese, *english} and reason == {999_001: "near_duplicate"}


def test_decontamination_reads_character_ngrams_in_chinese() -> None:
    prompts = pl.DataFrame(
        {"eval_set": ["zh_eval"] * 2, "prompt": [SIMPLIFIED, "介绍一下中国的历史和文化。"]}
    )
    index = NgramIndex.build(prompts, min_n=8, max_n=13, min_words=6)
    assert index.n_per_set == {"zh_eval": 13}  # 5th percentile of 12 and 44 characters, clamped
    train = pl.Series([
        "请回答：世界上最大的动物是蓝鲸。它们生活在海洋里，谢谢。",  # a copied span of 13+ characters
        "蓝鲸很大。",  # shares only a few characters
        "the largest animal is the blue whale",
    ])  # fmt: skip
    assert index.match(train).to_list() == ["zh_eval", None, None]


def test_a_profile_takes_the_sources_in_its_languages() -> None:
    sft = load_sft_sources(REPO / "configs" / "sft_sources.yaml")
    pref = load_preference_sources(REPO / "configs" / "preference_sources.yaml")
    en = selected_source_ids(sft, {"clean": {"languages": ["en"]}}, "sft")
    assert "alpaca_zh_demo" not in en and "alpaca" in en
    assert selected_source_ids(sft, {"clean": {"languages": ["zh"]}}, "sft") == ["alpaca_zh_demo"]
    both = selected_source_ids(pref, {"clean": {"languages": ["en", "zh"]}}, "preference")
    assert {"dpo_zh_demo", "hh_rlhf_harmless"} <= set(both)
    listed = {"clean": {"languages": ["zh"]}, "sft": {"sources": ["alpaca"]}}
    assert selected_source_ids(sft, listed, "sft") == ["alpaca"]  # an explicit list wins


def test_report_prompts_come_from_the_profile(tmp_path: Path) -> None:
    zh = {"report_prompts": {"generation": ["介绍一下中国。"], "win_rate": "preference_val"}}
    assert generation_prompts(zh) == ("介绍一下中国。",)
    assert "What is the capital of France?" in generation_prompts({})
    val = tmp_path / "val.parquet"
    msgs = [[{"role": "user", "content": c}] for c in ("甲", "乙", "甲", "丙")]
    msgs.append([{"role": "system", "content": "s"}, {"role": "user", "content": "丁"}])
    pl.DataFrame({"prompt": msgs}).write_parquet(val)
    got = win_rate_prompts(zh, ["English"], val, limit=10)
    assert [m[0]["content"] for m in got] == ["甲", "乙", "丙"]
    assert win_rate_prompts({}, ["English"], val, limit=10) == [
        [{"role": "user", "content": "English"}]
    ]
    with pytest.raises(ValueError, match="win_rate"):
        generation_prompts({"report_prompts": {"win_rate": "mmlu"}})
