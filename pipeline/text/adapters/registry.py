"""SFT sources: the validated config (:class:`SftSource`), adapter lookup and :func:`adapt_source`.

``configs/sft_sources.yaml`` is edited by hand and read by a long pipeline; a typo found after
the downloads is expensive, so :func:`load_sft_sources` checks every entry up front (unknown keys,
ids, repo vs url, revisions, patterns, that the adapter module exists) and reports every problem
at once, each naming its entry. Adapters are found by module name under this package, so a new
source schema is one new file and no registration step.

The same registry format, validation and file conversion (:func:`convert_files`) serve the
preference sources (``configs/preference_sources.yaml``): they pass their own allowed keys and
adapter package (``pipeline.text.adapters.preference``) instead of the SFT defaults.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from pipeline.text.adapters.base import (
    ADAPTED_SCHEMA,
    REJECTS_SCHEMA,
    ROLES,
    ROWS_SCHEMA,
    SourceSchemaError,
    read_records,
    tidy_text,
)

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")  # a Dagster asset-key segment, lower case
REPO_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_NOT_ADAPTERS = frozenset({"base", "registry"})
SFT_ADAPTERS = "pipeline.text.adapters"  # the package whose modules are the SFT adapters
_KEYS = frozenset(
    {"id", "repo", "url", "revision", "patterns", "sha256", "adapter", "weight", "cap", "licence",
     "language"}
)  # fmt: skip
LANGUAGE_PATTERN = re.compile(r"[a-z]{2,3}")  # ISO 639 code, as the clean stage records them


class SftConfigError(ValueError):
    """An invalid SFT sources file; the message lists every problem, each naming its entry."""


@dataclass(frozen=True)
class SftSource:
    """One SFT source: where its files come from, which adapter reads them, its share of the mix.

    Exactly one of ``repo`` (a Hub dataset, with ``revision`` and ``patterns``) and ``url`` (a
    plain file, optionally pinned by ``sha256``) is set. ``weight`` and ``cap`` are for the mixing
    stage; :func:`adapt_source` converts every row.
    """

    id: str
    adapter: str
    licence: str
    weight: float = 1.0
    cap: int | None = None
    repo: str | None = None
    revision: str | None = None
    patterns: tuple[str, ...] = ()
    url: str | None = None
    sha256: str | None = None
    # The language of the conversations: a profile that lists no `sources` takes those in its
    # languages (pipeline.text.profile_languages), so an English run never mixes in Chinese.
    language: str = "en"

    @property
    def non_commercial(self) -> bool:
        """True for "NC" licences (e.g. CC-BY-NC-4.0): usable for tests and research only."""
        return "NC" in re.split(r"[-\s_]", self.licence.upper())


@dataclass(frozen=True)
class Adapter:
    """An adapter module's contract (see :mod:`pipeline.text.adapters.base`)."""

    name: str
    required_columns: tuple[str, ...]
    convert: Callable[[pl.DataFrame], pl.DataFrame]


def available_adapters(package: str = SFT_ADAPTERS) -> list[str]:
    """Names of the adapter modules in ``package`` (sub-packages are not adapters)."""
    module = importlib.import_module(package)
    names = (m.name for m in pkgutil.iter_modules(module.__path__) if not m.ispkg)
    return sorted(n for n in names if n not in _NOT_ADAPTERS and not n.startswith("_"))


@functools.cache
def get_adapter(name: str, package: str = SFT_ADAPTERS) -> Adapter:
    """The adapter module ``<package>.<name>``; ValueError if there is none."""
    if not ID_PATTERN.fullmatch(name) or name in _NOT_ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; available: {available_adapters(package)}")
    module_name = f"{package}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        available = available_adapters(package)
        raise ValueError(f"unknown adapter {name!r}; available: {available}") from None
    columns = getattr(module, "REQUIRED_COLUMNS", None)
    convert = getattr(module, "convert", None)
    if not isinstance(columns, tuple) or not callable(convert):
        raise TypeError(f"adapter module {module_name} lacks REQUIRED_COLUMNS or convert()")
    return Adapter(name, columns, convert)


