"""The cleaning stage's worker pool: fast to start, one polars thread per worker.

Kept apart from :mod:`pipeline.text.clean` so the pool's start-up knowledge (forkserver with a
light preload, the hidden ``__main__`` script) sits in one place.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from pipeline.text import clean_worker


@contextlib.contextmanager
def worker_environment() -> Iterator[None]:
    """Worker processes inherit the environment: one polars thread each, since the pool
    already runs one process per core (more threads per process only contend)."""
    old = os.environ.get("POLARS_MAX_THREADS")
    os.environ["POLARS_MAX_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["POLARS_MAX_THREADS"]
        else:
            os.environ["POLARS_MAX_THREADS"] = old


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """While workers start, hide the ``__main__`` script from them.

    ``spawn``/``forkserver`` children re-run the parent's main script (as ``__mp_main__``) before
    taking work, so that functions defined there can be unpickled. Ours live in
    :mod:`pipeline.text.clean_worker`, and the script is whatever launched us: the ``dagster`` console script
    (which imports all of Dagster) in an asset step, a benchmark that imports torch and
    tokenizers. Re-running it cost each worker ~1.5 s, five times the pool's own start-up.
    Modules run with ``-m`` are named in ``__spec__`` and stay as they are (light, or skipped
    by multiprocessing itself for ``__main__`` packages).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose workers start in milliseconds: ``forkserver`` forks them from a server
    process that imported :mod:`pipeline.text.clean_worker` (numpy, polars, no pyarrow) once.

    Not ``fork``: forking a parent that has used polars or pyarrow thread pools can deadlock.
    Not ``spawn`` unless forkserver is unavailable: every worker would re-import everything.
    Threads do not help: the polars string kernels and ``str``/``re`` work hold the GIL.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([clean_worker.__name__])
    else:
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
