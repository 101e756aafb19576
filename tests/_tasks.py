"""Task functions for the executor and joblib tests.

They live in an importable module, not in the test files, so that workers
started by spawn and forkserver can unpickle them by reference (design brief,
trap 5). Processes are sequenced through files (``wait_for``), never through
sleeps: a task that must stay busy blocks until the test creates its release
file.
"""

from __future__ import annotations

import mmap
import os
import signal
import threading
import time

import numpy as np
import pandas as pd

import sharedexec
from sharedexec import _codec

# Generous: only reached if a test forgets to release a task, so that a
# mistake fails that test instead of hanging the suite.
WAIT_LIMIT = 120.0


def wait_for(path: str, limit: float = WAIT_LIMIT) -> None:
    """Block until ``path`` exists (created by the test process)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was never created")
        time.sleep(0.005)


def cpu_stalled_seconds() -> float | None:
    """Seconds in which some runnable task of this machine waited for a CPU,
    since boot (Linux pressure stall information); None without PSI."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1]) / 1e6  # microseconds
    except (OSError, IndexError, ValueError):
        return None


def wait_until(predicate, limit: float = WAIT_LIMIT, uncontended: bool = False) -> None:
    """Block until ``predicate()`` is true (a state another thread or process
    reaches); fail after ``limit`` seconds rather than hang.

    ``uncontended``: ``limit`` is a latency promised on an idle machine
    ("memory comes back within 5 s"). Time in which the CPUs were contended
    (other test suites on this 2-core machine) does not count towards it, up
    to WAIT_LIMIT in all: an idle machine keeps the exact bound, a loaded one
    no longer fails it for want of a CPU."""
    start, stalled = time.monotonic(), cpu_stalled_seconds() if uncontended else None
    while not predicate():
        elapsed = time.monotonic() - start
        counted = elapsed if stalled is None else elapsed - (cpu_stalled_seconds() - stalled)
        if counted > limit or elapsed > WAIT_LIMIT:
            raise TimeoutError(f"{predicate} never became true ({elapsed:.1f} s, {counted:.1f} s of it uncontended)")
        time.sleep(0.005)


def touch(path: str) -> None:
    with open(path, "w"):
        pass


# -- frames ----------------------------------------------------------------------


def make_frame(rows: int = 100_000, strings: str | None = "default", seed: int = 0) -> pd.DataFrame:
    """A frame of ``rows`` rows: two float64 and one int64 column (2.4 MB per
    100k rows), plus a string column: ``"default"`` (what pandas infers:
    ``str``, Arrow-backed with pyarrow, in pandas 3; object in pandas 2),
    ``"object"`` (Python objects), ``"arrow"`` (Arrow-backed) or None."""
    rng = np.random.default_rng(seed)
    data = {
        "a": rng.random(rows),
        "b": rng.random(rows),
        "i": np.arange(rows, dtype=np.int64) + seed,
    }
    labels = [f"s{k % 97}" for k in range(rows)]
    if strings == "default":
        data["s"] = labels  # inferred: pandas 3's ``str`` (Arrow-backed with pyarrow), pandas 2's object
    elif strings == "object":
        data["s"] = pd.Series(labels, dtype=object)
    elif strings == "arrow":
        try:  # pandas 3's ``str`` with pyarrow
            dtype = pd.StringDtype("pyarrow", na_value=np.nan)
        except TypeError:  # pandas 2.2
            dtype = pd.StringDtype("pyarrow")
        data["s"] = pd.Series(labels, dtype=dtype)
    elif strings is not None:
        raise ValueError(strings)
    return pd.DataFrame(data)


def checksum(frame: pd.DataFrame | None):
    """What a task reports about the frame it received: enough to tell a
    wrong, truncated or foreign frame from the right one."""
    if frame is None:
        return None
    out = (len(frame), float(frame["a"].sum()), int(frame["i"].sum()), tuple(frame.columns))
    if "s" in frame.columns:
        out += (str(frame["s"].dtype), str(frame["s"].iloc[-1]))
    return out


def is_mapped(arr: np.ndarray) -> bool:
    """Whether ``arr``'s memory is a memory-mapped segment (not a pickled copy)."""
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    # A segment's mapping (_segment.map_fd), or a private copy of one (an mmap).
    return hasattr(base, "sharedexec_read_only") or isinstance(base, mmap.mmap)


def numeric_blocks(frame: pd.DataFrame) -> list[np.ndarray]:
    """The numpy arrays holding ``frame``'s numeric columns."""
    arrays = [blk.values for blk in frame._mgr.blocks]
    return [a for a in arrays if isinstance(a, np.ndarray) and a.dtype.kind in "fiu"]


#: Whether a frame's numeric columns are writable in a task under
#: mmap_mode="r": where pandas writes in place (2.2 without Copy-on-Write),
#: a task's frame is over a private mapping of the segment (docs: semantics).
MAPPED_WRITABLE = _codec.writes_in_place(pd.DataFrame)


def numeric_backing(frame: pd.DataFrame) -> dict[str, tuple[bool, bool]]:
    """``{column: (memory-mapped, writeable)}`` for the numpy-backed columns."""
    out = {}
    for blk in frame._mgr.blocks:
        if isinstance(blk.values, np.ndarray) and blk.values.dtype.kind in "fiu":
            for loc in blk.mgr_locs.as_array:
                out[frame.columns[loc]] = (is_mapped(blk.values), bool(blk.values.flags.writeable))
    return out


# -- conformance tasks ---------------------------------------------------------------


