"""Dagster resources: where artefacts live, which profile is active, where sources are, tracking.

Each resource is a typed ``ConfigurableResource`` so the UI's launchpad shows and validates it.
Defaults come from the environment variables named in the developers' guide, read once when the
code location loads (``resources_from_env``), never from module-level globals.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from llm_core.config import load_profile, profile_path
from pipeline.artefacts import Artefacts, data_root

GUTENBERG_DEFAULT = "https://www.gutenberg.org"
USER_AGENT = "Scriptorium/0.1 (+https://github.com/scriptorium-llm/scriptorium)"


class Paths(dg.ConfigurableResource):
    """The artefact root; each asset owns ``<data_root>/<asset_key>/``."""

    data_root: str

    def root(self) -> Path:
        p = Path(self.data_root).expanduser().resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p

    def asset_dir(self, key: str | dg.AssetKey, *, create: bool = True) -> Path:
        """``<data_root>/<key>`` for ``gutenberg_books`` or ``sft_sources/alpaca`` alike."""
        rel = "/".join(key.path) if isinstance(key, dg.AssetKey) else key
        p = self.root() / rel
        if create:
            p.mkdir(parents=True, exist_ok=True)
        return p

    def require(self, key: str, filename: str) -> Path:
        """An upstream artefact, with an error that says which asset to materialise first."""
        return self.artefacts().require(key, filename)

    def artefacts(self) -> Artefacts:
        """The file names under this root (:mod:`pipeline.artefacts`)."""
        return Artefacts(self.root())


@functools.lru_cache(maxsize=8)
def _parsed_profile(name: str, digest: str) -> dict[str, Any]:
    return load_profile(name)


def cached_profile(name: str) -> dict[str, Any]:
    """Profile ``name``, parsed once per process and content (an edited file is parsed again);
    a copy, so callers may change it."""
    path = profile_path(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return copy.deepcopy(_parsed_profile(name, digest))


class Profile(dg.ConfigurableResource):
    """The active profile (``tiny``, ``demo``, ``small``, ``gpt2-124m``) or a path to a YAML."""

    name: str

    def load(self) -> dict[str, Any]:
        """The profile, parsed once per process (a copy, so callers may change it)."""
        return cached_profile(self.name)

    def section(self, key: str) -> dict[str, Any]:
        return dict(self.load().get(key) or {})


class GutenbergSource(dg.ConfigurableResource):
    """A gutenberg.org-style site: the real one, or the project's mirror server."""

    base_url: str = GUTENBERG_DEFAULT
    user_agent: str = USER_AGENT


class HubSource(dg.ConfigurableResource):
    """Where SFT and evaluation data come from: the Hugging Face Hub (or a mirror of its API) and
    plain URLs (optionally rewritten onto a files mirror, ``<files_mirror>/<host>/<path>``).

    ``token`` is bound to ``dg.EnvVar("HF_TOKEN")`` by ``resources_from_env``, so the secret is
    resolved in the step process and never shown in the UI or written to the event log.
    """

    endpoint: str = ""  # empty: huggingface.co
    token: str | None = None
    files_mirror: str = ""  # empty: fetch plain URLs from their own hosts
    cache_dir: str = ""  # huggingface_hub cache; empty: <data_root>/hf_cache

    def cache(self, paths: Paths) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else paths.root() / "hf_cache"


class MlflowTracking(dg.ConfigurableResource):
    """Where MLflow runs go. Empty ``tracking_uri`` means SQLite under the data root."""

    tracking_uri: str = ""
    experiment: str = "scriptorium"

    def uri(self, paths: Paths) -> str:
        return self.tracking_uri or f"sqlite:///{paths.root() / 'mlflow.db'}"


