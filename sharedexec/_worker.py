"""What a worker process does around each shared task.

* Exit when the parent dies. Stdlib pool workers block on their call queue
  forever once the parent is SIGKILLed (design brief, trap 11), pinning every
  segment they mapped; a daemon thread notices the parent's death (the worker
  is re-parented) and ends the process.
* Drop cached objects whose segment the parent retired (``_cache``).
* Keep loky's memory-leak guard from counting shared pages (see
  ``_exclude_shared_pages_from_loky_guard``).
* Say what to do when a task writes into data shared read-only: numpy's
  "assignment destination is read-only" names neither sharedexec nor the fix.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import gc
import os
import sys
import threading
import time

from . import _cache
from ._errors import SharedReadOnlyError

_POLL_SECONDS = 0.2
_watching_pid: int | None = None


def watch_parent() -> None:
    """Start (once per process) the thread that exits when the parent dies.

    Only in multiprocessing children: a task run in the main process must
    never end it. The parent's sentinel says when it dies even where the
    worker's OS parent is a fork server, which outlives it while it has
    children; loky's workers have no sentinel, and their OS parent is the
    caller, so there we watch for re-parenting instead."""
    global _watching_pid
    parent = multiprocessing.parent_process()
    if _watching_pid == os.getpid() or parent is None:
        return
    _watching_pid = os.getpid()
    sentinel = getattr(parent, "_sentinel", None)
    if sentinel is not None:

        def watch() -> None:
            multiprocessing.connection.wait([sentinel])
            os._exit(1)

    else:
        ppid = os.getppid()

        def watch() -> None:
            while os.getppid() == ppid:
                time.sleep(_POLL_SECONDS)
            os._exit(1)

    threading.Thread(target=watch, name="sharedexec-parent-watch", daemon=True).start()


_guard_patched = False


def _exclude_shared_pages_from_loky_guard() -> None:
    """Make loky's worker memory-leak guard measure private memory only.

    loky restarts a worker whose RSS grew by ``_MAX_MEMORY_LEAK_SIZE`` (300 MB)
    since its first task, with a "memory leak" warning (design brief, trap
    16). RSS counts every page of a shared frame the worker has touched, so a
    worker reading a 400 MB shared frame "leaks" 400 MB and is restarted
    mid-run, and the frame mapped again by its successor. Shared pages are not
    a leak: the guard measures resident memory minus the resident pages of
    shared and file mappings (``/proc/self/statm``: resident - shared), which
    is what leaks are made of. Workers are loky's, possibly running other
    backends' tasks: their guard stays on, on the memory it was meant for."""
    global _guard_patched
    _guard_patched = True
    loky_executor = sys.modules.get("joblib.externals.loky.process_executor")
    if loky_executor is None or not getattr(loky_executor, "_USE_PSUTIL", False):
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def private_memory(pid: int, force_gc: bool = False) -> int:
        if force_gc:
            gc.collect()
        with open(f"/proc/{pid}/statm") as f:
            _, resident, shared = f.read().split()[:3]
        return (int(resident) - int(shared)) * page

    loky_executor._get_memory_usage = private_memory


def enter_task() -> None:
    watch_parent()
    if not _guard_patched:
        _exclude_shared_pages_from_loky_guard()
    _cache.CACHE.sweep_if_due()


@contextlib.contextmanager
def explain_read_only(mmap_mode: str):
    try:
        yield
    except ValueError as exc:
        # numpy says "assignment destination is read-only", or "cannot set
        # WRITEABLE flag to True of this array" to a task that tries to lift it.
        if not any(text in str(exc) for text in ("read-only", "WRITEABLE flag")) or mmap_mode != "r":
            raise
        raise SharedReadOnlyError(
            f"{exc}. If this array is data sharedexec shares with other processes "
            "(mmap_mode='r'), write into a copy (df = df.copy(), arr = arr.copy()) or pass "
            "mmap_mode='c' to give each task private copy-on-write views. (pandas 3 also "
            "hands out read-only views from .values and .to_numpy(): use .to_numpy(copy=True).)"
        ) from exc
