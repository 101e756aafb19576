"""sharedexec: share large DataFrames with process pools through shared memory.

Process pools pickle every argument into every task: a 400 MB DataFrame given
to 200 tasks is copied 200 times. sharedexec makes the standard calls send a
~150-byte handle instead, to one copy of the frame in shared memory:

```python
from sharedexec import ProcessPoolExecutor          # 1. the executor
with ProcessPoolExecutor(8) as ex:
    results = list(ex.map(func, [df] * 1000, configs))

import sharedexec, joblib                           # 2. the joblib backend
with joblib.parallel_config(backend="sharedexec"):
    joblib.Parallel()(joblib.delayed(func)(df, c) for c in configs)

@sharedexec.shared                                  # 3. unchanged pools
def func(args): ...
multiprocessing.Pool(15).map(func, [(df, c) for c in configs])
```

How it works (each box is one module; ``docs/how-it-works.md`` says more):

```text
    parent process                                    worker process
    --------------                                    --------------
    pool pickles (fn, args)                           pool unpickles (fn, args)
     _sharing: SharedTask arms the pickler             _sharing: TaskRunner
     large df -> _registry.publish (once per object)   handle -> _cache.resolve
        _codec.encode: layout + buffers                   first time: _segment.attach
        _publication.write -> _segment.create             (read-only), _codec.decode,
          (pwrite: one copy, sx_<pid>_<rand>)             kept per process
        + a lease -> Handle (~150 B)                   each task: a shallow view
     _reaper: unlinks our segments if we die            fn(view, cfg) -> result
    future done / worker mapped it -> lease ends        large result -> a segment
     (_leases: the board of pickled handles)             named for the parent
    no lease, no process maps it (flock), or object   mapping holds a shared flock
      gone and no lease -> retired, unlinked           on the segment (_segment)
    result <- _cache.claim_result (private, writable) <-
```

Sharing is read-only by default (``mmap_mode="r"``, as joblib): a task that
writes into shared data gets [`SharedReadOnlyError`][sharedexec.SharedReadOnlyError]; ``mmap_mode="c"``
gives each task private copy-on-write views. Linux (or any system with a
tmpfs at ``/dev/shm`` or ``SHAREDEXEC_DIR``) only.
"""

from __future__ import annotations

from . import _registry
from ._errors import (
    SegmentCorruptError,
    SegmentNotFoundError,
    SharedExecError,
    SharedExecWarning,
    SharedMemoryError,
    SharedMemoryFullError,
    SharedReadOnlyError,
)
from .decorator import share, shared
from .executor import ProcessPoolExecutor
from .joblib_backend import JoblibBackend

__version__ = "0.1.0"

__all__ = [
    "ProcessPoolExecutor",
    "JoblibBackend",
    "shared",
    "share",
    "stats",
    "SharedExecError",
    "SharedMemoryError",
    "SharedMemoryFullError",
    "SegmentNotFoundError",
    "SegmentCorruptError",
    "SharedReadOnlyError",
    "SharedExecWarning",
]


def stats() -> dict[str, int]:
    """What this process has shared so far.

    ``segments`` and ``bytes_shared``: segments alive now and their size;
    ``publications``: objects published (copied into shared memory) since the
    start; ``reuse_hits``: times an object already published was sent again
    without copying; ``bytes_copied`` / ``bytes_reused``: data copied into new
    segments / found in existing ones (derived frames); ``bytes_pickled``:
    large objects that went by plain pickling because shared memory was full.
    Released segments are collected first, so the figures are current.
    """
    return _registry.REGISTRY.stats()
