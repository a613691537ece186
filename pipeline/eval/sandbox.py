"""Running model-written Python (HumanEval completions) where it cannot hurt the evaluation.

Each program runs in its own process, in a fresh temporary directory that is deleted afterwards,
with:

* a wall-clock limit: the process group is killed when it runs past ``timeout_s``;
* rlimits set in the child before the program starts: CPU seconds (``RLIMIT_CPU``), address space
  (``RLIMIT_AS``, so allocating 10 GB raises MemoryError), file size (``RLIMIT_FSIZE``), open
  files, no core dumps;
* no network: a fresh, empty network namespace (``unshare --user --net``, only a loopback that
  is down) where the kernel allows unprivileged user namespaces; and in every case an audit hook
  (PEP 578) that refuses sockets, subprocesses, ``fork``/``exec``, ``ctypes`` and deleting or
  renaming files before the program's first line runs;
* an isolated interpreter (``-I -S``: no environment variables, no user or site packages) with
  a minimal environment, stdin from /dev/null, output to size-limited files.

This is a guard against the accidents of generated code (an endless loop, a huge list, a stray
``rm``), the same threat model as OpenAI's ``human-eval`` ``reliability_guard``, not a boundary
against an adversary: the audit hook lives in the same interpreter as the program. The namespace
is the real network barrier; :func:`network_isolation` says which of the two a run had, and the
report prints it with the limits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BLOCKED_MARK = "SANDBOX-BLOCKED"
OUTPUT_TAIL = 400  # characters of a failing program's stderr kept for the report

# Runs before the program, inside the child: rlimits, then the audit hook, then the program.
_BOOTSTRAP = r"""
import resource, sys
cpu, mem, fsize = (int(a) for a in sys.argv[2:5])
for lim, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                   (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_CORE, (0, 0)),
                   (resource.RLIMIT_NOFILE, (64, 64))):
    resource.setrlimit(lim, value)
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
           "os.fork", "os.forkpty", "pty.", "os.remove", "os.unlink", "os.rmdir", "os.rename",
           "os.replace", "shutil.rmtree", "os.chmod", "os.chown", "os.kill", "os.killpg",
           "os.truncate", "ctypes.", "_thread.start_new_thread", "winreg.", "webbrowser.")
NO_IMPORT = {"ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl", "subprocess", "multiprocessing"}
def guard(event, args):
    if event.startswith(BLOCKED) or (event == "import" and args and args[0] in NO_IMPORT):
        raise PermissionError(f"MARK: {event} {args[0] if args else ''}")
path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    code = compile(f.read(), path, "exec")
sys.argv = [path]
sys.addaudithook(guard)
exec(code, {"__name__": "__main__", "__file__": path})
""".replace("MARK", BLOCKED_MARK)


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use; printed in the report beside the scores."""

    timeout_s: float = 5.0  # wall clock
    cpu_s: int = 5  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    file_mb: int = 16  # RLIMIT_FSIZE (its own output files included)
    workers: int = 2  # programs at once

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """``status``: passed, failed (an exception or exit code), timeout, memory, blocked (the
    audit hook refused an operation) or killed (a signal, e.g. the CPU limit)."""

    status: str
    seconds: float
    returncode: int | None
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_isolation() -> str:
    """``"namespace"`` when an unprivileged user+network namespace can be made here (checked
    once, by running ``true`` in one), else ``"audit-hook"``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "audit-hook"
    try:
        ok = subprocess.run(
            [unshare, "--user", "--net", "--map-root-user", "true"],
            capture_output=True,
            timeout=10,
        ).returncode
    except (OSError, subprocess.TimeoutExpired):
        return "audit-hook"
    return "namespace" if ok == 0 else "audit-hook"


def describe(limits: SandboxLimits, network: str | None = None) -> dict[str, Any]:
    """The limits and isolation a report states beside the HumanEval scores."""
    net = network or network_isolation()
    return {
        **limits.to_dict(),
        "network": (
            "none: empty network namespace (unshare) + audit hook refusing sockets"
            if net == "namespace"
            else "audit hook refusing sockets (no user namespaces on this machine)"
        ),
        "process": "own process group, python -I -S, throw-away working directory, stdin closed",
        "blocked": "sockets, subprocesses, fork/exec, ctypes, deleting/renaming files",
    }


def _command(program: Path, limits: SandboxLimits, network: str) -> list[str]:
    mem = limits.memory_mb * 2**20
    cmd = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, str(program)]
    cmd += [str(limits.cpu_s), str(mem), str(limits.file_mb * 2**20)]
    if network == "namespace":
        cmd = ["unshare", "--user", "--net", "--map-root-user", "--", *cmd]
    return cmd


def _classify(rc: int | None, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "passed"
    if BLOCKED_MARK in stderr:
        return "blocked"
    if "MemoryError" in stderr:
        return "memory"
    if rc is not None and rc < 0:
        return "killed"
    return "failed"


def run_program(source: str, limits: SandboxLimits, network: str | None = None) -> Outcome:
    """Run ``source`` once under ``limits``; never raises for anything the program does."""
    net = network or network_isolation()
    with tempfile.TemporaryDirectory(prefix="scriptorium-sandbox-") as tmp:
        work = Path(tmp)
        program = work / "program.py"
        program.write_text(source, encoding="utf-8")
        out, err = work / "stdout.txt", work / "stderr.txt"
        t0 = time.perf_counter()
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                _command(program, limits, net),
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work)},
                start_new_session=True,  # its own process group: one kill reaches everything
            )
            timed_out = False
            try:
                rc: int | None = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.wait()
        seconds = time.perf_counter() - t0
        with err.open("rb") as f:
            f.seek(max(0, err.stat().st_size - 4 * OUTPUT_TAIL))
            stderr = f.read().decode("utf-8", "replace")
        # The program may have left files it could not delete (we blocked it): make sure the
        # temporary directory can go.
        for p in work.rglob("*"):
            if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
                p.chmod(0o700)
    status = _classify(rc, stderr, timed_out)
    tail = "" if status == "passed" else stderr.strip()[-OUTPUT_TAIL:]
    return Outcome(status, round(seconds, 3), rc, tail)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_programs(
    sources: Sequence[str], limits: SandboxLimits, network: str | None = None
) -> list[Outcome]:
    """Every program under ``limits``, ``limits.workers`` at a time, in input order."""
    net = network or network_isolation()
    with ThreadPoolExecutor(max_workers=max(1, limits.workers)) as pool:
        return list(pool.map(lambda s: run_program(s, limits, net), sources))
