"""``python -m sharedexec bench``: every way of sharing a frame, side by side, in one run.

What one run does, for each string kind (Python objects, then Arrow)::

    build the frame (frames.make_frame)
    main      every approach x every task (len, touch), --workers workers, --tasks tasks
              (few tasks for the approaches that pickle the frame into each task)
    workers   memory with 8 workers (with --sweep: 1, 2, 4, 8, 16), one task per worker,
              each reading every column and holding the frame until all hold it
    tasks     with --sweep: time against the number of tasks
    size      with --sweep: time per task against the frame size (1/8 .. 1 of --rows)

then prints the header, the tables and the targets (ratios of this run's figures),
and writes the JSON and PNGs asked for. The measuring itself is in
:mod:`sharedexec.bench.runner`; the approaches in :mod:`sharedexec.bench.approaches`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from sharedexec.bench import onecopy, partitioned, report, tasks
from sharedexec.bench.approaches import APPROACHES, BY_KEY, Approach
from sharedexec.bench.frames import STRING_KINDS, describe, frame_nbytes, make_frame
from sharedexec.bench.runner import Result, run_approach

DEFAULT_ROWS, DEFAULT_TASKS, DEFAULT_FEW = 500_000, 200, 4
QUICK_ROWS, QUICK_TASKS, QUICK_FEW = 10_000, 20, 2
TARGET_ROWS, TARGET_TASKS = 500_000, 200  # the conditions the targets are stated for
TARGET_CHUNKS = 16  # row-partitioned's (issue 15)

SWEEP_WORKERS = (1, 2, 4, 8, 16)
TARGET_WORKERS = 8
SWEEP_TASKS = (1, 4, 16, 64, 256)
SWEEP_SIZES = (1 / 8, 1 / 4, 1 / 2)  # the full size is the main phase's run
SWEEP_KEYS = ("stdlib", "joblib", "sharedexec", "sharedexec-arrow-strings", "pool-shared", "joblib-sharedexec")
TASKS = {"len": tasks.task_len, "touch": tasks.task_touch}
# phase: (x, y, x label, y label, title) of its table and PNG
SWEEP_FIGURES = {
    "workers": ("workers", "peak_extra_bytes", "workers", "peak extra memory (GB)", "memory vs workers, all workers reading the frame at once"),
    "tasks": ("tasks", "wall_s", "tasks", "wall time (s)", "wall time vs tasks, task len(df) + i"),
    "size": ("frame_bytes", "per_task_s", "frame size (MB)", "time per task (s)", "time per task vs frame size, task len(df) + i"),
}


@dataclass(frozen=True)
class Step:
    phase: str
    approach: Approach
    task: tasks.Task
    workers: int
    n: int
    rows: int


def build_parser() -> argparse.ArgumentParser:
    keys = ", ".join(a.key for a in APPROACHES)
    p = argparse.ArgumentParser(
        prog="python -m sharedexec bench",
        description="Share one large DataFrame with a process pool, every way at once: "
        "wall time, time per task, first result, peak extra memory (PSS + /dev/shm), correctness.",
    )
    p.add_argument("--rows", type=int, help=f"rows of the frame (default {DEFAULT_ROWS:,}: ~400 MB; --quick: {QUICK_ROWS:,})")
    p.add_argument("--tasks", type=int, help=f"tasks per approach (default {DEFAULT_TASKS}; --quick: {QUICK_TASKS})")
    p.add_argument(
        "--few-tasks",
        type=int,
        help=f"tasks for the approaches that pickle the frame into every task (default {DEFAULT_FEW}; --quick: {QUICK_FEW})",
    )
    p.add_argument("--workers", type=int, default=2, help="pool size (default 2)")
    p.add_argument("--string-columns", type=int, default=1, help="string columns in the frame (default 1)")
    p.add_argument("--string-kind", choices=(*STRING_KINDS, "both"), default="both", help="Python-object or Arrow-backed strings (default both)")
    p.add_argument("--task", choices=(*TASKS, "both"), default="both", help="len: len(df) + i; touch: read every column (default both)")
    p.add_argument("--skip", default="", metavar="NAME[,NAME]", help=f"approaches to leave out, among: {keys} (default none)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a {QUICK_ROWS:,}-row frame and few tasks: a smoke run in seconds, too small to judge the targets (default off)",
    )
    p.add_argument(
        "--sweep", action="store_true", help="also memory vs workers (1..16), time vs tasks and vs frame size, each as a PNG (default off)"
    )
    p.add_argument(
        "--scenario", choices=("broadcast", *partitioned.SCENARIOS, *onecopy.SCENARIOS), default="broadcast",
        help="broadcast: the whole frame to every task (the default); row-partitioned: one chunk of rows per task; "
        "few-rows: each task reads a few rows (with a data-server approach); one-copy: memory and time of "
        "adopt=True against adopt=False, 8 workers reading a --gb frame; fill: see --fill",
    )
    p.add_argument("--chunks", type=int, default=TARGET_CHUNKS, help=f"row-partitioned: chunks, one task each (default {TARGET_CHUNKS})")
    p.add_argument(
        "--fill", action="store_true",
        help="the scenario 'fill': a frame of 55%% of the memory this process may use (its cgroup's limit, else the "
        "machine's), run to completion by 8 workers with adopt=True; approaches that need two copies are listed as skipped "
        "(default off)",
    )
    p.add_argument("--gb", type=float, default=2.0, help="one-copy: the frame's size in GB (default 2)")
    add_start_method(p, "; joblib's approaches use loky, fork-global fork, Ray its own")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON (default: not written)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the main figures, sweep PNGs beside it (default: not written)")
    return p


def add_start_method(p: argparse.ArgumentParser, note: str = "") -> None:
    """``--start-method``, for the bench and the demo: its help names the
    default this run really uses, which may not be the platform's."""
    default = default_start_method()
    why = ", Python 3.14's default on Linux" if default == "forkserver" else ""
    p.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=default,
        help=f"how the pools' workers start (default {default}{why}; used whatever this platform's own "
        f"default, which `python -m sharedexec doctor` shows){note}",
    )


