"""``scriptorium run``: the whole graph (or a selection) with a view a person can read.

``dagster asset materialize`` prints every event at DEBUG, several thousand lines for the demo.
This wraps that same command (the shared interface stays one ``dagster asset materialize
--select '*'``), keeps its full output in a log file, and prints instead:

- one line when a step starts and one when it ends, with its duration;
- during training, one progress line per logged step: step k/N, loss, tokens/s and an ETA;
- at the end, a summary: wall time, the orchestration overhead (wall time during which no step
  body ran: process start-up, code-location loads, hand-offs), the artefacts written, the headline
  figures of ``evaluation_report`` and how to open the Dagster and MLflow UIs on this run.

The parser reads Dagster's CLI log format; a line it does not recognise is only logged, so a
format change degrades the view, never the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# "2026-12-05 06:05:55 +0000 - dagster - DEBUG - __ASSET_JOB - <run id> - <pid> - <step> - EVENT - msg"
EVENT = re.compile(
    r" - dagster - \w+ - (?P<job>[^ ]+) - (?P<run>[0-9a-f-]{36}) - (?:\d+ - )?"
    r"(?P<step>[^ ]+) - (?P<event>STEP_START|STEP_SUCCESS|STEP_FAILURE|STEP_SKIPPED) - (?P<msg>.*)"
)
RUN_EVENT = re.compile(
    r" - dagster - \w+ - [^ ]+ - (?P<run>[0-9a-f-]{36}) - (?:\d+ - )?"
    r"(?P<event>RUN_START|RUN_SUCCESS|RUN_FAILURE) - (?P<msg>.*)"
)
# INFO lines a step logs: "... - <run id> - <step> - <message>"
INFO = re.compile(
    r" - dagster - (?:INFO|WARNING|ERROR) - [^ ]+ - [0-9a-f-]{36} - (?P<step>[^ ]+) - (?P<msg>.*)"
)
PROGRESS = re.compile(r"^step (?P<k>\d+)/(?P<n>\d+): (?P<metrics>.*)$")
METRIC = re.compile(r"(\w+)=([-+0-9.eE]+)")
DURATION = re.compile(r" in (?P<v>[0-9.]+)(?P<u>ms|s|m)\b")


@dataclass
class StepTimes:
    """When each step's body ran, as seen by this process (monotonic seconds)."""

    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def busy(self) -> float:
        """Seconds during which at least one step body was running (the union of intervals)."""
        spans = sorted((s, self.ended.get(k, s)) for k, s in self.started.items())
        total, cur_start, cur_end = 0.0, None, None
        for start, end in spans:
            if cur_end is None or start > cur_end:
                if cur_end is not None and cur_start is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        if cur_end is not None and cur_start is not None:
            total += cur_end - cur_start
        return total


@dataclass
class View:
    """Turns Dagster's log lines into the concise view; ``lines`` of output per input line."""

    started_at: float = field(default_factory=time.monotonic)
    steps: StepTimes = field(default_factory=StepTimes)
    run_id: str = ""
    progress_seen: dict[str, tuple[float, int]] = field(default_factory=dict)

    def feed(self, line: str, now: float | None = None) -> list[str]:
        """The view's lines for one line of Dagster output."""
        now = time.monotonic() if now is None else now
        if m := RUN_EVENT.search(line):
            self.run_id = m["run"]
            if m["event"] == "RUN_FAILURE":
                return [f"✗ run failed: {m['msg']}"]
            return []
        if m := EVENT.search(line):
            self.run_id = self.run_id or m["run"]
            step, event = m["step"], m["event"]
            if event == "STEP_START":
                self.steps.started[step] = now
                return [f"▶ {step}"]
            self.steps.ended[step] = now
            if event == "STEP_SUCCESS":
                d = DURATION.search(m["msg"])
                took = (
                    f"{d['v']}{d['u']}" if d else f"{now - self.steps.started.get(step, now):.1f}s"
                )
                return [f"✓ {step} ({took})"]
            if event == "STEP_FAILURE":
                self.steps.failed.append(step)
                return [f"✗ {step}: {m['msg'][:300]}"]
            return [f"- {step} skipped"]
        if (m := INFO.search(line)) and (p := PROGRESS.match(m["msg"])):
            return [self._progress(m["step"], int(p["k"]), int(p["n"]), p["metrics"], now)]
        return []

    def _progress(self, step: str, k: int, n: int, metrics: str, now: float) -> str:
        """``step 10/600 ▕███░░░░▏ loss 6.12 · 812 tok/s · ETA 12m30s``."""
        first = self.progress_seen.setdefault(step, (now, k))
        rate = (k - first[1]) / (now - first[0]) if now > first[0] and k > first[1] else 0.0
        eta = f"ETA {fmt_seconds((n - k) / rate)}" if rate > 0 else "ETA …"
        values = dict(METRIC.findall(metrics))
        width = 20
        done = int(width * k / max(n, 1))
        bar = "█" * done + "░" * (width - done)
        parts = [f"  {step} {k}/{n} ▕{bar}▏"]
        if "loss" in values:
            parts.append(f"loss {float(values['loss']):.3f}")
        if "tokens_per_s" in values:
            parts.append(f"{float(values['tokens_per_s']):,.0f} tok/s")
        parts.append(eta)
        return " · ".join(parts)

    def overhead(self, wall: float) -> tuple[float, float]:
        """(seconds with no step body running, as a fraction of ``wall``)."""
        idle = max(wall - self.steps.busy(), 0.0)
        return idle, idle / wall if wall > 0 else 0.0


