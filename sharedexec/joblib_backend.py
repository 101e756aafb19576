"""The joblib backend ``"sharedexec"``: joblib's loky backend, sharing frames.

Built on joblib's *vendored* loky (``joblib.externals.loky``), never on the
standalone ``loky`` package: importing that after joblib replaces joblib's
"loky" context and breaks its reducers and resource tracking (joblib#1482).

Only ``submit`` differs from :class:`joblib._parallel_backends.LokyBackend`:
each batch is wrapped in a :class:`~sharedexec._sharing.SharedTask`, so loky's
pickler turns the batch's large DataFrames -- string, object and Arrow columns
included, which joblib's own memmapping re-pickles on every dispatch -- into
handles, published once for as long as the frame lives, across ``Parallel``
calls. Batching, ``return_as``, timeouts, nested calls, the reusable executor
and ``TerminatedWorkerError`` are joblib's own.
"""

from __future__ import annotations

from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import LokyBackend

from . import _leases
from ._sharing import Options, SharedTask, install_hooks, remove_results_of


class JoblibBackend(LokyBackend):
    """joblib's loky backend, sharing large frames and arrays through shared memory.

    Use by name after `import sharedexec`:

    ```python
    with joblib.parallel_config(backend="sharedexec", n_jobs=8):
        joblib.Parallel()(joblib.delayed(f)(df, c) for c in configs)
    ```

    or as an instance with options: `parallel_config(backend=
    sharedexec.JoblibBackend(min_bytes=..., mmap_mode="c"))`. `min_bytes`,
    `mmap_mode`, `on_full`, `strings` and `adopt` mean what they mean for
    [`ProcessPoolExecutor`][sharedexec.ProcessPoolExecutor]; other keyword
    arguments go to joblib's `LokyBackend`.
    """

    def __init__(
        self,
        *args: Any,
        min_bytes: int = 1 << 20,
        mmap_mode: str = "r",
        on_full: str = "fallback",
        strings: str = "exact",
        adopt: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._sharing = Options(min_bytes, mmap_mode, on_full, strings, adopt=adopt)
        install_hooks()

    def submit(self, func: Any, callback: Any = None) -> Any:
        """Run a batch in a worker, its large arguments shared (joblib's hook)."""
        leases = _leases.TaskLeases()
        future = super().submit(SharedTask(func, self._sharing, leases), callback)
        future.add_done_callback(leases.end)
        return future


    def abort_everything(self, ensure_ready: bool = True) -> None:
        """joblib's abort (it kills busy workers), then remove the results
        those workers were sending (its own workers': a result of another
        pool's may be in flight)."""
        workers = list((getattr(self._workers, "_processes", None) or {}).values())
        super().abort_everything(ensure_ready=ensure_ready)
        remove_results_of(workers)


register_parallel_backend("sharedexec", JoblibBackend)
