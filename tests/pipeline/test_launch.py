"""``Compute`` → ``torchrun``: the options of one node, of several nodes (c10d or static
rendezvous), and a real two-"node" job: two torchrun agents on this machine meeting at a c10d
rendezvous on loopback, one gloo process each, which trains like one process on the same global
batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.child import EXTRAS_ENV
from pipeline.launch import CHILD, child_command, other_nodes_note
from pipeline.resources import Compute, Paths, resources_from_env
from tests.llm_core.distributed_helpers import REPO, STAGE, PretrainSetup, free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_single_node_commands() -> None:
    assert child_command(Compute()) == [sys.executable, "-m", CHILD]
    assert child_command(Compute(nproc_per_node=4)) == [
        *TORCHRUN, "--standalone", "--nproc_per_node=4", "-m", CHILD,
    ]  # fmt: skip


def test_multi_node_commands_and_their_errors() -> None:
    node1 = Compute(nnodes=3, node_rank=1, nproc_per_node=8, rdzv_endpoint="n0:29400", rdzv_id="j")
    assert child_command(node1, module="m") == [
        *TORCHRUN, "--nnodes=3", "--nproc_per_node=8", "--rdzv_backend=c10d",
        "--rdzv_endpoint=n0:29400", "--rdzv_id=j", "--rdzv_conf=is_host=false", "-m", "m",
    ]  # fmt: skip
    node0 = node1.model_copy(update={"node_rank": 0})
    assert "--rdzv_conf=is_host=true" in node0.torchrun_args()
    static = node1.model_copy(update={"rdzv_backend": "static"}).torchrun_args()
    assert "--rdzv_backend=static" in static and "--node_rank=1" in static
    assert not any("is_host" in a for a in static)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        Compute(nnodes=2).torchrun_args()
    with pytest.raises(ValueError, match="node_rank"):
        node1.model_copy(update={"node_rank": 3}).torchrun_args()
    with pytest.raises(ValueError, match="rdzv_backend"):
        node1.model_copy(update={"rdzv_backend": "etcd"}).torchrun_args()


def test_other_nodes_note_writes_the_extras_and_the_command(tmp_path: Path) -> None:
    compute = Compute(
        nnodes=3, nproc_per_node=8, rdzv_endpoint="n0:29400", rdzv_id="j", rdzv_backend="static"
    )
    extras = {"stage": "pretrain", "config": {"out_dir": "/data/pretrained_weights"}}
    note = other_nodes_note(compute, extras, Paths(data_root=str(tmp_path)), "abcd1234-pretrain")
    path = tmp_path / ".launch" / "abcd1234-pretrain.json"
    assert json.loads(path.read_text()) == extras
    assert f'{EXTRAS_ENV}="$(cat {path})"' in note and "NODE_RANK=1...2" in note
    assert note.endswith(
        "-m torch.distributed.run --nnodes=3 --nproc_per_node=8 --rdzv_backend=static "
        "--rdzv_endpoint=n0:29400 --rdzv_id=j --node_rank=$NODE_RANK -m pipeline.child"
    )


def test_compute_from_environment() -> None:
    env = {
        "SCRIPTORIUM_NNODES": "2",
        "SCRIPTORIUM_NODE_RANK": "1",
        "SCRIPTORIUM_RDZV_ENDPOINT": "head:29500",
        "SCRIPTORIUM_RDZV_ID": "run-7",
        "SCRIPTORIUM_NPROC": "8",
    }
    compute = resources_from_env(env)["compute"]
    assert (compute.nnodes, compute.node_rank, compute.nproc_per_node) == (2, 1, 8)
    assert "--rdzv_endpoint=head:29500" in compute.torchrun_args()
    assert "--rdzv_id=run-7" in compute.torchrun_args()


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_match_one_process(tmp_path: Path) -> None:
    setup = PretrainSetup(tmp_path)
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "two_nodes"  # the shared folder: only global rank 0 writes
    agents = []
    for node_rank in (0, 1):
        compute = Compute(nnodes=2, node_rank=node_rank, rdzv_endpoint=endpoint, rdzv_id="t")
        cmd = [*child_command(compute, module=STAGE), *setup.stage_args(out)]
        agents.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=setup.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # the agent and its worker: one group to stop
            )
        )
    logs = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=180)
            logs.append(stdout[-2000:] + stderr[-3000:])
    finally:
        for agent in agents:  # only after a failure: SIGTERM lets torchrun stop its worker
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGTERM)
                try:
                    agent.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(agent.pid, signal.SIGKILL)
                    agent.wait()
    assert [a.returncode for a in agents] == [0, 0], "\n---\n".join(logs)

    two = json.loads((out / "metrics.json").read_text())
    assert two["world_size"] == 2
    single = setup.single(tmp_path / "single").train
    two_losses = [h["loss"] for h in two["history"]]
    single_losses = [h["loss"] for h in single.history]
    assert two_losses[0] == pytest.approx(single_losses[0], abs=1e-6)
    assert two_losses == pytest.approx(single_losses, abs=2e-4)
    assert two["final_metrics"]["val_loss"] == pytest.approx(
        single.final_metrics["val_loss"], abs=2e-4
    )
