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


def write_eval_sets(root: Path) -> Path:
    """``root/eval_sets`` holding blimp, lambada, gsm8k_test and alpaca_eval files."""
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
    return base
