"""What the exported model card says: training data and licences, stages, evaluation figures.

:func:`llm_core.hf_card.render_model_card` formats a card from a plain dict; this module fills
that dict from the project's own records, so the card states what the artefacts actually are:
the data configs (``configs/sft_sources.yaml``, ``configs/preference_sources.yaml`` when present),
each stage's ``metrics.json`` under the data root, and the headline figures of
``evaluation_report/report.json``. Plain Python (no Dagster), shared by the ``hf_export`` asset and
``scriptorium export``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from llm_core.config import configs_dir
from pipeline.artefacts import Artefacts
from pipeline.eval.report import headline

# Weights folder (asset key) -> the stage that produced it; each stage includes the ones before.
STAGES = ("pretrained_weights", "sft_weights", "rlhf_weights")
STAGE_NAMES = {"pretrained_weights": "pretrain", "sft_weights": "sft", "rlhf_weights": "rlhf"}
GUTENBERG = {
    "name": "Project Gutenberg books",
    "role": "pretraining",
    "licence": "public domain in the USA",
    "url": "https://www.gutenberg.org",
}


def stage_of(weights_dir: Path) -> str | None:
    """``sft_weights`` for ``.../sft_weights`` (and so on); None for a folder of another name."""
    return weights_dir.name if weights_dir.name in STAGES else None


def data_sources(path: Path, role: str) -> list[dict[str, str]]:
    """The ``sources`` of a data config as card rows (name, Hub id or URL, licence, role).

    Only lists what the file declares; validating it is the job of the stage that reads it.
    """
    if not path.is_file():
        return []
    doc = yaml.safe_load(path.read_text()) or {}
    rows = []
    for s in doc.get("sources") or []:
        row = {"name": str(s.get("id", "")), "role": role,
               "licence": str(s.get("licence") or s.get("license") or "unknown")}  # fmt: skip
        if s.get("repo"):
            row["id"] = str(s["repo"])
        elif s.get("url"):
            row["url"] = str(s["url"])
        rows.append(row)
    return rows


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def with_mixture_counts(
    rows: list[dict[str, str]], stats: Mapping[str, Any]
) -> list[dict[str, str]]:
    """SFT rows annotated with the conversations each source gave the mixture
    (``sft_mixture/stats.json``), dropping configured sources that gave none."""
    per_source = stats.get("sources")
    if not isinstance(per_source, Mapping):
        return rows
    out = []
    for row in rows:
        train = (per_source.get(row["name"]) or {}).get("train")
        if train:
            out.append({**row, "name": f"{row['name']} ({train} conversations)"})
    return out


def eval_figures(report: Mapping[str, Any]) -> dict[str, float]:
    """The headline figures of an ``evaluation_report/report.json`` (its ``headline`` mapping, as
    the evaluation writes it; recomputed from the report's sections when a report lacks it)."""
    figures = report.get("headline")
    if not isinstance(figures, Mapping):
        figures = headline(report)
    return {
        str(k): v
        for k, v in figures.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _stage_rows(files: Artefacts, stage: str) -> list[dict[str, str]]:
    """One row per stage up to ``stage``, with what its ``metrics.json`` says about the run."""
    rows = []
    for s in STAGES[: STAGES.index(stage) + 1]:
        m = _json(files.metrics(s))
        steps = f" ({m['steps']} steps)" if m.get("steps") else ""
        if s == "pretrained_weights":
            text = f"next-token prediction on Project Gutenberg books{steps}"
        elif s == "sft_weights":
            text = (
                f"supervised fine-tuning on the instruction mixture, assistant tokens only{steps}"
            )
        else:
            text = f"preference alignment, method {m.get('method', 'unknown')}{steps}"
        rows.append({"name": STAGE_NAMES[s], "description": text})
    return rows


def card_info(
    data_root: Path,
    stage: str | None,
    *,
    profile_name: str | None = None,
    base_model: str | None = None,
    licence: str | None = None,
) -> dict[str, Any]:
    """The model-card dict for weights produced by ``stage`` (an entry of :data:`STAGES`).

    ``stage=None`` (weights from elsewhere) lists no stages or data, only what is known. The
    default licence is conservative: ``cc-by-nc-4.0`` when any training source is
    non-commercial, else ``other`` (see the data table), unless ``licence`` is given.
    """
    files = Artefacts(data_root)
    datasets: list[dict[str, str]] = []
    stages: list[dict[str, str]] = []
    if stage is not None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
        stages = _stage_rows(files, stage)
        books = files.books
        n_books = pq.ParquetFile(books).metadata.num_rows if books.is_file() else None
        gutenberg = dict(GUTENBERG)
        if n_books:
            gutenberg["name"] += f" ({n_books} books)"
        datasets.append(gutenberg)
        if STAGES.index(stage) >= 1:
            sft = data_sources(configs_dir() / "sft_sources.yaml", "sft")
            datasets += with_mixture_counts(sft, _json(files.mixture_stats))
        if STAGES.index(stage) >= 2:
            datasets += data_sources(configs_dir() / "preference_sources.yaml", "preference")
    figures = eval_figures(_json(files.report))
    non_commercial = any("NC" in d["licence"].upper().split("-") for d in datasets)
    name = "-".join(p for p in ("scriptorium", profile_name, STAGE_NAMES.get(stage or "")) if p)
    card: dict[str, Any] = {
        "model_name": name,
        "license": licence or ("cc-by-nc-4.0" if non_commercial else "other"),
        "datasets": datasets,
        "stages": stages,
        "eval": figures,
        "tags": [t for t in ("chat" if stage in STAGES[1:] else "", profile_name or "") if t],
    }
    if base_model:
        card["base_model"] = base_model
    return card
