"""Small evaluation sets in the layout the ``eval_sets`` asset keeps (``<id>/files/...``), with
the columns of the real files, plus one broken record per set that the loaders must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

BLIMP = {
    "anaphor_gender_agreement": [
        ("Mary admired herself.", "Mary admired himself."),
        ("The king praised himself.", "The king praised herself."),
        ("Anna hurt herself.", "Anna hurt himself."),
        ("The girl saw herself.", "The girl saw itself."),
        ("", "A broken pair."),  # refused: empty sentence
    ],
    "determiner_noun_agreement_1": [
        ("This ship sails.", "These ship sails."),
        ("Those trees grow.", "That trees grow."),
        ("This river flows.", "This river flows."),  # refused: identical
        ("These stones fall.", "This stones fall."),
    ],
}
LAMBADA = [
    "The old man walked down to the sea and looked at the boat",
    "She opened the door of the little house and saw the garden",
    "He ate the bread and drank the water from the river",
    "They sailed the ship across the sea to the island of the king",
    "word",  # refused: no context
]
GSM8K = [
    ("Tom has 3 apples and buys 5 more. How many apples does he have?", "3+5=8\n#### 8"),
    ("A box holds 12 eggs. How many eggs are in 2 boxes?", "12*2=24\n#### 24"),
    ("Sam had 10 coins and lost 4. How many are left?", "10-4=6\n#### 6"),
    ("What is the answer?", "no final line"),  # refused: no '####'
]
ALPACA = [
    "What is the biggest animal in the world?",
    "Give three tips for staying healthy.",
    "Write a short poem about the sea.",
    "Name a famous river.",
    "   ",  # refused: blank
]


# Each question names its correct letter ("key C") so a rigged model can find it in its input.
MMLU = {
    "astronomy": [
        ("Which planet is largest, key B?", "Mars", "Jupiter", "Venus", "Earth", "B"),
        ("What orbits the Earth, key D?", "Sun", "Mars", "Venus", "the Moon", "D"),
        ('Stars shine by "fusion", key A?', "fusion", "fission", "burning", "reflection", "A"),
        ("Light from the Sun takes, key C?", "1 s", "1 day", "8 minutes", "1 year", "C"),
        ("A broken row, key A?", "a", "b", "c", "d", "E"),  # refused: no such letter
    ],
    "virology": [
        ("A virus needs, key C?", "light", "soil", "a host cell", "salt", "C"),
        ("Vaccines train, key A?", "immunity", "muscles", "bones", "eyes", "A"),
        ("Influenza is, key B?", "a bacterium", "a virus", "a fungus", "a prion", "B"),
        ("", "a", "b", "c", "d", "A"),  # refused: empty question
    ],
}


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"') else text


def write_mmlu(eval_sets: Path) -> None:
    """``eval_sets/mmlu/files/<subject>_test.csv`` as the mirror holds them (no header)."""
    files = eval_sets / "mmlu" / "files"
    files.mkdir(parents=True)
    for subject, rows in MMLU.items():
        lines = [",".join(_csv_field(f) for f in row) for row in rows]
        (files / f"{subject}_test.csv").write_text("\n".join(lines) + "\n")


# HumanEval problems in the columns of openai_humaneval; the last one is refused (no test).
HUMANEVAL_PROMPT = '''def add(a: int, b: int) -> int:
    """Return a + b.
    >>> add(2, 3)
    5
    """
'''
HUMANEVAL = [
    ("HumanEval/0", HUMANEVAL_PROMPT, "    return a + b\n",
     "def check(candidate):\n    assert candidate(2, 3) == 5\n", "add"),
    ("HumanEval/1", "def neg(x: int) -> int:\n    \"\"\"Return -x.\"\"\"\n", "    return -x\n",
     "def check(candidate):\n    assert candidate(4) == -4\n", "neg"),
    ("HumanEval/2", "def f():\n    pass\n", "", "", "f"),
]  # fmt: skip


def write_humaneval(eval_sets: Path) -> None:
    d = eval_sets / "humaneval" / "files" / "openai_humaneval"
    d.mkdir(parents=True)
    cols = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    pl.DataFrame({c: [row[i] for row in HUMANEVAL] for i, c in enumerate(cols)}).write_parquet(
        d / "test-00000-of-00001.parquet"
    )


def write_eval_sets(root: Path) -> Path:
    """``root/eval_sets`` holding blimp, lambada, gsm8k_test, alpaca_eval, mmlu and humaneval
    files."""
    base = root / "eval_sets"
    for phenomenon, pairs in BLIMP.items():
        d = base / "blimp" / "files" / phenomenon
        d.mkdir(parents=True)
        pl.DataFrame(
            {
                "sentence_good": [g for g, _ in pairs],
                "sentence_bad": [b for _, b in pairs],
                "UID": [phenomenon] * len(pairs),
                "pair_id": list(range(len(pairs))),
            }
        ).write_parquet(d / "train-00000-of-00001.parquet")
    d = base / "lambada" / "files"
    d.mkdir(parents=True)
    (d / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    d = base / "gsm8k_test" / "files" / "main"
    d.mkdir(parents=True)
    pl.DataFrame(
        {"question": [q for q, _ in GSM8K], "answer": [a for _, a in GSM8K]}
    ).write_parquet(d / "test-00000-of-00001.parquet")
    d = base / "alpaca_eval" / "files"
    d.mkdir(parents=True)
    records = [
        {"dataset": "test", "instruction": t, "output": "-", "generator": "-"} for t in ALPACA
    ]
    (d / "alpaca_eval.json").write_text(json.dumps(records))
    write_mmlu(base)
    write_humaneval(base)
    return base
