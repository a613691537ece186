"""The toy profile end to end: one ``dagster asset materialize --select '*'`` shared by every test
here (and by the playground notebook, which reads its artefacts).

The run is the real ``dagster`` CLI on ``configs/profiles/toy.yaml`` with its own sqlite Dagster
instance and MLflow store in a temp dir; steps run in one process (``in_process`` executor), so
the graph's cost is what its assets do. It fetches nothing: the corpus, the SFT examples and the
preference pairs are written in the profile, and the profile turns the Hub sources, benchmarks and
classifiers off. The lesson it must show: SFT answers every toy question (the long way its
examples answer), and alignment gives the preferred short answer where SFT did not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).parent / "dagster"
IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'

pytestmark = [pytest.mark.slow]


class ToyRun(NamedTuple):
    data: Path
    log: str
    seconds: float


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> ToyRun:
    """The toy profile's whole graph, run once for this module."""
    root = tmp_path_factory.mktemp("toy")
    (root / "home").mkdir()
    env = {
        **os.environ,
        "SCRIPTORIUM_PROFILE": "toy",
        "SCRIPTORIUM_DATA": str(root / "data"),
        "DAGSTER_HOME": str(root / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
    }
    for key in ("GUTENBERG_MIRROR", "HF_ENDPOINT", "SCRIPTORIUM_FILES_MIRROR"):
        env.pop(key, None)  # the toy run must need no source at all
    cmd = [str(DAGSTER), "asset", "materialize", "-m", "pipeline.definitions", "--select", "*"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--config-json", IN_PROCESS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return ToyRun(root / "data", log, seconds)


def test_every_asset_and_the_text_source(toy_run: ToyRun) -> None:
    for key in ("pretrained_weights", "sft_weights", "reward_model", "rlhf_weights"):
        assert (toy_run.data / key).is_dir(), key
    assert "STEP_FAILURE" not in toy_run.log
    assert not (toy_run.data / "hf_export").exists()  # skip_groups: [classification, export]
    books = pl.read_parquet(toy_run.data / "cleaned_books" / "books.parquet")
    assert books["source"].to_list() == ["toy"] and books["id"].to_list() == [-1]
    assert "the cat likes milk ." in books["text"][0]
    rejects = pl.read_parquet(toy_run.data / "cleaned_books" / "rejects.parquet")
    assert rejects.columns == ["id", "reason", "detail", "source"]
    # Nothing was fetched: no Gutenberg book, no Hub source, no benchmark file.
    assert not any((toy_run.data / "gutenberg_books").glob("books/*"))
    assert not (toy_run.data / "sft_sources").exists()
    assert pl.read_parquet(toy_run.data / "eval_sets" / "prompts.parquet").height == 0


def test_word_tokenizer_is_readable(toy_run: ToyRun) -> None:
    from llm_core.tokenizer import UNK, load_tokenizer, tokenizer_kind

    tok = load_tokenizer(toy_run.data / "bpe_tokenizer" / "tokenizer.json")
    assert tokenizer_kind(tok) == "word"
    enc = tok.encode("does the cat like milk ?", add_special_tokens=False)
    assert enc.tokens == ["does", "the", "cat", "like", "milk", "?"]
    assert tok.encode("the cat likes jazz", add_special_tokens=False).tokens[-1] == UNK
    assert tok.get_vocab_size() < 40  # the corpus's words, the specials and <|unk|>
    manifest = json.loads((toy_run.data / "token_shards" / "manifest.json").read_text())
    assert manifest["val_char_fraction"] == 0.2 and manifest["splits"]["val"]["tokens"] > 0


def test_alignment_effect(toy_run: ToyRun) -> None:
    """SFT answers each toy question; the aligned model gives the preferred answer where SFT did
    not, or (where SFT already did) a larger log-probability margin for it. The margins are
    recomputed here from the weights, not only read from the report."""
    from llm_core.checkpoint import load_weights
    from llm_core.tokenizer import load_tokenizer
    from pipeline.eval.questions import reply_logprobs

    report = json.loads((toy_run.data / "evaluation_report" / "report.json").read_text())
    section = report["questions"]
    items, stages = section["items"], section["stages"]
    assert len(items) == 6 and set(stages) == {"base", "sft", "rlhf"}
    tok = load_tokenizer(toy_run.data / "bpe_tokenizer" / "tokenizer.json")
    prompts = [q["question"] for q in items]
    margins = {}
    for stage, key in (("sft", "sft_weights"), ("rlhf", "rlhf_weights")):
        model = load_weights(toy_run.data / key).eval()
        chosen = reply_logprobs(model, tok, prompts, [q["chosen"] for q in items])
        rejected = reply_logprobs(model, tok, prompts, [q["rejected"] for q in items])
        margins[stage] = [c - r for c, r in zip(chosen, rejected, strict=True)]
        for i, m in enumerate(margins[stage]):
            assert m == pytest.approx(stages[stage][i]["margin"], abs=1e-3)
    fixed = 0
    for i, q in enumerate(items):
        sft, rlhf = stages["sft"][i]["answer"], stages["rlhf"][i]["answer"]
        # SFT answers: yes or no, the polarity of the preferred answer.
        assert sft.split()[0] == q["chosen"].split()[0], (q, sft)
        if sft != q["chosen"]:
            assert rlhf == q["chosen"], (q, sft, rlhf)
            fixed += 1
        else:
            assert margins["rlhf"][i] > margins["sft"][i], (q, margins)
    assert fixed > 0, "alignment had nothing to fix: the toy no longer shows its lesson"
    md = (toy_run.data / "evaluation_report" / "report.md").read_text()
    assert "### Toy questions: greedy answers per stage" in md
    assert f"| {items[0]['question']} | {items[0]['chosen']} |" in md
    html = (toy_run.data / "evaluation_report" / "report.html").read_text()
    assert "Toy questions: greedy answers per stage" in html
    assert f"<td>{items[0]['question']}</td><td>{items[0]['chosen']}</td>" in html


def test_playground_notebook_runs(toy_run: ToyRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """``notebooks/playground.ipynb`` top to bottom on this run's artefacts (nbclient, the
    python3 kernel of this interpreter): every cell runs, and it shows what it promises."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("SCRIPTORIUM_DATA", str(toy_run.data))
    nb = nbformat.read(REPO / "notebooks" / "playground.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any failure
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "layers x" in text and "heads" in text
    assert "p('.' after 'no'):" in text
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 2, "the heat maps and the probability bars were not drawn"
