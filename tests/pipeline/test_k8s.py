"""The pod a training stage runs in on Kubernetes (``SCRIPTORIUM_PIPES=k8s``), built by
dagster-k8s's own ``build_pod_body`` exactly as ``PipesK8sClient.run`` would submit it, with no
cluster: image, command (torchrun on the GPUs asked for), resources, the artefact volume at the
data root's path, and an environment that carries what the child reads and nothing else."""

from __future__ import annotations

import json
import sys

import dagster as dg
import pytest
from kubernetes.client import ApiClient

from pipeline.child import EXTRAS_ENV
from pipeline.k8s import StagePodClient
from pipeline.launch import child_command
from pipeline.resources import resources_from_env

ENV = {
    "SCRIPTORIUM_PIPES": "k8s",
    "SCRIPTORIUM_DATA": "/data",
    "SCRIPTORIUM_K8S_IMAGE": "registry.example/scriptorium:1",
    "SCRIPTORIUM_K8S_DATA_CLAIM": "scriptorium-data",
    "SCRIPTORIUM_K8S_NAMESPACE": "training",
    "SCRIPTORIUM_K8S_GPUS": "8",
    "SCRIPTORIUM_K8S_CPUS": "32",
    "SCRIPTORIUM_NPROC": "8",
}


def test_training_pod_spec_without_a_cluster() -> None:
    resources = resources_from_env(ENV)
    client, compute = resources["pipes"], resources["compute"]
    assert isinstance(client, StagePodClient) and client.namespace == "training"
    extras = {"stage": "pretrain", "config": {"out_dir": "/data/pretrained_weights"}}
    # What launch_stage hands the client: the host's whole environment plus the child's.
    env = {
        "HOME": "/root",
        "AWS_SECRET_ACCESS_KEY": "never-in-a-pod-spec",
        "SCRIPTORIUM_PROFILE": "gpt2-124m",
        **compute.child_env({}),
        EXTRAS_ENV: json.dumps(extras),
    }
    pipes_env = {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}
    command = child_command(compute)
    assert command[0] == sys.executable
    pod = client.pod("pretrain-abc", command, env, pipes_env)
    pod = ApiClient().sanitize_for_serialization(pod)  # the JSON body a cluster would receive

    assert pod["metadata"]["name"] == "pretrain-abc"
    assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "scriptorium"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["image"] == "registry.example/scriptorium:1"
    assert container["command"] == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8",
        "-m", "pipeline.child",
    ]  # fmt: skip
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"]["cpu"] == "32"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"data": "/data", "dshm": "/dev/shm"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "scriptorium-data"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"

    pod_env = {e["name"]: e["value"] for e in container["env"]}
    assert json.loads(pod_env[EXTRAS_ENV]) == extras
    assert pod_env["OMP_NUM_THREADS"] == "4"  # 32 CPUs over 8 ranks, not this host's cores
    assert pod_env["SCRIPTORIUM_DATA"] == "/data"
    assert pod_env["SCRIPTORIUM_PROFILE"] == "gpt2-124m"
    assert "HOME" not in pod_env and "AWS_SECRET_ACCESS_KEY" not in pod_env
    assert pod_env["DAGSTER_PIPES_CONTEXT"] == "ctx"  # how the child finds its Pipes session
    assert pod_env["DAGSTER_PIPES_MESSAGES"] == "msgs"


def test_pod_client_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="SCRIPTORIUM_K8S_IMAGE"):
        resources_from_env({"SCRIPTORIUM_PIPES": "k8s"})
    with pytest.raises(ValueError, match="SCRIPTORIUM_PIPES"):
        resources_from_env({"SCRIPTORIUM_PIPES": "ssh"})
    with pytest.raises(ValueError, match="data_root"):
        StagePodClient(image="i", data_claim="c", data_root="relative/data")
    assert type(resources_from_env({})["pipes"]) is dg.PipesSubprocessClient  # the default
