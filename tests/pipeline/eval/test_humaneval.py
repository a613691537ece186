"""HumanEval: the pass@k estimator, program assembly, and the sandbox stopping a completion that
loops forever, allocates 10 GB or opens a socket, each scored a failure while the rest of the
batch (and this process) carries on."""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest

from pipeline.eval.humaneval import pass_at_k, program, truncate_completion
from pipeline.eval.sandbox import SandboxLimits, describe, network_isolation, run_programs

PROMPT = '''from typing import List


def add(a: int, b: int) -> int:
    """Return the sum of a and b.
    >>> add(2, 3)
    5
    """
'''
TEST = """

METADATA = {}


def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0
"""
LIMITS = SandboxLimits(timeout_s=2.0, cpu_s=2, memory_mb=512, workers=2)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_pass_at_k_equals_the_closed_form(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed = 1.0 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct


def test_pass_at_k_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


def test_base_completion_stops_at_a_new_top_level_block() -> None:
    text = "    return a + b\n\n\ndef other():\n    pass\n"
    assert truncate_completion(text) == "    return a + b\n\n"
    assert truncate_completion("    return a + b\nprint(1)") == "    return a + b"


def test_chat_reply_with_a_fenced_function_replaces_the_stub() -> None:
    reply = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    src = program(PROMPT, reply, TEST, "add", chat=True)
    assert src.rstrip().endswith("check(add)") and "Sure" not in src and "Done." not in src
    body_only = program(PROMPT, "    return a + b", TEST, "add", chat=True)
    assert "    return a + b" in body_only
    [ok, body] = run_programs([src, body_only], LIMITS)
    assert ok.passed and body.passed, (ok, body)


def test_hostile_completions_are_stopped_and_scored_as_failures() -> None:
    completions = {
        "passes": "    return a + b\n",
        "wrong": "    return a - b\n",
        "loops": "    while True:\n        pass\n",
        "allocates_10gb": "    x = bytearray(10 * 2**30)\n    return a + b\n",
        "opens_socket": (
            "    import socket\n    s = socket.create_connection(('127.0.0.1', 9))\n"
            "    return a + b\n"
        ),
        "spawns_shell": "    import os\n    os.system('touch /tmp/escaped')\n    return a + b\n",
    }
    sources = [program(PROMPT, c, TEST, "add", chat=False) for c in completions.values()]
    t0 = time.perf_counter()
    outcomes = dict(zip(completions, run_programs(sources, LIMITS), strict=True))
    elapsed = time.perf_counter() - t0
    status = {k: o.status for k, o in outcomes.items()}
    assert status == {
        "passes": "passed",
        "wrong": "failed",
        "loops": "timeout",
        "allocates_10gb": "memory",
        "opens_socket": "blocked",
        "spawns_shell": "blocked",
    }
    assert [k for k, o in outcomes.items() if o.passed] == ["passes"]
    assert "AssertionError" in outcomes["wrong"].stderr_tail
    assert outcomes["loops"].seconds < LIMITS.timeout_s + 2
    assert elapsed < 15  # the endless loop cost its time limit, not the run
    # The run goes on: the next program in the same process is scored normally.
    [again] = run_programs([sources[0]], LIMITS)
    assert again.passed


def test_without_a_namespace_the_audit_hook_still_refuses_sockets() -> None:
    """The fallback for machines without user namespaces: a real listener on loopback must see
    no connection from the program."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[object] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                accepted.append(server.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    sneaky = (
        "    import importlib\n    s = importlib.import_module('socket')\n"
        f"    s.create_connection(('127.0.0.1', {port})).sendall(b'hi')\n    return a + b\n"
    )
    [out] = run_programs([program(PROMPT, sneaky, TEST, "add", chat=False)], LIMITS, "audit-hook")
    time.sleep(0.3)  # a connection made before the program exited is queued by now
    done.set()
    thread.join()
    server.close()
    assert out.status == "blocked" and not accepted
    assert "audit hook" in describe(LIMITS, "audit-hook")["network"]


def test_network_isolation_is_probed_and_described() -> None:
    mode = network_isolation()
    assert mode in {"namespace", "audit-hook"}
    facts = describe(LIMITS, mode)
    assert facts["timeout_s"] == 2.0 and facts["memory_mb"] == 512 and facts["cpu_s"] == 2
