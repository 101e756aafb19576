"""Module-level task functions for test_lifetime (spawn and forkserver
workers import them by name)."""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd

import sharedexec

from ._tasks import checksum, touch, wait_for


def frame_checksum(df: pd.DataFrame, started: str | None = None):
    if started is not None:
        touch(f"{started}.{os.getpid()}")
    return checksum(df)


@sharedexec.shared(min_bytes=1000)
def shared_checksum(args):
    df, started = args
    return frame_checksum(df, started)


@sharedexec.shared(min_bytes=1000)
def shared_wait(args):
    """Start, say so, and wait for a file that never comes (the pool is
    terminated) -- or die, if asked to."""
    df, started, release, die = args
    touch(f"{started}.{os.getpid()}")
    if die:
        os._exit(1)
    wait_for(release)
    return checksum(df)


def consume(queue, done: str) -> None:
    """A process that is no pool worker: receives shared frames through a
    queue, uses them, keeps none, and lives on."""
    count = 0
    while (df := queue.get()) is not None:
        checksum(df)
        count += 1
        del df
    touch(done)
    while True:
        time.sleep(1)


def loky_guard_touch(df: pd.DataFrame, tighten: bool):
    """In a loky worker: make the memory-leak guard strict (10 MB, checked
    at every task) the first time, read every page of the frame after."""
    from joblib.externals.loky import process_executor

    if tighten:
        process_executor._MAX_MEMORY_LEAK_SIZE = 10 << 20
        process_executor._MEMORY_LEAK_CHECK_DELAY = 0.0
        return os.getpid()
    checksum(df)
    return os.getpid()


def mapped_segments(pid: int) -> list[str]:
    """The sx_ segments process ``pid`` maps now."""
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split("/")[-1].split()[0] for line in f if "/sx_" in line})


def head(obj):
    """The first rows of what a task received (a small result)."""
    return obj.head(4).copy()


@sharedexec.shared(min_bytes=1000)
def shared_head(obj):
    return head(obj)


def touch_columns(df: pd.DataFrame, k: int, seconds: float = 0.0):
    """Read every page of the first ``k`` columns, take ``seconds``; say
    which worker did."""
    time.sleep(seconds)
    return float(df.iloc[:, :k].to_numpy().sum()), os.getpid()


try:
    from sklearn.base import BaseEstimator, RegressorMixin

    _ESTIMATOR_BASES: tuple[type, ...] = (RegressorMixin, BaseEstimator)
except ImportError:  # scikit-learn is a test extra (the compat run has none)
    _ESTIMATOR_BASES = (object,)


class PidEstimator(*_ESTIMATOR_BASES):
    """An estimator whose score is the pid of the worker that ran it."""

    def __init__(self, shift: float = 0.0):
        self.shift = shift

    def fit(self, X, y):
        self.total_ = float(X.to_numpy().sum()) + self.shift
        return self

    def score(self, X, y):
        return float(os.getpid())


def consume_checksums(queue, count: int, out: str) -> None:
    """Read ``count`` frames from ``queue``; write their checksums to ``out``."""
    sums = [checksum(queue.get()) for _ in range(count)]
    with open(out, "w") as f:
        f.write(repr(sums))


@sharedexec.shared(min_bytes=1000)
def shared_slow_checksum(df):
    time.sleep(1.5)  # longer than the lease grace period
    return checksum(df)


@sharedexec.shared
def shared_big_result(i: int):
    return np.full(2_000_000, i, dtype=np.float64)  # 16 MB: sent through shared memory


@sharedexec.shared(adopt=True)
def shared_len_adopting(df):
    return len(df)


def identity(obj):
    return obj


@sharedexec.shared(min_bytes=1000)
def shared_result_dying_mid_write(n: int):
    return result_dying_mid_write(n)


def result_dying_mid_write(n: int):
    """A large result whose writer dies once its segment exists, half
    written (a worker the OOM killer picks mid-result)."""
    from sharedexec import _segment

    fill = _segment._fill

    def die(fd, view, placed, *args, **kwargs):
        if placed[0][0] == 0:  # the header (where it is not written before the size)
            return fill(fd, view, placed, *args, **kwargs)
        os._exit(9)

    _segment._fill = die
    return np.zeros(n)


def send_a_result(owner: int, conn) -> None:
    """A worker of some other pool: writes a large result for ``owner``,
    sends its name and exits before ``owner`` claims it."""
    from sharedexec import _cache

    mapping, _ = _cache.write_result(np.arange(200_000, dtype=np.float64), owner)
    conn.send((mapping.name, mapping.key))
    conn.close()
