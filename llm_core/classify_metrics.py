"""Classification metrics: accuracy, balanced accuracy, per-class precision/recall/F1, the
confusion matrix, and how they are shown (a Markdown table, a PNG heat map).

Plain NumPy, so a metric is the same number in the trainer's evaluator, the stage's summary and
a test. Balanced accuracy (the mean per-class recall) is reported beside accuracy because the
natural SMS split is 87% ham: a model that always says ``ham`` has 87% accuracy and 50% balanced
accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """``cm[i, j]``: rows whose true label is ``i`` predicted as ``j``."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Loss (mean cross-entropy, nats), accuracy, balanced accuracy, macro F1, per-class
    precision/recall/F1/support and the confusion matrix of predictions ``argmax(probs)``.

    A class never predicted has precision 0 (not NaN), a class absent from ``y_true`` is left
    out of the balanced accuracy; an empty split raises, naming the problem.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if not len(y):
        raise ValueError("classification_metrics: no rows")
    if p.shape != (len(y), len(labels)):
        raise ValueError(f"probs shape {p.shape} != ({len(y)}, {len(labels)})")
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, len(labels))
    per_class: dict[str, dict[str, float]] = {}
    recalls = []
    for i, name in enumerate(labels):
        tp, predicted, support = cm[i, i], cm[:, i].sum(), cm[i, :].sum()
        precision = float(tp / predicted) if predicted else 0.0
        recall = float(tp / support) if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support),
        }
        if support:
            recalls.append(recall)
    nll = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))
    return {
        "loss": float(nll.mean()),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
        "rows": len(y),
    }


def per_class_markdown(metrics: dict[str, Any], title: str = "") -> str:
    """The per-class table and the confusion matrix as Markdown (Dagster metadata, the CLI)."""
    lines = [f"**{title}**" if title else ""]
    lines += [
        f"accuracy {metrics['accuracy']:.4f}, balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f}, {metrics['rows']} rows",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in metrics["per_class"].items():
        lines.append(
            f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | "
            f"{c['support']} |"
        )
    labels = metrics["labels"]
    lines += ["", "| true \\ predicted | " + " | ".join(labels) + " |"]
    lines.append("|---|" + "---:|" * len(labels))
    for name, row in zip(labels, metrics["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines).strip()


def confusion_png(metrics: dict[str, Any], path: str | Path, title: str) -> Path:
    """A heat map of the confusion matrix with its counts, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llm_core.data import atomic_write_bytes

    cm = np.asarray(metrics["confusion_matrix"])
    labels = metrics["labels"]
    size = 2.2 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    try:
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        top = cm.max() if cm.size else 0
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                color = "white" if top and cm[i, j] > top / 2 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color)
        fig.tight_layout()
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out
