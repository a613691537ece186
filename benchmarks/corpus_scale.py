"""Data stages at 1,000 and 4,000 distinct books, through the CLI, and the road to 75,000.

For each size N this script

1. writes a synthetic gutenberg.org-layout mirror of N distinct English books
   (:mod:`benchmarks.synthetic_gutenberg`: real PG headers and footers, bodies from a word chain
   fitted on the real mirror) under ``--work`` (never inside the repository);
2. serves it with the project's own mirror server (``scriptorium mirror serve``);
3. runs each data stage as its own ``dagster asset materialize -m pipeline.definitions --select
   <asset>`` (the multiprocess executor: every step its own process, cleaning's worker pool and
   the fan-out steps included) on a profile derived from ``gpt2-124m`` with ``catalog.max_books:
   N`` and an unthrottled loopback download;
4. records each stage's wall time (the whole CLI call: Dagster's start-up and step processes are
   part of what a user waits for), its throughput, and memory: every 50 ms the whole process tree
   under the CLI is read from ``/proc`` -- the peak ``VmHWM`` of any one process (the kernel's
   own high-water mark, so a spike between two reads is not missed) and the peak of the tree's
   summed ``VmRSS``.

It then prints the ratios at 4,000 against 1,000 books, the extrapolation to 75,000 books (the
larger of ``t(4000) * 75000 / 4000`` and the straight line through both sizes, so a stage whose
cost per book grows shows it), and, last, one JSON object with everything plus the CPU record.

Usage::

    python benchmarks/corpus_scale.py                      # 1,000 and 4,000 books
    python benchmarks/corpus_scale.py --sizes 50 --keep    # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine_info  # noqa: E402

STAGES = ("gutenberg_catalog", "gutenberg_books", "cleaned_books", "bpe_tokenizer", "token_shards")
FULL_GUTENBERG = 75_000
TARGETS = {"throughput_4k_over_1k": 0.9, "rss_4k_over_1k": 1.2, "rss_gb": 2.0, "full_hours": 3.0}
BIN = Path(sys.executable).parent


class TreeMemory(threading.Thread):
    """Peak memory of a process and all its descendants, read from ``/proc`` every ``every_s``."""

    def __init__(self, root_pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root, self.every_s = root_pid, every_s
        self.hwm: dict[int, tuple[int, str]] = {}  # pid -> (peak VmHWM kB, command)
        self.peak_tree_kb = 0
        self._halt = threading.Event()
        self.start()

    @staticmethod
    def _children() -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
        return kids

    def _sample(self) -> None:
        kids = self._children()
        todo, tree = [self.root], 0
        while todo:
            pid = todo.pop()
            todo.extend(kids.get(pid, []))
            with contextlib.suppress(OSError, ValueError):
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
                fields = {k: v for k, _, v in (line.partition(":") for line in status)}
                hwm = int(fields.get("VmHWM", "0 kB").split()[0])
                tree += int(fields.get("VmRSS", "0 kB").split()[0])
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
                if hwm > self.hwm.get(pid, (0, ""))[0]:
                    self.hwm[pid] = (hwm, cmd.decode(errors="replace").strip())
        self.peak_tree_kb = max(self.peak_tree_kb, tree)

    def run(self) -> None:
        while not self._halt.is_set():
            self._sample()
            self._halt.wait(self.every_s)

    def stop(self) -> dict[str, Any]:
        self._halt.set()
        self.join()
        top = sorted(((kb, pid, cmd) for pid, (kb, cmd) in self.hwm.items()), reverse=True)
        return {
            "peak_process_mb": round(top[0][0] / 1024, 1) if top else 0.0,
            "peak_process": top[0][2] if top else "",
            "peak_tree_mb": round(self.peak_tree_kb / 1024, 1),
            "processes": len(self.hwm),
            "top_processes": [(pid, round(kb / 1024, 1)) for kb, pid, _ in top[:6]],
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_profile(path: Path, n_books: int, base: str, *, full_tokenizer: bool = False) -> None:
    """The ``base`` profile with ``max_books: n_books`` and an unthrottled loopback download;
    ``full_tokenizer``: without ``tokenizer.max_chars`` (train on every book)."""
    import yaml

    from llm_core.config import load_profile

    p = load_profile(base)
    p["name"] = f"corpus-scale-{n_books}"
    p["catalog"] = {**p["catalog"], "max_books": n_books}
    p["download"] = {**p["download"], "requests_per_second": 10_000.0, "concurrency": 16}
    if full_tokenizer:
        p["tokenizer"] = {k: v for k, v in (p.get("tokenizer") or {}).items() if k != "max_chars"}
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def _asset_figures(data: Path, stage: str) -> dict[str, Any]:
    """What each stage produced, read from its files (throughput denominators)."""
    import polars as pl

    if stage == "gutenberg_catalog":
        return {"books": pl.read_parquet(data / stage / "catalog.parquet").height}
    if stage == "gutenberg_books":
        m = pl.read_parquet(data / stage / "manifest.parquet").filter(pl.col("status") == "ok")
        return {"books": m.height, "mb": round(int(m["bytes"].sum()) / 1e6, 2)}
    if stage == "cleaned_books":
        raw = pl.read_parquet(data / "gutenberg_books" / "manifest.parquet")
        kept = pl.scan_parquet(data / stage / "books.parquet").select(
            pl.len().alias("n"), pl.col("n_chars").sum().alias("chars")
        )
        k = kept.collect().row(0, named=True)
        log = (data.parent / "logs" / f"{stage}.log").read_text(errors="replace")
        found = re.search(r"near-duplicate candidates (\d+) \(verified (\d+)\)", log)
        return {
            "books": raw.height,
            "mb": round(int(raw["bytes"].sum()) / 1e6, 2),
            "books_kept": k["n"],
            "rejected": pl.read_parquet(data / stage / "rejects.parquet").height,
            "near_duplicate_candidates": int(found.group(1)) if found else None,
            "near_duplicate_verified": int(found.group(2)) if found else None,
        }
    if stage == "bpe_tokenizer":
        stats = json.loads((data / stage / "stats.json").read_text())
        return {
            "train_chars": stats.get("train_chars"),
            "corpus_chars": stats.get("corpus_chars"),
            "held_out_bytes_per_token": round(stats["bytes_per_token"], 4),
            "train_seconds": round(stats["train_seconds"], 1),
        }
    manifest = json.loads((data / stage / "manifest.json").read_text())
    splits = manifest["splits"]
    return {
        "tokens": sum(s["tokens"] for s in splits.values()),
        "mb": round(sum(s["bytes"] for s in splits.values()) / 1e6, 2),
        "books": sum(s["books"] for s in splits.values()),
        "shards": len(manifest["shards"]),
    }


def run_stage(stage: str, env: dict[str, str], log: Path) -> dict[str, Any]:
    cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "pipeline.definitions",
           "--select", stage]  # fmt: skip
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        mem = TreeMemory(proc.pid)
        rc = proc.wait()
        seconds = time.perf_counter() - t0
    figures = mem.stop()
    text = log.read_text(errors="replace")
    if rc != 0:
        raise SystemExit(f"{stage} failed (exit {rc}); log {log}:\n{text[-3000:]}")
    # Name the processes: Dagster logs "<pid> - <step> - STEP_START" for every step process.
    steps = {int(pid): step for pid, step in re.findall(r" (\d+) - (\S+) - STEP_START", text)}
    steps[proc.pid] = "dagster CLI (run coordinator)"
    figures["top_processes"] = [
        {"step": steps.get(pid, "worker or helper process"), "peak_mb": mb}
        for pid, mb in figures["top_processes"]
    ]
    figures["peak_step"] = figures["top_processes"][0]["step"] if figures["top_processes"] else ""
    return {"seconds": round(seconds, 2), **figures}


def _throughput(stage: str, r: dict[str, Any]) -> tuple[float, str]:
    s = max(r["seconds"], 1e-9)
    if stage == "token_shards":
        return r["tokens"] / s, "tokens/s"
    if stage == "bpe_tokenizer":
        return (r.get("corpus_chars") or 0) / 1e6 / s, "M corpus chars/s"
    if "mb" in r:
        return r["mb"] / s, "MB/s"
    return r["books"] / s, "books/s"


SHARD_CHILD = """
import json, sys, time
from pipeline.text.shards import encode_books_to_shards
from benchmarks.corpus_scale import _vmhwm_mb
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
m, st = encode_books_to_shards(a["books"], a["tok"], a["out"], tokens_per_shard=a["tps"],
                               val_ids=set(), vocab_size=a["vocab"], encoder=a["encoder"])
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": sum(st.tokens.values()),
                  "encoder": st.encoder, "shas": [s["sha256"] for s in m["shards"]],
                  "peak_rss_mb": _vmhwm_mb()}))
