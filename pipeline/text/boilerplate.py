"""Remove Project Gutenberg headers, footers, licences and transcriber credits from a book.

Thirty years of PG files use different conventions (see the mirror README, styles A-F):

* ``*** START OF THE/THIS PROJECT GUTENBERG EBOOK X ***`` and ``*** END OF ... ***`` markers,
  with variants: ``***START`` without a space, a comma after ``EBOOK``, the title wrapping onto a
  second line (#43, #69087);
* 1990s files whose text starts after the small print,
  ``*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*`` (or ``*END THE SMALL
  PRINT!``, #36), and that may have no footer at all;
* ``End of [the] Project Gutenberg EBook/Etext of X`` footer lines, ``*** START: FULL LICENSE ***``
  sections, and the small print or licence after the END marker;
* inside the text: ``Produced by`` / ``This etext was prepared by`` credits, transcriber's notes
  and PG editorial notes (``[Etext #1]`` title lines in the compound file #1, ``Note: Project
  Gutenberg also has an HTML version``...).

Strategy: cut the header at the START marker (else the end of the small print, else a header
block heuristic) and the footer at the earliest footer signal after it; then *scrub* the body:
remove the paragraphs that carry strong PG phrases anywhere (bounded in size, so a paragraph of
the book is never lost to one line of boilerplate), and credit paragraphs near the two ends only
(``Produced by`` deep inside a novel is prose, not a credit).

Speed matters (the stage must clean >= 30 MB/s on 2 cores). Python's ``re`` is slow when a pattern
has no literal prefix, so every search here is either anchored on a literal (``*``, ``START``) or
first located with ``str.find`` on a few case variants of a literal and then confirmed with a
regular expression on the surrounding lines only.

:func:`find_boilerplate` is the checker (asset check "no PG boilerplate left"): it reports the same
strong phrases anywhere and credit lines near the ends. A book that merely names someone called
Gutenberg (the printer, Joyce's "Murtagh Gutenberg") is not flagged: only "Project Gutenberg"-like
phrases, PG domains, "etext", small print and licence phrases are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["StripResult", "find_boilerplate", "strip_boilerplate"]

# Credits and notes are looked for this far into / from the end of the body.
HEAD_CHARS = 8000
TAIL_CHARS = 4000
# A paragraph longer than this is never dropped whole for one boilerplate line; only the lines.
MAX_PARAGRAPH_CHARS = 2500
# ``***``-separated PG note sections at the top of 1990s texts (#5, #2264, #2265).
MAX_NOTE_SECTION_CHARS = 6000
# Transcriber's notes at the very end are cut to the end when no more than this follows them.
MAX_TAIL_NOTE_CHARS = 6000

_START = re.compile(r"\*[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*", re.IGNORECASE)
_END = re.compile(r"\*[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*", re.IGNORECASE)
_SMALL_PRINT_END = re.compile(r"\*END\*?[ \t]*THE SMALL PRINT[^\n]*", re.IGNORECASE)
_SMALL_PRINT_START = re.compile(r"\*START\*+[ \t]*THE SMALL PRINT", re.IGNORECASE)
_FULL_LICENSE = "START: FULL LICENSE"
_FOOTER_LINE = re.compile(
    r"[ \t*]*(?:End|Ende|Fin|Fine|Einde|Koniec|Loppu|Slut)\b[^\n]{0,120}?"
    r"(?:Project|Projekt|Projet|Proyecto|Progetto|Projecto|Projeto)[ \t]+Gutenberg",
    re.IGNORECASE,
)

# Literal anchors (every case variant that occurs in practice) for the strong phrases below.
_ANCHORS = (
    "utenberg", "UTENBERG", "etext", "Etext", "ETEXT", "e-text", "E-text",
    "mall print", "mall Print", "MALL PRINT", "ULL LICENSE", "pglaf", "pgdp",
)  # fmt: skip
_STRONG = re.compile(
    r"(?:project|projekt|projet|proyecto|progetto|projecto|projeto)[ \t\n]+gutenberg"
    r"|gutenberg[ \t\n-]+(?:project|projekt|literary[ \t\n]+archive|ebook|etext)"
    r"|gutenberg\.(?:org|net|aol|de|pglaf)|ibiblio\.org/gutenberg|pglaf|pgdp\.net"
    r"|\be-?texts?\b|small[ \t\n]+print!|legal[ \t\n]+small[ \t\n]+print|(?-i:SMALL PRINT)"
    r"|(?-i:FULL LICENSE)"
    r"|distributed[ \t\n]+proofread",
    re.IGNORECASE,
)
# Paragraph openers that mark a credit or an editorial note (checked near the ends only).
_CREDIT = re.compile(
    r"[ \t\[(]*(?:"
    r"(?:this|the)[ \t]+(?:e-?text|e-?book|file|edition|electronic[ \t]+\w+|text|book)"
    r"[ \t]+(?:was|has[ \t]+been|is)[ \t]+"
    r"(?:produced|prepared|transcribed|digiti[sz]ed|scanned|proofread|created|converted|done|made)"
    r"[ \t]+(?:by|from)\b"
    r"|(?:produced|prepared|transcribed|digiti[sz]ed|scanned|proofread)[ \t]*:?[ \t]*(?:by|from)\b"
    r"|(?:e-?text|e-?book|html[ \t]+version)[ \t]+(?:prepared|produced|created)[ \t]+by"
    r"|(?:original[ \t]+)?transcriber['’]?s?['’]?[ \t]+notes?\b"
    r"|html[ \t]+version[ \t]+by"
    r")",
    re.IGNORECASE,
)
_TAIL_NOTE = re.compile(r"[ \t\[(]*transcriber['’]?s?['’]?[ \t]+notes?\b", re.IGNORECASE)
# Header lines of a PG file without any START marker (fallback only).
_HEADER_LINE = re.compile(
    r"[ \t*]*(?:title|author|editor|translator|illustrator|release date|posting date|"
    r"last updated|language|character set encoding|produced by|credits|\[?e-?(?:book|text) ?#|"
    r"this ebook is for the use of anyone|copyright laws are changing|please read the)"
    r"|.*(?:project gutenberg|gutenberg\.org)",
    re.IGNORECASE,
)
_LEADING_BLANK_LINES = re.compile(r"(?:[ \t]*\n)*")
_NON_SPACE = re.compile(r"\S")
_ENDS_WITH_BLANK_LINE = re.compile(r"\n[ \t]*\n[ \t]*\Z")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


@dataclass(frozen=True)
class StripResult:
    """The book body and where it was cut out of the decoded file.

    ``header_end``/``footer_start`` are offsets into the input text (the between-markers span is
    ``text[header_end:footer_start]``); ``removed_chars`` counts the characters of the notes and
    credits scrubbed out of that span, so callers and tests can see how much of it survived.
    ``style`` is the README's header style letter (A, B, D, E, F) or ``footer`` (a footer but no
    start marker) / ``header`` (a header heuristic cut) / ``none`` (nothing recognised).
    """

    body: str
    header_end: int
    footer_start: int
    style: str
    start_marker: str | None = None
    end_marker: str | None = None
    removed_chars: int = 0

    @property
    def span_chars(self) -> int:
        return self.footer_start - self.header_end


# ------------------------------------------------------------------------------ small helpers
def _line_bounds(text: str, pos: int) -> tuple[int, int]:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return start, len(text) if end < 0 else end


def _at_line_start(text: str, pos: int, allowed: str = " \t*") -> bool:
    start = text.rfind("\n", 0, pos) + 1
    return not text[start:pos].strip(allowed)


def _anchor_positions(text: str, lo: int = 0, hi: int | None = None) -> list[int]:
    """Sorted positions of every literal anchor in ``text[lo:hi]`` (``str.find`` is fast)."""
    hi = len(text) if hi is None else hi
    found: list[int] = []
    for lit in _ANCHORS:
        i = text.find(lit, lo, hi)
        while i >= 0:
            found.append(i)
            i = text.find(lit, i + 1, hi)
    found.sort()
    return found


def _strong_match(text: str, pos: int) -> re.Match[str] | None:
    """A strong PG phrase overlapping ``pos``, searched on its line and the two neighbours
    (phrases such as "Project\nGutenberg" wrap lines)."""
    lstart, lend = _line_bounds(text, pos)
    lo = text.rfind("\n", 0, max(0, lstart - 1)) + 1 if lstart > 0 else 0
    nxt = text.find("\n", lend + 1) if lend < len(text) else -1
    hi = len(text) if nxt < 0 else nxt
    for m in _STRONG.finditer(text, lo, hi):
        if m.start() <= pos + 20 and m.end() >= pos:
            return m
    return None


def _paragraph_bounds(text: str, pos: int, max_chars: int = MAX_PARAGRAPH_CHARS) -> tuple[int, int]:
    """The blank-line delimited paragraph around ``pos``, or only its line if it is too long."""
    lstart, lend = _line_bounds(text, pos)
    start, end = lstart, lend
    while start > 0:
        prev_start = text.rfind("\n", 0, start - 1) + 1
        if not text[prev_start : start - 1].strip():
            break
        if end - prev_start > max_chars:
            return lstart, lend
        start = prev_start
    while end < len(text):
        nxt = text.find("\n", end + 1)
        nxt = len(text) if nxt < 0 else nxt
        if not text[end + 1 : nxt].strip():
            break
        if nxt - start > max_chars:
            return lstart, lend
        end = nxt
    return start, end


def _paragraph_starts(text: str, lo: int, hi: int) -> list[int]:
    """Offsets of the first non-blank character of each paragraph starting in ``[lo, hi)``."""
    starts = []
    if lo == 0:
        first = _NON_SPACE.search(text, 0, hi)
        if first:
            starts.append(first.start())
    starts.extend(m.end() for m in _PARAGRAPH_BREAK.finditer(text, lo, hi) if m.end() < hi)
    return starts


def _skip_blank_lines(text: str) -> str:
    m = _LEADING_BLANK_LINES.match(text)
    return text[m.end() :] if m else text


def _trim(text: str) -> str:
    """Drop leading blank lines and trailing whitespace, keeping the first line's indentation
    (title pages are often centred with spaces)."""
    return _skip_blank_lines(text).rstrip()


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


# ------------------------------------------------------------------------ header and footer
def _find_start_marker(text: str, hi: int) -> tuple[int, int] | None:
    """(line start, end incl. a wrapped continuation line) of the first START marker."""
    for m in _START.finditer(text, 0, hi):
        if not _at_line_start(text, m.start()):
            continue
        lstart, lend = _line_bounds(text, m.start())
        line = text[lstart:lend].rstrip()
        if not line.endswith("*"):
            nxt_end = text.find("\n", lend + 1)
            nxt_end = len(text) if nxt_end < 0 else nxt_end
            nxt = text[lend + 1 : nxt_end].rstrip()
            if nxt.strip() and len(nxt) <= 160 and nxt.endswith("*"):
                lend = nxt_end
        return lstart, lend
    return None


def _find_line_marker(pattern: re.Pattern[str] | str, text: str, lo: int, hi: int) -> int | None:
    """Start of the first line in ``[lo, hi)`` that begins (after ``*``/blanks) with ``pattern``."""
    if isinstance(pattern, str):
        i = text.find(pattern, lo, hi)
        while i >= 0:
            if _at_line_start(text, i):
                return text.rfind("\n", 0, i) + 1
            i = text.find(pattern, i + 1, hi)
        return None
    for m in pattern.finditer(text, lo, hi):
        if _at_line_start(text, m.start()):
            return text.rfind("\n", 0, m.start()) + 1
    return None


def _find_footer(
    text: str, lo: int, anchors: list[int], end_pos: int | None
) -> tuple[int, str | None]:
    """Earliest footer signal after ``lo``: (offset, the marker line) or (len(text), None).

    ``end_pos``: the first END marker line of the file, already searched for by the caller.
    """
    candidates: list[int] = []
    if end_pos is None or end_pos < lo:
        end_pos = _find_line_marker(_END, text, lo, len(text))
    if end_pos is not None:
        candidates.append(end_pos)
    for pattern in (_SMALL_PRINT_START, _FULL_LICENSE):
        pos = _find_line_marker(pattern, text, lo, min(candidates, default=len(text)))
        if pos is not None:
            candidates.append(pos)
    limit = min(candidates, default=len(text))
    for a in anchors:
        if a < lo or a >= limit:
            continue
        lstart, _ = _line_bounds(text, a)
        if a - lstart <= 160 and _FOOTER_LINE.match(text, lstart, a + 20):
            candidates.append(lstart)
            break
    if not candidates:
        return len(text), None
    pos = min(candidates)
    return pos, text[pos : _line_bounds(text, pos)[1]].strip()


def _fallback_header_end(text: str) -> int:
    """End of a PG header block when the file has no START marker and no small print."""
    pos, last_hit_end, quiet, lines = 0, -1, 0, 0
    window = min(len(text), 20000)
    while pos < window and lines < 400:
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        line = text[pos:end]
        if line.strip() and _HEADER_LINE.match(line):
            last_hit_end, quiet = end, 0
        elif line.strip():
            quiet += 1
            if (last_hit_end < 0 and lines > 30) or quiet > 40:
                break
        pos, lines = end + 1, lines + 1
    if last_hit_end < 0:
        return 0
    _, para_end = _paragraph_bounds(text, max(0, last_hit_end - 1), max_chars=4000)
    return min(len(text), para_end)


def _style(text: str, start_line: str | None, small_print_start: bool, footer: bool) -> str:
    if start_line is None:
        return "A" if small_print_start else ("footer" if footer else "none")
    if start_line.lstrip().startswith("***START") or re.match(r"\*+START", start_line.strip()):
        return "E"
    if re.search(r"START OF THIS", start_line, re.IGNORECASE):
        return "D"
    if "," in start_line.split("EBOOK", 1)[-1][:2] or _SMALL_PRINT_END.search(text):
        return "B"
    return "F"


# ------------------------------------------------------------------------------------ scrub
def _note_sections(body: str, head: int, anchors: list[int]) -> list[tuple[int, int]]:
    """Leading ``***``-separated sections of the head that carry strong PG phrases."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < head:
        sep = body.find("\n***\n", pos, head + MAX_NOTE_SECTION_CHARS)
        if sep < 0 or sep - pos > MAX_NOTE_SECTION_CHARS:
            break
        if not any(_strong_match(body, a) for a in anchors if pos <= a < sep):
            break
        spans.append((pos, sep + 5))
        pos = sep + 5
    return spans


