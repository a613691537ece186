"""``preference_pairs`` on the real mirror: hh-rlhf transcripts parsed from the mirror's rows, and
the asset through ``dg.materialize`` against the mirror server (``huggingface_hub`` for the Hub
datasets, the plain-URL path for rasbt's file) with a tokenizer trained here."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from llm_core.tokenizer import train_bpe
from pipeline.assets.preferences import preference_pairs
from pipeline.resources import HubSource, Paths, Profile
from pipeline.sources.mirror import MirrorServer
from pipeline.text.adapters.registry import SftSource
from pipeline.text.preferences import PAIRS_SCHEMA, adapt_pairs, read_pairs

HH_FILE = Path("hf/datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz")
RASBT_PATH = (
    "raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "04_preference-tuning-with-dpo/instruction-data-with-preference.json"
)
RASBT_FIRST = "Evaluate the following phrase by transforming it into the spelling given."
LABELS = {"user": "Human", "assistant": "Assistant"}


def _hh_rows(mirror_dir: Path) -> list[dict[str, str]]:
    lines = gzip.decompress((mirror_dir / HH_FILE).read_bytes()).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _transcript(messages: list[dict[str, str]]) -> str:
    return "".join(f"\n\n{LABELS[m['role']]}: {m['content']}" for m in messages)


@pytest.mark.mirror
def test_hh_rlhf_transcripts_from_the_mirror(mirror_dir: Path) -> None:
    """Every real row parses into a prompt + two replies that rebuild its transcripts, or is
    refused with a reason; none is silently altered."""
    path = mirror_dir / HH_FILE
    raw = _hh_rows(mirror_dir)
    hh = SftSource(id="hh", adapter="hh_rlhf", licence="MIT", repo="Anthropic/hh-rlhf",
                   revision="main", patterns=("harmless-base/test.jsonl.gz",))  # fmt: skip
    pairs = adapt_pairs(hh, [path])
    assert pairs.height == len(raw) == 500
    reasons = dict(pairs.group_by("reason").len().iter_rows())
    assert reasons == {
        None: 489,
        # The model wrote the user's next line ("Assistant: Human: …"): turns are ambiguous.
        "malformed transcript: speaker label inside a turn (chosen)": 9,
        "malformed transcript: speaker label inside a turn (rejected)": 2,
    }
    parsed = 0
    for row, original in zip(pairs.iter_rows(named=True), raw, strict=True):
        if row["reason"] is not None:
            assert (row["chosen"], row["rejected"]) == (original["chosen"], original["rejected"])
            continue
        parsed += 1
        prompt = row["prompt"]
        roles = [m["role"] for m in prompt]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        for reply, side in ((row["chosen"], "chosen"), (row["rejected"], "rejected")):
            rebuilt = _transcript([*prompt, {"role": "assistant", "content": reply}])
            assert _squash(rebuilt) == _squash(original[side])
    assert parsed == 489
    first = pairs.row(0, named=True)
    assert first["prompt"][0] == {
        "role": "user",
        "content": "what are some pranks with a pen i can do?",
    }
    assert len(first["prompt"]) == 5 and first["chosen"].startswith("No, sorry!")
    assert first["rejected"].startswith("There are lots of funny things you can do with pens")
    # Row 86's chosen transcript ends in an empty Assistant turn: parsed, left to empty_reply.
    assert pairs.row(86, named=True)["chosen"] == ""


# ------------------------------------------------------------------------------ the asset
@pytest.fixture
def hub_server(
    mirror_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MirrorServer]:
    """The mirror server, with no user Hub cache, token or mirror variable leaking in."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for name in ("HF_TOKEN", "HF_ENDPOINT", "SCRIPTORIUM_FILES_MIRROR"):
        monkeypatch.delenv(name, raising=False)
    with MirrorServer(mirror_dir) as server:
        yield server


@pytest.fixture
def data(mirror_dir: Path, tmp_path: Path) -> Path:
    """A data root holding what ``bpe_tokenizer`` and ``eval_sets`` would leave: a small BPE
    trained on the preference texts themselves, and one evaluation prompt that is also a rasbt
    instruction."""
    texts = [
        r["instruction"] + "\n" + r["chosen"]
        for r in json.loads((mirror_dir / "files" / RASBT_PATH).read_text())
    ]
    texts += [r["chosen"] for r in _hh_rows(mirror_dir)]
    data = tmp_path / "data"
    (data / "bpe_tokenizer").mkdir(parents=True)
    train_bpe(texts, vocab_size=512).save(str(data / "bpe_tokenizer" / "tokenizer.json"))
    (data / "eval_sets").mkdir()
    pl.DataFrame({"eval_set": ["alpaca_eval"], "prompt": [RASBT_FIRST]}).write_parquet(
        data / "eval_sets" / "prompts.parquet"
    )
    return data


