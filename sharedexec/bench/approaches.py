"""The ways of getting one large frame to a pool's workers, side by side.

Each approach is a small class that plugs into the one generic runner
(:mod:`sharedexec.bench.runner`) through three hooks:

``prepare(frame) -> state``
    Work that must happen before the pool starts (filling a ``multiprocessing.Array``
    that workers can only inherit). Timed and measured as part of the run.
``pool(workers, ctx, state)``
    A context manager that starts the pool, waits until every worker has run a
    warm-up task (not timed, not measured: every approach is compared on a warm
    pool) and yields ``run(task, n, frame)``, which starts ``n`` tasks
    ``task(frame, i)`` and returns an iterator over their results in order. Whatever
    ``run`` does when called (publishing the frame, pickling it) is timed.
    ``out_of_band`` approaches (mp.Array, fork global) ignore ``frame``: their
    workers hold the frame already, from ``state``.
``unavailable()``
    Why the approach cannot run here (``ray`` not installed, ``sharedexec`` entry
    point not there yet, no ``fork``), or None.

``few = True`` marks the approaches that pickle the frame into every task: the
runner gives them only a few tasks, so that a run ends in minutes, and reports the
time per task. The sharedexec approaches import :mod:`sharedexec` lazily, so the
benchmark runs (and says what is missing) while an entry point is not there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib
import itertools
import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pandas as pd

from sharedexec.bench import tasks

Run = Callable[[tasks.Task, int, pd.DataFrame], Iterator[int]]


WARM_ROUNDS = 50


def _warm_up(run_warm: Callable[[int], Iterable[int]], workers: int) -> None:
    """Run rounds of :func:`tasks.warm` until every one of ``workers`` has answered.

    ``run_warm(n)`` runs ``n`` warm-up tasks and returns their workers' pids. One
    round is not enough: executors start workers on demand (ProcessPoolExecutor
    under spawn/forkserver, loky when joblib grows its pool), and a worker still
    starting when the measurement begins would add its interpreter to the figures.
    """
    seen: set[int] = set()
    for _ in range(WARM_ROUNDS):
        seen.update(run_warm(2 * workers))
        if len(seen) >= workers:
            return


class Approach:
    """One way of sharing the frame: see the module docstring for the hooks."""

    key = ""
    label = ""
    note = ""
    few = False
    out_of_band = False
    uses_sharedexec = False

    def unavailable(self) -> str | None:
        return None

    def frame_for(self, frame: pd.DataFrame) -> Any:
        """The frame the tasks see (the expected results are computed on it)."""
        return frame

    def frame_bytes(self, seen: Any) -> int | None:
        """The size of ``frame_for``'s frame when it is another kind of object."""
        return None

    def frame_in_tasks(self, seen: Any) -> Any:
        """The frame as the tasks receive it, where the approach changes it on
        the way (``strings="arrow"``): the expected results are computed on it."""
        return seen

    def prepare(self, frame: pd.DataFrame) -> Any:
        return frame

    def pool(self, workers: int, ctx: multiprocessing.context.BaseContext, state: Any) -> contextlib.AbstractContextManager[Run]:
        raise NotImplementedError

    def stats(self) -> dict[str, int] | None:
        """Counters of the library under test (``sharedexec.stats()``), if any."""
        stats = _sharedexec("stats")[0] if self.uses_sharedexec else None
        return dict(stats()) if stats else None


def _sharedexec(name: str | None = None) -> tuple[Any, str | None]:
    """The ``sharedexec`` module (or its attribute ``name``), or None and why not."""
    try:
        module = importlib.import_module("sharedexec")
    except Exception as exc:  # a half-written package may fail with anything
        return None, f"import sharedexec failed: {type(exc).__name__}: {exc}"
    if name is None:
        return module, None
    if not hasattr(module, name):
        return None, f"sharedexec.{name} does not exist yet"
    return getattr(module, name), None


class StdlibExecutor(Approach):
    key = "stdlib"
    label = "stdlib ProcessPoolExecutor"
    note = "pickles the frame into every task"
    few = True

    def executor_class(self) -> type[concurrent.futures.ProcessPoolExecutor]:
        return concurrent.futures.ProcessPoolExecutor

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: multiprocessing.context.BaseContext, state: Any) -> Iterator[Run]:
        with self.executor_class()(max_workers=workers, mp_context=ctx) as ex:
            _warm_up(lambda n: ex.map(tasks.warm, range(n)), workers)
            yield lambda task, n, frame: ex.map(task, itertools.repeat(frame, n), range(n))


class SharedexecExecutor(StdlibExecutor):
    key = "sharedexec"
    label = "sharedexec.ProcessPoolExecutor"
    note = ""
    few = False
    uses_sharedexec = True

    def unavailable(self) -> str | None:
        return _sharedexec("ProcessPoolExecutor")[1]

    def executor_class(self) -> type[concurrent.futures.ProcessPoolExecutor]:
        return _sharedexec("ProcessPoolExecutor")[0]


