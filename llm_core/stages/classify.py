"""Classification fine-tuning: a language model plus linear heads, trained on labelled texts.

The single-task stage is Raschka's *LLMs from scratch* chapter 6, SMS spam: the pretrained
transformer, a bias-free linear head on a pooled hidden state (``last`` token by default), and
either the whole model or only the last ``train_blocks`` blocks, the final norm and the head
trained (the book trains one block). :mod:`llm_core.stages.classify_multi` is the same ``run()``
with more task inputs: one backbone, a dict of heads, trained jointly.

Each task input is a folder (``<task>_data``) holding ``labels.json`` (the label set, the splits
and the default one) and per split ``<split>/{train,val,test}.parquet`` (``text``, ``label``).
The stage trains on the chosen split of each task (``<task>_split``, e.g. the book's
``balanced`` SMS split), validates on its ``val``, and finally scores the ``test`` file of
*every* split of the task (so the spam model trained on the balanced split is also measured on
the natural, 87%-ham test split). ``init: random`` trains the same shape from random weights,
for measuring what pretraining is worth.

    python -m llm_core.stages.classify --profile tiny --spam-data data/sms_spam \
        --init-weights data/pretrained_weights --tokenizer data/bpe_tokenizer/tokenizer.json \
        --out /tmp/spam
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from llm_core.classify import (
    POOLINGS,
    ClassifierModel,
    Encoded,
    EvalSet,
    encode_texts,
    load_classifier,
    make_classify_evaluator,
    pad_id,
    predict,
    save_classifier,
)
from llm_core.classify_metrics import classification_metrics, confusion_png, per_class_markdown
from llm_core.data import atomic_write_bytes
from llm_core.model import Transformer
from llm_core.objectives import ClassifyObjective
from llm_core.stages.base import Markdown, StageConfig, StageResult, module_main
from llm_core.stages.session import fit_and_save, training_session

INITS = ("pretrained", "random")
LABELS_FILE = "labels.json"
END_TOKEN = "<|endoftext|>"
SPLIT_FILES = ("train", "val", "test")


@dataclass(frozen=True, kw_only=True)
class Config(StageConfig):
    """Profile section ``classify``: the single-task spam classifier."""

    SECTION = "classify"
    INPUTS = ("spam_data", "init_weights", "tokenizer")

    spam_data: Path
    init_weights: Path
    tokenizer: Path
    pooling: str = "last"  # last | mean | max: the hidden state(s) the heads read
    train_blocks: int = 1  # -1: the whole model; k >= 0: the last k blocks + final norm + heads
    init: str = "pretrained"  # pretrained | random (same shape, for the value of pretraining)
    max_tokens: int = 0  # a text's first tokens kept; 0: the model's context length
    end_token: bool = False  # append <|endoftext|> (a fixed position for `last` pooling)
    spam_split: str = ""  # balanced | natural; empty: the data's default (balanced)
    spam_weight: float = 1.0  # the task's weight in the joint loss

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"classify pooling {self.pooling!r} is not one of {list(POOLINGS)}")
        if self.init not in INITS:
            raise ValueError(f"classify init {self.init!r} is not one of {list(INITS)}")

    def tasks(self) -> list[str]:
        """The task names: every ``<task>_data`` input."""
        return [k.removesuffix("_data") for k in self.INPUTS if k.endswith("_data")]

    def task_dir(self, task: str) -> Path:
        return Path(getattr(self, f"{task}_data"))

    def split(self, task: str) -> str:
        """The split a task trains on: its ``<task>_split`` knob, else the data's default."""
        chosen = str(getattr(self, f"{task}_split", "") or "")
        info = read_labels(self.task_dir(task))
        split = chosen or str(info["default_split"])
        if split not in info["splits"]:
            raise ValueError(
                f"{self.task_dir(task)}: split {split!r} for task {task!r} is not one of "
                f"{info['splits']}"
            )
        return split

    def weight(self, task: str) -> float:
        return float(getattr(self, f"{task}_weight", 1.0))


def end_token_id(tok: Any) -> int:
    """The id of ``<|endoftext|>``, appended to every text (:attr:`Config.end_token`)."""
    i = tok.token_to_id(END_TOKEN)
    if i is None:
        raise ValueError(f"tokenizer has no {END_TOKEN} token to append (set end_token: false)")
    return int(i)