def _profile(tmp_path: Path, **preference: object) -> Profile:
    """A profile file (a path is a valid ``Profile`` name) with this ``preference:`` section."""
    path = tmp_path / "profile.yaml"
    profile = {"name": "test", "vocab_size": 512, "context_length": 128, "seed": 3}
    path.write_text(yaml.safe_dump({**profile, "preference": preference}))
    return Profile(name=str(path))


def _materialize(data: Path, profile: Profile, server: MirrorServer) -> dg.ExecuteInProcessResult:
    resources = {
        "paths": Paths(data_root=str(data)),
        "profile": profile,
        "hub": HubSource(endpoint=server.url, files_mirror=f"{server.url}/files"),
    }
    with dg.instance_for_test() as instance:
        return dg.materialize(
            [preference_pairs], resources=resources, instance=instance, raise_on_error=False
        )


@pytest.mark.mirror
def test_preference_pairs_materialises_from_the_mirror(
    hub_server: MirrorServer, data: Path, tmp_path: Path
) -> None:
    profile = _profile(tmp_path, val_fraction=0.2, max_pairs_per_source=60, decontaminate=True)
    result = _materialize(data, profile, hub_server)
    assert result.success
    [mat] = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in mat.materialization.metadata.items()}
    assert meta["pairs_in"] == 500 + 300 + 1100
    assert meta["train_pairs"] + meta["val_pairs"] + meta["rejected"] == meta["pairs_in"]
    per_source = meta["pairs_per_source"]
    assert set(per_source) == {"hh_rlhf_harmless", "dpo_en_zh", "rasbt_preference"}
    assert per_source["rasbt_preference"]["train"] + per_source["rasbt_preference"]["val"] == 60
    assert all(0 < s["train"] + s["val"] <= 60 for s in per_source.values())
    reasons = meta["rejected_by_reason"]
    assert reasons["contaminated:alpaca_eval"] == 1  # the rasbt row that is the eval prompt
    assert reasons["too_long"] > 0 and reasons["over_cap"] > 0
    assert reasons["malformed transcript: speaker label inside a turn (chosen)"] == 9
    assert meta["licences"] == {
        "hh_rlhf_harmless": "MIT", "dpo_en_zh": "Apache-2.0", "rasbt_preference": "Apache-2.0"
    }  # fmt: skip
    assert "| rasbt_preference | 1100 |" in meta["per_source"]
    assert meta["max_tokens"] == 128
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "preference_pairs_valid" and check.passed

    out = data / "preference_pairs"
    train = read_pairs(out / "train.parquet")
    val = pl.read_parquet(out / "val.parquet")
    assert len(train) == meta["train_pairs"] and val.height == meta["val_pairs"] > 0
    assert val.schema == PAIRS_SCHEMA
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in train)
    assert not {json.dumps(p.prompt) for p in train} & {
        json.dumps(p) for p in val["prompt"].to_list()
    }
    rejects = pl.read_parquet(out / "rejects.parquet")
    assert rejects.height == meta["rejected"]
    assert rejects.columns == ["source", "pair_id", "reason", "prompt_json", "chosen", "rejected"]
    assert json.loads((out / "stats.json").read_text())["totals"]["pairs_in"] == 1900
    # Exactly the three sources' files were fetched, through their own download paths.
    fetched = [
        p
        for p in hub_server.faults.requested_paths("GET")
        if "/resolve/" in p or p.startswith("/files/")
    ]
    assert sorted(p.rsplit("/", 1)[-1] for p in fetched) == [
        "dpo_en.json", "instruction-data-with-preference.json", "test.jsonl.gz"
    ]  # fmt: skip
    assert f"/files/{RASBT_PATH}" in fetched


@pytest.mark.mirror
def test_blocking_check_fails_when_no_pair_fits(
    hub_server: MirrorServer, data: Path, tmp_path: Path
) -> None:
    """Pairs that cannot fit the context leave train empty: the check fails and the step fails."""
    result = _materialize(data, _profile(tmp_path, max_tokens=4, decontaminate=False), hub_server)
    assert not result.success
    [check] = result.get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["problems"].value == ["train is empty"]
