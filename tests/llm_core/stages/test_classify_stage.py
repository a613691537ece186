"""The ``classify`` and ``classify_multi`` stages end to end on files: a tiny backbone learns a
spam rule and a "language" rule jointly, the test splits are scored, the confusion matrices and
the model land in a real MLflow store and the model is registered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tokenizers import Tokenizer

from llm_core.classify import load_classifier
from llm_core.config import TrainConfig
from llm_core.stages import classify, classify_multi
from llm_core.stages.base import Tracking, execute
from tests.llm_core.stages.helpers import write_tokenizer
from tests.llm_core.training_helpers import MARKER, WORDS, save_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")
FIRST, SECOND = WORDS[:12], WORDS[12:]


def _write_task(
    folder: Path, rows: dict[str, dict[str, list[tuple[str, str]]]], labels: list[str]
) -> Path:
    for split, parts in rows.items():
        for part, items in parts.items():
            (folder / split).mkdir(parents=True, exist_ok=True)
            pl.DataFrame(items, schema=["text", "label"], orient="row").write_parquet(
                folder / split / f"{part}.parquet"
            )
    info = {"labels": labels, "splits": list(rows), "default_split": next(iter(rows))}
    (folder / "labels.json").write_text(json.dumps(info))
    return folder


def _spam_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = list(rng.choice(WORDS, 4))
        if i % 2:
            words.insert(int(rng.integers(0, 5)), MARKER)
        out.append((" ".join(words), "spam" if i % 2 else "ham"))
    return out


def _lang_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [
        (" ".join(rng.choice(FIRST if i % 2 else SECOND, 4)), "de" if i % 2 else "en")
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, chat_tok: Tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classify")
    spam = {
        "balanced": {
            "train": _spam_rows(256, 0),
            "val": _spam_rows(16, 1),
            "test": _spam_rows(20, 2),
        },
        "natural": {"train": _spam_rows(8, 3), "val": _spam_rows(4, 4), "test": _spam_rows(30, 5)},
    }
    lang = {
        "by_book": {"train": _lang_rows(64, 6), "val": _lang_rows(16, 7), "test": _lang_rows(20, 8)}
    }
    return {
        "spam_data": _write_task(root / "sms_spam", spam, ["ham", "spam"]),
        "language_data": _write_task(root / "language", lang, ["de", "en"]),
        "init_weights": save_tiny_lm(root / "lm", chat_tok.get_vocab_size(), ctx=32),
        "tokenizer": write_tokenizer(chat_tok, root / "tok.json"),
    }


def _train(**over: object) -> TrainConfig:
    base = dict(steps=80, batch_size=8, lr=5e-3, warmup_steps=2, eval_every=40, eval_batches=2,
                checkpoint_every=40, log_every=10, weight_decay=0.0, device="cpu")  # fmt: skip
    return TrainConfig.from_dict({**base, **over})


def test_multi_task_run_learns_both_heads_and_is_tracked(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    config = classify_multi.Config(
        out_dir=tmp_path / "out",
        train=_train(),
        train_blocks=-1,
        language_weight=0.5,
        **inputs,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result, tracked = execute(
        classify_multi, config, Tracking(uri=uri, registered_model="scriptorium-test-clf")
    )
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(summary["test"]) == {"spam/balanced", "spam/natural", "language/by_book"}
    assert summary["test"]["spam/balanced"]["trained_split"] is True
    assert summary["test"]["spam/natural"]["trained_split"] is False
    for key in ("spam/balanced", "spam/natural", "language/by_book"):
        assert summary["test"][key]["accuracy"] >= 0.9, (key, summary["test"][key])
    assert summary["weights"] == {"spam": 1.0, "language": 0.5}
    figures = result.figures
    assert figures["spam_balanced_test_f1_spam"] >= 0.9
    assert "| spam |" in figures["spam_natural_test_table"]
    assert figures["confusion_language_by_book"].startswith(
        "![confusion_language_by_book](data:image/png"
    )
    model = load_classifier(tmp_path / "out")
    assert set(model.tasks) == {"spam", "language"}
    # MLflow: final metrics, the evaluation files and the registered version.
    assert tracked is not None and tracked.registered == "scriptorium-test-clf v1"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracked.run_id)
    assert run.data.metrics["spam_natural_test_accuracy"] >= 0.9
    files = {a.path for a in client.list_artifacts(tracked.run_id, "evaluation")}
    assert {"evaluation/confusion_spam_natural.png", "evaluation/evaluation.json"} <= files
    assert len(result.samples) == 8  # 4 validation texts per task


def test_single_task_from_random_init_and_bad_split(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    spam_inputs = {k: v for k, v in inputs.items() if k != "language_data"}
    config = classify.Config(
        out_dir=tmp_path / "rand", train=_train(steps=4, eval_every=4), init="random",
        pooling="max", train_blocks=0, spam_split="natural", **spam_inputs,
    )  # fmt: skip
    result = classify.run(config)
    assert result.summary["init"] == "random" and result.summary["splits"] == {"spam": "natural"}
    model = load_classifier(tmp_path / "rand")
    assert list(model.tasks) == ["spam"] and model.config.pooling == "max"
    # train_blocks=0: only the final norm and the head train.
    assert result.summary["trainable_params"] == 32 + 2 * 32
    bad = classify.Config(
        out_dir=tmp_path / "bad", train=_train(), spam_split="nope", **spam_inputs
    )
    with pytest.raises(ValueError, match="split 'nope' for task 'spam' is not one of"):
        classify.run(bad)
    with pytest.raises(ValueError, match="classify init 'imagenet'"):
        classify.Config(out_dir=tmp_path, train=_train(), init="imagenet", **spam_inputs)
