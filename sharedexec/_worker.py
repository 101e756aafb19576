"""What a worker process does around each shared task.

* Exit when the parent dies. Stdlib pool workers block on their call queue
  forever once the parent is SIGKILLed (design brief, trap 11), pinning every
  segment they mapped; a daemon thread notices the parent's death (the worker
  is re-parented) and ends the process.
* Drop cached objects whose segment the parent retired (``_cache``).
* Say what to do when a task writes into data shared read-only: numpy's
  "assignment destination is read-only" names neither sharedexec nor the fix.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time

from . import _cache
from ._errors import SharedReadOnlyError

_POLL_SECONDS = 0.2
_watching_pid: int | None = None


def watch_parent() -> None:
    """Start (once per process) the thread that exits when the parent dies.

    Only in multiprocessing children: a task run in the main process must
    never end it."""
    global _watching_pid
    if _watching_pid == os.getpid() or multiprocessing.parent_process() is None:
        return
    _watching_pid = os.getpid()
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="sharedexec-parent-watch", daemon=True).start()


def enter_task() -> None:
    watch_parent()
    _cache.CACHE.sweep()


@contextlib.contextmanager
def explain_read_only(mmap_mode: str):
    try:
        yield
    except ValueError as exc:
        if "read-only" not in str(exc) or mmap_mode != "r":
            raise
        raise SharedReadOnlyError(
            f"{exc}. If this array is data sharedexec shares with other processes "
            "(mmap_mode='r'), write into a copy (df = df.copy(), arr = arr.copy()) or pass "
            "mmap_mode='c' to give each task private copy-on-write views. (pandas 3 also "
            "hands out read-only views from .values and .to_numpy(): use .to_numpy(copy=True).)"
        ) from exc