def _scrub(body: str, anchors: list[int]) -> tuple[str, int]:
    """Drop PG notes and credits from a body (``anchors``: its literal anchor positions);
    returns (new body, chars removed)."""
    n = len(body)
    head, tail = min(n, HEAD_CHARS), max(0, n - TAIL_CHARS)
    spans = _note_sections(body, head, anchors)
    for a in anchors:
        if _strong_match(body, a):
            spans.append(_paragraph_bounds(body, a))
    for p in _paragraph_starts(body, 0, head) + _paragraph_starts(body, max(head, tail), n):
        if _CREDIT.match(body, p):
            spans.append(_paragraph_bounds(body, p))
    for p in _paragraph_starts(body, tail, n):
        if _TAIL_NOTE.match(body, p) and n - p <= MAX_TAIL_NOTE_CHARS:
            spans.append((p, n))
            break
    if not spans:
        return _trim(body), 0
    pieces, prev, removed = [], 0, 0
    for s, e in _merge(spans):
        e += body.startswith("\n", e)  # a removed line takes its newline with it
        pieces.append(body[prev:s])
        removed += e - s
        prev = e
    pieces.append(body[prev:])
    # Splice: after a piece that ends with a blank line, drop the next one's leading blank lines,
    # so removing a paragraph leaves one blank line and removing a line leaves none.
    out: list[str] = []
    after_blank = True
    for piece in pieces:
        if after_blank:
            piece = _skip_blank_lines(piece)
        if piece:
            out.append(piece)
            tail = max(0, len(piece) - 200)
            after_blank = _ENDS_WITH_BLANK_LINE.search(piece, tail) is not None
    return _trim("".join(out)), removed


