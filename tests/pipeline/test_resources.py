"""Resources built from the environment, and profile-aware code versions."""

from __future__ import annotations

import os

import yaml

from pipeline.resources import profile_code_version, resources_from_env


def test_resources_follow_the_documented_environment(tmp_path) -> None:
    res = resources_from_env(
        {
            "SCRIPTORIUM_DATA": str(tmp_path),
            "SCRIPTORIUM_PROFILE": "tiny",
            "GUTENBERG_MIRROR": "http://127.0.0.1:9",
        }
    )
    assert res["paths"].root() == tmp_path.resolve()
    assert res["profile"].load()["name"] == "tiny"
    assert res["gutenberg"].base_url == "http://127.0.0.1:9"
    assert res["mlflow"].uri(res["paths"]).startswith("sqlite:///")


def test_profile_code_version_changes_only_with_the_sections_read(tmp_path) -> None:
    from llm_core.config import load_profile

    profile = load_profile("tiny")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    env = {"SCRIPTORIUM_PROFILE": str(path)}
    before_clean = profile_code_version("1", "clean", env=env)
    before_model = profile_code_version("1", "model", env=env)
    assert before_clean.startswith("1+")
    profile["model"]["n_layer"] += 1
    path.write_text(yaml.safe_dump(profile))
    assert profile_code_version("1", "clean", env=env) == before_clean
    assert profile_code_version("1", "model", env=env) != before_model
    assert profile_code_version("1", "x", env={"SCRIPTORIUM_PROFILE": "missing"}) == "1"


def test_compute_chooses_child_threads_unless_the_environment_already_does() -> None:
    from pipeline.resources import Compute

    cores = len(os.sched_getaffinity(0))
    env = Compute(nproc_per_node=2).child_env({})
    assert env == {"OMP_NUM_THREADS": str(max(1, cores // 2)), "OMP_WAIT_POLICY": "PASSIVE"}
    assert Compute(threads=3).child_env({})["OMP_NUM_THREADS"] == "3"
    mine = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    assert Compute(threads=3).child_env(mine) == mine
    res = resources_from_env({"SCRIPTORIUM_THREADS": "5"})
    assert res["compute"].child_env({})["OMP_NUM_THREADS"] == "5"