# ------------------------------------------------------------------------------------ config
def load_sft_sources(
    path: Path | str, *, keys: frozenset[str] = _KEYS, adapters: str = SFT_ADAPTERS
) -> list[SftSource]:
    """Read and validate an SFT sources YAML file (see ``configs/sft_sources.yaml``).

    ``keys`` (the allowed entry keys) and ``adapters`` (the adapter package) let another registry
    in the same format, such as the preference sources, reuse this validation.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SftConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_sft_sources(data, origin=str(path), keys=keys, adapters=adapters)


def parse_sft_sources(
    data: Any,
    origin: str = "<sft sources>",
    *,
    keys: frozenset[str] = _KEYS,
    adapters: str = SFT_ADAPTERS,
) -> list[SftSource]:
    """Validate already-parsed config data; every problem is reported, not just the first."""
    if not isinstance(data, Mapping) or not isinstance(data.get("sources"), list):
        raise SftConfigError(f"{origin}: expected a mapping with a 'sources' list")
    if extra := sorted(set(data) - {"sources"}):
        raise SftConfigError(f"{origin}: unknown top-level key(s) {extra}")
    if not data["sources"]:
        raise SftConfigError(f"{origin}: 'sources' is empty")
    problems: list[str] = []
    sources: list[SftSource] = []
    seen: set[str] = set()
    for index, entry in enumerate(data["sources"], start=1):
        label = f"source #{index}"
        if isinstance(entry, Mapping) and isinstance(entry.get("id"), str):
            label += f" ({entry['id']!r})"
        errors: list[str] = []
        source = _parse_entry(entry, errors, keys, adapters)
        if source is not None and source.id in seen:
            errors.append(f"duplicate id {source.id!r}")
        problems.extend(f"{origin}: {label}: {e}" for e in errors)
        if source is not None and not errors:
            seen.add(source.id)
            sources.append(source)
    if problems:
        raise SftConfigError("\n".join(problems))
    return sources


def _parse_entry(
    entry: Any, errors: list[str], keys: frozenset[str], adapters: str
) -> SftSource | None:
    """One entry, appending each problem to ``errors``; None when it cannot be built."""
    if not isinstance(entry, Mapping):
        errors.append(f"expected a mapping, got {type(entry).__name__}")
        return None
    if unknown := sorted(set(entry) - keys):
        errors.append(f"unknown key(s) {unknown}; allowed: {sorted(keys)}")

    source_id = entry.get("id")
    if not isinstance(source_id, str) or not ID_PATTERN.fullmatch(source_id):
        errors.append(f"'id' must match {ID_PATTERN.pattern} (got {source_id!r})")
    repo, url = entry.get("repo"), entry.get("url")
    revision, patterns, sha256 = entry.get("revision"), entry.get("patterns"), entry.get("sha256")
    if (repo is None) == (url is None):
        errors.append("set exactly one of 'repo' (a Hub dataset) and 'url' (a plain file)")
    if repo is not None:
        if not isinstance(repo, str) or not REPO_PATTERN.fullmatch(repo):
            errors.append(f"'repo' must be 'org/name' (got {repo!r})")
        if not isinstance(revision, str) or not revision.strip():
            errors.append("'revision' is required for a repo source (branch, tag or commit sha)")
        if not _string_list(patterns):
            errors.append("'patterns' must be a non-empty list of file patterns")
        if sha256 is not None:
            errors.append("'sha256' applies to url sources only")
    if url is not None:
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^/\s]+/\S+", url):
            errors.append(f"'url' must be an http(s) URL of a file (got {url!r})")
        if revision is not None or patterns is not None:
            errors.append("'revision' and 'patterns' apply to repo sources only")
        if sha256 is not None and not (
            isinstance(sha256, str) and SHA256_PATTERN.fullmatch(sha256)
        ):
            errors.append("'sha256' must be 64 lower-case hex digits")

    adapter = entry.get("adapter")
    if not isinstance(adapter, str):
        errors.append(f"'adapter' is required; available: {available_adapters(adapters)}")
    else:
        try:
            get_adapter(adapter, adapters)
        except ValueError as exc:
            errors.append(str(exc))
    weight = entry.get("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not (math.isfinite(weight) and weight > 0)
    ):
        errors.append(f"'weight' must be a positive number (got {weight!r})")
    cap = entry.get("cap")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
        errors.append(f"'cap' must be a positive integer or null (got {cap!r})")
    licence = entry.get("licence")
    if not isinstance(licence, str) or not licence.strip():
        errors.append("'licence' is required (as stated by the dataset's authors)")
    language = entry.get("language", "en")
    if not isinstance(language, str) or not LANGUAGE_PATTERN.fullmatch(language):
        errors.append(f"'language' must be an ISO 639 code like 'en' or 'zh' (got {language!r})")
    if errors:
        return None
    return SftSource(
        id=source_id,
        adapter=adapter,
        licence=licence,
        weight=float(weight),
        cap=cap,
        repo=repo,
        revision=revision,
        patterns=tuple(patterns or ()),
        url=url,
        sha256=sha256,
        language=language,
    )


def _string_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, str) and v.strip() for v in value)
    )


# ------------------------------------------------------------------------------------ adapt
def adapt_source(source: SftSource, files: Sequence[Path]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Convert ``source``'s downloaded files to ``(rows, rejects)``.

    ``rows`` has :data:`~pipeline.text.adapters.base.ROWS_SCHEMA` (``source``, ``source_id``,
    ``messages``); ``rejects`` has ``source``, ``source_id`` and ``reason``, one per row that the
    adapter or the generic checks refused, so nothing is dropped silently. Raises
    :class:`SourceSchemaError`, naming the source, when a file lacks a column the adapter needs:
    that is a wrong source or a changed upstream, not a bad row.
    """
    adapted = convert_files(source, files, ADAPTED_SCHEMA)
    if adapted.height == 0:
        return ROWS_SCHEMA.to_frame(), REJECTS_SCHEMA.to_frame()
    checked = check_messages(adapted).with_columns(pl.lit(source.id).alias("source"))
    rows = checked.filter(pl.col("reason").is_null()).select(ROWS_SCHEMA.names())
    rejects = checked.filter(pl.col("reason").is_not_null()).select(REJECTS_SCHEMA.names())
    log.info("SFT source %s: %d rows, %d rejected", source.id, rows.height, rejects.height)
    return rows, rejects


