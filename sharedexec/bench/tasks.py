"""What runs in the workers: the benchmark's tasks and the worker side of the
approaches that hand the frame over outside the task's arguments.

Everything here is a module-level function, so that the spawn and forkserver start
methods (and Ray, and loky) can pickle it by reference and import it in a worker.

Every task returns ``figure(df) + i``: a figure of the whole frame plus the task's
index, so the expected results cost one call in the parent, and a worker that got
the wrong frame (or a stale one) returns a wrong number that the runner reports.

* :func:`task_len` -- ``len(df) + i``, the brief's trivial task: it measures what
  getting the frame into the worker costs, and nothing else.
* :func:`task_touch` -- reads every memory page of every column (numeric buffers,
  datetime, categorical codes, Arrow buffers) and every Python string object. Pages
  of a shared segment are mapped lazily, so only a task like this one shows what a
  worker that really uses the data adds to memory (e.g. copy-on-write copies of
  object strings whose reference counts it touches after a fork).
* :func:`task_hold` -- :func:`task_touch`, then waits until every worker of the
  pool holds the frame too (a file barrier, see :func:`barrier`): the memory of a
  pool whose tasks all work on the frame at once, as long tasks do. With trivial
  tasks a pickling executor never holds more than a few copies, because its
  parent pickles one task at a time; that would hide how memory grows with workers.
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd

PAGE = mmap.PAGESIZE

Task = Callable[[pd.DataFrame, int], int]


def warm(i: int) -> int:
    """The warm-up task: imports in a worker what tasks will need; returns its pid.

    The same modules in every approach's workers (pandas, and pyarrow and sharedexec
    where installed), so that a worker's first real task imports nothing and no
    approach's memory figure holds another one's import costs: the figures are those
    of a pool that has been running for a while. It lasts 10 ms, so that a round
    of them spreads over all the workers.
    """
    for name in ("pyarrow", "sharedexec"):
        try:
            importlib.import_module(name)
        except Exception:  # not installed, or mid-rewrite: the task will say so itself
            pass
    time.sleep(0.01)
    return os.getpid()


def task_len(df: pd.DataFrame, i: int) -> int:
    """The trivial task: ``len(df) + i``."""
    return len(df) + i


def task_touch(df: pd.DataFrame, i: int) -> int:
    """Read every page of every column: ``checksum(df) + i``."""
    return checksum(df) + i


ROWS_PER_TASK = 8


def task_rows(df: Any, i: int) -> int:
    """Read :data:`ROWS_PER_TASK` rows at the task's own place: ``checksum(rows) + i``.

    ``df`` is a frame, or a :class:`RemoteFrame` that asks a data server."""
    start = i * 7919 % max(len(df) - ROWS_PER_TASK, 1)
    return checksum(df.iloc[start : start + ROWS_PER_TASK]) + i


def expected_piece(task: Task, frame: pd.DataFrame, start: int, stop: int, i: int) -> int:
    """What ``task`` returns for piece ``i`` (rows start..stop) of ``frame``."""
    return task(frame, i) if task is task_rows else task(frame.iloc[start:stop], i)


def task_hold(df: pd.DataFrame, i: int) -> int:
    """:func:`task_touch`, then wait at the barrier until all workers hold the frame."""
    value = task_touch(df, i)
    _arrive(i)
    return value


# The barrier is a directory, not a multiprocessing object: a task cannot receive
# one through its arguments under spawn/forkserver, Ray or loky, and must not need
# anything but (df, i). Workers find it through $SHAREDEXEC_BENCH_BARRIER: a fresh
# private directory (mkdtemp), never a fixed name in the shared temp directory,
# which any other user could take first and so stop the benchmark.
BARRIER_ENV = "SHAREDEXEC_BENCH_BARRIER"
BARRIER_TIMEOUT = 60.0


@contextlib.contextmanager
def barrier_directory() -> Iterator[str]:
    """Make the directory of the barriers of one run and name it in the
    environment. Open it before the first pool starts: a forkserver (or
    Ray's raylet) passes on the environment it started with, not today's."""
    if os.environ.get(BARRIER_ENV):
        yield os.environ[BARRIER_ENV]
        return
    os.environ[BARRIER_ENV] = path = tempfile.mkdtemp(prefix="sharedexec-bench-barrier-")
    try:
        yield path
    finally:
        del os.environ[BARRIER_ENV]
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def barrier(parties: int) -> Iterator[None]:
    """Open the barrier of :func:`task_hold` for ``parties`` tasks, in the parent."""
    with barrier_directory() as path:
        for name in os.listdir(path):  # arrivals at an earlier barrier of the run
            os.unlink(os.path.join(path, name))
        with open(os.path.join(path, "parties"), "w") as f:
            f.write(f"{parties} {os.getpid()}")
        try:
            yield
        finally:
            os.unlink(os.path.join(path, "parties"))


def _arrive(i: int) -> None:
    path = os.environ.get(BARRIER_ENV)
    if not path:  # no barrier open: nothing to wait for
        return
    try:
        with open(os.path.join(path, "parties")) as f:
            parties, opener = map(int, f.read().split())
    except (FileNotFoundError, NotADirectoryError):  # no barrier open: nothing to wait for
        return
    if os.getpid() == opener:  # the parent computing the expected result
        return
    open(os.path.join(path, f"arrived-{i}"), "w").close()
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while len(os.listdir(path)) - 1 < parties and time.monotonic() < deadline:
        time.sleep(0.005)


def _page_sample(values: np.ndarray) -> int:
    # One byte every PAGE bytes: any PAGE-long window of the buffer holds exactly one
    # sample, so every page is read, for a thousandth of the work of reading it all.
    # An unsigned integer sum is exact and order-free: every process gets the same.
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    return int(raw[::PAGE].sum(dtype=np.uint64))


def _column_checksum(s: pd.Series) -> int:
    values = s.array
    if isinstance(s.dtype, pd.CategoricalDtype):
        return _page_sample(values.codes)
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        return _page_sample(values.asi8)
    if isinstance(s.dtype, np.dtype) and s.dtype.kind != "O":
        return _page_sample(s.to_numpy())
    if hasattr(values, "__arrow_array__"):
        # Arrow-backed (pandas' "str" with pyarrow storage): every chunk's offsets
        # and string bytes, in the chunk's own range -- a slice may carry its
        # parent's whole buffers or only its part, as it travelled.
        return sum(_arrow_strings_checksum(c) for c in values.__arrow_array__().chunks)
    # Python objects: visit each one, as real code would (this touches refcounts).
    # Through the numpy array: iterating the pandas array goes through __getitem__.
    return sum(len(v) for v in s.to_numpy() if isinstance(v, str))


def _arrow_strings_checksum(chunk: Any) -> int:
    _, offsets, data = chunk.buffers()
    width = np.int64 if chunk.type.equals("large_string") else np.int32
    ends = np.frombuffer(offsets, width)[chunk.offset : chunk.offset + len(chunk) + 1]
    if not len(chunk) or data is None:
        return chunk.null_count
    strings = np.frombuffer(data, np.uint8)[ends[0] : ends[-1]]
    return _offsets_sample(ends) + _page_sample(strings) + chunk.null_count


def _offsets_sample(ends: np.ndarray) -> int:
    # One offset every PAGE bytes, relative to the first (a slice's offsets may
    # start anywhere), with no copy of the buffer: a task's own temporaries
    # would otherwise count as memory its sharing costs.
    samples = ends[:: max(PAGE // ends.itemsize, 1)] - ends[0]
    return int(samples.astype(np.uint64).sum())


def checksum(df: pd.DataFrame) -> int:
    """An integer that depends on every page of every column of ``df``."""
    if not isinstance(df, pd.DataFrame):
        return _polars_checksum(df)
    return sum(_column_checksum(df.iloc[:, k]) for k in range(df.shape[1]))


def _polars_checksum(df: Any) -> int:
    # A polars frame: every buffer of its Arrow columns, taken without a copy
    # (the newest compat level keeps strings as views, as polars holds them).
    import polars as pl

    table = df.to_arrow(compat_level=pl.CompatLevel.newest())
    buffers = [b for column in table.columns for chunk in column.chunks for b in chunk.buffers() if b is not None]
    return sum(_page_sample(np.frombuffer(b, np.uint8)) for b in buffers)


def to_polars(df: pd.DataFrame) -> Any:
    """``df`` as a polars DataFrame (strings become polars' ``String``)."""
    import polars as pl

    return pl.from_pandas(df)


# ---------------------------------------------------------------------------
# Frames that reach the workers outside the task's arguments.
#
# fork copy-on-write global: the parent sets _FRAME before the pool forks, and the
# children inherit it. mp.Array: the pool initializer stores the shared array and its
# layout in _ARRAY, and the first task wraps it as a frame with np.frombuffer (lazily,
# so that this cost is timed and its memory measured like every other approach's).

_FRAME: pd.DataFrame | None = None
_ARRAY: tuple[Any, list[tuple[str, list[str], int]], int] | None = None


def set_global_frame(df: pd.DataFrame | None) -> None:
    """Set (or, with None, drop) the frame that :func:`call_on_global` passes to tasks."""
    global _FRAME
    _FRAME = df


def set_array(raw: Any, layout: list[tuple[str, list[str], int]], rows: int) -> None:
    """Pool initializer of the ``multiprocessing.Array`` approach."""
    global _ARRAY
    _ARRAY = (raw, layout, rows)


def array_blocks(raw: Any, layout: list[tuple[str, list[str], int]], rows: int) -> list[tuple[list[str], np.ndarray]]:
    """Views of a shared byte array as (columns, rows) blocks, one per dtype.

    ``layout`` lists, per dtype, the column names and the byte offset of its
    C-ordered block: pandas' own block layout, so each block can become a
    DataFrame block as it is.
    """
    buf = np.frombuffer(raw, dtype=np.uint8)
    blocks = []
    for dtype, names, offset in layout:
        dt = np.dtype(dtype)
        blocks.append((names, buf[offset : offset + dt.itemsize * rows * len(names)].view(dt).reshape(len(names), rows)))
    return blocks


def frame_from_array(raw: Any, layout: list[tuple[str, list[str], int]], rows: int) -> pd.DataFrame:
    """Wrap a shared byte array as a frame, without copying (see :func:`array_blocks`)."""
    parts = [pd.DataFrame(block.T, columns=names, copy=False) for names, block in array_blocks(raw, layout, rows)]
    return pd.concat(parts, axis=1)


def call_on_global(task: Task, i: int) -> int:
    """Run ``task`` on the frame this worker holds outside the arguments."""
    global _FRAME
    if _FRAME is None and _ARRAY is not None:
        _FRAME = frame_from_array(*_ARRAY)
    assert _FRAME is not None, "no frame in this worker: call set_global_frame or set_array first"
    return task(_FRAME, i)


def call_on_namespace(task: Task, namespace: Any, i: int) -> int:
    """Run ``task`` on the frame held by a ``multiprocessing.Manager().Namespace()``.

    Reading ``namespace.df`` makes the manager process pickle the frame and send it:
    the cost the users who are advised to do this pay on every task.
    """
    return task(namespace.df, i)


# ---------------------------------------------------------------------------
# A data server: a process that holds the frame and answers requests for rows,
# cells and slices over queues (bench scenario "few-rows").


def serve_frame(frame: pd.DataFrame, requests: Any, replies: list[Any]) -> None:
    """The server's loop: ``(slot, what, args)`` in, the answer out to ``replies[slot]``;
    None ends it. ``what``: "len", "slice" (rows a..b), "cell" (row, column)."""
    while (request := requests.get()) is not None:
        slot, what, args = request
        if what == "len":
            answer: Any = len(frame)
        elif what == "slice":
            answer = frame.iloc[args[0] : args[1]]
        else:
            answer = frame.iat[args[0], args[1]]
        replies[slot].put(answer)


_SERVER: tuple[Any, Any, int] | None = None


def connect_to_server(requests: Any, replies: list[Any], slots: Any) -> None:
    """Pool initializer: take a reply queue of one's own."""
    global _SERVER
    with slots.get_lock():
        slot = slots.value
        slots.value += 1
    _SERVER = (requests, replies[slot], slot)


class RemoteFrame:
    """What a task of the data-server approach reads: ``len`` and ``.iloc[a:b]``,
    each a round trip to the server."""

    def __init__(self) -> None:
        self.iloc = self

    def _ask(self, what: str, *args: Any) -> Any:
        assert _SERVER is not None, "connect_to_server was not run in this worker"
        requests, reply, slot = _SERVER
        requests.put((slot, what, args))
        return reply.get()

    def __len__(self) -> int:
        return self._ask("len")

    def __getitem__(self, rows: slice) -> pd.DataFrame:
        return self._ask("slice", rows.start, rows.stop)


def call_on_server(task: Task, i: int) -> int:
    """Run ``task`` on the frame the data server holds."""
    return task(RemoteFrame(), i)
