"""One copy in total (issue 18): the scenarios ``one-copy`` and ``fill``.

``one-copy``: a mixed frame (numeric, time-zone aware datetime, categorical,
Arrow strings; one block per column, as a frame built column by column has)
of ``--gb`` GB, published then read in full by 8 workers at once, with
``adopt=False`` and then ``adopt=True``::

    build the frame                      not measured: the baseline holds it
    start 8 workers, warm them           not measured
    publish (REGISTRY.publish)           timed, memory measured
    8 tasks reading every column, held   memory measured (all 8 hold it at once)
    200 tasks len(df) + i                timed: the per-task cost

``fill``: a frame of 55% of the memory this process may use -- the cgroup's
limit where one applies (v2 ``memory.max``, v1 ``memory.limit_in_bytes``,
the lowest on the way to the root), else the machine's -- run to completion
by 8 workers with ``adopt=True``. Two copies of it cannot fit: sharedexec
without adoption, the stdlib executor and joblib are listed as skipped, with
the reason, never run (the kernel's OOM killer would end the benchmark).

Memory is the meter's (:mod:`sharedexec.bench.memory`), but where
``SHAREDEXEC_DIR`` is a tmpfs of its own, only that file system is counted,
not ``/dev/shm``: on a machine shared with others, their files there would
count too.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import psutil

import sharedexec
from sharedexec import _registry
from sharedexec.bench import memory, report, tasks
from sharedexec.bench.memory import MemoryMeter
from sharedexec.bench.runner import Result

SCENARIOS = ("one-copy", "fill")
WORKERS = 8
LEN_TASKS = 200
FILL_FRACTION = 0.55
# Bytes a row of make_onecopy_frame holds: 6 float64, 2 int64, one datetime,
# one categorical (int8 codes), two Arrow strings of ~7 digits (+ 4-byte offsets).
ROW_BYTES = 6 * 8 + 2 * 8 + 8 + 1 + 2 * (7 + 4)


def memory_limit() -> tuple[int, str]:
    """The bytes this process may use, and where that figure comes from."""
    limits = [(value, where) for value, where in _cgroup_limits() if value < psutil.virtual_memory().total]
    if limits:
        return min(limits)
    return psutil.virtual_memory().total, "physical memory"


def _cgroup_limits() -> list[tuple[int, str]]:
    """The memory limits of this process's cgroup and its ancestors, v2 and v1."""
    mounts = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            _, where, kind, options = line.split()[:4]
            if kind == "cgroup2":
                mounts.setdefault("v2", where)
            elif kind == "cgroup" and "memory" in options.split(","):
                mounts["v1"] = where
    found = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "" and "v2" in mounts:
                found += _walk(mounts["v2"], path, "memory.max")
            elif "memory" in controllers.split(",") and "v1" in mounts:
                found += _walk(mounts["v1"], path, "memory.limit_in_bytes")
    return found