def default_start_method() -> str:
    # forkserver: Python 3.14's default on Linux, and it keeps the parent's frame out
    # of the workers' address space, so no figure depends on copy-on-write luck.
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def context_for(start_method: str) -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Workers fork from a server that has pandas imported already: starting 16 of
        # them on 2 cores then takes a fraction of a second (starting is not timed).
        ctx.set_forkserver_preload([tasks.__name__])
    return ctx


def _task_fns(args: argparse.Namespace) -> list[tasks.Task]:
    return list(TASKS.values()) if args.task == "both" else [TASKS[args.task]]


def plan(args: argparse.Namespace, approaches: Sequence[Approach]) -> list[Step]:
    """Every run of one string kind, in order."""
    steps = [
        Step("main", a, t, args.workers, args.few_tasks if a.few else args.tasks, args.rows)
        for a in approaches
        for t in _task_fns(args)
    ]
    swept = [a for a in approaches if a.key in SWEEP_KEYS]
    # --quick leaves the 8-worker run out: starting 8 loky workers twice on 2 cores
    # would double its time, and memory ratios of a tiny frame mean nothing.
    for w in SWEEP_WORKERS if args.sweep else () if args.quick else (TARGET_WORKERS,):
        steps += [Step("workers", a, tasks.task_hold, w, w, args.rows) for a in swept]
    if args.sweep:
        steps += [
            Step("tasks", a, tasks.task_len, args.workers, c, args.rows)
            for a in swept
            for c in SWEEP_TASKS
            if not a.few or c <= args.few_tasks
        ]
        steps += [
            Step("size", a, tasks.task_len, args.workers, args.few_tasks if a.few else args.tasks, max(int(args.rows * f), 1))
            for f in SWEEP_SIZES
            for a in swept
        ]
    return steps


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Approach]:
    args.rows = args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    args.tasks = args.tasks or (QUICK_TASKS if args.quick else DEFAULT_TASKS)
    args.few_tasks = min(args.few_tasks or (QUICK_FEW if args.quick else DEFAULT_FEW), args.tasks)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    keys = list(BY_KEY) if args.scenario == "broadcast" else [a.key for a in partitioned.SCENARIOS[args.scenario][1]]
    unknown = skip - set(keys)
    if unknown:
        parser.error(f"--skip: unknown approach {', '.join(sorted(unknown))}; choose among {', '.join(keys)}")
    args.skip = sorted(skip)
    return [a for a in APPROACHES if a.key not in skip]


