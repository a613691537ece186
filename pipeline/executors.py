"""Which Dagster executor runs a run's steps: processes on this machine, Celery workers, or
Kubernetes Jobs. ``SCRIPTORIUM_EXECUTOR`` picks it when the code location loads; the run config
in ``configs/executors/<name>.yaml`` configures it (``dagster asset materialize ... -c``).

- ``multiprocess`` (default): Dagster's own, one process per step on this machine
  (``configs/executors/multiprocess.yaml`` caps how many at once).
- ``celery`` (dagster-celery): each step is a task on a broker (Redis); any number of workers on
  any machines run them. Workers load this code location with the same environment
  (``SCRIPTORIUM_*``, ``SCRIPTORIUM_EXECUTOR=celery``) and reach the same data root and Dagster
  instance storage (one machine: ``$DAGSTER_HOME``'s SQLite; several: Postgres,
  ``docker/dagster.yaml``).
- ``k8s`` (dagster-k8s ``k8s_job_executor``): each step is a Kubernetes Job running the
  project's image, with the artefact volume and the instance's Postgres.

The download, cleaning and sharding steps fan out over chunks of books (dynamic outputs), so a
distributed executor spreads them over workers or pods. The extra packages are imported only
when their executor is chosen: loading the code location stays as light as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

EXECUTOR_ENV = "SCRIPTORIUM_EXECUTOR"
EXECUTORS = ("multiprocess", "celery", "k8s")


def executor_from_env(env: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor ``$SCRIPTORIUM_EXECUTOR`` names (default ``multiprocess``)."""
    name = (os.environ if env is None else env).get(EXECUTOR_ENV) or "multiprocess"
    if name == "multiprocess":
        return dg.multi_or_in_process_executor
    if name == "celery":
        from dagster_celery import celery_executor

        return celery_executor
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    raise ValueError(f"{EXECUTOR_ENV} must be one of {EXECUTORS}, got {name!r}")
