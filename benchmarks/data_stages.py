"""Data-stage throughput and memory on the whole mirror, in one run.

Prints:
- cleaning MB/s over every book of ``<mirror>/gutenberg`` (raw bytes in / wall seconds);
- sharding tokens/s (our ``encode_books_to_shards``: parquet streaming + encode + shard writes)
  beside bare ``Tokenizer.encode_batch`` tokens/s on the same texts, and their ratio;
- peak RSS of the cleaning and of the sharding stage for the corpus at 1x and duplicated 4x, each
  measured in a fresh subprocess (``ru_maxrss``), and the 4x/1x ratios.

Targets (issue 2): cleaning >= 30 MB/s; sharding >= 0.8x bare encode_batch; RSS 4x <= 1.2x RSS 1x.
The last line is one JSON object with every figure.

Usage: python benchmarks/data_stages.py [--mirror ../shared/mirror] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import psutil
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm_core.tokenizer import load_tokenizer, train_bpe  # noqa: E402
from pipeline.sources.gutenberg import parse_catalog  # noqa: E402
from pipeline.text.clean import clean_books  # noqa: E402
from pipeline.text.shards import encode_books_to_shards, iter_book_texts  # noqa: E402


def build_inputs(mirror: Path, copies: int) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """A download manifest and catalog over the mirror's files, each book repeated ``copies``x.

    Copies get distinct ids (id + k*10^6) so every copy is read, decoded and hashed; the exact
    duplicates are then rejected by dedup, as a real re-crawl would be.
    """
    gut = mirror / "gutenberg"
    catalog = parse_catalog(gut / "cache/epub/feeds/pg_catalog.csv")
    rows, cats = [], []
    total = 0
    for k in range(copies):
        for rec in catalog.iter_rows(named=True):
            path = gut / f"cache/epub/{rec['id']}/pg{rec['id']}.txt"
            size = path.stat().st_size
            total += size
            new_id = rec["id"] + k * 1_000_000
            rows.append({"id": new_id, "path": str(path), "status": "ok", "bytes": size})
            cats.append({**rec, "id": new_id})
    return pl.DataFrame(rows), pl.DataFrame(cats, schema=catalog.schema), total


def run_clean(mirror: Path, out: Path, copies: int) -> dict:
    manifest, catalog, total = build_inputs(mirror, copies)
    t0 = time.perf_counter()
    clean_books(manifest, catalog, out, languages=["en"], min_chars=2000, near_duplicate_threshold=0.8)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "mb_in": total / 1e6, "mb_per_s": total / 1e6 / secs}


def replicate_books(books: Path, dest: Path, copies: int) -> None:
    """``books.parquet`` with every row repeated ``copies``x, written a row group at a time."""
    pf = pq.ParquetFile(books)
    writer = pq.ParquetWriter(dest, pf.schema_arrow)
    for _ in range(copies):
        for batch in pf.iter_batches(batch_size=8):
            writer.write_batch(batch)
    writer.close()


def run_shard(books: Path, tokenizer: Path, out: Path, vocab_size: int) -> dict:
    manifest, stats = encode_books_to_shards(
        books, tokenizer, out, tokens_per_shard=4 << 20, val_ids=set(), vocab_size=vocab_size
    )
    return {"seconds": stats.seconds, "tokens": sum(stats.tokens.values()), "tokens_per_s": stats.tokens_per_s}


class TreeRss(threading.Thread):
    """Samples the summed RSS of this process and all its descendants (cleaning's worker pool).

    ``ru_maxrss`` sees only this process, and RUSAGE_CHILDREN only reaped children, so a pool
    behind a forkserver would be invisible to both.
    """

    def __init__(self, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak, self._halt = every_s, 0, threading.Event()
        self.start()

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._halt.wait(self.every_s)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak / 2**20


def child(args: argparse.Namespace) -> None:
    """One measured stage in a fresh process; prints its result and its own peak RSS."""
    sampler = TreeRss()
    work = Path(args.work)
    if args.child == "clean":
        res = run_clean(Path(args.mirror), work / f"clean{args.copies}", args.copies)
    else:
        books = work / "clean1" / "books.parquet"
        if args.copies > 1:
            rep = work / f"books_x{args.copies}.parquet"
            replicate_books(books, rep, args.copies)
            books = rep
        res = run_shard(books, work / "tokenizer.json", work / f"shards{args.copies}", args.vocab_size)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["peak_tree_rss_mb"] = sampler.stop()
    print(json.dumps(res))


def measure(args: argparse.Namespace, stage: str, copies: int) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--copies", str(copies), "--work", args.work,
           "--mirror", args.mirror, "--vocab-size", str(args.vocab_size)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bare_encode_batch(books: Path, tokenizer: Path) -> dict:
    """The baseline: ``encode_batch`` alone on the same texts, already in memory."""
    tok = load_tokenizer(tokenizer)
    texts = [t for _, t in iter_book_texts(books)]
    t0 = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    secs = time.perf_counter() - t0
    return {"seconds": secs, "tokens": n, "tokens_per_s": n / secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mirror", default=str(REPO.parent / "shared" / "mirror"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", choices=["clean", "shard"], default=None)
    ap.add_argument("--copies", type=int, default=1)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    args.work = args.work or tempfile.mkdtemp(prefix="scriptorium-bench-")
    work = Path(args.work)

    clean1 = measure(args, "clean", 1)
    print(f"cleaning 1x: {clean1['mb_in']:.1f} MB in {clean1['seconds']:.2f}s = "
          f"{clean1['mb_per_s']:.1f} MB/s, peak RSS {clean1['peak_rss_mb']:.0f} MB "
          f"(with workers {clean1['peak_tree_rss_mb']:.0f} MB)")  # fmt: skip
    clean4 = measure(args, "clean", 4)
    print(f"cleaning 4x: {clean4['mb_in']:.1f} MB in {clean4['seconds']:.2f}s = "
          f"{clean4['mb_per_s']:.1f} MB/s, peak RSS {clean4['peak_rss_mb']:.0f} MB "
          f"(with workers {clean4['peak_tree_rss_mb']:.0f} MB)")  # fmt: skip

    books = work / "clean1" / "books.parquet"
    t0 = time.perf_counter()
    tok = train_bpe((t for _, t in iter_book_texts(books)), args.vocab_size)
    tok.save(str(work / "tokenizer.json"))
    print(f"tokenizer: vocab {tok.get_vocab_size()} trained in {time.perf_counter() - t0:.1f}s")

    # Interleave ours and the bare baseline so machine noise hits both alike.
    bare_a = bare_encode_batch(books, work / "tokenizer.json")
    shard1 = measure(args, "shard", 1)
    bare_b = bare_encode_batch(books, work / "tokenizer.json")
    bare_tps = (bare_a["tokens_per_s"] + bare_b["tokens_per_s"]) / 2
    ratio = shard1["tokens_per_s"] / bare_tps
    print(f"sharding: {shard1['tokens_per_s']:,.0f} tok/s vs bare encode_batch {bare_tps:,.0f} tok/s "
          f"= {ratio:.2f}x; peak RSS {shard1['peak_rss_mb']:.0f} MB")  # fmt: skip
    shard4 = measure(args, "shard", 4)
    print(f"sharding 4x: {shard4['tokens']:,} tokens, peak RSS {shard4['peak_rss_mb']:.0f} MB")

    result = {
        "corpus_mb": round(clean1["mb_in"], 2),
        "cleaning_mb_per_s": round(clean1["mb_per_s"], 2),
        "cleaning_peak_rss_mb_1x": round(clean1["peak_rss_mb"], 1),
        "cleaning_peak_rss_mb_4x": round(clean4["peak_rss_mb"], 1),
        "cleaning_rss_ratio_4x_1x": round(clean4["peak_rss_mb"] / clean1["peak_rss_mb"], 3),
        "cleaning_tree_rss_mb_1x": round(clean1["peak_tree_rss_mb"], 1),
        "cleaning_tree_rss_mb_4x": round(clean4["peak_tree_rss_mb"], 1),
        "cleaning_tree_rss_ratio_4x_1x": round(
            clean4["peak_tree_rss_mb"] / clean1["peak_tree_rss_mb"], 3
        ),
        "sharding_tokens_per_s": round(shard1["tokens_per_s"]),
        "bare_encode_batch_tokens_per_s": round(bare_tps),
        "sharding_vs_bare_ratio": round(ratio, 3),
        "sharding_peak_rss_mb_1x": round(shard1["peak_rss_mb"], 1),
        "sharding_peak_rss_mb_4x": round(shard4["peak_rss_mb"], 1),
        "sharding_rss_ratio_4x_1x": round(shard4["peak_rss_mb"] / shard1["peak_rss_mb"], 3),
        "tokens_1x": shard1["tokens"],
        "vocab_size": args.vocab_size,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
