"""Ranked preference files: a file built by the RRHF recipe from the mirror's pairs (the rasbt
preference file, through its real adapter) plus samples of a policy scored by a real reward
model, then checked row by row with hand-made bad rows beside it."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from llm_core.checkpoint import load_weights
from llm_core.ranking import NO_RESPONSE, Ranked
from llm_core.reward import RewardModel, save_reward_model
from llm_core.sft import ChatSpecials
from llm_core.stages import rrhf
from llm_core.stages.ranked import build_ranked
from pipeline.text.adapters.registry import SftSource
from pipeline.text.preferences import adapt_pairs
from pipeline.text.ranked import pairs_as_ranked, read_ranked_source, sort_ranked, write_ranked
from tests.llm_core.stages.helpers import write_pairs, write_tokenizer
from tests.llm_core.training_helpers import chat_tokenizer, save_tiny_lm, tiny_train_config

RASBT_PATH = Path(
    "files/raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
    "04_preference-tuning-with-dpo/instruction-data-with-preference.json"
)


@pytest.fixture(scope="module")
def mirror_ranked(mirror_dir: Path, tmp_path_factory) -> tuple[Ranked, list, Path]:
    """The first 6 rasbt pairs as ranked groups: each pair's two replies and 2 samples of a
    tiny policy, all scored by a tiny (untrained, real) reward model loaded from disk."""
    root = tmp_path_factory.mktemp("ranked")
    source = SftSource(id="rasbt_preference", adapter="alpaca_preference", licence="Apache-2.0",
                       url="https://example.invalid/x.json")  # fmt: skip
    pairs = adapt_pairs(source, [mirror_dir / RASBT_PATH]).filter(pl.col("reason").is_null())
    rows = pairs.head(6).select("prompt", "chosen", "rejected").to_dicts()
    tok = chat_tokenizer()
    policy_dir = save_tiny_lm(root / "sft", tok.get_vocab_size(), ctx=128)
    sp = ChatSpecials.from_tokenizer(tok)
    rm = RewardModel(load_weights(policy_dir), "eos", (sp.end, sp.eot), sp.assistant)
    save_reward_model(rm, root / "rm")
    config = rrhf.Config(
        out_dir=root / "out",
        train=tiny_train_config(),
        train_path=write_pairs(root / "pairs" / "train.parquet", rows),
        val_path=write_pairs(root / "pairs" / "val.parquet", rows[:2]),
        init_weights=policy_dir,
        tokenizer=write_tokenizer(tok, root / "tok.json"),
        reward_model=root / "rm",
        samples=2,
        max_new_tokens=6,
    )
    ranked, rejects = build_ranked(
        config, "train", config.reward_fn(), load_weights(policy_dir), tok
    )
    return ranked, rows, root


def test_the_rrhf_recipe_builds_ranked_groups_from_the_mirror(mirror_ranked) -> None:
    ranked, rows, _ = mirror_ranked
    assert len(ranked) == 6 and ranked.prompts == [r["prompt"] for r in rows]
    for group, row, scores in zip(ranked.responses, rows, ranked.scores, strict=True):
        assert group[:2] == [row["chosen"], row["rejected"]]  # the pair's own replies first
        assert 3 <= len(group) <= 4 and len(scores) == len(group)  # + the non-empty samples
        assert len(set(scores)) > 1


def test_ranked_file_keeps_good_rows_and_rejects_bad_ones_with_reasons(
    mirror_ranked, tmp_path: Path
) -> None:
    ranked, _, _ = mirror_ranked
    good = ranked.records()
    k = max(len(r["text"]) for r in good)
    padded = [  # the source schema: every list k long, padded with -100
        {**r, "text": r["text"] + [""] * (k - len(r["text"])),
         "score": r["score"] + [NO_RESPONSE] * (k - len(r["score"]))}
        for r in good
    ]  # fmt: skip
    prompt = good[0]["prompt"]
    bad = [
        {"prompt": prompt, "text": ["a", "b", "c"], "score": [1.0, 0.0]},
        {"prompt": prompt, "text": ["a", "b"], "score": [0.5, 0.5]},
        {"prompt": prompt, "text": ["a", "  "], "score": [1.0, 0.0]},
        {"prompt": prompt, "text": ["a", ""], "score": [2.0, NO_RESPONSE]},
        {"prompt": [{"role": "assistant", "content": "hi"}], "text": ["a", "b"], "score": [1, 0]},
        {"prompt": "A plain-string prompt.", "text": ["yes", "no", ""], "score": [3, 1, -100]},
    ]
    path = tmp_path / "ranked.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*padded, *bad]) + "\n")
    stats = write_ranked(read_ranked_source(path), tmp_path / "out", "train")
    assert stats["reasons"] == {
        "length_mismatch": 1,
        "all_equal_scores": 1,
        "empty_text": 1,
        "too_few_responses": 1,
        "bad_prompt": 1,
    }
    assert stats["rows"] == len(good) + 1 and stats["responses_min"] == 2
    back = Ranked.read_parquet(tmp_path / "out" / "train.parquet")
    assert back.responses[: len(good)] == ranked.responses  # padding slots dropped
    assert back.prompts[-1] == [{"role": "user", "content": "A plain-string prompt."}]
    rejects = pl.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert rejects["row"].to_list() == list(range(len(good), len(good) + 5))


def test_pairs_are_the_k2_case() -> None:
    pair = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "Go."}
    ranked, rejects = sort_ranked(pairs_as_ranked([pair, {**pair, "rejected": ""}]))
    assert ranked.responses == [["Hello.", "Go."]] and ranked.scores == [[1.0, 0.0]]
    assert rejects["reason"].to_list() == ["empty_text"]
