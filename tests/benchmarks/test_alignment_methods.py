"""benchmarks/alignment_methods.py on a tiny data root: one method into ``rlhf/<method>`` and one
pooling into ``reward_pooling/<pooling>``, read back into the table and the last-line JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks import alignment_methods as bench
from llm_core.checkpoint import load_weights
from llm_core.reward import RewardModel, save_reward_model
from tests.llm_core.training_helpers import chat_tokenizer, save_tiny_lm
from tests.pipeline.assets.test_alignment_assets import PROFILE, _pairs_file


def test_methods_and_poolings_on_a_tiny_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    tok = chat_tokenizer()
    (data / "bpe_tokenizer").mkdir(parents=True)
    tok.save(str(data / "bpe_tokenizer" / "tokenizer.json"))
    save_tiny_lm(data / "sft_weights", tok.get_vocab_size())
    _pairs_file(data / "preference_pairs" / "train.parquet", 40, seed=1)
    _pairs_file(data / "preference_pairs" / "val.parquet", 12, seed=2)
    save_reward_model(RewardModel(load_weights(data / "sft_weights")), data / "reward_model")
    (data / "reward_model" / "metrics.json").write_text(json.dumps({"steps": 0}))
    profile = {**PROFILE, "reward_train": {**PROFILE["reward_train"], "eval_batches": 2}}
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("SCRIPTORIUM_DATA", str(data))
    argv = ["--profile", str(tmp_path / "profile.yaml"), "--methods", "weighted",
            "--poolings", "eos", "existing", "--pooling-steps", "2", "--threads", "1"]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    [method] = result["methods"]
    assert method["method"] == "weighted" and method["steps"] == 3 and method["n"] == 6
    assert method["reply_tokens_mean"] >= 0 and method["wall_time_s"] > 0
    lo, hi = method["ci95"]
    assert 0 <= lo <= method["win_rate"] <= hi <= 1
    assert (data / "rlhf" / "weighted" / "model.safetensors").is_file()
    eos, existing = result["poolings"]
    assert eos["pooling"] == "eos" and eos["steps"] == 2 and eos["pairs"] == 12
    assert existing["pooling"] == "last" and existing["wall_time_s"] is None
    assert existing["source"] == "the data root's reward_model"
    assert 0 <= eos["ece"] <= 1 and (data / "reward_pooling" / "eos" / "reliability.png").is_file()
    assert out[0].startswith("weighted ") and result["machine_before"]["cpu_model"]
