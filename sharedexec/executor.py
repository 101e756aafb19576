"""``sharedexec.ProcessPoolExecutor``: the stdlib executor, sharing large arguments.

Everything but ``submit`` is the stdlib's own code. ``submit`` wraps the
callable in a :class:`~sharedexec._sharing.SharedTask`, so that the executor's
queue feeder, pickling the call item, turns large frames into handles; and it
ends the task's leases when its future completes, fails or is cancelled.
``map`` goes through ``submit`` (one task per chunk) and so shares too.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

from . import _leases, _registry, _worker
from ._sharing import Options, SharedTask, install_hooks, remove_results_of


def _initialize_worker(initializer: Callable | None, initargs: tuple) -> None:
    # Start the parent watcher in every worker, even one that never runs a
    # task: an orphaned worker must not outlive its parent (brief, trap 11).
    _worker.watch_parent()
    if initializer is not None:
        initializer(*initargs)


class ProcessPoolExecutor(concurrent.futures.ProcessPoolExecutor):
    """A drop-in `concurrent.futures.ProcessPoolExecutor` that sends large DataFrames, Series, Indexes, numpy arrays and Arrow
    objects to its workers through shared memory, once, instead of pickling
    them into every task; and brings large results back the same way.

    The positional and keyword arguments before `*` are the stdlib's.

    Args:
        min_bytes: Objects at least this large (default 1 MiB, as joblib) are
            shared; smaller ones are pickled as usual.
        mmap_mode: `"r"` (default): workers see the data read-only, and a
            write into it raises [`SharedReadOnlyError`][sharedexec.SharedReadOnlyError].
            `"c"`: each task gets private copy-on-write views; its writes are
            seen by nobody else.
        on_full: What to do when the shared-memory directory has no room:
            `"fallback"` (default) pickles that object as the stdlib would,
            with one [`SharedExecWarning`][sharedexec.SharedExecWarning];
            `"raise"` fails the task with
            [`SharedMemoryFullError`][sharedexec.SharedMemoryFullError].
        strings: `"exact"` (default): a column of Python strings (`object`
            dtype) arrives as it is, an `object` column of `str`, built by
            each worker. `"arrow"`: such a column of a DataFrame or Series
            arrives as pandas' Arrow-backed `str` dtype, read in place from
            shared memory: no worker builds Python strings (see
            [Data types](dtypes.md#object-columns-of-strings)).
        adopt: `False` (default): your process keeps its own copy of a frame
            next to the shared one. `True`: as a DataFrame or Series is
            published, its blocks are re-pointed at the shared copy, block by
            block, and your process's private copy is freed: one copy in
            total (see [Semantics](semantics.md#one-copy-in-total-adopttrue)).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable | None = None,
        initargs: tuple = (),
        *,
        max_tasks_per_child: int | None = None,
        min_bytes: int = 1 << 20,
        mmap_mode: str = "r",
        on_full: str = "fallback",
        strings: str = "exact",
        adopt: bool = False,
    ) -> None:
        self._sharing = Options(
            min_bytes=min_bytes, mmap_mode=mmap_mode, on_full=on_full, strings=strings, adopt=adopt
        )
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        install_hooks()
        super().__init__(
            max_workers,
            mp_context,
            _initialize_worker,
            (initializer, initargs),
            max_tasks_per_child=max_tasks_per_child,
        )

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        leases = _leases.TaskLeases()
        future = super().submit(SharedTask(fn, self._sharing, leases), *args, **kwargs)
        future.add_done_callback(leases.end)
        return future

    submit.__doc__ = concurrent.futures.ProcessPoolExecutor.submit.__doc__

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        workers = list((self._processes or {}).values())
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:  # every result has arrived: any other of its workers' is unclaimable
            remove_results_of(workers)
        _registry.REGISTRY.collect()

    shutdown.__doc__ = concurrent.futures.ProcessPoolExecutor.shutdown.__doc__
