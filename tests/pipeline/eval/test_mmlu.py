"""MMLU: the headerless CSVs load (bad rows refused with a reason), examples never include the
scored question, and scoring picks the letter a model with rigged logits points at, through the
plain and the chat template, at 0 and k shots, with examples dropped to fit a short window."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llm_core.tokenizer import train_bpe
from pipeline.eval.mmlu import LETTERS, base_prompt, draw_shots, load_mmlu, mmlu_scores
from pipeline.eval.sets import set_files
from tests.pipeline.eval.eval_fixtures import write_mmlu


class RiggedLM(nn.Module):
    """Logits of 0 everywhere except +10 on the letter that the last "key X" of the input
    names, shifted by ``shift`` letters (``shift=1``: always wrong)."""

    def __init__(self, tok: object, letter_ids: list[int], window: int, shift: int = 0) -> None:
        super().__init__()
        self.tok, self.letter_ids, self.shift = tok, letter_ids, shift
        self.config = SimpleNamespace(context_length=window)
        self.unused = nn.Parameter(torch.zeros(1))  # where the scorer finds the device
        self.vocab = tok.get_vocab_size()  # type: ignore[attr-defined]

    def forward(self, idx: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        out = torch.zeros(idx.shape[0], idx.shape[1], self.vocab)
        for b, row in enumerate(idx.tolist()):
            text = self.tok.decode(row, skip_special_tokens=True)  # type: ignore[attr-defined]
            key = re.findall(r"key ([A-D])", text)[-1]
            out[b, :, self.letter_ids[(LETTERS.index(key) + self.shift) % 4]] = 10.0
        return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> object:
    root = tmp_path_factory.mktemp("mmlu")
    write_mmlu(root / "eval_sets")
    return load_mmlu(set_files(root / "eval_sets", "mmlu"), 10, seed=3)


@pytest.fixture(scope="module")
def tok(loaded: object) -> object:
    texts = [
        base_prompt(r["subject"], [], r) + f" {r['answer']}"
        for r in loaded.pool.iter_rows(named=True)
    ]  # type: ignore[attr-defined]
    tok = train_bpe(texts * 20 + ["Answer: A B C D"] * 50, vocab_size=400, min_frequency=1)
    for spelled in (" A", " B", " C", " D", "A", "B", "C", "D"):
        assert len(tok.encode(spelled, add_special_tokens=False).ids) == 1, spelled
    return tok


def test_load_refuses_bad_rows_and_keeps_quoted_fields(loaded: object) -> None:
    assert loaded.available == 7 and loaded.items.height == 7  # type: ignore[attr-defined]
    rejects = loaded.rejects  # type: ignore[attr-defined]
    assert sorted(rejects["reason"].to_list()) == [
        "answer is not one of A, B, C, D",
        "empty question",
    ]
    assert set(rejects["item"]) == {"astronomy_test.csv:4", "virology_test.csv:3"}
    row = loaded.items.filter(loaded.items["A"] == "fusion").row(0, named=True)  # type: ignore[attr-defined]
    assert row["question"] == 'Stars shine by "fusion", key A?' and row["subject"] == "astronomy"


def test_examples_come_from_the_same_subject_never_the_scored_question(loaded: object) -> None:
    pool = loaded.pool  # type: ignore[attr-defined]
    for row in pool.iter_rows(named=True):
        shots = draw_shots(pool, row, 5, seed=3)
        assert len(shots) == 3 if row["subject"] == "astronomy" else len(shots) == 2
        assert all(s["subject"] == row["subject"] and s["item"] != row["item"] for s in shots)
        assert shots == draw_shots(pool, row, 5, seed=3)  # the same for every stage and rerun


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("shots", [0, 2])
def test_rigged_logits_pick_the_right_letter(
    loaded: object, tok: object, chat: bool, shots: int
) -> None:
    spelled = list(LETTERS) if chat else [f" {x}" for x in LETTERS]
    letter_ids = [tok.encode(s, add_special_tokens=False).ids[0] for s in spelled]  # type: ignore[attr-defined]
    right = RiggedLM(tok, letter_ids, window=1024)
    result = mmlu_scores(right, tok, loaded, shots=shots, chat=chat, batch_size=3, seed=3)  # type: ignore[arg-type]
    assert result["accuracy"] == 1.0 and result["macro_accuracy"] == 1.0
    assert result["n"] == 7 and result["subjects"] == 2 and result["chance"] == 0.25
    assert result["mean_shots_kept"] == shots and result["truncated"] == 0
    # the answers' own letter counts: A 2, B 2, C 2, D 1
    assert result["picked"] == {"A": 2, "B": 2, "C": 2, "D": 1}
    lo, hi = result["macro_ci95"]
    assert 0.0 < lo < 1.0 == hi
    wrong = RiggedLM(tok, letter_ids, window=1024, shift=1)
    result = mmlu_scores(wrong, tok, loaded, shots=shots, chat=chat, batch_size=3, seed=3)  # type: ignore[arg-type]
    assert result["accuracy"] == 0.0
    assert result["per_subject"]["virology"] == {
        "accuracy": 0.0,
        "correct": 0,
        "n": 3,
        "ci95": result["per_subject"]["virology"]["ci95"],
    }


def test_examples_are_dropped_until_the_prompt_fits_the_window(loaded: object, tok: object) -> None:
    letter_ids = [tok.encode(f" {x}", add_special_tokens=False).ids[0] for x in LETTERS]  # type: ignore[attr-defined]
    lengths = [
        len(tok.encode(base_prompt(r["subject"], [], r), add_special_tokens=False).ids)  # type: ignore[attr-defined]
        for r in loaded.items.iter_rows(named=True)  # type: ignore[attr-defined]
    ]
    window = max(lengths) + 5  # every question fits alone, hardly any with an example
    model = RiggedLM(tok, letter_ids, window=window)
    result = mmlu_scores(model, tok, loaded, shots=2, chat=False, batch_size=4, seed=3)  # type: ignore[arg-type]
    assert result["truncated"] == 0 and result["accuracy"] == 1.0
    assert result["mean_shots_kept"] < 1.0 and result["shots"] == 2
