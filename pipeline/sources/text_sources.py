"""Pretraining text beyond Gutenberg: the profile's ``text_sources``.

A learner points the pipeline at their own text: a local file, a URL (fetched with the same
HTTP client as every other download, through the files mirror when one is configured, written
atomically, optionally sha256-pinned) or, for a toy corpus, text written inline in the profile::

    text_sources:
      - id: verdict
        url: https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt
        sha256: 1a2b...        # optional: a changed upstream file is an error, not a new corpus
        title: The Verdict     # optional, as are authors and language (default en)
      - id: notes
        path: corpus/notes.txt # relative paths are relative to the repository root
      - id: toy
        repeat: 20             # inline text only: a few sentences, written out 20 times
        text: |
          I like coffee .

:func:`text_source_books` turns them into rows of the same manifest and catalog that
``gutenberg_books`` and ``gutenberg_catalog`` write, so ``cleaned_books`` decodes, filters and
deduplicates them with the books, and ``books.parquet`` / ``rejects.parquet`` say which source
every row came from. Their ids are negative (-1 for the first source, -2 ...): never a PG id.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import polars as pl

from pipeline.io import atomic_write_text, sha256_file
from pipeline.sources.hub import download_url

KEYS = {"id", "path", "url", "text", "repeat", "sha256", "title", "authors", "language"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class TextSource:
    """One entry of a profile's ``text_sources``: exactly one of ``path``, ``url``, ``text``."""

    id: str
    path: str | None = None
    url: str | None = None
    text: str | None = None
    sha256: str | None = None
    title: str | None = None
    authors: str | None = None
    language: str = "en"
    # Inline text written out this many times: a toy corpus of a few sentences is too short for
    # even one batch of training windows, and its val split for one batch of evaluation.
    repeat: int = 1

    @property
    def origin(self) -> str:
        return self.url or self.path or "inline text in the profile"


def parse_text_sources(entries: Any) -> list[TextSource]:
    """The profile's ``text_sources`` list, checked: each error names the entry and the key."""
    if entries is None:
        return []
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ValueError(f"profile `text_sources` must be a list, got {type(entries).__name__}")
    sources: list[TextSource] = []
    for i, entry in enumerate(entries):
        where = f"profile `text_sources[{i}]`"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a mapping, got {entry!r}")
        if unknown := sorted(set(entry) - KEYS):
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed {sorted(KEYS)}")
        sid = str(entry.get("id", ""))
        if not _ID.match(sid):
            raise ValueError(f"{where}: id {sid!r} must match {_ID.pattern}")
        given = [k for k in ("path", "url", "text") if entry.get(k)]
        if len(given) != 1:
            raise ValueError(f"{where} ({sid}): give exactly one of path, url, text; got {given}")
        if entry.get("url") and urlsplit(str(entry["url"])).scheme not in {"http", "https"}:
            raise ValueError(f"{where} ({sid}): url {entry['url']!r} is not http(s)")
        repeat = entry.get("repeat", 1)
        if not isinstance(repeat, int) or repeat < 1 or (repeat > 1 and not entry.get("text")):
            raise ValueError(f"{where} ({sid}): repeat must be an integer >= 1, for text only")
        fields = {k: str(v) for k, v in entry.items() if k != "repeat" and v is not None}
        sources.append(TextSource(**fields, repeat=repeat))
    ids = [s.id for s in sources]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"profile `text_sources`: duplicate id(s) {dupes}")
    return sources


def fetch_text_source(source: TextSource, dest: Path, base_dir: Path) -> Path:
    """The local file of one source: ``path`` as is (checked), ``url`` downloaded into ``dest``,
    ``text`` written into ``dest``. A missing or changed file raises, naming the source."""
    if source.path is not None:
        path = Path(source.path).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"text source {source.id!r}: file {path} does not exist")
        if source.sha256 and sha256_file(path) != source.sha256:
            raise ValueError(f"text source {source.id!r}: {path} does not match its sha256")
        return path
    dest.mkdir(parents=True, exist_ok=True)
    if source.text is not None:
        target = dest / f"{source.id}.txt"
        atomic_write_text(target, source.text * source.repeat)
        return target
    assert source.url is not None
    name = Path(urlsplit(source.url).path).name or "index.txt"
    try:
        return download_url(source.url, dest / f"{source.id}--{name}", sha256=source.sha256)
    except Exception as exc:  # the URL alone does not say which profile entry failed
        raise RuntimeError(f"text source {source.id!r} ({source.url}): {exc}") from exc


def text_source_books(
    sources: Sequence[TextSource], dest: Path, base_dir: Path
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(manifest rows, catalog rows) for ``sources``, shaped like Gutenberg's: ``id, path,
    status, error`` and ``id, title, authors, languages, source``. Ids are -1, -2, ..."""
    manifest, catalog = [], []
    for i, source in enumerate(sources):
        book_id = -(i + 1)
        path = fetch_text_source(source, dest, base_dir)
        manifest.append({"id": book_id, "path": str(path), "status": "ok", "error": None})
        catalog.append(
            {
                "id": book_id,
                "title": source.title or source.id,
                "authors": source.authors,
                "languages": [source.language],
                "source": source.id,
            }
        )
    manifest_schema = {"id": pl.Int64, "path": pl.String, "status": pl.String, "error": pl.String}
    catalog_schema = {
        "id": pl.Int64,
        "title": pl.String,
        "authors": pl.String,
        "languages": pl.List(pl.String),
        "source": pl.String,
    }
    return pl.DataFrame(manifest, schema=manifest_schema), pl.DataFrame(
        catalog, schema=catalog_schema
    )
