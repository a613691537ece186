"""What every benchmark shares: the machine record, interleaved rounds, and the ratio statistics.

A benchmark compares side A (ours) against side B (a baseline doing the same work) over several
*rounds*. Both sides are warmed up first (untimed), then every round runs each side once, back to
back, in an order that rotates from round to round, so a burst of load from a neighbour hits
both alike. :func:`compare` then reports:

- ``ratio_of_medians``: A's median against B's median (the headline figure);
- ``median_of_ratios``: the median of the per-round ratios (each round's two runs ran back to back);
- ``spread``: ``[min, max]`` of the per-round ratios, and ``rounds``;
- ``verdict`` against a target: ``met`` only when the whole spread clears it (its lower end for
  an "at least" target, its upper end for an "at most" one), ``missed`` when the whole spread
  falls short, otherwise ``within noise``; ``no target`` when there is none.

Ratios are always "A relative to B, higher is better for A": for times, B's time over A's; for
rates, A's rate over B's.

:func:`machine_info` records the CPU model, the flags that decide the kernels (avx2, avx512f,
avx512_bf16, amx), the clock, the load average and the torch version (read from the installed
package's metadata: importing this module never imports torch).

Stdlib only, so a benchmark's measured child processes can import it without raising their floor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model, flags of interest and clock from ``/proc/cpuinfo`` (and cpufreq where present)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags, mhz = None, set(), []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz":
            with contextlib.suppress(ValueError):
                mhz.append(float(value))
    info: dict[str, Any] = {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_flags": {f: f in flags for f in FLAGS_OF_INTEREST},
        "cpu_mhz": round(statistics.median(mhz), 1) if mhz else None,
        "cpu_mhz_range": [round(min(mhz), 1), round(max(mhz), 1)] if mhz else None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        info["cpu_max_mhz"] = round(int(max_khz.read_text()) / 1000, 1)
    except (OSError, ValueError):
        info["cpu_max_mhz"] = None
    return info


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without a load average
        return []


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Everything a figure needs to be read against: CPU, clock, load, library versions."""
    return {
        **cpu_info(),
        "loadavg": loadavg(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "tokenizers": package_version("tokenizers"),
        "transformers": package_version("transformers"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# ---------------------------------------------------------------------------------- verdicts
def verdict(lo: float, hi: float, target: float | None, *, at_most: bool = False) -> str:
    """``met`` only when the whole spread ``[lo, hi]`` clears ``target``.

    An "at least" target (the default) is met when ``lo >= target`` and missed when
    ``hi < target``; an ``at_most`` target is met when ``hi <= target`` and missed when
    ``lo > target``. Anything in between is ``within noise``.
    """
    if target is None:
        return "no target"
    if at_most:
        return "met" if hi <= target else "missed" if lo > target else "within noise"
    return "met" if lo >= target else "missed" if hi < target else "within noise"


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    lower_is_better: bool = True,
    target: float | None = None,
    at_most: bool = False,
    a_name: str = "a",
    b_name: str = "b",
) -> dict[str, Any]:
    """Statistics of A against B from paired rounds (``a[i]`` and ``b[i]`` ran in round ``i``).

    ``lower_is_better``: the values are times (ratio = B / A); otherwise rates (ratio = A / B).
    """
    if len(a) != len(b) or not a:
        raise ValueError(
            f"need the same non-zero number of rounds on both sides: {len(a)}, {len(b)}"
        )
    ma, mb = statistics.median(a), statistics.median(b)
    if lower_is_better:
        per_round = [y / x for x, y in zip(a, b, strict=True)]
        rom = mb / ma
    else:
        per_round = [x / y for x, y in zip(a, b, strict=True)]
        rom = ma / mb
    lo, hi = min(per_round), max(per_round)
    return {
        "a": a_name,
        "b": b_name,
        "a_median": _r(ma, 6),
        "b_median": _r(mb, 6),
        "ratio_of_medians": _r(rom),
        "median_of_ratios": _r(statistics.median(per_round)),
        "spread": [_r(lo), _r(hi)],
        "rounds": len(per_round),
        "per_round": [_r(x) for x in per_round],
        "target": target,
        "target_kind": "at most" if at_most else "at least",
        "verdict": verdict(lo, hi, target, at_most=at_most),
    }


def summarize(
    values: Sequence[float], *, target: float | None = None, at_most: bool = False
) -> dict[str, Any]:
    """One-sided figure over rounds (a throughput, a memory ratio): median, spread, verdict."""
    if not values:
        raise ValueError("no values")
    lo, hi = min(values), max(values)
    return {
        "median": _r(statistics.median(values)),
        "spread": [_r(lo), _r(hi)],
        "rounds": len(values),
        "target": target,
        "target_kind": "at most" if at_most else "at least",
        "verdict": verdict(lo, hi, target, at_most=at_most),
    }


def describe(stats: dict[str, Any], unit: str = "x") -> str:
    """One line for the log: ``1.03x (median of ratios 1.05x, spread 0.97-1.10x, 7 rounds): ...``."""
    if "ratio_of_medians" in stats:
        head = (
            f"{stats['ratio_of_medians']:.2f}{unit} (median of ratios "
            f"{stats['median_of_ratios']:.2f}{unit}"
        )
    else:
        head = f"{stats['median']:.2f}{unit} (median"
    lo, hi = stats["spread"]
    line = f"{head}, spread {lo:.2f}-{hi:.2f}{unit}, {stats['rounds']} rounds)"
    if stats["target"] is not None:
        sign = "<=" if stats["target_kind"] == "at most" else ">="
        line += f"; target {sign} {stats['target']}{unit}: {stats['verdict']}"
    return line


# ---------------------------------------------------------------------------------- rounds
def interleave(
    sides: dict[str, Callable[[], float | None]],
    *,
    rounds: int,
    warmup: int,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[float]]:
    """Warm every side up ``warmup`` times, then run ``rounds`` rounds of every side.

    A side returns the seconds it measured itself (e.g. a child process's timed region) or
    ``None`` to be timed here by wall clock. The order rotates each round (AB, BA, ... for two
    sides), so neither side always runs first; warm-up runs interleave the same way.
    """
    names = list(sides)
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    for w in range(warmup):
        for name in names[w % len(names) :] + names[: w % len(names)]:
            sides[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            got = sides[name]()
            out[name].append(time.perf_counter() - t0 if got is None else float(got))
        if log is not None:
            log(f"round {r + 1}/{rounds}: " + "  ".join(f"{n} {out[n][-1]:.3f}s" for n in names))
    return out


# ---------------------------------------------------------------------------------- CLI glue
def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings (a few seconds): exercises both sides and the statistics, so the "
        "script cannot rot; its figures mean nothing",
    )


def emit(result: dict[str, Any]) -> None:
    """Print the result as the last line (one JSON object) and flush."""
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)