"""


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def shard_ab(data: Path, work: Path) -> dict[str, Any]:
    """Sharding the same cleaned books with the same tokenizer, in one process each: the
    ``tokenizers`` path (``encode_batch``, the code before issue 23) against ``auto``
    (tiktoken). The shards must be identical."""
    import yaml

    p = yaml.safe_load((work / "profile.yaml").read_text())
    out: dict[str, Any] = {}
    for encoder in ("tokenizers", "auto"):
        arg = {"books": str(data / "cleaned_books" / "books.parquet"),
               "tok": str(data / "bpe_tokenizer" / "tokenizer.json"),
               "out": str(work / f"shards_{encoder}"), "tps": p["shards"]["tokens_per_shard"],
               "vocab": p["vocab_size"], "encoder": encoder}  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-c", SHARD_CHILD, json.dumps(arg)],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["tokens_per_s"] = round(r["tokens"] / r["seconds"])
        shutil.rmtree(work / f"shards_{encoder}", ignore_errors=True)
        out[encoder] = r
        print(f"sharding with {encoder}: {r['seconds']:.1f} s, {r['tokens_per_s']:,} tokens/s, "
              f"peak {r['peak_rss_mb']} MB", flush=True)  # fmt: skip
    out["identical_shards"] = out["auto"].pop("shas") == out["tokenizers"].pop("shas")
    out["speedup"] = round(out["tokenizers"]["seconds"] / out["auto"]["seconds"], 2)
    if not out["identical_shards"]:
        raise SystemExit("tiktoken and tokenizers shards differ")
    return out


def run_size(args: argparse.Namespace, n: int) -> dict[str, Any]:
    from benchmarks.synthetic_gutenberg import generate

    work = Path(args.work) / f"n{n}"
    mirror, data = work / "mirror", work / "data"
    saved = work / "result.json"
    if args.reuse and saved.exists():
        print(f"[n={n}] results of an earlier run: {saved}", flush=True)
        return json.loads(saved.read_text())
    if args.generate_only:
        if not (mirror / "gutenberg" / "cache" / "epub" / "feeds" / "pg_catalog.csv").exists():
            info = generate(
                Path(args.mirror), mirror, n, seed=args.seed, mb_per_book=args.mb_per_book
            )
            print(f"[n={n}] generated {info}", flush=True)
        return {}
    if data.exists():
        shutil.rmtree(data)
    for d in (work / "dagster_home", work / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    info = {}
    if not (mirror / "gutenberg" / "cache" / "epub" / "feeds" / "pg_catalog.csv").exists():
        info = generate(Path(args.mirror), mirror, n, seed=args.seed, mb_per_book=args.mb_per_book)
        print(f"[n={n}] generated {info}", flush=True)
    write_profile(work / "profile.yaml", n, args.profile)
    port = _free_port()
    env = {
        **os.environ,
        "SCRIPTORIUM_DATA": str(data),
        "SCRIPTORIUM_PROFILE": str(work / "profile.yaml"),
        "GUTENBERG_MIRROR": f"http://127.0.0.1:{port}",
        "DAGSTER_HOME": str(work / "dagster_home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
    }
    server = subprocess.Popen(
        [str(BIN / "scriptorium"), "mirror", "serve", str(mirror), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: dict[str, Any] = {"books": n, "generated": info, "stages": {}}
    before = machine_info()
    try:
        subprocess.run(
            [str(BIN / "scriptorium"), "mirror", "wait", "--port", str(port), "--timeout", "60"],
            check=True,
        )
        for stage in args.stages:
            r = run_stage(stage, env, work / "logs" / f"{stage}.log")
            r.update(_asset_figures(data, stage))
            rate, unit = _throughput(stage, r)
            r["throughput"], r["unit"] = round(rate, 3), unit
            results["stages"][stage] = r
            print(
                f"[n={n}] {stage:18s} {r['seconds']:8.1f} s  {rate:12,.2f} {unit:16s} "
                f"peak process {r['peak_process_mb']:7.0f} MB  tree {r['peak_tree_mb']:7.0f} MB",
                flush=True,
            )
        if n == args.shard_ab_at:
            results["sharding_encoders"] = shard_ab(data, work)
        if n == args.full_tokenizer_at:  # the same books, the tokenizer trained on all of them
            write_profile(work / "profile_full.yaml", n, args.profile, full_tokenizer=True)
            full_env = {**env, "SCRIPTORIUM_PROFILE": str(work / "profile_full.yaml")}
            r = run_stage("bpe_tokenizer", full_env, work / "logs" / "bpe_tokenizer_full.log")
            r.update(_asset_figures(data, "bpe_tokenizer"))
            results["tokenizer_on_everything"] = r
            print(f"[n={n}] bpe_tokenizer on every book: {r}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    results["machine"] = {"before": before, "loadavg_after": machine_info()["loadavg"]}
    if args.keep:
        saved.write_text(json.dumps(results))
    else:
        shutil.rmtree(work, ignore_errors=True)
    return results


def summarize(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Ratios between the two sizes and the extrapolation to the full catalog."""
    small, large = min(runs), max(runs)
    out: dict[str, Any] = {"small": small, "large": large, "stages": {}}
    if small == large:
        return out
    full_s = 0.0
    for stage, r1 in runs[large]["stages"].items():
        r0 = runs[small]["stages"].get(stage)
        if r0 is None:
            continue
        t0, t1 = r0["seconds"], r1["seconds"]
        per_book = (t1 - t0) / (large - small)
        line = t1 + per_book * (FULL_GUTENBERG - large)
        proportional = t1 * FULL_GUTENBERG / large
        extrapolated = max(line, proportional)
        s = {
            "throughput_ratio": round(r1["throughput"] / max(r0["throughput"], 1e-12), 3),
            "peak_process_ratio": round(r1["peak_process_mb"] / max(r0["peak_process_mb"], 1), 3),
            "peak_tree_ratio": round(r1["peak_tree_mb"] / max(r0["peak_tree_mb"], 1), 3),
            "extrapolated_75k_s": round(extrapolated),
        }
        out["stages"][stage] = s
        if stage in ("cleaned_books", "bpe_tokenizer", "token_shards"):
            full_s += extrapolated
    out["clean_tokenizer_shards_75k_hours"] = round(full_s / 3600, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--mirror", default=str(REPO.parent / "shared" / "mirror"))
    ap.add_argument("--work", default="/tmp/corpus_scale", help="mirrors and data (not the repo)")
    ap.add_argument("--profile", default="gpt2-124m", help="base profile (vocab, clean, shards)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mb-per-book", type=float, default=0.3)
    ap.add_argument("--full-tokenizer-at", type=int, default=1000,
                    help="at this size, also train the tokenizer on every book (compression)")  # fmt: skip
    ap.add_argument("--shard-ab-at", type=int, default=1000,
                    help="at this size, also time sharding with tokenizers vs tiktoken")  # fmt: skip
    ap.add_argument("--generate-only", action="store_true",
                    help="write the mirrors and stop (generation is not measured)")  # fmt: skip
    ap.add_argument("--reuse", action="store_true",
                    help="take a size's results from an earlier --keep run in --work")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the mirrors and data afterwards")
    args = ap.parse_args()
    before = machine_info()
    runs = {n: run_size(args, n) for n in args.sizes}
    if args.generate_only:
        return
    summary = summarize(runs)
    for stage, s in summary["stages"].items():
        print(
            f"{stage:18s} throughput {summary['large']}/{summary['small']}: "
            f"{s['throughput_ratio']:.2f}x  peak process {s['peak_process_ratio']:.2f}x  "
            f"tree {s['peak_tree_ratio']:.2f}x  -> 75k books ~{s['extrapolated_75k_s'] / 60:.0f} min"
        )
    if "clean_tokenizer_shards_75k_hours" in summary:
        print(f"cleaning + tokenizer + sharding at 75,000 books: "
              f"~{summary['clean_tokenizer_shards_75k_hours']:.2f} h on this machine")  # fmt: skip
    after = machine_info()
    print(json.dumps({"runs": runs, "summary": summary, "targets": TARGETS,
                      "machine_before": before, "loadavg_after": after["loadavg"]}))  # fmt: skip


if __name__ == "__main__":
    main()