class SharedexecArrowStrings(SharedexecExecutor):
    key = "sharedexec-arrow-strings"
    label = 'sharedexec.ProcessPoolExecutor(strings="arrow")'
    note = "object string columns reach tasks as Arrow-backed str"

    def executor_class(self) -> Any:
        return functools.partial(super().executor_class(), strings="arrow")

    def frame_in_tasks(self, seen: pd.DataFrame) -> pd.DataFrame:
        return seen.astype({name: "str" for name, dtype in seen.dtypes.items() if dtype == object})


class _PolarsFrame:
    """Mixin: the tasks get the frame as a ``polars.DataFrame`` (converted before
    the measurement, which starts when the tasks do)."""

    def unavailable(self) -> str | None:
        try:
            import polars  # noqa: F401
        except ImportError:
            return "skipped: polars not installed"
        return super().unavailable()

    def frame_for(self, frame: pd.DataFrame) -> Any:
        return tasks.to_polars(frame)

    def frame_bytes(self, seen: Any) -> int | None:
        return int(seen.estimated_size())


class PolarsStdlib(_PolarsFrame, StdlibExecutor):
    key = "polars-stdlib"
    label = "polars DataFrame, stdlib executor"
    note = "polars pickles the frame into every task"


class PolarsSharedexec(_PolarsFrame, SharedexecExecutor):
    key = "polars-sharedexec"
    label = "polars DataFrame, sharedexec executor"
    note = "the frame's Arrow columns, shared"


class PlainPool(Approach):
    key = "pool"
    label = "multiprocessing.Pool"
    note = "pickles the frame into every task"
    few = True

    def task_for(self, task: tasks.Task) -> tasks.Task:
        return task

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: multiprocessing.context.BaseContext, state: Any) -> Iterator[Run]:
        with ctx.Pool(workers) as p:
            _warm_up(lambda n: p.map(tasks.warm, range(n)), workers)

            def run(task: tasks.Task, n: int, frame: pd.DataFrame) -> Iterator[int]:
                # apply_async per task: each task carries its own arguments, like
                # submit() (Pool.map's chunks would pickle the frame once per chunk).
                pending = [p.apply_async(self.task_for(task), (frame, i)) for i in range(n)]
                return (r.get() for r in pending)

            yield run


class SharedPool(PlainPool):
    key = "pool-shared"
    label = "multiprocessing.Pool + @shared"
    note = "unchanged Pool, task decorated with @sharedexec.shared"
    few = False
    uses_sharedexec = True

    def unavailable(self) -> str | None:
        try:
            importlib.import_module("sharedexec.bench._shared_tasks")
        except Exception as exc:
            return f"@sharedexec.shared unavailable: {type(exc).__name__}: {exc}"
        return None

    def task_for(self, task: tasks.Task) -> tasks.Task:
        return getattr(importlib.import_module("sharedexec.bench._shared_tasks"), task.__name__)


class JoblibDefault(Approach):
    key = "joblib"
    label = "joblib.Parallel (loky)"
    note = "auto-memmaps numeric blocks, pickles the rest per task"
    backend: str | None = None

    def parallel(self, workers: int) -> Any:
        import joblib

        return joblib.Parallel(n_jobs=workers, backend=self.backend, return_as="generator")

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: multiprocessing.context.BaseContext, state: Any) -> Iterator[Run]:
        # joblib picks its own start method (loky: fork+exec); ctx does not apply.
        from joblib import delayed
        from joblib.externals.loky import reusable_executor

        _warm_up(lambda n: self.parallel(workers)(delayed(tasks.warm)(i) for i in range(n)), workers)
        try:
            yield lambda task, n, frame: self.parallel(workers)(delayed(task)(frame, i) for i in range(n))
        finally:
            # joblib keeps its loky workers for the next call. Shut them down as the
            # other approaches' pools are: idle, they keep what they mapped (a retired
            # segment, a memmap) until some later run, whose figures would then shrink
            # when they let go. loky has no public "current executor": private name.
            with reusable_executor._executor_lock:
                executor = reusable_executor._executor
            if executor is not None:
                executor.shutdown(wait=True)


class JoblibSharedexec(JoblibDefault):
    key = "joblib-sharedexec"
    label = 'joblib.Parallel(backend="sharedexec")'
    note = ""
    backend = "sharedexec"
    uses_sharedexec = True

    def unavailable(self) -> str | None:
        reason = _sharedexec()[1]
        if reason:
            return reason
        from joblib.parallel import BACKENDS

        return None if "sharedexec" in BACKENDS else "import sharedexec did not register joblib backend 'sharedexec'"


