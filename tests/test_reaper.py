"""The reaper: a process's segments go when it dies, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd

import sharedexec
from sharedexec import _reaper, _segment

from .conftest import owned_segments

OWNER = textwrap.dedent(
    """
    import os, sys, numpy as np, pandas as pd, sharedexec
    kept = sharedexec.share(pd.DataFrame({"a": np.arange(1_000_000)}))
    print(os.getpid(), flush=True)
    sys.stdin.readline()  # until the test has looked
    ENDING
    """
)


def run_owner(ending: str) -> tuple[subprocess.Popen, int]:
    """The child and its pid as it sees it (a launcher may stand between)."""
    child = subprocess.Popen(
        [sys.executable, "-c", OWNER.replace("ENDING", ending)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid = int(child.stdout.readline())
    assert owned_segments(pid)  # the frame and the lease board
    return child, pid


def wait_until_clean(pid: int, seconds: float = 5.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while owned_segments(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return owned_segments(pid)


def test_sigkill_of_the_owner_leaves_nothing():
    child, pid = run_owner("sys.stdin.readline()")
    os.kill(pid, signal.SIGKILL)
    child.wait()
    assert wait_until_clean(pid) == []


def test_normal_exit_leaves_nothing_and_says_nothing():
    child, pid = run_owner("")
    _, stderr = child.communicate("\n", timeout=60)
    assert child.returncode == 0 and stderr == ""
    assert owned_segments(pid) == []  # removed at exit, before the reaper's sweep


def test_exit_by_exception_leaves_nothing():
    child, pid = run_owner("raise SystemExit(3)")
    child.communicate("\n", timeout=60)
    assert child.returncode == 3 and wait_until_clean(pid) == []


def test_a_killed_reaper_is_replaced_before_the_next_segment():
    sharedexec.share(pd.DataFrame({"a": np.arange(10)}))
    first = _reaper._reaper_pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _reaper._alive(first) and time.monotonic() < deadline:
        time.sleep(0.01)
    _segment.prepare_owner()
    assert _reaper._reaper_pid != first and _reaper._alive(_reaper._reaper_pid)