def _walk(mount: str, path: str, name: str) -> list[tuple[int, str]]:
    found = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        file = os.path.join(mount, *parts[:depth], name)
        try:
            with open(file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            found.append((int(text), f"{file} (cgroup)"))
    return found


def make_onecopy_frame(nbytes: int, seed: int = 0) -> pd.DataFrame:
    """A frame of about ``nbytes`` (see ``ROW_BYTES``), one block per column:
    each column is built and added on its own, so building it costs the frame
    plus one column (never two frames, even at 55% of memory)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = max(nbytes // ROW_BYTES, 1)
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(index=pd.RangeIndex(rows))
    for k in range(6):
        df[f"x{k}"] = rng.standard_normal(rows)
    for k in range(2):
        df[f"n{k}"] = rng.integers(-(10**9), 10**9, rows)
    seconds = rng.integers(1_500_000_000, 1_800_000_000, rows)
    df["when"] = pd.to_datetime(seconds, unit="s", utc=True).tz_convert("Europe/Paris")
    del seconds
    df["city"] = pd.Categorical.from_codes(rng.integers(0, 100, rows, dtype=np.int8), [f"city-{k:03d}" for k in range(100)])
    for k in range(2):
        # Built by Arrow, never as Python strings (which would cost ~60 bytes each).
        digits = pc.cast(pa.array(rng.integers(1_000_000, 10_000_000, rows)), pa.string())
        df[f"s{k}"] = pd.Series(pd.arrays.ArrowStringArray(pa.chunked_array([digits])), index=df.index)
        del digits
    return df


def _result(label: str, key: str, frame_bytes: int, rows: int, phase: str) -> Result:
    return Result(approach=key, label=label, note="", string_kind="arrow", task="task_hold", workers=WORKERS,
                  tasks=WORKERS, frame_bytes=frame_bytes, rows=rows, phase=phase)


def run_one(frame: pd.DataFrame, adopt: bool, ctx: Any, phase: str) -> Result:
    """Publish ``frame`` (adopting it or not), then 8 workers read all of it at once."""
    label = f"sharedexec, adopt={adopt}"
    result = _result(label, f"sharedexec-adopt-{str(adopt).lower()}", sharedexec._codec.nbytes(frame), len(frame), phase)
    expected_hold = tasks.task_touch(frame, 0)  # (what task_hold returns)
    expected_len = len(frame)
    with sharedexec.ProcessPoolExecutor(WORKERS, mp_context=ctx, adopt=adopt) as ex:
        list(ex.map(tasks.task_len, [frame.iloc[:10].copy()] * WORKERS, range(WORKERS)))  # warm: every worker up
        gc.collect()
        with MemoryMeter(shm_dirs=counted_dirs()) as meter:
            t0 = time.perf_counter()
            _registry.REGISTRY.publish(frame, adopt=adopt)
            published = time.perf_counter() - t0
            with tasks.barrier(WORKERS):
                held = list(ex.map(tasks.task_hold, [frame] * WORKERS, range(WORKERS)))
            t1 = time.perf_counter()
            lens = list(ex.map(tasks.task_len, [frame] * LEN_TASKS, range(LEN_TASKS)))
            per_task = (time.perf_counter() - t1) / LEN_TASKS
        result.wall_s = time.perf_counter() - t0
    result.correct = held == [expected_hold + i for i in range(WORKERS)] and lens == [expected_len + i for i in range(LEN_TASKS)]
    result.first_s, result.per_task_s = published, per_task
    result.peak_extra_bytes, result.final_extra_bytes = meter.peak_extra, meter.final_extra
    result.meter_cpu_s = meter.sample_seconds
    return result


def counted_dirs() -> list[str]:
    # On a machine shared with other users of /dev/shm, their files would count
    # too: with SHAREDEXEC_DIR on a tmpfs of its own, only that one is counted.
    dirs = memory.default_shm_dirs()
    return dirs[1:] or dirs


def skipped(label: str, key: str, frame_bytes: int, rows: int, reason: str) -> Result:
    result = _result(label, key, frame_bytes, rows, "fill")
    result.status, result.reason = "skipped", reason
    return result


def targets(results: Sequence[Result]) -> list[report.Target]:
    """Issue 18's targets, as ratios of this run's figures."""
    by = {r.approach: r for r in results}
    on, off = by.get("sharedexec-adopt-true"), by.get("sharedexec-adopt-false")
    found = []
    for r, goal, limit in ((on, "<= 0.15x", 0.15), (off, "about 1.0x", None)):
        if report._ok(r) and r.peak_extra_bytes is not None:
            value = r.peak_extra_bytes / r.frame_bytes
            status = "info" if limit is None else "PASS" if value <= limit else "MISS"
            found.append(report.Target(f"{r.label}: peak extra memory / frame", "arrow", goal, value, status))
    if report._ok(on) and report._ok(off):
        publish = on.first_s / off.first_s
        found.append(report.Target("publication time, adopt=True / adopt=False", "arrow", "<= 1.2x", publish,
                                   "PASS" if publish <= 1.2 else "MISS"))
        per_task = on.per_task_s / off.per_task_s
        found.append(report.Target("time per task, adopt=True / adopt=False", "arrow", "about 1.0x", per_task, "info"))
    return found


def run_scenario(scenario: str, gb: float, ctx: Any) -> tuple[list[Result], str]:
    """The results of ``scenario`` and a line describing its frame."""
    # One barrier directory for every pool: a forkserver keeps the environment it started with.
    with tasks.barrier_directory():
        return _run_scenario(scenario, gb, ctx)


def _run_scenario(scenario: str, gb: float, ctx: Any) -> tuple[list[Result], str]:
    if scenario == "fill":
        limit, where = memory_limit()
        nbytes = int(limit * FILL_FRACTION)
        frame = make_onecopy_frame(nbytes)
        size = sharedexec._codec.nbytes(frame)
        line = f"{len(frame):,} rows, {size / 1e9:.2f} GB: {size / limit:.0%} of the {limit / 1e9:.2f} GB limit ({where})"
        two = f"needs two copies of a frame of {size / limit:.0%} of the limit ({2 * size / 1e9:.2f} GB of {limit / 1e9:.2f} GB)"
        results = [
            run_one(frame, True, ctx, "fill"),
            skipped("sharedexec, adopt=False", "sharedexec-adopt-false", size, len(frame), two + ": the parent's frame and the shared copy"),
            skipped("stdlib ProcessPoolExecutor", "stdlib", size, len(frame), two + " at least: each task gets the frame pickled, and each worker unpickles its own copy"),
            skipped("joblib.Parallel (loky)", "joblib", size, len(frame), two + " at least: joblib memmaps a copy of the numeric blocks and pickles the Arrow strings into every task"),
        ]
        return results, line
    frame = make_onecopy_frame(int(gb * 1e9))
    line = f"{len(frame):,} rows, {sharedexec._codec.nbytes(frame) / 1e9:.2f} GB, {frame.shape[1]} columns, one block each"
    results = [run_one(frame, False, ctx, "one-copy")]
    del frame  # one frame at a time: the second is built anew, never published
    gc.collect()
    results.append(run_one(make_onecopy_frame(int(gb * 1e9)), True, ctx, "one-copy"))
    return results, line