def convert_files(
    source: SftSource,
    files: Sequence[Path],
    schema: pl.Schema,
    *,
    adapters: str = SFT_ADAPTERS,
    kind: str = "SFT source",
) -> pl.DataFrame:
    """Every file of ``source`` through its adapter (from package ``adapters``), concatenated.

    Each file gets a ``source_id`` column (``"<file name>:<row>"``) before conversion; the
    adapter must return exactly the columns of ``schema``, to whose types they are cast. Raises
    :class:`SourceSchemaError`, naming the ``kind`` of source, its id and the file, when a file
    lacks a required column or has one of the wrong type.
    """
    if not files:
        raise ValueError(f"{kind} {source.id!r}: no files to adapt")
    adapter = get_adapter(source.adapter, adapters)
    parts: list[pl.DataFrame] = []
    for path in files:
        frame = read_records(Path(path))
        if frame.height == 0 and frame.width == 0:
            continue  # an empty JSON array: nothing to convert, and no schema to check
        missing = [c for c in adapter.required_columns if c not in frame.columns]
        if missing:
            raise SourceSchemaError(
                f"{kind} {source.id!r} (adapter {adapter.name!r}): {Path(path).name} lacks "
                f"column(s) {missing}; it has {frame.columns}"
            )
        frame = frame.with_columns(
            pl.format("{}:{}", pl.lit(Path(path).name), pl.int_range(pl.len())).alias("source_id")
        )
        try:
            adapted = adapter.convert(frame)
            if tuple(adapted.columns) != tuple(schema.names()):
                raise TypeError(f"adapter {adapter.name!r} returned {adapted.columns}")
            parts.append(adapted.select(pl.col(n).cast(t) for n, t in schema.items()))
        except (pl.exceptions.SchemaError, pl.exceptions.InvalidOperationError) as exc:
            # Typically a column of the wrong type (a list where text was expected).
            raise SourceSchemaError(
                f"{kind} {source.id!r} (adapter {adapter.name!r}): cannot convert "
                f"{Path(path).name} with schema {dict(frame.schema)}: {exc}"
            ) from exc
    return pl.concat(parts) if parts else schema.to_frame()


def check_messages(frame: pl.DataFrame) -> pl.DataFrame:
    """Tidy every turn and set ``reason`` for rows no chat template could use.

    Turns lose trailing whitespace and leading blank lines (leading spaces are kept: they may be
    code indentation). A row is refused when it has no turns, an unknown role, an empty turn, no
    user turn, or does not end with the assistant (there would be nothing to learn). An adapter's
    own reason takes precedence.
    """
    role = pl.element().struct.field("role")
    content = pl.element().struct.field("content")
    tidy = pl.struct(role, tidy_text(content))
    frame = frame.with_columns(pl.col("messages").list.eval(tidy))
    messages = pl.col("messages")
    blank = content.is_null() | (content.str.strip_chars() == "")
    empty_role = messages.list.eval(role.filter(blank)).list.first()
    bad_role = messages.list.eval(role.filter(~role.is_in(ROLES) | role.is_null())).list.first()
    reason = (
        pl.when(pl.col("reason").is_not_null())
        .then(pl.col("reason"))
        .when(messages.is_null() | (messages.list.len() == 0))
        .then(pl.lit("no messages"))
        .when(messages.list.eval((~role.is_in(ROLES)) | role.is_null()).list.any())
        .then(pl.format("unknown role {}", bad_role.fill_null("null")))
        .when(messages.list.eval(blank).list.any())
        .then(pl.format("empty {} message", empty_role.fill_null("?")))
        .when(~messages.list.eval(role == "user").list.any())
        .then(pl.lit("no user message"))
        .when(messages.list.last().struct.field("role") != "assistant")
        .then(pl.lit("last message is not from the assistant"))
    )
    return frame.with_columns(reason.alias("reason"))
