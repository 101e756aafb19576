"""Scenarios where each task gets a piece of the frame, not all of it.

``python -m sharedexec bench --scenario NAME``:

``row-partitioned``
    pandarallel's job: the frame cut into ``--chunks`` row ranges
    (``df.iloc[a:b]``), one task per chunk, reading every column of its chunk
    (:func:`tasks.task_touch`). Every approach copies each row at least once
    (the stdlib pickles each chunk once), so the floor for a frame never shared
    is one copy into shared memory; a frame already shared needs none.
``few-rows``
    Every task reads a few rows of the whole frame, at its own place
    (:func:`tasks.task_rows`): the tasks of a "data server" -- a process that
    holds the frame and answers row, cell and slice requests over queues, the
    advice users get before shared memory -- against tasks that read the same
    rows from a frame sharedexec shares.

Measured like the main bench (:mod:`sharedexec.bench.runner`): wall time
from the first task sent to the last result, peak extra memory (PSS +
/dev/shm) over that time, correctness against the results computed here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd

from sharedexec.bench import report, tasks
from sharedexec.bench.approaches import _sharedexec, _warm_up
from sharedexec.bench.runner import Result, _meter, _NoMeter, run_guarded

# map(task, pieces) -> the results of task(piece_i, i), in order
Map = Callable[[Callable[[Any, int], int], Sequence[Any]], Iterator[int]]


class PieceApproach:
    """One way of running ``task(piece, i)`` over pieces of a frame.

    ``pieces(frame, bounds)`` builds what the tasks get, before the
    measurement (slicing costs nothing); ``pool(workers, ctx, frame)`` starts
    a warm pool and yields a :data:`Map`."""

    key = ""
    label = ""
    note = ""
    uses_sharedexec = False

    def unavailable(self) -> str | None:
        return None

    def pieces(self, frame: pd.DataFrame, bounds: Sequence[tuple[int, int]]) -> list[Any]:
        return [frame.iloc[a:b] for a, b in bounds]

    def pool(self, workers: int, ctx: Any, frame: pd.DataFrame) -> contextlib.AbstractContextManager[Map]:
        raise NotImplementedError


class Executor(PieceApproach):
    key, label, note = "stdlib", "stdlib ProcessPoolExecutor", "pickles each chunk into its task"

    def executor(self, workers: int, ctx: Any) -> concurrent.futures.Executor:
        return concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: Any, frame: pd.DataFrame) -> Iterator[Map]:
        with self.executor(workers, ctx) as ex:
            _warm_up(lambda n: ex.map(tasks.warm, range(n)), workers)
            yield lambda task, pieces: ex.map(task, pieces, range(len(pieces)))


class SharedexecExecutor(Executor):
    key, label, note = "sharedexec", "sharedexec.ProcessPoolExecutor", "chunks of a frame never shared"
    uses_sharedexec = True

    def unavailable(self) -> str | None:
        return _sharedexec("ProcessPoolExecutor")[1]

    def executor(self, workers: int, ctx: Any) -> concurrent.futures.Executor:
        return _sharedexec("ProcessPoolExecutor")[0](workers, mp_context=ctx)


class SharedexecShared(SharedexecExecutor):
    key, label, note = "sharedexec-shared", "sharedexec, frame already shared", "chunks of sharedexec.share(df)"

    def pieces(self, frame: pd.DataFrame, bounds: Sequence[tuple[int, int]]) -> list[Any]:
        # The shared frame is kept with its pieces: its segment lives as long
        # as the object share() returned (slices of a dead one are copied).
        self.shared = _sharedexec("share")[0](frame)
        return super().pieces(self.shared, bounds)


class Joblib(PieceApproach):
    key, label, note = "joblib", "joblib.Parallel (loky)", "auto-memmaps numeric blocks of each chunk"
    backend: str | None = None

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: Any, frame: pd.DataFrame) -> Iterator[Map]:
        import joblib
        from joblib.externals.loky import reusable_executor

        def parallel() -> joblib.Parallel:
            return joblib.Parallel(n_jobs=workers, backend=self.backend, return_as="generator")

        _warm_up(lambda n: parallel()(joblib.delayed(tasks.warm)(i) for i in range(n)), workers)
        try:
            yield lambda task, pieces: parallel()(joblib.delayed(task)(p, i) for i, p in enumerate(pieces))
        finally:
            with reusable_executor._executor_lock:  # (see approaches.JoblibDefault)
                executor = reusable_executor._executor
            if executor is not None:
                executor.shutdown(wait=True)


class JoblibSharedexec(Joblib):
    key, label, note = "joblib-sharedexec", 'joblib.Parallel(backend="sharedexec")', "chunks of a frame never shared"
    backend = "sharedexec"
    uses_sharedexec = True

    def unavailable(self) -> str | None:
        return _sharedexec()[1]


class Pandarallel(PieceApproach):
    key, label, note = "pandarallel", "pandarallel groupby.parallel_apply", "forks its workers; chunks as groups"

    def unavailable(self) -> str | None:
        try:
            import pandarallel  # noqa: F401
        except Exception as exc:  # 1.6.5 fails to import with pandas 3 (ImportError)
            return f"pandarallel unavailable: {type(exc).__name__}: {exc}"
        return None

    def pieces(self, frame: pd.DataFrame, bounds: Sequence[tuple[int, int]]) -> list[Any]:
        return [(a, b) for a, b in bounds]

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: Any, frame: pd.DataFrame) -> Iterator[Map]:
        from pandarallel import pandarallel

        pandarallel.initialize(nb_workers=workers, progress_bar=False, verbose=0)

        def run(task: Callable[[Any, int], int], pieces: Sequence[tuple[int, int]]) -> Iterator[int]:
            keys = pd.Series(0, index=frame.index)
            for i, (a, b) in enumerate(pieces):
                keys.iloc[a:b] = i
            done = frame.groupby(keys.to_numpy()).parallel_apply(lambda g: task(g, int(keys.iloc[g.index[0]])))
            return iter(done.tolist())

        yield run


class DataServer(PieceApproach):
    key, label, note = "data-server", "data server process + queues", "tasks ask a process holding the frame for rows"

    def pieces(self, frame: pd.DataFrame, bounds: Sequence[tuple[int, int]]) -> list[Any]:
        return [None] * len(bounds)  # the task asks for its rows by number

    @contextlib.contextmanager
    def pool(self, workers: int, ctx: Any, frame: pd.DataFrame) -> Iterator[Map]:
        requests, replies = ctx.Queue(), [ctx.Queue() for _ in range(workers)]
        slots = ctx.Value("i", 0)
        server = ctx.Process(target=tasks.serve_frame, args=(frame, requests, replies), daemon=True)
        server.start()  # (pickles the frame to it once under spawn/forkserver: not timed)
        try:
            with ctx.Pool(workers, initializer=tasks.connect_to_server, initargs=(requests, replies, slots)) as p:
                _warm_up(lambda n: p.map(tasks.warm, range(n)), workers)


                def run(task: Callable[[Any, int], int], pieces: Sequence[Any]) -> Iterator[int]:
                    pending = [p.apply_async(tasks.call_on_server, (task, i)) for i in range(len(pieces))]
                    return (r.get() for r in pending)

                yield run
        finally:
            requests.put(None)
            server.join(10)


class SharedexecRows(SharedexecExecutor):
    key, label, note = "sharedexec", "sharedexec.ProcessPoolExecutor", "each task gets the whole frame (a handle)"

    def pieces(self, frame: pd.DataFrame, bounds: Sequence[tuple[int, int]]) -> list[Any]:
        return [frame] * len(bounds)


SCENARIOS: dict[str, tuple[Callable[[Any, int], int], tuple[PieceApproach, ...]]] = {
    "row-partitioned": (
        tasks.task_touch,
        (Executor(), Joblib(), SharedexecExecutor(), SharedexecShared(), JoblibSharedexec(), Pandarallel()),
    ),
    "few-rows": (tasks.task_rows, (DataServer(), SharedexecRows())),
}


def bounds_for(rows: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` row ranges covering ``rows`` rows (the last ones one row shorter)."""
    edges = [rows * k // chunks for k in range(chunks + 1)]
    return list(zip(edges, edges[1:]))


def run(
    scenario: str,
    approach: PieceApproach,
    frame: pd.DataFrame,
    n: int,
    workers: int,
    ctx: Any,
    *,
    string_kind: str,
    frame_bytes: int,
) -> Result:
    """Run the scenario's task over ``n`` pieces through ``approach``."""
    task, _ = SCENARIOS[scenario]
    result = Result(
        approach=approach.key, label=approach.label, note=approach.note, string_kind=string_kind,
        task=task.__name__, workers=workers, tasks=n, frame_bytes=frame_bytes, rows=len(frame), phase=scenario,
    )
    return run_guarded(result, approach, lambda: _measure(result, approach, task, frame.copy(), n, workers, ctx))


def _measure(result: Result, approach: PieceApproach, task: Any, frame: pd.DataFrame, n: int, workers: int, ctx: Any) -> None:
    bounds = bounds_for(len(frame), n)
    expected = [tasks.expected_piece(task, frame, a, b, i) for i, (a, b) in enumerate(bounds)]
    stats = _sharedexec("stats")[0] if approach.uses_sharedexec else None
    with approach.pool(workers, ctx, frame) as map_pieces:
        pieces = approach.pieces(frame, bounds)  # a share() happens here: not measured
        before = dict(stats()) if stats else {}
        with _meter() or _NoMeter() as meter:
            t0 = time.perf_counter()
            results, first = [], None
            for value in map_pieces(task, pieces):
                first = time.perf_counter() - t0 if first is None else first
                results.append(value)
            wall = time.perf_counter() - t0
        after = dict(stats()) if stats else {}
        del pieces
        vars(approach).pop("shared", None)
    result.correct = results == expected
    result.wall_s, result.per_task_s, result.first_s = wall, wall / n, first
    result.peak_extra_bytes, result.final_extra_bytes = meter.peak_extra, meter.final_extra
    result.meter_cpu_s = meter.sample_seconds
    result.stats = {k: v - before.get(k, 0) for k, v in after.items()}


def targets(results: Sequence[Result]) -> list[report.Target]:
    """The scenario's targets (issue 15), as ratios of this run's figures."""
    found = []
    for kind in dict.fromkeys(r.string_kind for r in results):
        by = {r.approach: r for r in results if r.string_kind == kind}
        if results[0].phase == "row-partitioned":
            for base in ("stdlib", "joblib"):
                found.append(report._ratio_target(f"{base} / sharedexec, frame never shared", kind, 4, by.get(base), by.get("sharedexec"), "not run"))
                found.append(report._ratio_target(f"{base} / sharedexec, frame already shared", kind, 10, by.get(base), by.get("sharedexec-shared"), "not run"))
            for key in ("sharedexec", "sharedexec-shared"):
                r = by.get(key)
                value = r.peak_extra_bytes / r.frame_bytes if report._ok(r) and r.peak_extra_bytes is not None else None
                status = "n/a" if value is None else "PASS" if value <= 1.1 else "MISS"
                found.append(report.Target(f"{key}: peak extra memory / frame", kind, "<= 1.1x", value, status))
        else:
            found.append(report._ratio_target("data server / sharedexec", kind, 1, by.get("data-server"), by.get("sharedexec"), "not run"))
    return found


def run_all(scenario: str, frame: pd.DataFrame, n: int, workers: int, ctx: Any, skip: set[str], *, string_kind: str, frame_bytes: int) -> list[Result]:
    """Every approach of ``scenario`` not in ``skip``, in order."""
    _, approaches = SCENARIOS[scenario]
    return [
        run(scenario, a, frame, n, workers, ctx, string_kind=string_kind, frame_bytes=frame_bytes)
        for a in approaches
        if a.key not in skip
    ]