def fmt_seconds(s: float) -> str:
    """``75`` → ``1m15s``."""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_bytes(n: int) -> str:
    """Bytes in the unit a person reads."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summary(view: View, wall: float, data_root: Path, log_path: Path, rc: int) -> list[str]:
    """The closing lines: outcome, overhead, artefacts, headline figures, where to look next."""
    idle, frac = view.overhead(wall)
    lines = [
        "",
        f"{'✓ done' if rc == 0 else f'✗ failed (exit {rc})'} in {fmt_seconds(wall)}; "
        f"{len(view.steps.ended)} steps; orchestration overhead {fmt_seconds(idle)} "
        f"({frac:.0%} of the wall time with no step running)",
    ]
    if view.steps.failed:
        lines.append("failed steps: " + ", ".join(view.steps.failed))
    if data_root.is_dir():
        lines.append(f"artefacts in {data_root}:")
        for folder in sorted(p for p in data_root.iterdir() if p.is_dir()):
            if folder.name in ("hf_cache", "mlartifacts", "logs"):
                continue
            lines.append(f"  {folder.name:<22} {fmt_bytes(folder_size(folder)):>10}")
    report = data_root / "evaluation_report" / "report.json"
    if report.is_file():
        try:
            headline = json.loads(report.read_text()).get("headline", {})
        except (OSError, json.JSONDecodeError):
            headline = {}
        if headline:
            lines.append(f"evaluation_report headline ({report.parent / 'report.html'}):")
            lines += [
                f"  {k:<28} {v:.4g}" for k, v in headline.items() if isinstance(v, float | int)
            ]
    lines += [
        f"full event log: {log_path}",
        "UIs: `make ui` then Dagster http://127.0.0.1:3000"
        + (f"/runs/{view.run_id}" if view.run_id else "")
        + " and MLflow http://127.0.0.1:5000",
    ]
    return lines


def materialize_command(select: str) -> list[str]:
    """The one shared-interface command this view wraps."""
    dagster = Path(sys.executable).with_name("dagster")
    exe = str(dagster) if dagster.exists() else "dagster"
    return [exe, "asset", "materialize", "-m", "pipeline.definitions", "--select", select]


def stream(lines: Iterable[str], view: View, log: IO[str], out: IO[str], verbose: bool) -> None:
    """Log every line; print the view's lines (or every line when ``verbose``)."""
    for line in lines:
        log.write(line)
        if verbose:
            out.write(line)
        else:
            for shown in view.feed(line):
                out.write(shown + "\n")
        out.flush()


def default_log_path(data_root: Path) -> Path:
    """``$SCRIPTORIUM_DATA/logs/materialize-<UTC time>.log``."""
    return data_root / "logs" / time.strftime("materialize-%Y%m%dT%H%M%SZ.log", time.gmtime())


def run(select: str, data_root: Path, log_path: Path | None, verbose: bool, out: IO[str]) -> int:
    """Materialise ``select``; the exit status is Dagster's."""
    log_path = log_path or default_log_path(data_root)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = materialize_command(select)
    view = View()
    out.write(f"$ {' '.join(cmd)}   (full log: {log_path})\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        open(log_path, "w", encoding="utf-8") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        ) as proc,
    ):
        assert proc.stdout is not None
        try:
            stream(_lines(proc.stdout), view, log, out, verbose)
        except KeyboardInterrupt:
            proc.terminate()
            raise
        rc = proc.wait()
    wall = time.monotonic() - view.started_at
    out.write("\n".join(summary(view, wall, data_root, log_path, rc)) + "\n")
    return rc


def _lines(pipe: IO[str]) -> Iterator[str]:
    """Lines as they arrive (tqdm's carriage returns kept inside a line)."""
    yield from iter(pipe.readline, "")


def _cmd_run(args: argparse.Namespace) -> int:
    """``scriptorium run``: materialise the selection with the concise view."""
    from pipeline.artefacts import data_root

    root = data_root()
    return run(args.select, root, args.log, args.verbose, sys.stdout)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``scriptorium run`` (what ``make run`` calls)."""
    cmd = subparsers.add_parser(
        "run", help="materialise the graph with a concise view (the full log goes to a file)"
    )
    cmd.add_argument("--select", default="*", help="Dagster asset selection (default: '*')")
    cmd.add_argument("--log", type=Path, default=None,
                     help="full event log (default: $SCRIPTORIUM_DATA/logs/materialize-<time>.log)")  # fmt: skip
    cmd.add_argument("--verbose", action="store_true", help="print every Dagster line as well")
    cmd.set_defaults(func=_cmd_run)
