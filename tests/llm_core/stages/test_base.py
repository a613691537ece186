"""The stage configs built from every profile, their JSON round trip, the profile checks, the
command line's config, and ``llm_core``'s independence from Dagster and the pipeline."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from llm_core.config import configs_dir, load_profile, model_config_from_profile
from llm_core.rl import GRPOConfig
from llm_core.stages import STAGES, best_of_n, dpo, grpo, pretrain, stage_module
from llm_core.stages.base import StageConfig, build_parser, config_from_args

REPO = Path(__file__).resolve().parents[3]
LLM_CORE = REPO / "llm_core"
PROFILES = ("tiny", "demo", "small", "gpt2-124m", "zh", "demo-moe", "toy", "verdict")


def inputs_of(cfg: type[StageConfig], root: Path = Path("/data")) -> dict[str, Path]:
    """Input paths for ``cfg`` (only their names matter: building a config reads no file)."""
    return {key: root / key for key in cfg.INPUTS}


def test_every_profile_is_covered() -> None:
    found = {p.stem for p in (configs_dir() / "profiles").glob("*.yaml")}
    assert found == set(PROFILES), "add the new profile to PROFILES"


# ------------------------------------------------------------------------------ (a) every profile
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", PROFILES)
def test_config_from_every_profile_round_trips(name: str, stage: str) -> None:
    profile = load_profile(name)
    cfg: type[StageConfig] = stage_module(stage).Config
    if cfg.SECTION not in profile:  # a profile without the stage (verdict: pretraining only)
        with pytest.raises(ValueError, match=f"has no '{cfg.SECTION}' section"):
            cfg.from_profile(profile, inputs_of(cfg), out_dir="/runs/x")
        assert name in {"toy", "verdict"}, f"{name} lacks the {cfg.SECTION} section"
        return
    config = cfg.from_profile(profile, inputs_of(cfg), out_dir="/runs/x", steps=3, device="cpu")
    assert config.profile == profile["name"] and config.out_dir == Path("/runs/x")
    assert config.train.steps == 3 and config.train.device == "cpu" and not config.resume
    for key in cfg.INPUTS:
        assert getattr(config, key) == Path("/data") / key
    section = dict(profile.get(cfg.SECTION) or {})
    if cfg.METHOD is not None:
        section.update(section.get(cfg.METHOD) or {})
    assert config.train.seed == section.get("seed", profile.get("seed", 1337))
    for key in ("lr", "batch_size", "warmup_steps"):
        if key in section:
            assert getattr(config.train, key) == section[key], key
    # The config travels as plain JSON (to a Pipes child, a torchrun rank) and comes back equal.
    plain = json.loads(json.dumps(config.to_dict(), allow_nan=False))
    again = cfg.from_dict(plain)
    assert again == config and type(again) is cfg
    assert again.to_dict() == plain


@pytest.mark.parametrize("name", PROFILES)
def test_pretrain_model_is_the_profiles_model(name: str) -> None:
    profile = load_profile(name)
    config = pretrain.Config.from_profile(profile, inputs_of(pretrain.Config), out_dir="/o")
    assert config.model == model_config_from_profile(profile)
    assert config.model_config() == config.model.to_dict()


def test_steps_zero_keeps_the_profiles_steps_and_resume_is_carried() -> None:
    profile = load_profile("tiny")
    config = dpo.Config.from_profile(profile, inputs_of(dpo.Config), out_dir="/o", resume=True)
    assert config.train.steps == profile["rlhf"]["steps"] and config.resume
    assert dpo.Config.from_dict(config.to_dict()).resume


def test_missing_inputs_are_named() -> None:
    inputs = inputs_of(dpo.Config)
    del inputs["reward_model"]
    with pytest.raises(ValueError, match=r"missing input path\(s\) \['reward_model'\]"):
        dpo.Config.from_profile(load_profile("tiny"), inputs, out_dir="/o")


def test_unknown_stage_name_lists_the_stages() -> None:
    with pytest.raises(ValueError, match="unknown training stage 'rlfh'.*'grpo'"):
        stage_module("rlfh")


# ------------------------------------------------------------------------------ (b) unknown keys
def _with(profile: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(profile)
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_unknown_key_in_a_section_names_the_section_and_key(stage: str) -> None:
    cfg: type[StageConfig] = stage_module(stage).Config
    profile = _with(load_profile("tiny"), (cfg.SECTION, "learning_rate"), 1e-3)
    where = f"{cfg.SECTION}.{cfg.METHOD}" if cfg.METHOD else cfg.SECTION
    with pytest.raises(
        ValueError, match=rf"section '{where}': unknown key\(s\) \['learning_rate'\]"
    ):
        cfg.from_profile(profile, inputs_of(cfg), out_dir="/o")


@pytest.mark.parametrize("stage", ["grpo", "best_of_n"])
def test_unknown_key_in_a_method_block_names_the_block(stage: str) -> None:
    cfg: type[StageConfig] = stage_module(stage).Config
    profile = _with(load_profile("tiny"), ("rlhf", stage, "group_sise"), 4)
    with pytest.raises(ValueError, match=rf"section 'rlhf.{stage}'.*\['group_sise'\]"):
        cfg.from_profile(profile, inputs_of(cfg), out_dir="/o")


def test_a_sibling_methods_key_is_not_a_shared_key() -> None:
    """GRPO's knobs belong in ``rlhf.grpo``: in the shared section DPO refuses them."""
    profile = _with(load_profile("tiny"), ("rlhf", "group_size"), 4)
    with pytest.raises(ValueError, match=r"\['group_size'\]"):
        dpo.Config.from_profile(profile, inputs_of(dpo.Config), out_dir="/o")


