"""Data-stage throughput and memory: cleaning and sharding, each in fresh processes.

Every measured stage runs in a fresh subprocess of this script (``--child ...``); this module
imports only the standard library at the top, so a child's memory is that of the stage's own
imports plus its work. Figures (the last line is one JSON object, see ``benchmarks/common.py``
for the statistics and the verdicts):

- **Cleaning throughput** (target >= 30 MB/s): ``clean_books`` over the 1x corpus, raw bytes in
  over wall seconds, after one untimed warm-up run, over ``--clean-rounds`` fresh processes.
- **Sharding vs bare ``encode_batch``** (target >= 0.8x): side A is the pipeline's
  ``encode_books_to_shards`` (parquet streaming, cutting, encoding, ``.npy`` writes, fsyncs,
  SHA-256, manifest); side B is ``Tokenizer.encode_batch`` on *the same* 64 KiB newline-safe
  pieces in the same 4 MiB batches (cut by the pipeline's own code before B's clock starts) and
  reading every encoding's ids. Both sides load the same tokenizer in an equally fresh child, both
  are warmed up (one untimed run each, which also warms the page cache), and their rounds are
  interleaved. The token counts must agree (A = B + one ``<|endoftext|>`` per book).
- **Pipeline overhead**: inside side A, the time in ``encode_batch`` is measured; the rest
  (parquet reads, cutting, ids -> NumPy, shard writes with fsync and SHA-256, the manifest) is
  reported as a share of A's time, with its parts.
- **Memory at 1x and 4x** (target: 4x/1x <= 1.2x): the 4x corpus is the 1x corpus plus three
  *distinct* generated copies of every book: each copy deals a seeded permutation of all the
  paragraphs of the books of its language (real text) into new books of the original books'
  lengths, under the original's real Project Gutenberg header and footer with the ebook number
  replaced by a new id, with a matching catalog row. Exact and near-duplicate detection therefore
  keep them, and the memory that grows with distinct books is exercised. Peak RSS (``VmHWM``,
  not ``ru_maxrss``, which a child inherits from its parent across exec) of the stage's process
  is reported raw and minus the *import floor*: the peak RSS of a fresh process that only
  imports the stage's modules. Cleaning also reports the whole
  process tree (its worker pool), raw and minus the tree floor (cleaning one small book: imports
  plus the pool's start-up).

Usage:
  python benchmarks/data_stages.py [--mirror ../shared/mirror] [--vocab-size 8192]
  python benchmarks/data_stages.py --smoke      # a few small books, tiny vocabulary: seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    add_common_args,
    compare,
    describe,
    emit,
    interleave,
    machine_info,
    summarize,
)

# The pipeline's cut: both sharding sides use exactly these pieces and batches.
PIECE_CHARS = 64 << 10
BATCH_CHARS = 4 << 20
CLEAN_KW = {"languages": ["en"], "min_chars": 2000, "near_duplicate_threshold": 0.8}
NEW_ID_STEP = 1_000_000  # generated copy k of book i gets id i + k * NEW_ID_STEP
TIME_PARTS = ("encode_batch_s", "writer_s", "flush_io_hash_s", "manifest_s", "tokenizer_hash_s",
              "read_cut_ids_s")  # fmt: skip
TARGETS = {"cleaning_mb_per_s": 30.0, "sharding_vs_bare": 0.8, "rss_4x_over_1x": 1.2}


# ------------------------------------------------------------------------------ the corpora
def _select(catalog: Any, mirror: Path, max_books: int | None, max_book_kb: int | None) -> Any:
    import polars as pl

    gut = mirror / "gutenberg" / "cache" / "epub"
    sizes = [(gut / f"{i}" / f"pg{i}.txt").stat().st_size for i in catalog["id"]]
    catalog = catalog.with_columns(pl.Series("bytes", sizes))
    if max_book_kb is not None:  # smoke: a few small English books
        catalog = catalog.filter(
            (pl.col("bytes") <= max_book_kb * 1024) & pl.col("languages").list.contains("en")
        )
    if max_books is not None:
        catalog = catalog.sort("id").head(max_books)
    if catalog.height < 2:
        raise SystemExit(f"too few books selected from {mirror} ({catalog.height})")
    return catalog.drop("bytes")


def _renumber(boiler: str, old: int, new: int) -> str:
    """The header or footer with the ebook number replaced (``#1342``, ``/1342/``, ``1342-0``)."""
    boiler = re.sub(rf"#\s*{old}(?!\d)", f"#{new}", boiler)
    return re.sub(rf"(?<![\d.]){old}(?=[/-]\d|/)", str(new), boiler)


def build_corpora(
    mirror: Path, work: Path, copies: int, seed: int, max_books: int | None, max_book_kb: int | None
) -> dict[str, Any]:
    """Write the manifests and catalogs of the corpora ``x1``, ``x{copies}`` and ``one``.

    ``x1``: the mirror's books (or the smoke selection) in place. ``x{copies}``: those plus
    ``copies - 1`` generated distinct copies (see the module docstring). ``one``: the smallest
    book alone (the cleaning tree floor).
    """
    import polars as pl

    from pipeline.sources.gutenberg import parse_catalog
    from pipeline.text.boilerplate import strip_boilerplate
    from pipeline.text.encoding import decode_text

    gut = mirror / "gutenberg"
    catalog = parse_catalog(gut / "cache/epub/feeds/pg_catalog.csv")
    catalog = _select(catalog, mirror, max_books, max_book_kb)
    out = work / "corpus"
    t0 = time.perf_counter()
    books: list[dict[str, Any]] = []
    pools: dict[str, list[str]] = defaultdict(list)
    for rec in catalog.iter_rows(named=True):
        path = gut / f"cache/epub/{rec['id']}/pg{rec['id']}.txt"
        text = decode_text(path.read_bytes()).text
        cut = strip_boilerplate(text)
        lang = (rec["languages"] or ["?"])[0]
        paragraphs = [p for p in re.split(r"\n[ \t]*\n", cut.body) if p.strip()]
        pools[lang].extend(paragraphs)
        books.append(
            {
                "rec": rec,
                "path": path,
                "lang": lang,
                "header": text[: cut.header_end],
                "footer": text[cut.footer_start :],
                "chars": len(cut.body),
            }
        )
    rows = [
        {
            "id": b["rec"]["id"],
            "path": str(b["path"]),
            "status": "ok",
            "bytes": b["path"].stat().st_size,
        }
        for b in books
    ]
    cats = [b["rec"] for b in books]
    generated = []
    for k in range(1, copies):
        for lang, pool in sorted(pools.items()):
            order = list(range(len(pool)))
            random.Random(f"{seed}:{k}:{lang}").shuffle(order)
            pos = 0
            members = [b for b in books if b["lang"] == lang]
            for j, b in enumerate(members):
                chosen, size = [], 0
                last = j == len(members) - 1
                while pos < len(order) and (last or size < b["chars"]):
                    p = pool[order[pos]]
                    chosen.append(p)
                    size += len(p) + 2
                    pos += 1
                old, new = b["rec"]["id"], b["rec"]["id"] + k * NEW_ID_STEP
                text = (
                    _renumber(b["header"], old, new).rstrip("\n")
                    + "\n\n\n"
                    + "\n\n".join(chosen)
                    + "\n\n\n"
                    + _renumber(b["footer"], old, new).lstrip("\n")
                )
                dest = out / "mirror" / f"{new}" / f"pg{new}.txt"
                dest.parent.mkdir(parents=True, exist_ok=True)
                data = text.encode("utf-8")
                dest.write_bytes(data)
                rows.append({"id": new, "path": str(dest), "status": "ok", "bytes": len(data)})
                cats.append(
                    {**b["rec"], "id": new, "title": f"{b['rec']['title']} [recombined {k}]"}
                )
                generated.append(new)
    schema = catalog.schema
    n1 = len(books)
    corpora = {"x1": (rows[:n1], cats[:n1]), f"x{copies}": (rows, cats)}
    smallest = min(range(n1), key=lambda i: rows[i]["bytes"])
    corpora["one"] = ([rows[smallest]], [cats[smallest]])
    info: dict[str, Any] = {"seconds_to_generate": round(time.perf_counter() - t0, 2)}
    for name, (r, c) in corpora.items():
        pl.DataFrame(r).write_parquet(out / f"manifest_{name}.parquet")
        pl.DataFrame(c, schema=schema).write_parquet(out / f"catalog_{name}.parquet")
        info[name] = {"books": len(r), "mb": round(sum(x["bytes"] for x in r) / 1e6, 3)}
    info["generated_books"] = len(generated)
    return info


# ------------------------------------------------------------------------------ children
class TreeRss(threading.Thread):
    """Samples the summed RSS of this process and all its descendants (cleaning's worker pool).

    ``ru_maxrss`` sees only this process, and RUSAGE_CHILDREN only reaped children, so a pool
    behind a forkserver would be invisible to both.
    """

    def __init__(self, every_s: float = 0.05) -> None:
        import psutil

        super().__init__(daemon=True)
        self._psutil = psutil
        self.every_s, self.peak, self._halt = every_s, 0, threading.Event()
        self.start()

    def run(self) -> None:
        me = self._psutil.Process()
        while not self._halt.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(self._psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._halt.wait(self.every_s)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak / 2**20


def _peak_rss_mb() -> float:
    """This process's peak RSS in MiB: ``VmHWM``, the high-water mark of its own address space.

    Not ``ru_maxrss``: Linux carries it across ``execve``, and a child started by ``subprocess``
    (vfork + exec) inherits the *parent's* peak there, so a child of a 2 GB parent reports at
    least 2 GB whatever it does. ``VmHWM`` starts afresh with the new address space at exec.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def child_floor(args: argparse.Namespace) -> dict[str, Any]:
    """Import floor: a fresh process that imports the stage's modules and does nothing else."""
    sampler = TreeRss()
    if args.stage == "clean":
        import polars  # noqa: F401

        import pipeline.text.clean  # noqa: F401
    else:
        import pyarrow.parquet  # noqa: F401

        import llm_core.tokenizer  # noqa: F401
        import pipeline.text.shards  # noqa: F401
    time.sleep(0.2)  # let the sampler see the settled process
    return {
        "peak_rss_mb": _peak_rss_mb(),
        "peak_tree_rss_mb": sampler.stop(),
        "torch_imported": "torch" in sys.modules,
    }


def child_clean(args: argparse.Namespace) -> dict[str, Any]:
    sampler = TreeRss()
    import polars as pl

    from pipeline.text.clean import clean_books

    work = Path(args.work)
    manifest = pl.read_parquet(work / "corpus" / f"manifest_{args.corpus}.parquet")
    catalog = pl.read_parquet(work / "corpus" / f"catalog_{args.corpus}.parquet")
    total = int(manifest["bytes"].sum())
    t0 = time.perf_counter()
    stats = clean_books(manifest, catalog, work / f"clean_{args.corpus}", **CLEAN_KW)
    secs = time.perf_counter() - t0
    return {
        "seconds": secs,
        "mb_in": total / 1e6,
        "mb_per_s": total / 1e6 / secs,
        "books_in": stats.books_in,
        "books_kept": stats.books_kept,
        "rejected": stats.rejected,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_tree_rss_mb": sampler.stop(),
        "torch_imported": "torch" in sys.modules,
    }


class _TimedTokenizer:
    """Delegates to a ``tokenizers.Tokenizer``, adding up the time spent in ``encode_batch``."""

    def __init__(self, tok: Any, timers: dict[str, float]) -> None:
        self._tok, self._timers = tok, timers

    def encode_batch(self, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._tok.encode_batch(*a, **kw)
        finally:
            self._timers["encode_batch"] += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def child_shard(args: argparse.Namespace) -> dict[str, Any]:
    """Side A: the pipeline's sharding, instrumented to split its time into encode and the rest."""
    import pipeline.text.shards as shards_mod

    timers: dict[str, float] = defaultdict(float)

    def timed(key: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[key] += time.perf_counter() - t0

        return wrapper

    # The merge (issue 23) streams the parts into shards: reading the parts, the shard files,
    # fsync and SHA-256/CRC-32 all happen inside write_split.
    shards_mod.write_split = timed("writer", shards_mod.write_split)

    real_load = shards_mod.load_tokenizer
    shards_mod.load_tokenizer = lambda p: _TimedTokenizer(real_load(p), timers)
    real_fast = shards_mod.fast_encoder

    def timed_fast(*a: Any, **kw: Any) -> Any:  # the tiktoken path (issue 23) is encoding too
        fast = real_fast(*a, **kw)
        if fast is not None:
            fast.encode_batch = timed("encode_batch", fast.encode_batch)
        return fast

    shards_mod.fast_encoder = timed_fast
    shards_mod.write_manifest = timed("manifest", shards_mod.write_manifest)
    shards_mod.file_sha256 = timed("tokenizer_hash", shards_mod.file_sha256)

    work = Path(args.work)
    _, stats = shards_mod.encode_books_to_shards(
        work / f"clean_{args.corpus}" / "books.parquet",
        work / "tokenizer.json",
        work / f"shards_{args.corpus}",
        tokens_per_shard=args.tokens_per_shard,
        val_ids=set(),
        vocab_size=args.vocab_size,
        batch_chars=BATCH_CHARS,
        piece_chars=PIECE_CHARS,
    )
    secs = stats.seconds
    encode = timers["encode_batch"]
    writer = timers["writer"]
    rest = secs - encode - writer - timers["manifest"] - timers["tokenizer_hash"]
    return {
        "seconds": secs,
        "tokens": sum(stats.tokens.values()),
        "books": sum(stats.books.values()),
        "shards": stats.n_shards,
        "encode_batch_s": encode,
        "writer_s": writer,  # the merge: parts streamed into shards (write_split)
        "flush_io_hash_s": timers["writer"],  # part reads + shard writes + fsync + hashes
        "manifest_s": timers["manifest"],
        "tokenizer_hash_s": timers["tokenizer_hash"],
        "read_cut_ids_s": rest,  # parquet reads, cutting, Encoding.ids -> NumPy
        "overhead_share": (secs - encode) / secs,
        "peak_rss_mb": _peak_rss_mb(),
        "torch_imported": "torch" in sys.modules,
    }


def child_bare(args: argparse.Namespace) -> dict[str, Any]:
    """Side B: ``encode_batch`` alone on the pipeline's own pieces and batches, ids read."""
    from llm_core.tokenizer import load_tokenizer
    from pipeline.text.shards import _batches_by_bytes, iter_book_texts

    work = Path(args.work)
    tok = load_tokenizer(work / "tokenizer.json")
    books = work / f"clean_{args.corpus}" / "books.parquet"
    batches, n_books = [], 0
    for batch, counts, _ in _batches_by_bytes(iter_book_texts(books), BATCH_CHARS, PIECE_CHARS):
        batches.append(batch)
        n_books += len(counts)
    t0 = time.perf_counter()
    n = 0
    for batch in batches:
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            n += len(enc.ids)
    secs = time.perf_counter() - t0
    return {
        "seconds": secs,
        "tokens": n,
        "books": n_books,
        "pieces": sum(len(b) for b in batches),
        "peak_rss_mb": _peak_rss_mb(),
    }


CHILDREN = {"floor": child_floor, "clean": child_clean, "shard": child_shard, "bare": child_bare}


def run_child(args: argparse.Namespace, kind: str, **kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--work", args.work,
           "--vocab-size", str(args.vocab_size), "--tokens-per-shard", str(args.tokens_per_shard)]  # fmt: skip
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the parent
def _ratio_minus(many: float, one: float, floor: float) -> float | None:
    """``(many - floor) / (one - floor)``; None where the 1x figure is within 5 % of the floor
    (the ratio of two small differences of sampled figures would be noise)."""
    if one - floor < 0.05 * one:
        return None
    return (many - floor) / (one - floor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--mirror", default=str(REPO.parent / "shared" / "mirror"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--tokens-per-shard", type=int, default=4 << 20)
    ap.add_argument("--copies", type=int, default=4, help="size of the large corpus (distinct)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clean-rounds", type=int, default=3)
    ap.add_argument("--shard-rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each side")
    ap.add_argument("--floor-rounds", type=int, default=3)
    ap.add_argument("--max-books", type=int, default=None)
    ap.add_argument("--max-book-kb", type=int, default=None)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--child", choices=sorted(CHILDREN), default=None)
    ap.add_argument("--stage", choices=["clean", "shard"], default="clean")
    ap.add_argument("--corpus", default="x1")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.smoke:
        args.vocab_size = min(args.vocab_size, 512)
        args.tokens_per_shard = 16384
        args.clean_rounds, args.shard_rounds, args.floor_rounds = 1, 2, 1
        args.max_books = args.max_books or 5
        args.max_book_kb = args.max_book_kb or 120
    t_start = time.perf_counter()
    info = machine_info()
    print(f"{info['cpu_model']} @ {info['cpu_mhz']} MHz, flags {info['cpu_flags']}, "
          f"load average {info['loadavg']}")  # fmt: skip
    made_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="scriptorium-bench-")
    work = Path(args.work)
    big = f"x{args.copies}"
    try:
        corpora = build_corpora(
            Path(args.mirror), work, args.copies, args.seed, args.max_books, args.max_book_kb
        )
        print(f"corpora: {corpora}")

        # Import floors (fresh processes that only import the stage's modules).
        floors = {
            stage: [run_child(args, "floor", stage=stage) for _ in range(args.floor_rounds)]
            for stage in ("clean", "shard")
        }
        floor_clean = statistics.median(f["peak_rss_mb"] for f in floors["clean"])
        floor_shard = statistics.median(f["peak_rss_mb"] for f in floors["shard"])
        tree_floor = run_child(args, "clean", corpus="one")["peak_tree_rss_mb"]
        torch_in_floor = any(f["torch_imported"] for fs in floors.values() for f in fs)
        print(f"import floor: cleaning {floor_clean:.0f} MB (tree with pool, one book "
              f"{tree_floor:.0f} MB), sharding {floor_shard:.0f} MB; torch imported: "
              f"{torch_in_floor}")  # fmt: skip

        # Cleaning: warm-up, then fresh-process rounds at 1x; one run at 4x.
        for _ in range(args.warmup):
            run_child(args, "clean", corpus="x1")
        clean1 = [run_child(args, "clean", corpus="x1") for _ in range(args.clean_rounds)]
        clean_big = run_child(args, "clean", corpus=big)
        c1 = clean1[len(clean1) // 2]
        for name, c in (("1x", c1), (f"{args.copies}x", clean_big)):
            print(f"cleaning {name}: {c['mb_in']:.1f} MB, {c['books_in']} books in, "
                  f"{c['books_kept']} kept, {c['mb_per_s']:.1f} MB/s, peak RSS "
                  f"{c['peak_rss_mb']:.0f} MB (tree {c['peak_tree_rss_mb']:.0f} MB)")  # fmt: skip

        # Tokenizer for the sharding runs (not measured).
        from llm_core.tokenizer import train_bpe
        from pipeline.text.shards import iter_book_texts

        t0 = time.perf_counter()
        tok = train_bpe(
            (t for _, t in iter_book_texts(work / "clean_x1" / "books.parquet")), args.vocab_size
        )
        tok.save(str(work / "tokenizer.json"))
        print(f"tokenizer: vocab {tok.get_vocab_size()} trained in {time.perf_counter() - t0:.1f}s")

        # Sharding: pipeline (A) vs bare encode_batch on the same pieces (B), fresh processes.
        runs: dict[str, list[dict[str, Any]]] = {"pipeline": [], "bare": []}

        def side(kind: str, key: str) -> Any:
            def run() -> float:
                res = run_child(args, kind, corpus="x1")
                runs[key].append(res)
                return res["seconds"]

            return run

        times = interleave(
            {"pipeline": side("shard", "pipeline"), "bare": side("bare", "bare")},
            rounds=args.shard_rounds,
            warmup=args.warmup,
        )
        timed_a, timed_b = runs["pipeline"][args.warmup :], runs["bare"][args.warmup :]
        for a, b in zip(runs["pipeline"], runs["bare"], strict=True):
            if a["tokens"] != b["tokens"] + a["books"] or a["books"] != b["books"]:
                raise RuntimeError(
                    f"sharding sides did different work: pipeline {a['tokens']} tokens / "
                    f"{a['books']} books, bare {b['tokens']} tokens / {b['books']} books"
                )
        sharding = compare(
            times["pipeline"],
            times["bare"],
            target=TARGETS["sharding_vs_bare"],
            a_name="pipeline encode_books_to_shards",
            b_name="bare encode_batch, same pieces",
        )
        tokens_a = timed_a[0]["tokens"]
        overhead = summarize([r["overhead_share"] for r in timed_a])
        parts = {
            k: round(statistics.median(r[k] / r["seconds"] for r in timed_a), 4) for k in TIME_PARTS
        }
        print(f"sharding vs bare encode_batch: {describe(sharding)}")
        print(f"pipeline overhead (all but encode_batch): {describe(overhead, unit='')}; "
              f"shares {parts}")  # fmt: skip
        shard_big = run_child(args, "shard", corpus=big)
        shard1_rss = statistics.median(r["peak_rss_mb"] for r in timed_a)

        def rss_row(one: float, many: float, floor: float) -> dict[str, Any]:
            minus = _ratio_minus(many, one, floor)
            return {
                "mb_1x": round(one, 1),
                f"mb_{args.copies}x": round(many, 1),
                "floor_mb": round(floor, 1),
                "ratio_raw": round(many / one, 3),
                "ratio_minus_floor": None if minus is None else round(minus, 3),
                "verdict_minus_floor": "floor within 5 % of 1x: no ratio"
                if minus is None
                else summarize([minus], target=TARGETS["rss_4x_over_1x"], at_most=True)["verdict"],
            }

        rss = {
            "cleaning_main": rss_row(c1["peak_rss_mb"], clean_big["peak_rss_mb"], floor_clean),
            "cleaning_tree": rss_row(
                c1["peak_tree_rss_mb"], clean_big["peak_tree_rss_mb"], tree_floor
            ),
            "sharding": rss_row(shard1_rss, shard_big["peak_rss_mb"], floor_shard),
        }
        for k, v in rss.items():
            print(f"peak RSS {k}: {v}")
        result = {
            "benchmark": "data_stages",
            "smoke": args.smoke,
            "machine": info,
            "loadavg_end": machine_info()["loadavg"],
            "corpora": corpora,
            "vocab_size": args.vocab_size,
            "cleaning": {
                "mb_in_1x": round(c1["mb_in"], 3),
                "mb_per_s": summarize(
                    [c["mb_per_s"] for c in clean1], target=TARGETS["cleaning_mb_per_s"]
                ),
                "books_kept_1x": c1["books_kept"],
                f"books_kept_{args.copies}x": clean_big["books_kept"],
                f"rejected_{args.copies}x": clean_big["rejected"],
                f"mb_in_{args.copies}x": round(clean_big["mb_in"], 3),
                f"mb_per_s_{args.copies}x": round(clean_big["mb_per_s"], 2),
            },
            "sharding": {
                "tokens_1x": tokens_a,
                "pipeline_tokens_per_s": round(tokens_a / sharding["a_median"]),
                "bare_tokens_per_s": round(timed_b[0]["tokens"] / sharding["b_median"]),
                "vs_bare": sharding,
                "overhead_share": overhead,
                "time_shares": parts,
                "pieces": timed_b[0]["pieces"],
                f"tokens_{args.copies}x": shard_big["tokens"],
            },
            "peak_rss": rss,
            "import_floor_mb": {
                "cleaning": round(floor_clean, 1),
                "cleaning_tree_one_book": round(tree_floor, 1),
                "sharding": round(floor_shard, 1),
                "torch_imported": torch_in_floor,
            },
            "elapsed_s": round(time.perf_counter() - t_start, 1),
        }
        emit(result)
    finally:
        if made_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
