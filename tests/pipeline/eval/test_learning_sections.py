"""The evaluation report's sections for the learning profiles (pipeline.eval.epochs and
pipeline.eval.questions): loss per epoch from a run's metrics, and the toy questions' table."""

from __future__ import annotations

import math

from pipeline.eval.epochs import epoch_rows, epoch_table
from pipeline.eval.questions import question_table, questions
from pipeline.eval.report import md_table


def test_epoch_rows_average_the_train_loss_between_evaluations() -> None:
    metrics = {
        "train_config": {"batch_size": 2, "grad_accum": 1},
        "model_config": {"context_length": 10},
        "history": [{"step": s, "loss": float(10 - s)} for s in range(1, 7)],
        "eval_history": [{"step": 3, "val_loss": 8.5}, {"step": 6, "val_loss": 8.0}],
    }
    rows = epoch_rows(metrics, train_tokens=60)  # 20 tokens a step: an epoch is 3 steps
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert [r["train_loss"] for r in rows] == [8.0, 5.0]  # mean of 9,8,7 then of 6,5,4
    assert [r["val_loss"] for r in rows] == [8.5, 8.0]
    table = epoch_table(
        {"pretrain_epochs": {"train_tokens": 60, "rows": rows, "continuations": {}}}
    )
    assert table is not None and "| 6 | 2.00 | 5.000 | 8.000 |" in md_table(*table)
    assert epoch_table({}) is None
    assert math.isnan(epoch_rows({**metrics, "history": []}, 60)[0]["train_loss"])


def test_questions_table_marks_the_preferred_answers() -> None:
    profile = {
        "preference": {
            "pairs": [
                {"user": "does the cat like milk ?", "chosen": "yes .", "rejected": "no ."},
                {"user": "does the cat like milk ?", "chosen": "yes .", "rejected": "yes , it"},
            ]
        }
    }
    items = questions(profile)
    assert items == [
        {"question": "does the cat like milk ?", "chosen": "yes .", "rejected": "no ."}
    ]
    report = {
        "questions": {
            "items": items,
            "stages": {
                "sft": [{"answer": "yes , it does .", "margin": -3.0}],
                "rlhf": [{"answer": "yes .", "margin": 4.25}],
            },
        }
    }
    table = question_table(report)
    assert table is not None
    md = md_table(*table)
    assert (
        "| does the cat like milk ? | yes . | yes , it does . | **yes .** | -3.00 | +4.25 |" in md
    )
    assert question_table({}) is None
    report["questions"]["stages"]["sft"][0]["answer"] = "yes | no\n."
    table = question_table(report)
    assert table is not None and "| yes \\| no . |" in md_table(*table)  # one cell, one row