def square(x, frame=None):
    return x * x, checksum(frame)


def pid_of(x, frame=None):
    return os.getpid(), x


def fail_on_purpose(x, frame=None):
    raise ValueError(f"task {x} failed on purpose")


class TaskError(Exception):
    """A user exception type: must come back as itself."""


def fail_with_task_error(x, frame=None):
    raise TaskError("custom", x)


def fail_numpy_read_only(x, frame=None):
    """numpy's read-only error on an array the task made itself: nothing to do
    with shared memory."""
    arr = np.broadcast_to(np.zeros(1), (3,))
    arr[0] = 1.0
    return x


def block_until(release: str, value=None, frame=None, started: str | None = None):
    if started is not None:
        touch(started)
    wait_for(release)
    return value, checksum(frame)


def kill_self(x, frame=None):
    os.kill(os.getpid(), signal.SIGKILL)


def return_lock(x, frame=None):
    return threading.Lock()


def return_socket(x, frame=None):
    """A result only multiprocessing's pickler can send (it passes the fd)."""
    import socket

    return socket.socket()


def return_lambda(x, frame=None):
    return lambda: x


INIT_VALUE = None


def set_init_value(value) -> None:
    global INIT_VALUE
    INIT_VALUE = value


def get_init_value(x, frame=None):
    return INIT_VALUE, x, checksum(frame)


def failing_initializer() -> None:
    raise RuntimeError("initializer failed on purpose")


# -- sharing tasks -------------------------------------------------------------------


def backing_of(x, frame):
    return numeric_backing(frame)


def frame_result(rows: int, seed: int = 0, strings: str | None = "default") -> pd.DataFrame:
    return make_frame(rows, strings=strings, seed=seed)


def array_result(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


def mutate_and_describe(frame: pd.DataFrame):
    """What the task saw, then changes its frame every way a task can
    without writing into shared data."""
    seen = (tuple(frame.columns), dict(frame.attrs), frame.index.name, frame.columns.name)
    frame["added"] = 1
    frame.attrs["touched"] = True
    frame.index.name = "renamed"
    frame.columns.name = "cols"
    frame.rename(columns={"a": "A"}, inplace=True)
    return os.getpid(), seen


def write_array(arr: np.ndarray, value: float = -1.0):
    arr[0] = value
    return float(arr[0])


def read_array_head(arr: np.ndarray):
    return float(arr[0])


def write_via_to_numpy(frame: pd.DataFrame, value: float = -1.0):
    """The usual way around pandas 3's read-only ``to_numpy()`` views."""
    values = frame["a"].to_numpy()
    values.flags.writeable = True
    values[0] = value
    return float(frame["a"].iloc[0])


def read_frame_head(frame: pd.DataFrame):
    return float(frame["a"].iloc[0])


# -- joblib ---------------------------------------------------------------------------


def nested_parallel(x, backend=None, frame=None):
    from joblib import Parallel, delayed

    inner = Parallel(n_jobs=2, backend=backend)(delayed(square)(x + k) for k in range(3))
    return [v for v, _ in inner], checksum(frame)


def thread_limits(x):
    """The BLAS / OpenMP thread limits a joblib worker runs under."""
    return os.environ.get("OMP_NUM_THREADS"), os.environ.get("OPENBLAS_NUM_THREADS"), x


class _DieWhenPickled:
    """Kills the process that pickles it: a worker dying while it sends a result."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def array_then_die(n: int):
    """A large result (written to a segment first), then death mid-pickling."""
    return np.arange(n, dtype=np.float64), _DieWhenPickled()


def array_and_lock(n: int):
    """A large result (written to a segment first) that then fails to pickle."""
    return np.arange(n, dtype=np.float64), threading.Lock()


def meet(folder: str, count: int) -> int:
    """Check in at ``folder`` and wait until ``count`` distinct processes have:
    a batch of ``count`` such tasks runs on ``count`` different workers."""
    touch(os.path.join(folder, str(os.getpid())))
    wait_until(lambda: len(os.listdir(folder)) >= count)
    return os.getpid()


class Gate:
    """An argument whose pickling, in the parent's queue feeder thread, waits
    for the test: it holds a task between "submitted" and "sent"."""

    def __init__(self, reached: str, opened: str):
        self.reached, self.opened = reached, opened

    def __reduce__(self):
        touch(self.reached)
        wait_for(self.opened)
        return Gate, (self.reached, self.opened)


def kill_when(path: str, frame=None):
    wait_for(path)
    os.kill(os.getpid(), signal.SIGKILL)


@sharedexec.shared(min_bytes=1000)
def square_shared(x, frame=None):
    """A decorated task: also given to the executors that share by themselves."""
    return x * x, checksum(frame)


def read_only_result(case: str, n: int = 1 << 18):
    """Results whose flags a pickle decides: numpy keeps a read-only array
    read-only under protocol 5 only where it sends it as a PickleBuffer."""
    a = np.arange(n, dtype=np.float64)
    if case == "frame":
        a.flags.writeable = False
        return pd.DataFrame({"a": a}, copy=False)
    a = {
        "contiguous": a,
        "fortran": np.asfortranarray(a.reshape(2, -1)),
        "strided": a.reshape(2, -1)[:, : n // 4],
        "datetime": a.astype("M8[ns]"),
        "writable": a,
    }[case]
    if case != "writable":
        a.flags.writeable = False
    return a


READ_ONLY_CASES = ("contiguous", "fortran", "strided", "datetime", "frame", "writable")


def echo(x):
    return x