def _caveat(args: argparse.Namespace) -> str:
    if args.quick:
        return f"--quick: targets are not judged on a {args.rows:,}-row frame; run without --quick ({TARGET_ROWS:,} rows) to judge them"
    if args.scenario == "row-partitioned" and (args.rows, args.chunks, args.string_columns) != (TARGET_ROWS, TARGET_CHUNKS, 1):
        return (
            f"the targets are stated for {TARGET_ROWS:,} rows (~400 MB) in {TARGET_CHUNKS} chunks, one string column; "
            f"this run used {args.rows:,} rows, {args.chunks} chunks, {args.string_columns} string column(s)"
        )
    if args.scenario == "broadcast" and (args.rows, args.tasks, args.string_columns) != (TARGET_ROWS, TARGET_TASKS, 1):
        return (
            f"the targets are stated for {TARGET_ROWS:,} rows (~400 MB), {TARGET_TASKS} tasks, one string column; "
            f"this run used {args.rows:,} rows, {args.tasks} tasks, {args.string_columns} string column(s)"
        )
    return ""


def _sweep_paths(plot: str | None) -> dict[str, str]:
    stem = os.path.splitext(plot)[0] if plot else "sharedexec-bench"
    return {name: f"{stem}-{name}.png" for name in ("workers", "tasks", "size")}


def _skipped(a: Approach, kind: str, args: argparse.Namespace) -> list[Result]:
    return [
        Result(approach=a.key, label=a.label, note=a.note, string_kind=kind, task=t.__name__, workers=args.workers,
               tasks=0, frame_bytes=0, rows=args.rows, status="skipped", reason="left out with --skip")
        for t in _task_fns(args)
    ]


def _sweep_results(results: Sequence[Result], phase: str) -> list[Result]:
    group = [r for r in results if r.phase == phase]
    if phase == "size" and group:  # the full size point is the main phase's run
        group += [r for r in results if r.phase == "main" and r.task == "task_len" and r.approach in SWEEP_KEYS]
    return group


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every approach that ran returned correct results."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.fill or args.scenario in onecopy.SCENARIOS:
        ctx = context_for(args.start_method)
        return _onecopy_main("fill" if args.fill else args.scenario, args, ctx, " ".join([parser.prog, *argv]))
    approaches = _resolve(args, parser)
    ctx = context_for(args.start_method)
    if args.scenario != "broadcast":
        return _scenario_main(args, ctx, " ".join([parser.prog, *argv]))
    kinds = list(STRING_KINDS) if args.string_kind == "both" else [args.string_kind]
    steps = plan(args, approaches)
    available = {a.key: a.unavailable() is None for a in approaches}
    progress = report.Progress(len(kinds) * sum(s.n for s in steps if available[s.approach.key]), "building the frame")

    results: list[Result] = []
    frames: dict[str, str] = {}
    # One barrier directory for the run, named in the environment before the first
    # pool (or forkserver) starts: see tasks.barrier_directory.
    barriers = contextlib.ExitStack()
    barriers.enter_context(tasks.barrier_directory())
    try:
        for kind in kinds:
            results += [r for a in APPROACHES if a.key in args.skip for r in _skipped(a, kind, args)]
            for rows in sorted({s.rows for s in steps}, reverse=True):
                progress.describe(f"{kind} strings: building {rows:,} rows")
                frame = make_frame(rows, string_columns=args.string_columns, string_kind=kind)
                nbytes = frame_nbytes(frame)
                if rows == args.rows:
                    frames[kind] = describe(frame)
                for s in (s for s in steps if s.rows == rows):
                    progress.describe(f"{kind}: {s.approach.key} {s.task.__name__} x{s.n}, {s.workers} workers")
                    with tasks.barrier(s.n) if s.task is tasks.task_hold else contextlib.nullcontext():
                        results.append(
                            run_approach(
                                s.approach, frame, s.task, s.n, s.workers, ctx,
                                string_kind=kind, frame_bytes=nbytes, phase=s.phase, on_result=progress.update,
                            )
                        )
                del frame
    finally:
        barriers.close()
        progress.close()

    env = report.environment(args.start_method, " ".join([parser.prog, *argv]))
    out = sys.stdout
    report.print_header(env, "sharedexec bench", out)
    for kind in kinds:
        print(f"\nframe ({kind} strings): {frames[kind]}", file=out)
        for t in _task_fns(args):
            group = [r for r in results if r.string_kind == kind and r.phase == "main" and r.task == t.__name__]
            report.print_table(group, f"{kind} strings, {t.__name__}, {args.workers} workers", out)
    for phase, (x, y, _, _, title) in SWEEP_FIGURES.items():
        if group := _sweep_results(results, phase):
            report.print_sweep(group, x, y, title, out)
    targets = _judged(report.compute_targets(results, args.workers), args)
    report.print_targets(targets, _caveat(args), out)

    if args.json:
        report.write_json(args.json, env, vars(args), frames, results, targets)
        print(f"\nJSON: {args.json}", file=out)
    if args.plot:
        report.plot_main(args.plot, results, f"sharedexec bench, {args.workers} workers, {args.rows:,} rows -- {env['date']}")
        print(f"plot: {args.plot}", file=out)
    if args.sweep:
        paths = _sweep_paths(args.plot)
        for phase, (x, y, xlabel, ylabel, title) in SWEEP_FIGURES.items():
            group = _sweep_results(results, phase)
            frame_bytes = max(r.frame_bytes for r in group) if phase == "workers" and group else None
            report.plot_sweep(paths[phase], group, x, y, xlabel, ylabel, title, frame_bytes)
        print("sweep plots: " + ", ".join(paths.values()), file=out)

    return _closing(results, targets, _caveat(args) if args.quick else "", out)


