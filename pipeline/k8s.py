"""Training and evaluation children as Kubernetes pods, through Dagster Pipes (``PipesK8sClient``).

``launch_stage()`` starts its child through the ``pipes`` resource. Bound to
:class:`StagePodClient` instead of ``dg.PipesSubprocessClient`` (``SCRIPTORIUM_PIPES=k8s``, see
:func:`k8s_pipes_from_env`), the same child command runs as a pod: the project's image, the GPUs
and CPUs asked for, the artefact volume mounted at the *same path* as the data root of the
Dagster process (every path in a stage config is absolute, so nothing is rewritten), and only the
environment the child needs (never the orchestrator's whole environment, which may hold
secrets). Progress lines, the materialisation and the asset checks come back through the pod's
logs, as Pipes does for a subprocess.

:meth:`StagePodClient.pod` builds the pod exactly as ``PipesK8sClient.run`` would submit it
(``dagster_k8s.pipes.build_pod_body``), with no cluster: the tests and ``kubectl`` dry runs use
it. This module (and with it ``dagster_k8s`` and the ``kubernetes`` client) is imported only
where ``SCRIPTORIUM_PIPES=k8s`` asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from dagster_k8s import PipesK8sClient

from pipeline.child import EXTRAS_ENV

# What a child reads from its environment (pipeline.child, llm_core.stages, Compute.child_env).
FORWARDED_ENV = (
    EXTRAS_ENV,
    "OMP_WAIT_POLICY",
    "SCRIPTORIUM_PROFILE",
    "SCRIPTORIUM_DATA",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_DISABLE_TELEMETRY",
)
POD_META = {"labels": {"app.kubernetes.io/part-of": "scriptorium"}}


class StagePodClient(PipesK8sClient):
    """``PipesK8sClient`` with the pod a Scriptorium stage needs; a drop-in ``pipes`` resource.

    ``data_root`` is where the artefact volume (``data_claim``, a ReadWriteMany
    PersistentVolumeClaim) is mounted in the pod: the same path as ``$SCRIPTORIUM_DATA`` of the
    Dagster code server (which mounts the same claim). ``gpus`` sets the
    ``nvidia.com/gpu`` limit; ``cpus`` the CPU request, from which the child's OpenMP threads are
    derived (the orchestrator's core count means nothing in the pod).
    """

    def __init__(
        self,
        *,
        image: str,
        data_claim: str,
        data_root: str,
        namespace: str = "default",
        gpus: int = 0,
        cpus: int = 4,
        memory: str = "16Gi",
        service_account: str | None = None,
        node_selector: Mapping[str, str] | None = None,
        **client_kwargs: Any,
    ) -> None:
        super().__init__(**client_kwargs)
        if not image or not data_claim or not data_root.startswith("/"):
            raise ValueError(
                "StagePodClient needs an image, a data_claim (PVC name) and an absolute "
                f"data_root (got image={image!r}, data_claim={data_claim!r}, "
                f"data_root={data_root!r})"
            )
        self.image, self.data_claim, self.data_root = image, data_claim, data_root
        self.namespace, self.gpus, self.cpus, self.memory = namespace, gpus, cpus, memory
        self.service_account = service_account
        self.node_selector = dict(node_selector or {})

    # -- what the pod runs ----------------------------------------------------------------
    @staticmethod
    def pod_command(command: Sequence[str]) -> list[str]:
        """The child command with the image's ``python`` for this process's interpreter."""
        cmd = list(command)
        if cmd and PurePosixPath(cmd[0]).name.startswith("python"):
            cmd[0] = "python"
        return cmd

    def pod_env(self, env: Mapping[str, str], nproc_per_node: int = 1) -> dict[str, str]:
        """Only what the child reads, with OpenMP threads sized to the pod's CPUs."""
        out = {k: env[k] for k in FORWARDED_ENV if k in env}
        out["OMP_NUM_THREADS"] = str(max(1, self.cpus // max(nproc_per_node, 1)))
        out["SCRIPTORIUM_DATA"] = self.data_root
        return out

    def base_pod_spec(self) -> dict[str, Any]:
        """The pod spec under the Pipes additions: resources, the data volume, shared memory
        for the DataLoader/NCCL (``/dev/shm`` is 64 MiB by default), placement."""
        limits: dict[str, str] = {"memory": self.memory}
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
        spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "stage",
                    "image": self.image,
                    "workingDir": "/opt/scriptorium",  # docker/Dockerfile's WORKDIR
                    "resources": {
                        "requests": {"cpu": str(self.cpus), "memory": self.memory},
                        "limits": limits,
                    },
                    "volumeMounts": [
                        {"name": "data", "mountPath": self.data_root},
                        {"name": "dshm", "mountPath": "/dev/shm"},
                    ],
                }
            ],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": self.data_claim}},
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            ],
        }
        if self.service_account:
            spec["serviceAccountName"] = self.service_account
        if self.node_selector:
            spec["nodeSelector"] = self.node_selector
        return spec

    def spec_for(self, command: Sequence[str]) -> dict[str, Any]:
        """:meth:`base_pod_spec` running ``command`` (already :meth:`pod_command`)."""
        spec = self.base_pod_spec()
        spec["containers"][0]["command"] = list(command)
        return spec

    def pod(
        self,
        pod_name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        pipes_env: Mapping[str, str] | None = None,
    ) -> Any:
        """The ``V1Pod`` that :meth:`run` submits for ``command`` and ``env`` (as :meth:`run`
        gets them) and the Pipes session's bootstrap variables ``pipes_env``, built by
        dagster-k8s's own ``build_pod_body`` with the same environment merge."""
        from dagster_k8s.pipes import build_pod_body

        cmd = self.pod_command(command)
        return build_pod_body(
            pod_name=pod_name,
            image=None,  # in the spec: the container is named and has its image
            command=None,
            env_vars={**(pipes_env or {}), **self.pod_env(env, _nproc(cmd))},
            base_pod_meta=POD_META,
            base_pod_spec=self.spec_for(cmd),
        )

    # -- the Pipes client API launch_stage calls -------------------------------------------
    def run(  # type: ignore[override]
        self,
        *,
        context: Any,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        extras: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``command`` (``launch.child_command``) in a pod and wait for it, as
        ``PipesSubprocessClient.run`` runs it in a subprocess."""
        cmd = self.pod_command(command)
        return super().run(
            context=context,
            extras=dict(extras or {}),
            namespace=self.namespace,
            env=self.pod_env(env or {}, _nproc(cmd)),
            base_pod_meta=POD_META,
            base_pod_spec=self.spec_for(cmd),
            **kwargs,
        )


def _nproc(command: Sequence[str]) -> int:
    """``torchrun``'s processes per node in ``command`` (1 without torchrun)."""
    flag = "--nproc_per_node="
    return next((int(a.removeprefix(flag)) for a in command if a.startswith(flag)), 1)


def k8s_pipes_from_env(env: Mapping[str, str], data_root: str) -> StagePodClient:
    """The pod client from ``SCRIPTORIUM_K8S_*`` variables (README, "Scaling out")."""
    missing = [k for k in ("SCRIPTORIUM_K8S_IMAGE", "SCRIPTORIUM_K8S_DATA_CLAIM") if not env.get(k)]
    if missing:
        raise ValueError(f"SCRIPTORIUM_PIPES=k8s needs {', '.join(missing)}")
    return StagePodClient(
        image=env["SCRIPTORIUM_K8S_IMAGE"],
        data_claim=env["SCRIPTORIUM_K8S_DATA_CLAIM"],
        data_root=data_root,
        namespace=env.get("SCRIPTORIUM_K8S_NAMESPACE", "default"),
        gpus=int(env.get("SCRIPTORIUM_K8S_GPUS", "0")),
        cpus=int(env.get("SCRIPTORIUM_K8S_CPUS", "4")),
        memory=env.get("SCRIPTORIUM_K8S_MEMORY", "16Gi"),
    )
