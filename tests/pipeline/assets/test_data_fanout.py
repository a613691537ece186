"""The data stages' fan-out: ``cleaned_books`` and ``token_shards`` as many chunk steps + a reduce
give exactly what one pass gives; the tokenizer trains on its bounded, seeded sample."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from llm_core.config import load_profile
from pipeline.assets.gutenberg import cleaned_books, gutenberg_books, gutenberg_catalog
from pipeline.assets.tokens import bpe_tokenizer, held_out_ids, token_shards
from pipeline.resources import GutenbergSource, Paths, Profile
from pipeline.sources.mirror import MirrorServer
from pipeline.text.clean import clean_books
from pipeline.text.shards import encode_books_to_shards

MAX_CHARS = 400_000


@pytest.mark.mirror
def test_chunked_assets_match_one_pass(mirror_dir: Path, tmp_path: Path) -> None:
    profile_yaml = tmp_path / "tiny-sampled.yaml"
    p = load_profile("tiny")
    p["tokenizer"] = {**(p.get("tokenizer") or {}), "max_chars": MAX_CHARS}
    profile_yaml.write_text(yaml.safe_dump(p))
    data = tmp_path / "data"
    profile = Profile(name=str(profile_yaml))
    chunked = {"config": {"chunk_books": 2}}
    run_config = {
        "ops": {
            "cleaned_books": {"ops": {"plan_clean_chunks": chunked}},
            "token_shards": {"ops": {"plan_token_chunks": chunked}},
        }
    }
    with MirrorServer(mirror_dir) as server, dg.instance_for_test() as instance:
        result = dg.materialize(
            [gutenberg_catalog, gutenberg_books, cleaned_books, bpe_tokenizer, token_shards],
            resources={
                "paths": Paths(data_root=str(data)),
                "profile": profile,
                "gutenberg": GutenbergSource(base_url=server.url),
            },
            run_config=run_config,
            instance=instance,
        )
    assert result.success
    steps = {e.step_key for e in result.all_events if e.step_key}
    assert sum("clean_book_chunk" in s for s in steps) >= 3  # 7 books, 2 per step
    assert sum("encode_token_chunk" in s for s in steps) >= 3

    def meta(key: str) -> dict:
        mats = result.asset_materializations_for_node(key)
        return {k: v.value for k, v in mats[-1].metadata.items()}

    clean_meta, tok_meta, shard_meta = (
        meta("cleaned_books"),
        meta("bpe_tokenizer"),
        meta("token_shards"),
    )
    assert clean_meta["chunks"] >= 3 and shard_meta["chunks"] >= 3
    # The reduce step gives the graph-backed asset its data version, as the one-step asset did.
    clean_mat = result.asset_materializations_for_node("cleaned_books")[-1]
    assert clean_mat.tags["dagster/data_version"] == clean_meta["books_sha256"][:16]
    assert shard_meta["encoder"] == "tiktoken"
    # The tokenizer saw its sample: MAX_CHARS of a larger corpus, recorded in the metadata.
    assert tok_meta["max_chars"] == MAX_CHARS and tok_meta["train_chars"] == MAX_CHARS
    assert tok_meta["corpus_chars"] > MAX_CHARS and 0 < tok_meta["sampled_fraction"] < 1
    stats = json.loads((data / "bpe_tokenizer" / "stats.json").read_text())
    assert stats["train_chars"] == MAX_CHARS and stats["train_books"] < 6

    # One pass, in this process, over the same downloads: byte-identical outputs.
    manifest = pl.read_parquet(data / "gutenberg_books" / "manifest.parquet")
    manifest = manifest.with_columns(
        pl.format(str(data / "gutenberg_books" / "books") + "/{}.txt", pl.col("id")).alias("path")
    )
    catalog = pl.read_parquet(data / "gutenberg_catalog" / "catalog.parquet")
    c = p["clean"]
    clean_books(
        manifest,
        catalog.with_columns(pl.lit("gutenberg").alias("source")),
        tmp_path / "one_pass",
        languages=c["languages"],
        min_chars=c["min_chars"],
        near_duplicate_threshold=c["near_duplicate_threshold"],
    )
    for name in ("books.parquet", "rejects.parquet"):
        assert (data / "cleaned_books" / name).read_bytes() == (
            tmp_path / "one_pass" / name
        ).read_bytes(), name
    assert sorted(x.name for x in (data / "cleaned_books").iterdir()) == [
        "books.parquet",
        "rejects.parquet",
    ]
    val_ids = held_out_ids(Paths(data_root=str(data)), profile)
    one, _ = encode_books_to_shards(
        data / "cleaned_books" / "books.parquet",
        data / "bpe_tokenizer" / "tokenizer.json",
        tmp_path / "one_pass_shards",
        tokens_per_shard=p["shards"]["tokens_per_shard"],
        val_ids=val_ids,
        vocab_size=p["vocab_size"],
        encoder="tokenizers",
    )
    fanned = json.loads((data / "token_shards" / "manifest.json").read_text())
    assert fanned == one
    assert not (data / "token_shards" / "_parts").exists()
