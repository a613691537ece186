"""Shared fixtures, and the rule that a CI run cannot pass by skipping.

The real data mirror
    ``../shared/mirror`` beside the repository (or ``$SCRIPTORIUM_TEST_MIRROR``). Tests that need it
    take the ``mirror_dir`` fixture, which skips where it is absent (outside CI). Counts about the
    mirror (how many books, which are English) come from ``mirror_books``: the catalog
    ``gutenberg/cache/epub/feeds/pg_catalog.csv`` and the book files present, never from literals,
    so the mirror can grow without editing tests.

``CI=true`` (exported by ``.ci/run``)
    - The session stops before collecting anything if the mirror is missing.
    - Every skip becomes a failure naming the skip's reason (a missing mirror, a missing system
      package, ``pytest.importorskip`` of a dependency such as ``transformers``, a
      ``pytest.mark.skip``), in collection as in setup, call or teardown. Expected failures
      (``xfail``) are left alone.
    - The allowlist: a skip whose reason starts with :data:`CI_ALLOWED_SKIP` ("impossible in CI:")
      stays a skip. Use it only for what no CI machine can provide, e.g.
      ``@pytest.mark.skipif(not torch.cuda.is_available(), reason="impossible in CI: needs CUDA")``.
      Missing packages, data or services are never on the list: CI installs them.

tests/e2e's stack (tests/e2e/stack.py)
    The docker-compose deployment on real processes and the one whole-graph
    ``dagster asset materialize --select '*'`` run on it take minutes. Where selected tests use it
    (the ``e2e_stack`` fixture), it starts in the background at the session's first test and those
    tests run last, the ones that wait for the whole-graph run after the others, so the rest of
    the suite uses the second core meanwhile.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CI_ALLOWED_SKIP = "impossible in CI:"


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _mirror_dir() -> Path:
    env = os.environ.get("SCRIPTORIUM_TEST_MIRROR")
    return Path(env) if env else REPO.parent / "shared" / "mirror"


def _catalog_path(mirror: Path) -> Path:
    return mirror / "gutenberg" / "cache" / "epub" / "feeds" / "pg_catalog.csv"


def _missing_mirror_message(path: Path) -> str:
    return f"data mirror not found at {path} (no {_catalog_path(path).relative_to(path)}; set SCRIPTORIUM_TEST_MIRROR)"


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    """``../shared/mirror`` (or ``$SCRIPTORIUM_TEST_MIRROR``); skips the test where it is absent."""
    path = _mirror_dir()
    if not _catalog_path(path).exists():
        pytest.skip(_missing_mirror_message(path))
    return path


@dataclass(frozen=True)
class MirrorBooks:
    """The Gutenberg books of the mirror, as its catalog and its files say (parsed here with the
    ``csv`` module, independently of ``pipeline.sources.gutenberg``)."""

    catalog: dict[int, tuple[str, ...]]  # every catalog row: id -> language codes ("en; fr")
    files: frozenset[int]  # ids with a cache/epub/{id}/pg{id}.txt

    @property
    def ids(self) -> list[int]:
        """Books with both a catalog row and a text file, ascending."""
        return sorted(set(self.catalog) & self.files)

    def language(self, book_id: int) -> str:
        """The book's first catalog language."""
        return self.catalog[book_id][0]

    def in_language(self, code: str) -> list[int]:
        """Books whose catalog languages include ``code``."""
        return [i for i in self.ids if code in self.catalog[i]]

    def not_in_language(self, code: str) -> list[int]:
        """Books whose catalog languages do not include ``code``."""
        return [i for i in self.ids if code not in self.catalog[i]]


@pytest.fixture(scope="session")
def mirror_books(mirror_dir: Path) -> MirrorBooks:
    epub = mirror_dir / "gutenberg" / "cache" / "epub"
    with _catalog_path(mirror_dir).open(encoding="utf-8", newline="") as f:
        catalog = {
            int(row["Text#"]): tuple(row["Language"].split("; ")) for row in csv.DictReader(f)
        }
    files = frozenset(
        int(p.parent.name)
        for p in epub.glob("*/pg*.txt")
        if p.parent.name.isdigit() and p.name == f"pg{p.parent.name}.txt"
    )
    return MirrorBooks(catalog, files)


# --- tests/e2e's stack: started early, used last ---------------------------------------------
E2E_STACK = "e2e_stack"
GRAPH_RUN = "graph_run"


def _uses(item: pytest.Item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on tests/e2e's stack go last, those that read its whole-graph run after the rest
    (a stable sort: each group keeps its order)."""
    items.sort(key=lambda item: (_uses(item, E2E_STACK), _uses(item, GRAPH_RUN)))


@pytest.fixture(scope="session", autouse=True)
def _e2e_stack_early(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Start tests/e2e's stack in the background at the first test, if a selected test uses it
    (without the mirror, the tests that use it skip instead: see ``mirror_dir``)."""
    mirror = _mirror_dir()
    if not _catalog_path(mirror).exists() or not any(
        _uses(item, E2E_STACK) for item in request.session.items
    ):
        yield
        return
    from tests.e2e.stack import session_stack

    stack, started_here = session_stack(request.config, tmp_path_factory, mirror)
    try:
        yield
    finally:
        if started_here:
            stack.stop()


# --- CI=true: no passing by skipping ----------------------------------------------------------
def pytest_sessionstart(session: pytest.Session) -> None:
    path = _mirror_dir()
    if _in_ci() and not _catalog_path(path).exists():
        pytest.exit(
            f"CI=true: {_missing_mirror_message(path)}", returncode=pytest.ExitCode.USAGE_ERROR
        )


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skipped report into a failed one under CI=true, unless allowlisted."""
    if not (_in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if reason.startswith(CI_ALLOWED_SKIP):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, which counts as a failure: {reason}\n"
        f"(CI must provide this; see tests/conftest.py for the '{CI_ALLOWED_SKIP}' allowlist)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    _fail_skip_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    report = yield
    _fail_skip_in_ci(report)
    return report