class Compute(dg.ConfigurableResource):
    """Where training runs: ``device`` (auto/cpu/cuda), processes per node for ``torchrun``, the
    nodes of a multi-machine job, and the OpenMP threads of each child.

    Several machines (``nnodes`` > 1): every node runs ``torchrun`` with the same ``nnodes``,
    ``rdzv_endpoint`` (``host:port`` of node 0, which hosts the rendezvous store) and
    ``rdzv_id``, and its own ``node_rank``. ``rdzv_backend`` ``c10d`` (elastic) lets the
    rendezvous order the nodes; ``static`` pins global rank 0 (the rank that writes the
    artefacts, MLflow and the Dagster report) to ``node_rank`` 0, which is what a Dagster-launched
    node 0 needs (README, "Scaling out").

    ``threads`` 0 gives each process its share of the cores this process may use. OpenMP waits
    ``PASSIVE`` by default: spinning threads cost 3-7x whenever anything else shares the cores
    (``benchmarks/train_throughput.py``), a little when nothing does. An ``OMP_NUM_THREADS`` or
    ``OMP_WAIT_POLICY`` already in the environment wins, so a user's explicit choice is kept.
    """

    device: str = "auto"
    nproc_per_node: int = 1
    threads: int = 0
    omp_wait_policy: str = "PASSIVE"
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # host:port of node 0; needed when nnodes > 1
    rdzv_id: str = "scriptorium"  # the same on every node of one job, new for the next job
    rdzv_backend: str = "c10d"  # c10d | static

    def torchrun_args(self) -> list[str]:
        """``torchrun``'s options for this node; empty for a single process on one node."""
        if self.nnodes > 1:
            if not self.rdzv_endpoint or ":" not in self.rdzv_endpoint:
                raise ValueError(
                    f"Compute.rdzv_endpoint must be host:port of node 0 when nnodes={self.nnodes}"
                    f" (got {self.rdzv_endpoint!r})"
                )
            if not 0 <= self.node_rank < self.nnodes:
                raise ValueError(
                    f"Compute.node_rank must be in [0, {self.nnodes}), got {self.node_rank}"
                )
            if self.rdzv_backend not in ("c10d", "static"):
                raise ValueError(
                    f"Compute.rdzv_backend must be 'c10d' or 'static', got {self.rdzv_backend!r}"
                )
            args = [
                f"--nnodes={self.nnodes}",
                f"--nproc_per_node={self.nproc_per_node}",
                f"--rdzv_backend={self.rdzv_backend}",
                f"--rdzv_endpoint={self.rdzv_endpoint}",
                f"--rdzv_id={self.rdzv_id}",
            ]
            if self.rdzv_backend == "static":  # ranks follow node_rank
                return [*args, f"--node_rank={self.node_rank}"]
            # c10d orders the nodes itself; node 0 hosts the store, whatever its hostname says.
            return [*args, f"--rdzv_conf=is_host={str(self.node_rank == 0).lower()}"]
        if self.nproc_per_node > 1:
            return ["--standalone", f"--nproc_per_node={self.nproc_per_node}"]
        return []

    def child_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The thread settings a training or evaluation child starts with."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = self.threads or max(1, (cores or 1) // max(self.nproc_per_node, 1))
        return {
            "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS") or str(threads),
            "OMP_WAIT_POLICY": environ.get("OMP_WAIT_POLICY") or self.omp_wait_policy,
        }


def profile_code_version(base: str, *keys: str, env: dict[str, str] | None = None) -> str:
    """``base`` plus a short hash of the profile values an asset reads.

    Dagster marks an asset stale when its code version or an upstream data version changes, but a
    profile edit is neither. Folding the asset's own profile sections into its code version makes
    the UI show exactly the assets whose settings changed (and, after they rerun, their
    dependents). Read from the same environment as :func:`resources_from_env`, when the code
    location loads.
    """
    env = dict(os.environ if env is None else env)
    try:
        profile = cached_profile(env.get("SCRIPTORIUM_PROFILE", "demo"))
    except (FileNotFoundError, ValueError):
        return base
    blob = json.dumps([profile.get(k) for k in keys], sort_keys=True, default=str)
    return f"{base}+{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _pipes_from_env(env: Mapping[str, str]) -> Any:
    """Where training children run: subprocesses here (default), or Kubernetes pods with
    ``SCRIPTORIUM_PIPES=k8s`` (:mod:`pipeline.k8s`, imported only then)."""
    kind = env.get("SCRIPTORIUM_PIPES", "subprocess")
    if kind == "subprocess":
        return dg.PipesSubprocessClient()
    if kind == "k8s":
        from pipeline.k8s import k8s_pipes_from_env

        return k8s_pipes_from_env(env, str(data_root(env)))
    raise ValueError(f"SCRIPTORIUM_PIPES must be 'subprocess' or 'k8s', got {kind!r}")


def resources_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the resource set from the documented environment variables."""
    env = dict(os.environ if env is None else env)
    return {
        "paths": Paths(data_root=str(data_root(env))),
        "profile": Profile(name=env.get("SCRIPTORIUM_PROFILE", "demo")),
        "gutenberg": GutenbergSource(base_url=env.get("GUTENBERG_MIRROR") or GUTENBERG_DEFAULT),
        "mlflow": MlflowTracking(tracking_uri=env.get("MLFLOW_TRACKING_URI", "")),
        "hub": HubSource(
            endpoint=env.get("HF_ENDPOINT", ""),
            token=dg.EnvVar("HF_TOKEN") if env.get("HF_TOKEN") else None,
            files_mirror=env.get("SCRIPTORIUM_FILES_MIRROR", ""),
        ),
        "pipes": _pipes_from_env(env),
        "compute": Compute(
            device=env.get("SCRIPTORIUM_DEVICE", "auto"),
            nproc_per_node=int(env.get("SCRIPTORIUM_NPROC", "1")),
            threads=int(env.get("SCRIPTORIUM_THREADS", "0")),
            nnodes=int(env.get("SCRIPTORIUM_NNODES", "1")),
            node_rank=int(env.get("SCRIPTORIUM_NODE_RANK", "0")),
            rdzv_endpoint=env.get("SCRIPTORIUM_RDZV_ENDPOINT", ""),
            rdzv_id=env.get("SCRIPTORIUM_RDZV_ID", "scriptorium"),
            rdzv_backend=env.get("SCRIPTORIUM_RDZV_BACKEND", "c10d"),
        ),
    }