def read_labels(folder: Path) -> dict[str, Any]:
    """A task folder's ``labels.json`` (``labels``, ``splits``, ``default_split``), checked."""
    path = folder / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a classification data folder (no {LABELS_FILE})")
    info = json.loads(path.read_text())
    for key in ("labels", "splits", "default_split"):
        if key not in info:
            raise ValueError(f"{path}: missing key {key!r}")
    return info


def read_split(folder: Path, split: str, part: str) -> pl.DataFrame:
    """``<folder>/<split>/<part>.parquet`` with its ``text`` and ``label`` columns."""
    path = folder / split / f"{part}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing classification split")
    df = pl.read_parquet(path)
    missing = {"text", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    return df


def _encode(tok: Any, df: pl.DataFrame, labels: Sequence[str], n: int, end: int | None) -> Encoded:
    return encode_texts(tok, df["text"].to_list(), df["label"].to_list(), labels, n, end)


def _png_markdown(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"![{path.stem}](data:image/png;base64,{data})"


def test_metrics(
    config: Config, model: ClassifierModel, tok: Any, max_tokens: int, batch_size: int
) -> dict[str, dict[str, Any]]:
    """Every task's metrics on the ``test`` file of every one of its splits, plus a confusion
    matrix PNG per (task, split) in ``out_dir``; keyed ``<task>/<split>``."""
    pad = pad_id(tok)
    out = {}
    device = next(model.parameters()).device
    bf16 = config.train.dtype == "bfloat16"
    for task in config.tasks():
        folder, labels = config.task_dir(task), model.tasks[task]
        tests = {s: read_split(folder, s, "test") for s in read_labels(folder)["splits"]}
        # A text in several test splits (the balanced test rows are natural test rows) is
        # scored once.
        texts = pl.concat([df.select("text") for df in tests.values()]).unique(maintain_order=True)
        unlabelled = texts.with_columns(label=pl.lit(labels[0]))
        data = _encode(tok, unlabelled, labels, max_tokens, model.config.end_token)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            probs = predict(model, data, task, pad, batch_size)
        row = {t: i for i, t in enumerate(texts["text"].to_list())}
        for split, df in tests.items():
            if not df.height:
                continue
            y = np.asarray([labels.index(v) for v in df["label"].to_list()], dtype=np.int64)
            p = probs[[row[t] for t in df["text"].to_list()]]
            m = classification_metrics(y, p, labels)
            png = config.out_dir / f"confusion_{task}_{split}.png"
            confusion_png(m, png, f"{task}: {split} test split (trained on {config.split(task)})")
            out[f"{task}/{split}"] = {**m, "trained_split": split == config.split(task)}
    return out


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Per task and test split: accuracy, balanced accuracy, and for two-class tasks the F1 of
    the second (positive) label; the per-class tables and confusion matrices as Markdown."""
    out: dict[str, Any] = {
        "init": summary.get("init"),
        "pooling": summary.get("pooling"),
        "train_blocks": summary.get("train_blocks"),
        "trainable_params": summary.get("trainable_params"),
    }
    for key, m in summary.get("test", {}).items():
        name = key.replace("/", "_")
        out[f"{name}_test_accuracy"] = m["accuracy"]
        out[f"{name}_test_balanced_accuracy"] = m["balanced_accuracy"]
        if len(m["labels"]) == 2:
            positive = m["labels"][1]
            out[f"{name}_test_f1_{positive}"] = m["per_class"][positive]["f1"]
        out[f"{name}_test_table"] = Markdown(per_class_markdown(m, f"{key} test split"))
    for task, rows in summary.get("train_rows", {}).items():
        out[f"{task}_train_rows"] = rows
    return out


def examples(config: Config, n: int = 4) -> dict[str, str]:
    """Each head's prediction for the first validation texts of each task."""
    from llm_core.classify import classify_texts
    from llm_core.tokenizer import load_tokenizer

    model, tok = load_classifier(config.out_dir), load_tokenizer(config.tokenizer)
    out = {}
    for task in config.tasks():
        df = read_split(config.task_dir(task), config.split(task), "val").head(n)
        for text, label, pred in zip(
            df["text"], df["label"], classify_texts(model, tok, df["text"].to_list()), strict=True
        ):
            shown = ", ".join(f"{t}: {lab} ({p:.2f})" for t, (lab, p) in pred.items())
            out[text[:160]] = f"[{task} truth: {label}] {shown}"
    return out


def run(config: Config, callbacks: Sequence[Any] = ()) -> StageResult:
    """Fine-tune ``init_weights`` (or a random model of its shape) with one head per task; write
    ``model.safetensors``, ``config.json``, ``tokenizer.json``, ``metrics.json`` (with every test
    split's metrics) and a confusion-matrix PNG per task and test split into ``out_dir``."""
    cfg = config.train
    with training_session(config.init_weights, config.tokenizer, cfg.device, cfg.seed) as s:
        tok = s.tokenizer
        assert tok is not None
        backbone = s.model
        if config.init == "random":
            torch.manual_seed(cfg.seed)
            backbone = Transformer(backbone.config).to(s.info.device)
        max_tokens = min(config.max_tokens or 10**9, backbone.config.context_length)
        end = end_token_id(tok) if config.end_token else None
        pad = pad_id(tok)
        tasks = {t: tuple(read_labels(config.task_dir(t))["labels"]) for t in config.tasks()}
        train, val = {}, []
        for t, labels in tasks.items():
            folder, split = config.task_dir(t), config.split(t)
            train[t] = _encode(tok, read_split(folder, split, "train"), labels, max_tokens, end)
            v = _encode(tok, read_split(folder, split, "val"), labels, max_tokens, end)
            if len(v) and cfg.eval_batches > 0:
                val.append(EvalSet(t, v, pad, limit=cfg.eval_batches * cfg.batch_size))
        torch.manual_seed(cfg.seed)  # the heads' init
        model = ClassifierModel(backbone, tasks, config.pooling, end).to(s.info.device)
        model.freeze_all_but(config.train_blocks)
        from llm_core.classify import TaskSampler

        sampler = TaskSampler(
            train, cfg.batch_size, pad, seed=cfg.seed, rank=s.info.rank,
            world_size=s.info.world_size,
        )  # fmt: skip
        evaluator = make_classify_evaluator(val, cfg.batch_size) if val else None

        def save(m: nn.Module, o: Path) -> None:
            save_classifier(m, o)  # type: ignore[arg-type]
            atomic_write_bytes(o / "tokenizer.json", config.tokenizer.read_bytes())

        def summary(result: Any, before: dict[str, float]) -> dict[str, Any]:
            return {
                "method": "classify",
                "tasks": {t: list(v) for t, v in tasks.items()},
                "splits": {t: config.split(t) for t in tasks},
                "weights": {t: config.weight(t) for t in tasks},
                "init": config.init,
                "pooling": config.pooling,
                "end_token": end,
                "train_blocks": config.train_blocks,
                "trainable_params": model.trainable_params(),
                "max_tokens": max_tokens,
                "train_rows": {t: len(d) for t, d in train.items()},
                "truncated": {t: d.truncated for t, d in train.items()},
                "val_before": before,
                "test": test_metrics(config, model, tok, max_tokens, cfg.batch_size * 4),
                "model_config": model.config.to_dict(),
                "init_weights": str(config.init_weights),
            }

        fit = fit_and_save(
            model,
            ClassifyObjective({t: config.weight(t) for t in tasks}),
            cfg,
            sampler,
            info=s.info,
            out=config.out_dir,
            save=save,
            summary=summary,
            evaluator=evaluator,
            callbacks=callbacks,
            resume=config.resume,
        )
    result = StageResult(fit.train, config.out_dir, fit.summary, samples_key="predictions")
    if fit.summary:
        result.figures = figures(fit.summary)
        pngs = sorted(config.out_dir.glob("confusion_*.png"))
        for png in pngs:
            result.figures[png.stem] = Markdown(_png_markdown(png))
        result.metrics = {
            k: v
            for k, v in result.figures.items()
            if isinstance(v, float) and not isinstance(v, bool)
        }
        evaluation = config.out_dir / "evaluation.json"
        atomic_write_bytes(evaluation, json.dumps(fit.summary["test"], indent=2).encode())
        result.artifacts = [*pngs, evaluation]
        result.samples = examples(config)
    return result


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
