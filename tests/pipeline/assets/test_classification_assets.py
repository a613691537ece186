"""The classification data assets through Dagster: a crafted SMS archive with bad lines, served
by the mirror server on loopback, lands every bad line in ``rejects.parquet``; the paragraph
dataset is built from the real mirror's books of several languages, split by book."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from pipeline.assets.classification import SMS_URL, classification_data
from pipeline.resources import GutenbergSource, HubSource, Paths, Profile
from pipeline.sources.mirror import MirrorServer
from tests.pipeline.text.test_classification import crafted_zip

GOOD = b"".join(
    f"{'spam' if i % 4 == 0 else 'ham'}\tmessage number {i}\n".encode() for i in range(40)
)
BAD = b"no tab here\nfoo\tunknown label\nham\t\nham\tmessage number 1\n"


def _materialize(
    keys: list[str], data: Path, mirror: Path, run_config: dict
) -> dg.ExecuteInProcessResult:
    with MirrorServer(mirror) as server:
        resources = {
            "paths": Paths(data_root=str(data)),
            "profile": Profile(name="tiny"),
            "hub": HubSource(files_mirror=f"{server.url}/files"),
            "gutenberg": GutenbergSource(base_url=server.url),
        }
        with dg.instance_for_test() as instance:
            return dg.materialize(
                [classification_data],
                selection=keys,
                resources=resources,
                instance=instance,
                run_config=run_config,
            )


def test_crafted_archive_bad_lines_land_in_rejects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCRIPTORIUM_FILES_MIRROR", raising=False)
    mirror = tmp_path / "mirror"
    crafted_zip(mirror / "files" / SMS_URL.removeprefix("https://"), GOOD + BAD)
    config = {"ops": {"classification_data": {"config": {"sms_sha256": ""}}}}
    result = _materialize(["sms_spam"], tmp_path / "data", mirror, config)
    assert result.success
    [mat] = result.get_asset_materialization_events()
    assert mat.asset_key == dg.AssetKey("sms_spam")  # the paragraphs were not selected
    meta = mat.materialization.metadata
    out = tmp_path / "data" / "sms_spam"
    rejects = pl.read_parquet(out / "rejects.parquet")
    assert sorted(rejects["reason"]) == ["duplicate", "empty_text", "missing_tab", "unknown_label"]
    assert meta["rejected"].value == 4 and meta["messages"].value == 40
    assert meta["rejected_by_reason"].value["duplicate"] == 1
    info = json.loads((out / "labels.json").read_text())
    assert info["counts"]["natural"]["test"] == {"ham": 6, "spam": 2}
    assert (out / "balanced" / "train.parquet").is_file()
    assert not (tmp_path / "data" / "language_paragraphs").exists()


def test_pinned_sha256_refuses_another_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCRIPTORIUM_FILES_MIRROR", raising=False)
    mirror = tmp_path / "mirror"
    crafted_zip(mirror / "files" / SMS_URL.removeprefix("https://"), GOOD)
    with pytest.raises(Exception, match="sha256"):
        _materialize(["sms_spam"], tmp_path / "data", mirror, {})


@pytest.mark.mirror
def test_language_paragraphs_from_the_mirror(tmp_path: Path, mirror_dir: Path) -> None:
    result = _materialize(["language_paragraphs"], tmp_path / "data", mirror_dir, {})
    assert result.success
    out = tmp_path / "data" / "language_paragraphs"
    info = json.loads((out / "labels.json").read_text())
    assert info["labels"] == ["de", "en", "fr", "zh"] and info["splits"] == ["by_book"]
    books = {p: set(pl.read_parquet(out / "by_book" / f"{p}.parquet")["book"]) for p in
             ("train", "val", "test")}  # fmt: skip
    assert not books["train"] & books["test"] and not books["val"] & books["test"]
    assert not books["train"] & books["val"]
    test = pl.read_parquet(out / "by_book" / "test.parquet")
    assert set(test["label"]) == {"de", "en", "fr", "zh"}
