"""The one runner every approach plugs into: time, memory and correctness of N tasks.

For one approach, one frame, one task and one worker count::

    prepare(frame)                 timed, memory measured  (e.g. fill a shared Array)
    start the pool, warm it up     neither: every approach is compared on a warm pool,
      (every worker runs a task,   whose workers have imported what the frame's path
      then a ~2 MB frame is sent)  needs (a user's pool pays that once, not per frame)
    run(task, n, frame), results   timed, memory measured
    shut the pool down             neither
    wait for /dev/shm to drain     so that this run's segments, freed late, do not
                                   shrink the next run's figures; what is still there
                                   once it stops moving is reported (a leak, or noise)

Figures (see :class:`Result`): wall time from the start of ``prepare`` to the last
result; time per task = wall / n (so a one-off publication is spread over the
tasks, as a user pays it); time to the first result, which holds the first
publication of the frame for the approaches that publish on first use; and the
peak extra memory of the whole process tree (:mod:`sharedexec.bench.memory`: PSS
without shared pages, plus /dev/shm, never RSS) over both measured phases, with
the pool's idle workers in the baseline.

Correctness: the results must equal ``task(frame, 0) + i`` for every i, in order
(see :mod:`sharedexec.bench.tasks`). A run that raises is reported, not fatal, so
that one broken approach does not hide the figures of the others.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from sharedexec.bench import tasks
from sharedexec.bench.approaches import Approach
from sharedexec.bench.memory import MemoryMeter, MeterUnavailableError, shm_total_bytes


@dataclass
class Result:
    """The figures of one approach on one frame, task and worker count."""

    approach: str
    label: str
    note: str
    string_kind: str
    task: str
    workers: int
    tasks: int
    frame_bytes: int
    rows: int
    phase: str = "main"  # main | workers | tasks | size: which part of the run (see cli)
    status: str = "ok"  # ok | error | unavailable | skipped
    reason: str = ""
    correct: bool | None = None
    wall_s: float | None = None
    per_task_s: float | None = None
    first_s: float | None = None
    peak_extra_bytes: int | None = None
    final_extra_bytes: int | None = None
    meter_cpu_s: float | None = None
    shm_left_bytes: int = 0  # still used in /dev/shm once it stopped draining after the run
    stats: dict[str, int] = field(default_factory=dict)
    traceback: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _meter() -> MemoryMeter | None:
    try:
        return MemoryMeter()
    except MeterUnavailableError:
        return None


class _NoMeter:
    """Stands in for the meter where it cannot run, so the runner has one code path."""

    peak_extra = final_extra = None
    sample_seconds = 0.0

    def __enter__(self) -> _NoMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


WARM_BYTES = 2 << 20  # above sharedexec's default min_bytes (1 MB): shared, not inlined
SETTLE_SECONDS = 5.0  # how long a run's shared memory may take to be freed after it
SETTLE_STILL = 0.5  # ... unless it stops moving for this long
SETTLE_SLACK = 2 << 20  # what may stay for good: a lease board, semaphores


def _warm_frame(frame: pd.DataFrame, frame_bytes: int) -> pd.DataFrame:
    rows = min(len(frame), WARM_BYTES * len(frame) // max(frame_bytes, 1) + 1)
    return frame.iloc[:rows].copy()


def run_approach(
    approach: Approach,
    frame: pd.DataFrame,
    task: tasks.Task,
    n: int,
    workers: int,
    ctx: multiprocessing.context.BaseContext,
    *,
    string_kind: str,
    frame_bytes: int,
    phase: str = "main",
    on_result: Callable[[], None] = lambda: None,
) -> Result:
    """Run ``n`` tasks ``task(frame, i)`` through ``approach``; see the module docstring."""
    result = Result(
        approach=approach.key,
        label=approach.label,
        note=approach.note,
        string_kind=string_kind,
        task=task.__name__,
        workers=workers,
        tasks=n,
        frame_bytes=frame_bytes,
        rows=len(frame),
        phase=phase,
    )
    # A copy of its own for every run: a library that keeps a frame published while
    # the object lives (sharedexec does, across pools) must not serve this run from
    # an earlier run's segment, which would hide this run's publication and memory.
    return run_guarded(result, approach, lambda: _measure(result, approach, frame.copy(), task, n, workers, ctx, on_result))


def run_guarded(result: Result, approach: Any, measure: Callable[[], None]) -> Result:
    """Fill ``result`` by ``measure()``, unless ``approach`` is unavailable here;
    an error becomes the row's status, and what the run left in shared memory
    is recorded."""
    reason = approach.unavailable()
    if reason:
        result.status, result.reason = "unavailable", reason
        return result
    shm_before = shm_total_bytes()
    try:
        measure()
    except Exception as exc:
        result.status, result.reason = "error", f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
    result.shm_left_bytes = _settle(shm_before)
    return result


def _measure(
    result: Result,
    approach: Approach,
    frame: pd.DataFrame,
    task: tasks.Task,
    n: int,
    workers: int,
    ctx: multiprocessing.context.BaseContext,
    on_result: Callable[[], None],
) -> None:
    seen = approach.frame_for(frame)
    result.frame_bytes = approach.frame_bytes(seen) or result.frame_bytes
    expected_base = task(approach.frame_in_tasks(seen), 0)
    stats_before = approach.stats() or {}
    with _meter() or _NoMeter() as prep_meter:
        t0 = time.perf_counter()
        state = approach.prepare(frame)
        prepare_s = time.perf_counter() - t0
    with approach.pool(workers, ctx, state) as run:
        if not approach.out_of_band:
            # Send a small frame first, so that the path the frame takes (pickling,
            # publishing, decoding) has imported what it needs in every worker.
            list(run(tasks.task_len, 2 * workers, approach.frame_for(_warm_frame(frame, result.frame_bytes))))
        with _meter() or _NoMeter() as meter:
            t0 = time.perf_counter()
            results, first = [], None
            for value in run(task, n, seen):
                if first is None:
                    first = time.perf_counter() - t0
                results.append(value)
                on_result()
            wall = time.perf_counter() - t0
    stats_after = approach.stats() or {}
    result.correct = results == [expected_base + i for i in range(n)]
    result.wall_s = prepare_s + wall
    result.per_task_s = result.wall_s / n
    result.first_s = prepare_s + (first if first is not None else wall)
    if meter.peak_extra is not None:
        # Whatever prepare left behind (a filled shared Array) is in the run's
        # baseline: add it back to the run's figures.
        result.peak_extra_bytes = max(prep_meter.peak_extra, prep_meter.final_extra + meter.peak_extra)
        result.final_extra_bytes = prep_meter.final_extra + meter.final_extra
        result.meter_cpu_s = prep_meter.sample_seconds + meter.sample_seconds
    result.stats = {k: v - stats_before.get(k, 0) for k, v in stats_after.items() if isinstance(v, (int, float))}


def _settle(before: int) -> int:
    """Wait until the run's shared memory is freed; return what is still left.

    Libraries free segments asynchronously (a collector thread, a resource tracker):
    without this wait, a segment of one run vanishing during the next run's
    measurement would make that run look smaller than it is.
    """
    gc.collect()
    start = changed = time.monotonic()
    last = shm_total_bytes()
    # Done when back to the level before the run, or when nothing has moved for
    # SETTLE_STILL seconds (what stays then is held, not on its way out).
    while last - before > SETTLE_SLACK and time.monotonic() - changed < SETTLE_STILL and time.monotonic() - start < SETTLE_SECONDS:
        time.sleep(0.05)
        now = shm_total_bytes()
        if now != last:
            last, changed = now, time.monotonic()
    return max(last - before, 0)
