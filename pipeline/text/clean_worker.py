"""The per-book half of ``cleaned_books``: what can be decided about one book on its own.

It lives apart from :mod:`.clean` so that the worker pool's fork server preloads only this
module and its light imports (numpy, polars for hashing, ``re``): importing :mod:`.clean` would
also pull in pyarrow, and on 2 cores the pool's start-up is a fixed cost that a 60 MB corpus
cleans in barely three times over.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.text.boilerplate import strip_boilerplate
from pipeline.text.dedup import Sketch, content_sha256, sketch_text
from pipeline.text.encoding import DecodeError, decode_text
from pipeline.text.language import UNDETERMINED, detect_language


@dataclass(frozen=True)
class BookTask:
    id: int
    path: str
    catalog_languages: tuple[str, ...]


@dataclass
class BookOutcome:
    id: int
    bytes_in: int = 0
    encoding: str | None = None
    style: str | None = None
    language: str | None = None
    reason: str | None = None
    detail: str = ""
    text: bytes | None = None  # UTF-8: what the parquet writer needs, and half a str's size
    n_chars: int = 0
    sha256: str | None = None
    sketch: Sketch | None = None
    cpu_seconds: float = 0.0


def choose_language(
    detected: str, confidence: float, catalog: Sequence[str], wanted: Sequence[str]
) -> tuple[str, str | None]:
    """(language to record, rejection detail or None). Undetermined text trusts the catalog."""
    if detected == UNDETERMINED:
        detected = next((c for c in catalog if c in wanted), catalog[0] if catalog else detected)
    if not wanted or detected in wanted:
        return detected, None
    return detected, (
        f"detected {detected} ({confidence:.2f}), expected {'/'.join(wanted)}; "
        f"catalog {'/'.join(catalog) or 'unknown'}"
    )


def _process_book(task: BookTask, languages: tuple[str, ...], min_chars: int) -> BookOutcome:
    out = BookOutcome(task.id)
    try:
        data = Path(task.path).read_bytes()
    except OSError as exc:
        out.reason, out.detail = "read_error", f"{type(exc).__name__}: {exc}"
        return out
    out.bytes_in = len(data)
    try:
        decoded = decode_text(data)
    except DecodeError as exc:
        out.reason, out.detail = "decode_error", str(exc)
        return out
    del data
    out.encoding = decoded.encoding
    stripped = strip_boilerplate(decoded.text)
    out.style = stripped.style
    body = stripped.body
    if len(body) < min_chars:
        out.reason, out.detail = "too_short", f"{len(body)} chars < min_chars {min_chars}"
        return out
    guess = detect_language(body)
    out.language, mismatch = choose_language(
        guess.code, guess.confidence, task.catalog_languages, languages
    )
    if mismatch:
        out.reason, out.detail = "language_mismatch", mismatch
        return out
    out.text = body.encode("utf-8")
    out.n_chars, out.sha256 = len(body), content_sha256(out.text)
    out.sketch = sketch_text(body)
    return out


def process_book(task: BookTask, languages: tuple[str, ...], min_chars: int) -> BookOutcome:
    """Read, decode, strip, language-check, hash and sketch one book (runs in a worker).

    One malformed book must not abort a 75k-book run: unexpected errors become rejects.
    """
    t0 = time.process_time()
    try:
        out = _process_book(task, languages, min_chars)
    except Exception as exc:  # recorded per book in rejects.parquet, counted in the stats
        out = BookOutcome(task.id, reason="processing_error", detail=f"{type(exc).__name__}: {exc}")
    out.cpu_seconds = time.process_time() - t0
    return out


def ready() -> None:
    """Submitted once per worker at start-up: returns when that worker can take books."""
    return None
