"""The labelled datasets of the classifiers: SMS parsing (every bad line a reject with its
reason), the balanced/natural splits, and the by-book paragraph split."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import polars as pl
import pytest

from pipeline.text import classification as tc

CRAFTED = (
    b"ham\tSee you at lunch\n"
    b"spam\tWINNER! Claim your prize now\n"
    b"no tab on this line\n"
    b"junk\tan unknown label\n"
    b"ham\t   \n"
    b"spam\tWINNER! Claim your prize now\n"
    b"ham\tbad byte \xff here\n"
    b"ham\tCall me later\r\n"
)


def crafted_zip(path: Path, data: bytes = CRAFTED, member: str = tc.SMS_MEMBER) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("readme", "crafted for a test")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def test_every_bad_line_is_a_reject_with_its_reason(tmp_path: Path) -> None:
    parsed = tc.parse_sms(tc.read_sms_zip(crafted_zip(tmp_path / "a.zip")))
    assert parsed.rows.select("line", "label").rows() == [(1, "ham"), (2, "spam"), (8, "ham")]
    assert parsed.rows["text"][2] == "Call me later"  # CRLF line end stripped
    reasons = dict(parsed.rejects.select("line", "reason").rows())
    assert reasons == {
        3: "missing_tab",
        4: "unknown_label",
        5: "empty_text",
        6: "duplicate",
        7: "invalid_utf8",
    }
    assert "line 2" in parsed.rejects.filter(pl.col("line") == 6)["detail"][0]


def test_archive_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "not.zip"
    bad.write_bytes(b"plain text")
    with pytest.raises(tc.SmsFormatError, match="not.zip: not a zip archive"):
        tc.read_sms_zip(bad)
    with pytest.raises(tc.SmsFormatError, match="no SMSSpamCollection member"):
        tc.read_sms_zip(crafted_zip(tmp_path / "b.zip", member="other.txt"))


def _rows(n_ham: int, n_spam: int) -> pl.DataFrame:
    rows = [{"line": i, "label": "ham", "text": f"ham {i}"} for i in range(n_ham)]
    rows += [{"line": 1000 + i, "label": "spam", "text": f"spam {i}"} for i in range(n_spam)]
    return pl.DataFrame(rows, schema=tc.ROW_SCHEMA)


def test_splits_are_stratified_balanced_inside_natural_and_seeded() -> None:
    splits = tc.split_sms(_rows(300, 50), seed=7)
    nat, bal = splits["natural"], splits["balanced"]
    counts = {p: dict(nat[p].group_by("label").len().iter_rows()) for p in tc.PARTS}
    assert counts == {
        "train": {"ham": 210, "spam": 35},
        "val": {"ham": 30, "spam": 5},
        "test": {"ham": 60, "spam": 10},
    }
    texts = {p: set(nat[p]["text"]) for p in tc.PARTS}
    assert not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    for p in tc.PARTS:
        by = dict(bal[p].group_by("label").len().iter_rows())
        assert by["ham"] == by["spam"] == counts[p]["spam"]
        assert set(bal[p]["text"]) <= texts[p]  # balanced rows never cross natural splits
    again = tc.split_sms(_rows(300, 50), seed=7)
    assert again["balanced"]["test"].equals(bal["test"])
    assert not tc.split_sms(_rows(300, 50), seed=8)["natural"]["test"].equals(nat["test"])


def test_write_dataset_layout(tmp_path: Path) -> None:
    splits = tc.split_sms(_rows(30, 10), seed=1)
    counts = tc.write_dataset(tmp_path, splits, tc.SMS_LABELS, "balanced")
    import json

    info = json.loads((tmp_path / "labels.json").read_text())
    assert info["labels"] == ["ham", "spam"] and info["default_split"] == "balanced"
    assert set(info["splits"]) == {"balanced", "natural"}
    test = pl.read_parquet(tmp_path / "natural" / "test.parquet")
    assert {"text", "label"} <= set(test.columns)
    assert counts["natural"]["test"] == {"ham": 6, "spam": 2}


def test_paragraphs_split_by_book_and_small_languages_rejected() -> None:
    cfg = tc.ParagraphConfig(paragraphs_per_book=3, min_chars=10, max_chars=30)
    books = pl.DataFrame(
        {
            "id": [1, 2, 3, 4, 5, 6, 7, 8],
            "language": ["en", "en", "en", "en", "fr", "fr", "fr", "fi"],
            "title": [f"book {i}" for i in range(1, 9)],
        }
    )
    body = "\n\n".join(f"paragraph number {k} of this book, long enough" for k in range(10))
    paragraphs = {i: tc.book_paragraphs(body, i, cfg, seed=3) for i in range(1, 9)}
    assert all(len(p) == 3 and all(len(t) <= 30 for t in p) for p in paragraphs.values())
    paragraphs[4] = tc.book_paragraphs("too short\n\nshort", 4, cfg, seed=3)
    parts, rejects, labels = tc.split_by_book(books, paragraphs, cfg, seed=3)
    assert labels == ["en", "fr"]
    assert dict(rejects.select("line", "reason").rows()) == {
        4: "no_paragraphs",
        8: "too_few_books",
    }
    seen: dict[int, str] = {}
    for part, df in parts.items():
        assert set(df["label"]) == {"en", "fr"}  # every language in every split
        for book in set(df["book"]):
            assert book not in seen, f"book {book} in {seen.get(book)} and {part}"
            seen[book] = part


def test_paragraph_config_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        tc.ParagraphConfig.from_mapping({"paragraphs": 3})
