"""Header/footer stripping on tiny synthetic files of every PG style, then on the real mirror."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.text.boilerplate import find_boilerplate, strip_boilerplate
from pipeline.text.encoding import decode_text
from tests.conftest import MirrorBooks

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "text"

# file -> (style, first body line, last body line, strings that must be gone)
CASES = {
    "style_a.txt": ("A", "Scanner's Notes:", "THE END", ["Executive Director", "SMALL PRINT"]),
    "style_a_footer.txt": ("A", "THE QUIET ORCHARD", "market on Saturday.", ["Portions of"]),
    "style_b.txt": ("B", "The River Road", "never moved away.", ["rroad10", "Small Print"]),
    "style_d.txt": ("D", "THE GLASS TOWER", "avoiding the accounts.", ["Produced by", "pgdp"]),
    "style_e.txt": ("E", "THE MOOR HOUSE", "to remember me.", ["Transcribed from", "pglaf"]),
    "style_f_wrapped.txt": (
        "F",
        "THE MURDER AT",
        "early autumn morning.",
        ["ASHBY ***", "Transcriber"],
    ),
    "no_title.txt": (
        "D",
        "PLAIN REASONS;",
        "an intolerable one.",
        ["HTML version", "eBook is for"],
    ),
    "compound.txt": ("A", "THE FIRST DECLARATION", "as change.", ["[Etext", "Collected Etexts"]),
    "header_only.txt": ("header", "ON WALKING", "than any almanac.", ["Release Date", "Title:"]),
    "no_markers.txt": ("none", "ON THE MAKING OF BREAD", "in a single morning.", []),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_styles(name: str) -> None:
    style, first, last, gone = CASES[name]
    text = (FIXTURES / name).read_text(encoding="utf-8")
    r = strip_boilerplate(text)
    assert r.style == style
    assert r.body.lstrip().splitlines()[0].strip().startswith(first)
    assert r.body.splitlines()[-1].strip().endswith(last)
    for s in gone:
        assert s not in r.body, s
    assert find_boilerplate(r.body) == []
    assert 0 <= r.header_end <= r.footer_start <= len(text)
    assert len(r.body) <= r.span_chars


def test_crlf_files_strip_the_same_after_decoding() -> None:
    raw = (FIXTURES / "style_d.txt").read_bytes()
    lf = strip_boilerplate(decode_text(raw).text)
    crlf = strip_boilerplate(decode_text(raw.replace(b"\n", b"\r\n")).text)
    assert crlf.body == lf.body and crlf.style == "D"


def test_wrapped_start_marker_is_one_marker() -> None:
    r = strip_boilerplate((FIXTURES / "style_f_wrapped.txt").read_text(encoding="utf-8"))
    assert r.start_marker is not None and r.start_marker.endswith("ASHBY ***")
    assert "ASHBY ***" not in r.body


def test_compound_file_keeps_each_collected_text_and_stops_at_the_collection_end() -> None:
    r = strip_boilerplate((FIXTURES / "compound.txt").read_text(encoding="utf-8"))
    assert "THE SECOND ADDRESS" in r.body and "celebration of freedom" in r.body
    assert r.body.count("THE FIRST DECLARATION") == 1  # the second copy is after the footer
    assert r.end_marker is not None and r.end_marker.startswith("***End of the Collected")


def test_full_license_section_ends_the_body_even_without_an_end_marker() -> None:
    text = "Some real text of the book.\n\nMore text here.\n\n*** START: FULL LICENSE ***\n\nTHE FULL..."
    r = strip_boilerplate(text)
    assert r.body == "Some real text of the book.\n\nMore text here."


def test_long_paragraph_loses_only_the_boilerplate_line() -> None:
    lines = [
        f"line {i} of a long poem without any blank line between its verses" for i in range(80)
    ]
    lines[40] = "Produced by the Project Gutenberg volunteers of the year"
    r = strip_boilerplate("\n".join(lines))
    assert "Project Gutenberg" not in r.body
    assert r.body.count("\n") == 78  # one line of 80 removed


@pytest.mark.parametrize(
    "snippet",
    [
        "Visit the Project Gutenberg site.",
        "see www.gutenberg.org/license",
        "*** START OF THE PROJECT GUTENBERG EBOOK MOBY DICK ***",
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*",
        "This etext was prepared by Jane Doe.",
        "The Project\nGutenberg Literary Archive Foundation",
        "*** START: FULL LICENSE ***",
    ],
)
def test_find_boilerplate_flags_pg_phrases_anywhere(snippet: str) -> None:
    text = "Real prose. " * 1000 + "\n\n" + snippet + "\n\n" + "More prose. " * 1000
    assert find_boilerplate(text)


def test_find_boilerplate_flags_credits_only_near_the_ends() -> None:
    credit = "Produced by Jane Doe and the volunteers\n\n"
    prose = "The story goes on and on.\n\n" * 2000
    assert find_boilerplate(credit + prose)
    assert find_boilerplate(prose + credit)
    assert not find_boilerplate(prose + credit + prose)


@pytest.mark.parametrize(
    "innocent",
    [
        "Rosaleen, Patrick W. Shakespeare, Brian Confucius, Murtagh Gutenberg, Patricio Velasquez",
        "Johannes Gutenberg printed his Bible in Mainz.",
        "He left on some pretext or other.",
        "Ye can, with your young eyes, read the small print of the lies from here.",
        "The king gave him full license to act as he pleased.",
    ],
)
def test_find_boilerplate_ignores_ordinary_prose(innocent: str) -> None:
    text = "Real prose. " * 1000 + "\n\n" + innocent + "\n\n" + "More prose. " * 1000
    assert find_boilerplate(text) == []
    assert innocent in strip_boilerplate(text).body


# ----------------------------------------------------------------------------------- mirror
_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M)
_SMALL_PRINT_END = re.compile(r"^\*END\*?\s?THE SMALL PRINT.*$", re.M)
_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG", re.M)
_FOOTER = re.compile(r"\n\W*End of\b[^\n]*Project Gutenberg", re.I)  # "\n", not ^: 5x faster


def marker_span(text: str) -> str | None:
    """The text between the START marker (or small print end) and the END marker / footer,
    computed independently of the module under test; None if the file has no START marker."""
    m = _START.search(text)
    if m:
        start = m.end()
        if not m.group(0).rstrip().endswith("*"):  # wrapped marker: the title ends a line later
            start = text.index("\n", start + 1)
    else:
        m = _SMALL_PRINT_END.search(text)
        if not m:
            return None
        start = m.end()
    ends = [x.start() for x in (_END.search(text, start), _FOOTER.search(text, start)) if x]
    return text[start : min(ends, default=len(text))].strip()


def readme_styles(mirror_dir: Path) -> dict[int, str]:
    """id -> header/footer style letter from the mirror README: the style column of its book
    table, and for a section's table of later additions without that column, the
    "Header style X" the section states."""
    out = {}
    readme = (mirror_dir / "gutenberg" / "README.md").read_text(encoding="utf-8")
    for section in re.split(r"\n(?=#{2,3} )", readme):
        stated = re.search(r"\bHeader style ([A-F])\b", section)
        for line in section.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) < 4 or not cells[1].isdigit():
                continue
            if len(cells) > 10:
                out[int(cells[1])] = cells[7]
            elif stated:
                out[int(cells[1])] = stated.group(1)
    return out


@pytest.mark.mirror
def test_mirror_styles_spans_and_no_boilerplate_left(
    mirror_dir: Path, mirror_books: MirrorBooks
) -> None:
    info = readme_styles(mirror_dir)
    assert sorted(info) == mirror_books.ids  # the README gives every book's style
    epub = mirror_dir / "gutenberg" / "cache" / "epub"
    bad_style, dirty, cut = {}, {}, {}
    for book_id, style in sorted(info.items()):
        text = decode_text((epub / str(book_id) / f"pg{book_id}.txt").read_bytes()).text
        r = strip_boilerplate(text)
        if r.style != style:
            bad_style[book_id] = (r.style, style)
        if mirror_books.language(book_id) == "en" and (hits := find_boilerplate(r.body)):
            dirty[book_id] = hits[:3]
        span = marker_span(text)
        if _START.search(text) and span is not None and len(r.body) < 0.95 * len(span):
            cut[book_id] = round(len(r.body) / len(span), 3)
    assert not bad_style
    assert not dirty
    assert not cut