# ------------------------------------------------------------------------------ (c) method blocks
def test_a_method_block_overrides_the_sections_shared_keys() -> None:
    rlhf = {
        "method": "dpo",
        "beta": 0.2,
        "win_rate_prompts": 4,
        "max_new_tokens": 24,  # shared: the win rate's reply length (and any method's default)
        "steps": 20,
        "batch_size": 8,
        "lr": 5e-4,
        "grpo": {"steps": 10, "lr": 2e-4, "max_new_tokens": 16, "group_size": 6},
        "best_of_n": {"max_new_tokens": 12, "n": 3},
    }
    profile = {"name": "blocks", "vocab_size": 64, "seed": 3, "rlhf": rlhf}

    g = grpo.Config.from_profile(profile, inputs_of(grpo.Config), out_dir="/o")
    assert isinstance(g.grpo, GRPOConfig)
    assert g.grpo.max_new_tokens == 16 and g.grpo.group_size == 6  # the block's
    assert g.win_rate_max_new_tokens == 24  # the win rate keeps the section's shared key
    assert g.win_rate_prompts == 4 and g.train.seed == 3
    assert g.train.steps == 10 and g.train.lr == 2e-4  # the block's
    assert g.train.batch_size == 8  # not in the block: the section's

    d = dpo.Config.from_profile(profile, inputs_of(dpo.Config), out_dir="/o")
    assert d.train.steps == 20 and d.train.lr == 5e-4 and d.beta == 0.2
    assert d.win_rate_max_new_tokens == 24 and d.win_rate_prompts == 4

    b = best_of_n.Config.from_profile(profile, inputs_of(best_of_n.Config), out_dir="/o")
    assert b.max_new_tokens == 12 and b.n == 3 and b.win_rate_max_new_tokens == 24
    assert b.train.steps == 20

    # A method with no block of its own takes the shared keys.
    no_block = {**profile, "rlhf": {k: v for k, v in rlhf.items() if k != "grpo"}}
    g = grpo.Config.from_profile(no_block, inputs_of(grpo.Config), out_dir="/o")
    assert g.grpo.max_new_tokens == 24 and g.train.steps == 20

    # Without a shared max_new_tokens the win rate keeps its default, whatever a block says.
    no_shared = {**profile, "rlhf": {k: v for k, v in rlhf.items() if k != "max_new_tokens"}}
    g = grpo.Config.from_profile(no_shared, inputs_of(grpo.Config), out_dir="/o")
    default = {f.name: f.default for f in dataclasses.fields(grpo.Config)}
    assert g.grpo.max_new_tokens == 16
    assert g.win_rate_max_new_tokens == default["win_rate_max_new_tokens"]


# ------------------------------------------------------------------------------ command line
def test_command_line_config_from_flags_and_from_json(tmp_path: Path) -> None:
    parser = build_parser(pretrain)
    args = parser.parse_args(
        ["--profile", "tiny", "--shards-dir", "/s", "--tokenizer", "/t.json", "--out", "/o",
         "--steps", "5", "--device", "cpu", "--resume"]
    )  # fmt: skip
    config = config_from_args(pretrain, args)
    expected = pretrain.Config.from_profile(
        load_profile("tiny"),
        {"shards_dir": "/s", "tokenizer": "/t.json"},
        out_dir="/o",
        steps=5,
        device="cpu",
        resume=True,
    )
    assert config == expected
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(config.to_dict()))
    assert config_from_args(pretrain, parser.parse_args(["--config-json", str(saved)])) == config
    with pytest.raises(SystemExit, match="--tokenizer"):
        config_from_args(pretrain, parser.parse_args(["--shards-dir", "/s", "--out", "/o"]))


# ------------------------------------------------------------------------------ (d) independence
def test_llm_core_imports_neither_dagster_nor_the_pipeline() -> None:
    code = textwrap.dedent(
        """
        import importlib, json, pkgutil, sys
        import llm_core
        names = [m.name for m in pkgutil.walk_packages(llm_core.__path__, "llm_core.")]
        for name in names:
            importlib.import_module(name)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("dagster", "pipeline"))
        print(json.dumps({"imported": names, "bad": bad}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {f"llm_core.stages.{s}" for s in STAGES} <= set(report["imported"])
    assert report["bad"] == []


def test_no_llm_core_source_imports_dagster_or_the_pipeline() -> None:
    files = sorted(LLM_CORE.rglob("*.py"))
    assert len(files) > 10
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad += [
                f"{path.relative_to(REPO)}:{node.lineno}: {name}"
                for name in names
                if name.split(".")[0] in ("dagster", "pipeline")
            ]
    assert bad == []
