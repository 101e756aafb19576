"""``python -m sharedexec demo``: the original problem, solved, in about a minute.

One mixed-dtype frame (numeric, time-zone aware datetime, categorical, Arrow and
Python-object strings; ~300 MB), many tasks that each read every column of it,
run twice on a warm pool of the same size:

* the stdlib ``concurrent.futures.ProcessPoolExecutor``, which pickles the frame
  into every task -- so it gets only a few tasks, or the demo would take minutes;
* ``sharedexec.ProcessPoolExecutor``, the drop-in subclass, with all the tasks.

Then a side-by-side table of time per task and peak extra memory (PSS of the
whole process tree plus /dev/shm: every page counted once, see
:mod:`sharedexec.bench.memory`) and one line saying what it means. The measuring
is the benchmark's own runner, so the demo's figures mean what the bench's do.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from sharedexec.bench import report, tasks
from sharedexec.bench.approaches import SharedexecExecutor, StdlibExecutor
from sharedexec.bench.cli import add_start_method, context_for
from sharedexec.bench.frames import describe, frame_nbytes, make_mixed_frame
from sharedexec.bench.runner import Result, run_approach

DEFAULTS = {"rows": 1_000_000, "tasks": 200, "stdlib_tasks": 6}
QUICK = {"rows": 20_000, "tasks": 20, "stdlib_tasks": 2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sharedexec demo",
        description="One large mixed-dtype DataFrame, many tasks: the stdlib ProcessPoolExecutor "
        "against sharedexec.ProcessPoolExecutor, time per task and peak memory side by side.",
    )
    p.add_argument("--rows", type=int, help=f"rows of the frame (default {DEFAULTS['rows']:,}, ~300 MB)")
    p.add_argument("--tasks", type=int, help=f"tasks run with sharedexec (default {DEFAULTS['tasks']})")
    p.add_argument("--stdlib-tasks", type=int, help=f"tasks run with the stdlib executor (default {DEFAULTS['stdlib_tasks']})")
    p.add_argument("--workers", type=int, default=2, help="pool size (default 2)")
    add_start_method(p)
    p.add_argument("--quick", action="store_true", help=f"a {QUICK['rows']:,}-row frame: a smoke run in seconds (default off)")
    return p


def _times(ratio: float, more: str, less: str) -> str:
    return f"{ratio:,.1f}x {more}" if ratio >= 1 else f"{1 / ratio:,.1f}x {less}"


def _meaning(std: Result, sx: Result, alone_s: float, workers: int) -> str:
    """One line from the two results, whatever they turned out to be."""
    line = f"sharedexec ran each task {_times(std.per_task_s / sx.per_task_s, 'faster', 'SLOWER')}"
    if std.peak_extra_bytes and sx.peak_extra_bytes:
        line += f" with {_times(std.peak_extra_bytes / sx.peak_extra_bytes, 'less', 'MORE')} peak memory"
    return (
        f"{line} than the stdlib executor (the task's own work alone: {report.fmt_seconds(alone_s / workers)} "
        f"a task with {workers} workers): the frame was copied once into shared memory and the workers "
        "map it, instead of unpickling a copy in every task."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when both executors ran and returned correct results."""
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else DEFAULTS
    rows = args.rows or sizes["rows"]
    n_sx = args.tasks or sizes["tasks"]
    n_std = args.stdlib_tasks or sizes["stdlib_tasks"]
    ctx = context_for(args.start_method)
    out = sys.stdout

    sx_approach = SharedexecExecutor()
    unavailable = sx_approach.unavailable()
    progress = report.Progress(n_std + (0 if unavailable else n_sx), "building the frame")
    try:
        frame = make_mixed_frame(rows)
        nbytes = frame_nbytes(frame)
        print(f"frame: {describe(frame)}", file=out)
        t0 = time.perf_counter()
        tasks.task_touch(frame, 0)
        alone_s = time.perf_counter() - t0
        print(
            f"task:  reads every column ({report.fmt_seconds(alone_s)} alone, in this process); "
            f"{args.workers} workers, warmed up before timing",
            file=out,
        )
        runs = [(StdlibExecutor(), n_std)] + ([] if unavailable else [(sx_approach, n_sx)])
        results = []
        for approach, n in runs:
            progress.describe(f"{approach.label}: {n} tasks")
            results.append(
                run_approach(approach, frame, tasks.task_touch, n, args.workers, ctx,
                             string_kind="mixed", frame_bytes=nbytes, on_result=progress.update)
            )
    finally:
        progress.close()

    report.print_table(results, "stdlib vs sharedexec: same frame, same task, same workers", out)
    bad = [r for r in results if r.status != "ok" or not r.correct]
    if unavailable:
        print(f"\nsharedexec.ProcessPoolExecutor could not run: {unavailable}", file=out)
        return 1
    if bad:
        for r in bad:
            print(f"\n{r.label} failed: {r.reason or 'wrong results'}\n{r.traceback}", file=out)
        return 1
    print("\n" + _meaning(*results, alone_s, args.workers), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
