"""``scriptorium push`` and the ``publish_hf_export`` job with the real ``huggingface_hub`` client
against the mirror server's Hub write API, then ``AutoModelForCausalLM.from_pretrained`` back
through the same server: identical tensors.

The mirror here is a temporary, writable one (``hub_write_routes``); the shared data mirror is
never written to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import torch
from safetensors.torch import load_file

from llm_core.interop import export_hf
from pipeline.publish_job import publish_hf_export
from pipeline.resources import HubSource, Paths
from pipeline.sources.hub_write import hub_write_routes
from pipeline.sources.mirror import MirrorServer
from tests.pipeline.serve.serving import tiny_chat_model

SCRIPTORIUM = Path(sys.executable).parent / "scriptorium"
TOKEN = "hf_test_secret_never_printed_4242"
LOAD_BACK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], cache_dir=sys.argv[2])
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[3])
print(json.dumps({"class": type(model).__name__}))
"""


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``export_hf`` folder of a tiny model (config, safetensors, tokenizer, card)."""
    work = tmp_path_factory.mktemp("publish")
    tiny_chat_model(work / "weights", ctx=64)
    return export_hf(work / "weights", work / "weights" / "tokenizer.json", work / "hf_export")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirrorServer]:
    root = tmp_path_factory.mktemp("writable_mirror")
    (root / "hf" / "datasets").mkdir(parents=True)
    (root / "hf" / "models").mkdir(parents=True)
    with MirrorServer(root, routes=hub_write_routes(root)) as server:
        yield server


def _push(folder: Path, repo: str, endpoint: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if token:
        env["HF_TOKEN"] = token
    cmd = [str(SCRIPTORIUM), "push", "--folder", str(folder), "--repo", repo]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_push_then_from_pretrained_gives_identical_tensors(
    export: Path, hub: MirrorServer, tmp_path: Path
) -> None:
    # Without a token nothing is sent at all.
    refused = _push(export, "acme/tiny-chat", hub.url, token=None)
    assert refused.returncode == 2 and "HF_TOKEN" in refused.stderr
    assert not (hub.root / "hf" / "models" / "acme").exists()
    assert not [r for r in hub.faults.log if r.method in ("POST", "PUT")]

    pushed = _push(export, "acme/tiny-chat", hub.url, TOKEN)
    assert pushed.returncode == 0, pushed.stderr
    assert TOKEN not in pushed.stdout + pushed.stderr
    assert "pushed" in pushed.stdout and "acme/tiny-chat@main" in pushed.stdout
    writes = [(r.method, r.path.split("/")[1]) for r in hub.faults.log if r.method != "GET"]
    assert ("PUT", "lfs-upload") in writes  # model.safetensors went through git-LFS

    stored = hub.root / "hf" / "models" / "acme" / "tiny-chat"
    for f in export.iterdir():
        assert (stored / f.name).read_bytes() == f.read_bytes(), f.name

    out = tmp_path / "loaded.safetensors"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN", None)
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_BACK, "acme/tiny-chat", str(tmp_path / "cache"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1])["class"] == "LlamaForCausalLM"
    original, back = load_file(export / "model.safetensors"), load_file(out)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    assert "lm_head.weight" in back  # untied: the head travelled too

    # Pushing the same folder again changes nothing: the client skips unchanged files.
    before = (stored / "model.safetensors").stat().st_mtime_ns
    again = _push(export, "acme/tiny-chat", hub.url, TOKEN)
    assert again.returncode == 0, again.stderr
    assert (stored / "model.safetensors").stat().st_mtime_ns == before


def test_publish_job_is_opt_in_and_pushes_hf_export(
    export: Path, hub: MirrorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.definitions import defs

    jobs_with_assets = [
        j.name for j in defs.resolve_all_job_defs() if j.name != "publish_hf_export"
    ]
    assert "publish_hf_export" not in jobs_with_assets
    assert not any(
        k.path[-1] == "publish_hf_export" for k in defs.resolve_asset_graph().get_all_asset_keys()
    )
    data_root = tmp_path / "data"
    (data_root / "hf_export").mkdir(parents=True)
    for f in export.iterdir():
        (data_root / "hf_export" / f.name).write_bytes(f.read_bytes())
    config = {"ops": {"push_hf_export": {"config": {"repo": "acme/from-dagster"}}}}
    resources = {"paths": Paths(data_root=str(data_root))}

    no_token = publish_hf_export.execute_in_process(
        run_config=config,
        resources={**resources, "hub": HubSource(endpoint=hub.url)},
        raise_on_error=False,
    )
    assert not no_token.success
    assert not (hub.root / "hf" / "models" / "acme" / "from-dagster").exists()

    # The mirror speaks git-LFS only. huggingface_hub reads HF_HUB_DISABLE_XET once, when it is
    # first imported (by an earlier test in the same session), so set its constant as well.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    result = publish_hf_export.execute_in_process(
        run_config=config,
        resources={**resources, "hub": HubSource(endpoint=hub.url, token=TOKEN)},
    )
    assert result.success
    [observation] = [
        e.event_specific_data.asset_observation  # type: ignore[union-attr]
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
    ]
    assert observation.metadata["hub_repo"].value == "acme/from-dagster"
    stored = hub.root / "hf" / "models" / "acme" / "from-dagster"
    assert (stored / "model.safetensors").read_bytes() == (
        export / "model.safetensors"
    ).read_bytes()
    logs = "".join(str(e.message) for e in result.all_events)
    assert TOKEN not in logs
