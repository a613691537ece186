"""``CI=true`` turns skips into failures (tests/conftest.py), except the allowlisted ones.

Each case runs pytest in a subprocess on a small probe file, with this repository's
``tests/conftest.py`` loaded as a plugin, and reads the outcomes from its JUnit XML.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.conftest import CI_ALLOWED_SKIP, REPO

PROBE = f'''
import pytest

def test_passes():
    pass

def test_imperative_skip():
    pytest.skip("no widget installed")

@pytest.mark.skip(reason="not today")
def test_marker_skip():
    pass

def test_missing_module():
    pytest.importorskip("scriptorium_no_such_module")

@pytest.mark.skipif(True, reason="{CI_ALLOWED_SKIP} needs a CUDA device")
def test_allowlisted():
    pass

@pytest.mark.xfail(reason="known bug", strict=False)
def test_expected_failure():
    assert False

def test_uses_mirror(mirror_dir):
    assert mirror_dir.is_dir()
'''
MODULE_SKIP = 'import pytest\npytest.importorskip("scriptorium_no_such_module")\n'


def _run(tmp_path: Path, ci: str | None, mirror: Path) -> tuple[dict[str, str], str, int]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PYTHONPATH=str(REPO), SCRIPTORIUM_TEST_MIRROR=str(mirror))
    if ci is not None:
        env["CI"] = ci
    xml = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-q", "-rA", "--continue-on-collection-errors", f"--junitxml={xml}", f"--rootdir={tmp_path}", "-c", os.devnull, "."],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    outcomes: dict[str, str] = {}
    if xml.exists():
        for case in ET.parse(xml).iter("testcase"):
            name = case.get("name") or case.get("classname") or ""
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            outcomes[name] = kinds[0] if kinds else "passed"
    return outcomes, proc.stdout + proc.stderr, proc.returncode


def test_without_ci_skips_stay_skips(tmp_path: Path, mirror_dir: Path) -> None:
    outcomes, out, rc = _run(tmp_path, None, mirror_dir)
    assert rc == 0, out
    assert outcomes["test_passes"] == outcomes["test_uses_mirror"] == "passed"
    for name in ("test_imperative_skip", "test_marker_skip", "test_missing_module"):
        assert outcomes[name] == "skipped", (name, out)
    assert outcomes["test_allowlisted"] == outcomes["test_expected_failure"] == "skipped"


def test_under_ci_skips_fail_with_their_reason(tmp_path: Path, mirror_dir: Path) -> None:
    outcomes, out, rc = _run(tmp_path, "true", mirror_dir)
    assert rc == 1, out
    assert outcomes["test_passes"] == outcomes["test_uses_mirror"] == "passed"
    assert outcomes["test_imperative_skip"] == outcomes["test_missing_module"] == "failure"
    assert outcomes["test_marker_skip"] == "error"  # skipped in setup: reported as an error
    prefix = "skipped under CI=true, which counts as a failure:"
    for reason in ("no widget installed", "not today", "could not import 'scriptorium_no_such"):
        assert f"{prefix} {reason}" in out, reason
    assert outcomes["test_allowlisted"] == "skipped"  # the allowlist
    assert outcomes["test_expected_failure"] == "skipped"  # an xfail is not a skip
    assert "ERROR test_module_skip.py" in out  # a module skipped at collection fails too


def test_under_ci_a_missing_mirror_stops_the_session(tmp_path: Path) -> None:
    missing = tmp_path / "no-mirror-here"
    _, out, rc = _run(tmp_path, "true", missing)
    assert rc == 4, out
    assert f"CI=true: data mirror not found at {missing}" in out
