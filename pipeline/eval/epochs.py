"""Pretraining loss per epoch and sampled continuations, for profiles that teach overfitting.

A one-story profile (``verdict``) trains for several passes over a few thousand tokens; what a
learner should see is train loss falling while val loss stops falling and turns back up. With
``report_epochs: true`` the evaluation report gains a table with one row per evaluation of the
pretraining run (``pretrain.eval_every``, set to about one epoch): the epoch reached, the mean
train loss since the previous row and the val loss, read from ``pretrained_weights/metrics.json``
and the shard manifest. ``continuation_prompts`` adds continuations the pretrained model samples
(the evaluation's ``temperature``/``top_k``/``seed``), as the book prints them after training.

Kept apart from :mod:`pipeline.eval.run` and :mod:`pipeline.eval.report`, like
:mod:`pipeline.eval.questions`; the Pipes child adds both to ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.artefacts import Artefacts


def epoch_rows(metrics: Mapping[str, Any], train_tokens: int) -> list[dict[str, float]]:
    """One row per evaluation: ``step``, ``epoch`` (tokens seen / train tokens), the mean train
    loss of the steps since the previous row, and ``val_loss``."""
    tc, mc = metrics["train_config"], metrics["model_config"]
    per_step = int(tc["batch_size"]) * int(tc.get("grad_accum", 1)) * int(mc["context_length"])
    losses = {int(h["step"]): float(h["loss"]) for h in metrics["history"] if "loss" in h}
    rows, previous = [], 0
    for ev in metrics["eval_history"]:
        step = int(ev["step"])
        window = [loss for s, loss in losses.items() if previous < s <= step]
        rows.append(
            {
                "step": step,
                "epoch": step * per_step / max(train_tokens, 1),
                "train_loss": sum(window) / len(window) if window else float("nan"),
                "val_loss": float(ev["val_loss"]),
            }
        )
        previous = step
    return rows


def add_epochs(
    report: dict[str, Any], root: str | Path, profile: Mapping[str, Any], device: str = "cpu"
) -> dict[str, Any]:
    """``report`` with a ``pretrain_epochs`` section when the profile asks (``report_epochs``)."""
    if not profile.get("report_epochs"):
        return report
    files = Artefacts(Path(root))
    weights = files.trained("pretrained_weights")
    if weights is None:
        return {**report, "pretrain_epochs": {"absent": "pretrained_weights is not materialised"}}
    metrics = json.loads(files.metrics("pretrained_weights").read_text())
    manifest = json.loads(files.existing(files.shards_manifest).read_text())
    train_tokens = int(manifest["splits"]["train"]["tokens"])
    section: dict[str, Any] = {
        "train_tokens": train_tokens,
        "rows": epoch_rows(metrics, train_tokens),
        "continuations": continuations(weights, files, profile, device),
    }
    return {**report, "pretrain_epochs": section}


def continuations(
    weights: Path, files: Artefacts, profile: Mapping[str, Any], device: str
) -> dict[str, str]:
    """The pretrained model's sampled continuation of each ``continuation_prompts`` entry."""
    prompts = [str(p) for p in profile.get("continuation_prompts") or []]
    if not prompts:
        return {}
    import torch

    from llm_core.checkpoint import load_weights
    from llm_core.generate import generate
    from llm_core.tokenizer import EOT, load_tokenizer
    from llm_core.trainer import resolve_device

    settings = dict(profile.get("evaluation") or {})
    tok = load_tokenizer(files.tokenizer_beside(weights))
    model = load_weights(weights, device=resolve_device(device)).eval()
    out = {}
    with torch.inference_mode():
        for prompt in prompts:
            ids = tok.encode(prompt, add_special_tokens=False).ids
            new = generate(
                model,
                ids[-model.config.context_length :],
                int(settings.get("max_new_tokens", 24)),
                temperature=float(settings.get("temperature", 0.7)),
                top_k=settings.get("top_k"),
                stop_ids=(tok.token_to_id(EOT),),
                seed=int(profile.get("seed", 0)),
            )[0]
            out[prompt] = tok.decode(new, skip_special_tokens=True)
    return out


def epoch_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Train and val loss per epoch as a table for both report formats (None without them)."""
    section = report.get("pretrain_epochs")
    if not section or "rows" not in section:
        return None
    rows = [
        [str(r["step"]), f"{r['epoch']:.2f}", f"{r['train_loss']:.3f}", f"{r['val_loss']:.3f}"]
        for r in section["rows"]
    ]
    return ["step", "epoch", "train loss", "val loss"], rows


def continuation_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The pretrained model's sampled continuations (None without them)."""
    section = report.get("pretrain_epochs") or {}
    if not section.get("continuations"):
        return None
    return ["prompt", "continuation"], [[p, t] for p, t in section["continuations"].items()]
