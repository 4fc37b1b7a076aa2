"""The export's progress: status lines from the watchdog process while the export itself is busy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from export.watchdog import handle, status
from tests.conftest import REPO_ROOT


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_a_busy_step_gets_status_lines_even_while_it_holds_the_gil():
    # 3 ** 4_000_000 in C holds the GIL: no thread of the export could speak meanwhile
    result = _run("""
        import logging, sys, time
        from export import progress
        logging.getLogger("export").addHandler(logging.StreamHandler(sys.stderr))
        logging.getLogger("export").setLevel(logging.INFO)
        progress.INTERVAL = 0.5
        progress.start()
        logging.getLogger("export").info("started")
        with progress.heartbeat("building a model"):
            began = time.monotonic()
            while time.monotonic() - began < 2.5:
                x = 3 ** 4_000_000
        with progress.Progress("scoring", 10) as counted:
            counted.update(4, 0.0)
            time.sleep(1.5)
        progress.stop()
    """)
    assert result.returncode == 0, result.stderr
    beats = [line for line in result.stderr.splitlines() if "building a model: still working" in line]
    counts = [line for line in result.stderr.splitlines() if "scoring: 4/10 inputs" in line]
    assert len(beats) >= 2 and counts and "s left" in counts[-1], result.stderr


def test_nothing_is_written_without_the_watchdog_or_when_quiet():
    result = _run("""
        from export import progress
        with progress.heartbeat("building"), progress.Progress("scoring", 3) as counted:
            counted.update(3)
    """)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_status_lines_estimate_the_time_left_from_the_work_done():
    stack: list[dict] = []
    handle('push\t{"id": "1", "what": "scoring", "total": 100, "unit": "inputs", "work": 1000, "started": 0}', stack)
    assert status(stack[-1], 5.0) == "scoring: 0/100 inputs, 5 s, estimating the time left"
    handle("count\t1\t50\t250.0", stack)  # half the inputs, a quarter of the tokens: three times as long to go
    assert status(stack[-1], 10.0) == "scoring: 50/100 inputs, 10 s, about 30 s left"
    handle('push\t{"id": "2", "what": "building", "total": null, "started": 8}', stack)
    assert status(stack[-1], 10.0) == "building: still working, 2 s"
    handle('push\t{"id": "3", "what": "building", "total": null, "started": 8, "expected": 12}', stack)
    assert status(stack[-1], 10.0) == "building: 2 s, about 10 s left"
    assert status(stack[-1], 30.0) == "building: still working, 22 s"
    handle("pop\t3", stack)
    assert handle("line", stack) is True
    handle("pop\t2", stack)
    assert [a["id"] for a in stack] == ["1"]
