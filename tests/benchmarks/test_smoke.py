"""Every benchmark script runs end to end with ``--smoke`` (tiny settings), so none can rot.

Each script runs as its own subprocess, as ``make bench`` runs it, and its last printed line must
be one JSON object carrying the machine record and, for every ratio, the statistics of
``benchmarks/common.py`` (ratio of medians, median of ratios, spread, rounds, verdict). The
figures of a smoke run mean nothing; only their presence and consistency are checked. The
statistics and verdict rules themselves are checked directly, without subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import compare, cpu_info, interleave, summarize, verdict

REPO = Path(__file__).resolve().parents[2]
VERDICTS = {"met", "within noise", "missed", "no target"}


def run_smoke(script: str, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, (
        f"{script} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert isinstance(result, dict) and result["smoke"] is True
    machine = result["machine"]
    assert machine["cpu_model"] and set(machine["cpu_flags"]) >= {"avx2", "avx512f", "avx512_bf16"}
    assert "cpu_mhz" in machine and "loadavg" in machine and machine["torch"]
    return result


def check_ratio(stats: dict[str, Any], *, has_target: bool) -> None:
    for key in ("ratio_of_medians", "median_of_ratios", "spread", "rounds", "verdict"):
        assert key in stats, key
    lo, hi = stats["spread"]
    assert lo <= stats["median_of_ratios"] <= hi
    assert stats["rounds"] == len(stats["per_round"]) >= 2
    assert stats["verdict"] in VERDICTS
    assert (stats["verdict"] != "no target") == has_target


def test_data_stages_smoke(mirror_dir: Path) -> None:
    res = run_smoke("data_stages.py", "--mirror", str(mirror_dir))
    check_ratio(res["sharding"]["vs_bare"], has_target=True)
    assert res["sharding"]["vs_bare"]["b"].startswith("bare encode_batch")
    assert 0 <= res["sharding"]["overhead_share"]["median"] < 1
    corpora = res["corpora"]
    assert corpora["x4"]["books"] == 4 * corpora["x1"]["books"]
    assert corpora["generated_books"] == 3 * corpora["x1"]["books"]
    # Distinct generated books survive dedup: more than the 1x run kept.
    assert res["cleaning"]["books_kept_4x"] > res["cleaning"]["books_kept_1x"]
    assert res["cleaning"]["mb_per_s"]["verdict"] in VERDICTS
    floors = res["import_floor_mb"]
    assert floors["torch_imported"] is False
    for name, row in res["peak_rss"].items():
        assert row["floor_mb"] > 0
        # Peak RSS of one process (VmHWM) is above its import floor; the tree's is sampled.
        assert name == "cleaning_tree" or row["mb_1x"] >= row["floor_mb"]
        assert row["verdict_minus_floor"] in VERDICTS or row["ratio_minus_floor"] is None


def test_train_throughput_smoke() -> None:
    # The emulated-bf16 path (AVX2-only CPUs) on any CPU: the bf16 row must then compare
    # against HF's fp32 step and say so.
    res = run_smoke("train_throughput.py", env={"LLM_CORE_CPU_BF16": "emulated"})
    assert res["cpu_bf16_kernels"] == "emulated"
    rows = res["train"]["rows"]
    check_ratio(rows["fp32"]["vs_baseline"], has_target=False)
    check_ratio(rows["bf16"]["vs_baseline"], has_target=True)
    assert rows["bf16"]["baseline"] == "hf_fp32" and "fastest" in rows["bf16"]["baseline_is"]
    assert "hf_bf16" not in res["train"]["configs"]
    gens = res["generation"]
    assert [g["batch"] for g in gens] == [1, 2]
    assert all(g["outputs_equal"] for g in gens)
    check_ratio(gens[0]["speedup"], has_target=True)
    check_ratio(gens[1]["speedup"], has_target=False)


def test_sft_packing_smoke(mirror_dir: Path) -> None:
    res = run_smoke("sft_packing.py", "--mirror", str(mirror_dir))
    check_ratio(res["pack_vs_pad"], has_target=True)
    assert res["faster"] in {"pack", "pad"}


# ------------------------------------------------------------------------ the statistics
def test_verdict_needs_the_whole_spread() -> None:
    assert verdict(1.31, 1.5, 1.3) == "met"
    assert verdict(1.2, 1.5, 1.3) == "within noise"
    assert verdict(1.0, 1.29, 1.3) == "missed"
    assert verdict(1.0, 1.19, 1.2, at_most=True) == "met"
    assert verdict(1.1, 1.3, 1.2, at_most=True) == "within noise"
    assert verdict(1.21, 1.3, 1.2, at_most=True) == "missed"
    assert verdict(0.5, 9.0, None) == "no target"


def test_compare_times_and_rates() -> None:
    # A takes 1 s every round; B 2, 4 and 3 s: A is 3x faster by medians, 2-4x per round.
    stats = compare([1.0, 1.0, 1.0], [2.0, 4.0, 3.0], target=2.5)
    assert stats["ratio_of_medians"] == 3.0 and stats["median_of_ratios"] == 3.0
    assert stats["spread"] == [2.0, 4.0] and stats["rounds"] == 3
    assert stats["verdict"] == "within noise"
    # The two summaries differ when the sides drift: the old fp32 row's trap.
    stats = compare([1.0, 2.0, 4.0], [3.0, 1.8, 3.5], target=None)
    assert stats["ratio_of_medians"] == 1.5 and stats["median_of_ratios"] == 0.9
    assert stats["spread"] == [0.875, 3.0] and stats["verdict"] == "no target"
    stats = compare([2.0, 4.0], [1.0, 1.0], lower_is_better=False, target=1.5)
    assert stats["ratio_of_medians"] == 3.0 and stats["verdict"] == "met"
    with pytest.raises(ValueError):
        compare([1.0], [1.0, 2.0])
    assert summarize([31.0, 29.0, 35.0], target=30.0)["verdict"] == "within noise"


def test_interleave_warms_up_both_sides_and_rotates() -> None:
    calls: list[str] = []
    sides = {name: (lambda name=name: calls.append(name) or 0.5) for name in ("a", "b")}
    out = interleave(sides, rounds=3, warmup=1, log=None)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert out == {"a": [0.5] * 3, "b": [0.5] * 3}


def test_cpu_info_parses_proc_cpuinfo() -> None:
    text = (
        "processor\t: 0\nmodel name\t: AMD EPYC 7763\ncpu MHz\t\t: 2450.000\n"
        "flags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7763\n"
        "cpu MHz\t\t: 2550.000\nflags\t\t: fpu avx2 fma\n"
    )
    info = cpu_info(text)
    assert info["cpu_model"] == "AMD EPYC 7763"
    assert info["cpu_flags"]["avx2"] and not info["cpu_flags"]["avx512f"]
    assert info["cpu_mhz"] == 2500.0 and info["cpu_mhz_range"] == [2450.0, 2550.0]


def test_stage_ab_smoke(tmp_path: Path) -> None:
    """Both trees are this one: the smoke only proves the child, the rounds and the JSON."""
    from tests.llm_core.training_helpers import chat_tokenizer, make_shards

    shards = make_shards(tmp_path / "shards", train_tokens=20_000, vocab=300)
    tokenizer = tmp_path / "tokenizer.json"
    chat_tokenizer(300).save(str(tokenizer))
    res = run_smoke(
        "stage_ab.py", "--before", str(REPO), "--shards", str(shards),
        "--tokenizer", str(tokenizer), "--profile", "tiny",
    )  # fmt: skip
    check_ratio(res["after_vs_before"], has_target=True)
    assert len(res["tokens_per_s"]["after"]) == res["after_vs_before"]["rounds"]


def test_integrity_smoke() -> None:
    res = run_smoke("integrity.py")
    assert res["step_s"] > 0 and res["checkpoint_saves"] >= 1
    for key in ("open_verify_ms", "batch_check_us", "checkpoint_hash_ms", "checkpoint_verify_ms"):
        assert res[key]["rounds"] >= 2 and res[key]["median"] >= 0, key
    assert res["run_share_pct"]["verdict"] in VERDICTS and res["run_share_pct"]["target"] == 1.0
    assert res["checks_s_per_run"] > 0


def test_serve_smoke() -> None:
    """A real ``scriptorium serve`` on a random tiny model, one client against four."""
    res = run_smoke("serve.py")
    check_ratio(res["aggregate_speedup"], has_target=True)
    assert res["ttft_s_one_client"]["target"] == 0.5
    assert res["prompt_tokens"] >= 90
    assert all(n > 0 for n in res["tokens_per_request"]["one"])
    assert all(len(r) == res["clients"] for r in res["tokens_per_request"]["four"])
    assert res["server"]["max_batch_seen"] >= 2  # the four requests shared decoding steps
    assert res["server"]["running"] == 0


def test_recipe_quality_smoke() -> None:
    """Both recipes train for a couple of seconds on the tests' corpus; bpb lands in the table."""
    res = run_smoke("recipe_quality.py")
    assert [r["recipe"] for r in res["rows"]] == ["old", "new"]
    assert (
        res["recipes"]["new"]["optimizer"] == "muon"
        and res["recipes"]["old"]["schedule"] == "cosine"
    )
    for row in res["rows"]:
        assert row["steps"] >= 1 and row["val_bpb"] > 0 and row["tokens_seen"] > 0
        assert res["val_bpb"][row["recipe"]][str(row["minutes"])] == row["val_bpb"]
