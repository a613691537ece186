"""``SCRIPTORIUM_EXECUTOR`` picks Dagster's executor, and every file in configs/executors/ is
valid run config for the executor it is written for (checked against the executors' own config
schemas, so a dagster-celery or dagster-k8s upgrade that renames a key fails here)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config

from pipeline.executors import executor_from_env

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "executors"


@pytest.mark.parametrize("name", ["multiprocess", "celery", "k8s"])
def test_executor_configs_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRIPTORIUM_CELERY_BROKER", "redis://broker:6379/0")
    monkeypatch.setenv("SCRIPTORIUM_CELERY_BACKEND", "redis://broker:6379/1")
    executor = executor_from_env({"SCRIPTORIUM_EXECUTOR": name})
    assert executor.name == {"multiprocess": "multi_or_in_process_executor"}.get(name, name)
    run_config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    result = process_config(executor.config_schema.config_type, run_config["execution"]["config"])
    assert result.success, [e.message for e in result.errors or []]
    if name == "celery":
        assert result.value["broker"] == "redis://broker:6379/0"  # resolved from the env


def test_default_and_unknown_executor() -> None:
    assert executor_from_env({}) is dg.multi_or_in_process_executor
    with pytest.raises(ValueError, match="SCRIPTORIUM_EXECUTOR"):
        executor_from_env({"SCRIPTORIUM_EXECUTOR": "ray"})