def strip_boilerplate(text: str) -> StripResult:
    """Cut the PG header and footer off ``text`` (LF newlines) and scrub notes and credits."""
    end_pos = _find_line_marker(_END, text, 0, len(text))
    search_hi = len(text) if end_pos is None else end_pos
    start = _find_start_marker(text, search_hi)
    small_print = None
    for m in _SMALL_PRINT_END.finditer(text, 0, search_hi):
        if _at_line_start(text, m.start()):
            small_print = m
            break
    start_line: str | None = None
    if start is not None:
        header_end = start[1]
        start_line = text[start[0] : start[1]].strip()
    elif small_print is not None:
        header_end = _line_bounds(text, small_print.start())[1]
        start_line = None
    else:
        header_end = _fallback_header_end(text)
    anchors = _anchor_positions(text)
    footer_start, end_line = _find_footer(text, header_end, anchors, end_pos)
    style = _style(
        text, start_line, small_print is not None and start is None, end_line is not None
    )
    if style == "none" and header_end > 0:
        style = "header"
    body_anchors = [a - header_end for a in anchors if header_end <= a < footer_start]
    body, removed = _scrub(text[header_end:footer_start], body_anchors)
    return StripResult(
        body=body,
        header_end=header_end,
        footer_start=footer_start,
        style=style,
        start_marker=start_line,
        end_marker=end_line,
        removed_chars=removed,
    )


def find_boilerplate(text: str, max_hits: int = 20) -> list[str]:
    """Snippets of PG boilerplate still present in a cleaned ``text`` (empty list: clean).

    Flags strong phrases anywhere (``Project Gutenberg``, ``gutenberg.org``, ``etext``, small print,
    ``FULL LICENSE``, START/END markers...) and credit paragraphs (``Produced by``, transcriber's
    notes) within the first/last few thousand characters.
    """
    hits: list[str] = []

    def add(pos: int) -> None:
        lo, hi = _line_bounds(text, pos)
        hits.append(f"@{pos}: {text[lo:hi].strip()[:120]}")

    last_line = -1
    for a in _anchor_positions(text):
        if len(hits) >= max_hits:
            return hits
        line_start = _line_bounds(text, a)[0]
        if line_start != last_line and _strong_match(text, a):
            add(a)
            last_line = line_start
    n = len(text)
    head, tail = min(n, HEAD_CHARS), max(0, n - TAIL_CHARS)
    for p in _paragraph_starts(text, 0, head) + _paragraph_starts(text, max(head, tail), n):
        if len(hits) >= max_hits:
            break
        if _CREDIT.match(text, p):
            add(p)
    return hits