def _scenario_main(args: argparse.Namespace, ctx: multiprocessing.context.BaseContext, command: str) -> int:
    """One of :data:`partitioned.SCENARIOS`: every approach, each string kind."""
    kinds = list(STRING_KINDS) if args.string_kind == "both" else [args.string_kind]
    n = args.chunks if args.scenario == "row-partitioned" else args.tasks
    results, frames = [], {}
    for kind in kinds:
        frame = make_frame(args.rows, string_columns=args.string_columns, string_kind=kind)
        frames[kind] = describe(frame)
        results += partitioned.run_all(
            args.scenario, frame, n, args.workers, ctx, set(args.skip), string_kind=kind, frame_bytes=frame_nbytes(frame)
        )
        del frame
    out = sys.stdout
    env = report.environment(args.start_method, command)
    report.print_header(env, f"sharedexec bench: {args.scenario}", out)
    for kind in kinds:
        print(f"\nframe ({kind} strings): {frames[kind]}", file=out)
        group = [r for r in results if r.string_kind == kind]
        report.print_table(group, f"{kind} strings, {args.scenario}, {n} tasks, {args.workers} workers", out)
    targets = _judged(partitioned.targets(results), args)
    report.print_targets(targets, _caveat(args), out)
    if args.json:
        report.write_json(args.json, env, vars(args), frames, results, targets)
    return _closing(results, targets, _caveat(args) if args.quick else "", out)


def _judged(targets: Sequence[report.Target], args: argparse.Namespace) -> list[report.Target]:
    """The targets as judged: a --quick run's ratios (a tiny frame) are
    shown, never a PASS or a MISS."""
    if not args.quick:
        return list(targets)
    return [dataclasses.replace(t, status="not judged") if t.status in ("PASS", "MISS") else t for t in targets]


def _onecopy_main(scenario: str, args: argparse.Namespace, ctx: multiprocessing.context.BaseContext, command: str) -> int:
    """The scenarios of issue 18 (:mod:`sharedexec.bench.onecopy`)."""
    results, frame = onecopy.run_scenario(scenario, args.gb, ctx)
    out = sys.stdout
    env = report.environment(args.start_method, command)
    report.print_header(env, f"sharedexec bench: {scenario}", out)
    print(f"\nframe: {frame}", file=out)
    print(f"shared memory counted: {', '.join(onecopy.counted_dirs())}", file=out)
    report.print_table(results, f"{scenario}: {onecopy.WORKERS} workers each read every column, held at once "
                       "(first = the publication alone)", out)
    targets = onecopy.targets(results)
    report.print_targets(targets, "", out)
    if args.json:
        report.write_json(args.json, env, vars(args), {"arrow": frame}, results, targets)
    return _closing(results, targets, "", out)


def _closing(results: Sequence[Result], targets: Sequence[report.Target], not_judged: str, out: TextIO) -> int:
    wrong = [r for r in results if r.status == "error" or (r.status == "ok" and not r.correct)]
    missed = [t for t in targets if t.status == "MISS"]
    met = [t for t in targets if t.status == "PASS"]
    unmeasured = sum(t.status == "n/a" for t in targets)
    if not_judged:
        print(f"\n{not_judged}.", file=out)
    else:
        print(f"\n{len(met)} target(s) met, {len(missed)} missed, {unmeasured} not measurable in this run.", file=out)
    for t in missed:
        print(f"MISSED: {t.string_kind} strings: {t.what}: {t.value:,.2f}x, goal {t.goal}", file=out)
    for r in wrong:
        what = "raised " + r.reason if r.status == "error" else "returned wrong results"
        print(f"FAILED: {r.label} ({r.string_kind}, {r.task}, {r.workers} workers) {what}", file=out)
        if r.traceback:
            print(r.traceback, file=sys.stderr)
    return 1 if wrong else 0
