"""``scriptorium run``'s view of Dagster's CLI log (the whole-graph e2e run checks it for real)."""

from __future__ import annotations

import pytest

from pipeline.run_view import StepTimes, View, fmt_seconds

RUN = "bb826d0f-fcbe-4599-80f3-eeca18705812"
PREFIX = f"2026-12-05 06:05:55 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 19624"


def test_step_lines_progress_and_failure() -> None:
    view = View()
    assert view.feed(f"{PREFIX} - gutenberg_catalog - STEP_START - Started execution", 0.0) == [
        "▶ gutenberg_catalog"
    ]
    done = f'{PREFIX} - gutenberg_catalog - STEP_SUCCESS - Finished execution of step "x" in 125ms.'
    assert view.feed(done, 1.0) == ["✓ gutenberg_catalog (125ms)"]
    info = f"2026-12-05 06:10:56 +0000 - dagster - INFO - __ASSET_JOB - {RUN} - pretrained_weights"
    assert view.feed(f"{info} - step 10/100: loss=8.568, tokens_per_s=561", 10.0)[0].endswith(
        "ETA …"
    )  # one point gives no rate yet
    line = view.feed(f"{info} - step 20/100: loss=7.81, tokens_per_s=1763.6", 20.0)[0]
    assert (
        line
        == "  pretrained_weights 20/100 ▕████░░░░░░░░░░░░░░░░▏ · loss 7.810 · 1,764 tok/s · ETA 1m20s"
    )
    assert view.feed(f"{info} - step 20: loss=7.81", 20.0) == []  # old format: only logged
    assert view.feed("Fetching 1 files: 100%|██████████| 1/1", 21.0) == []
    failed = f"{PREFIX} - cleaned_books - STEP_FAILURE - Execution of step failed: ValueError"
    assert view.feed(failed, 22.0)[0].startswith("✗ cleaned_books: Execution")
    assert view.steps.failed == ["cleaned_books"] and view.run_id == RUN


def test_overhead_is_the_time_no_step_body_ran() -> None:
    times = StepTimes(
        started={"a": 0.0, "b": 2.0, "c": 10.0}, ended={"a": 5.0, "b": 6.0, "c": 12.0}
    )
    assert times.busy() == pytest.approx(8.0)  # [0, 6] and [10, 12]
    view = View(steps=times)
    assert view.overhead(20.0) == pytest.approx((12.0, 0.6))


def test_fmt_seconds() -> None:
    assert fmt_seconds(75) == "1m15s" and fmt_seconds(3725) == "1h02m"


def test_loading_the_code_location_does_not_load_torch() -> None:
    """Every Dagster step process loads ``pipeline.definitions``; torch (1.5-3 s to import on
    these CPUs) loads only in the Pipes children that train or score, so small steps start fast."""
    import subprocess
    import sys

    code = "import sys, pipeline.definitions; print('torch._C' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