class ManagerNamespace(Approach):
    key = "manager"
    label = "Manager().Namespace()"
    note = "manager pickles the frame out on every read"
    few = True

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: multiprocessing.context.BaseContext, state: Any) -> Iterator[Run]:
        with ctx.Manager() as manager, ctx.Pool(workers) as p:
            ns = manager.Namespace()
            ns.df = state.iloc[:1]  # warms the manager up too: it imports pandas
            _warm_up(lambda n: p.map(tasks.warm, range(n)), workers)
            p.starmap(tasks.call_on_namespace, [(tasks.task_len, ns, i) for i in range(2 * workers)])

            def run(task: tasks.Task, n: int, frame: pd.DataFrame) -> Iterator[int]:
                ns.df = frame  # the publication: the manager unpickles its own copy
                pending = [p.apply_async(tasks.call_on_namespace, (task, ns, i)) for i in range(n)]
                return (r.get() for r in pending)

            yield run


def numeric_layout(frame: pd.DataFrame) -> tuple[list[tuple[str, list[str], int]], int]:
    """Per dtype, the column names and byte offset of its block; and the total size."""
    layout, offset = [], 0
    for dtype, names in frame.columns.groupby(frame.dtypes).items():
        names = list(names)
        layout.append((dtype.str, names, offset))
        # Keep every block 64-byte aligned, as numpy would allocate it.
        offset += -(-dtype.itemsize * len(frame) * len(names) // 64) * 64
    return layout, offset


class NumericArray(Approach):
    key = "mp-array"
    label = "multiprocessing.Array + np.frombuffer"
    note = "NUMERIC COLUMNS ONLY (strings dropped)"
    out_of_band = True

    def frame_for(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame.select_dtypes("number")

    def prepare(self, frame: pd.DataFrame) -> Any:
        numeric = self.frame_for(frame)
        layout, size = numeric_layout(numeric)
        # lock=False: the array is read-only here, and a lock would serialise the readers.
        raw = multiprocessing.Array("b", max(size, 1), lock=False)
        for names, block in tasks.array_blocks(raw, layout, len(numeric)):
            for row, name in zip(block, names):  # column by column: no temporary 2-D copy
                row[:] = numeric[name].to_numpy()
        return raw, layout, len(numeric)

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: multiprocessing.context.BaseContext, state: Any) -> Iterator[Run]:
        # A shared Array can only reach workers by inheritance: as a pool initializer argument.
        with ctx.Pool(workers, initializer=tasks.set_array, initargs=state) as p:
            _warm_up(lambda n: p.map(tasks.warm, range(n)), workers)

            def run(task: tasks.Task, n: int, frame: pd.DataFrame) -> Iterator[int]:
                # frame is not sent: the workers hold it already (out of band)
                pending = [p.apply_async(tasks.call_on_global, (task, i)) for i in range(n)]
                return (r.get() for r in pending)

            yield run


class ForkGlobal(Approach):
    key = "fork-global"
    label = "fork copy-on-write global"
    note = "fork only (Linux); not with spawn/forkserver; pool started after the frame"
    out_of_band = True

    def unavailable(self) -> str | None:
        if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
            return f"needs the fork start method on Linux (this is {sys.platform})"
        return None

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: multiprocessing.context.BaseContext, state: Any) -> Iterator[Run]:
        tasks.set_global_frame(state)
        try:
            with multiprocessing.get_context("fork").Pool(workers) as p:
                _warm_up(lambda n: p.map(tasks.warm, range(n)), workers)

                def run(task: tasks.Task, n: int, frame: pd.DataFrame) -> Iterator[int]:
                    # frame is not sent: the workers inherited it (out of band)
                    pending = [p.apply_async(tasks.call_on_global, (task, i)) for i in range(n)]
                    return (r.get() for r in pending)

                yield run
        finally:
            tasks.set_global_frame(None)


class RayPut(Approach):
    key = "ray"
    label = "Ray (ray.put, then tasks)"
    note = "explicit ray.put; read-only data"

    def unavailable(self) -> str | None:
        try:
            import ray  # noqa: F401
        except ImportError:
            return "skipped: ray not installed"
        return None

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: multiprocessing.context.BaseContext, state: Any) -> Iterator[Run]:
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            warm = ray.remote(tasks.warm)
            _warm_up(lambda n: ray.get([warm.remote(i) for i in range(n)]), workers)

            def run(task: tasks.Task, n: int, frame: pd.DataFrame) -> Iterator[int]:
                ref = ray.put(frame)
                remote = ray.remote(task)
                pending = [remote.remote(ref, i) for i in range(n)]
                return (ray.get(r) for r in pending)

            yield run
        finally:
            ray.shutdown()


APPROACHES: tuple[Approach, ...] = (
    StdlibExecutor(),
    PlainPool(),
    SharedPool(),
    JoblibDefault(),
    JoblibSharedexec(),
    ManagerNamespace(),
    NumericArray(),
    ForkGlobal(),
    RayPut(),
    SharedexecExecutor(),
    SharedexecArrowStrings(),
    PolarsStdlib(),
    PolarsSharedexec(),
)
BY_KEY = {a.key: a for a in APPROACHES}
