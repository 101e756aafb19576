"""Returning a large frame from a task: sharedexec vs the stdlib's pickle path.

Each worker builds the frame once (a warm-up call) and then returns that same
frame, so both sides time only the trip back: pickling through the result
pipe for the stdlib executor, one copy into a segment plus a private mapping
in the caller for sharedexec. Medians of ``--repeat`` interleaved runs
(issue 3's target: >= 5x).

    python benchmarks/result_speed.py [--rows 500000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import time

import numpy as np
import pandas as pd

import sharedexec

_frame = None


def frame(rows: int) -> pd.DataFrame:
    """The brief's frame: 60 float64 + 30 int64 + 1 string column, built once per worker."""
    global _frame
    if _frame is None or len(_frame) != rows:
        rng = np.random.default_rng(0)
        columns = {f"f{i}": rng.random(rows) for i in range(60)}
        columns |= {f"i{i}": rng.integers(0, 1000, rows) for i in range(30)}
        columns["s"] = rng.choice(["alpha", "beta", "gamma"], rows).astype(object)
        _frame = pd.DataFrame(columns)
    return _frame


def timed_return(executor, rows: int) -> float:
    start = time.perf_counter()
    result = executor.submit(frame, rows).result()
    elapsed = time.perf_counter() - start
    assert len(result) == rows
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    context = multiprocessing.get_context("forkserver")
    with (
        concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as stdlib,
        sharedexec.ProcessPoolExecutor(1, mp_context=context) as ours,
    ):
        stdlib.submit(frame, args.rows).result()
        ours.submit(frame, args.rows).result()
        plain, shared = [], []
        for _ in range(args.repeat):
            plain.append(timed_return(stdlib, args.rows))
            shared.append(timed_return(ours, args.rows))
    nbytes = frame(args.rows).memory_usage(deep=True).sum()
    p, s = statistics.median(plain), statistics.median(shared)
    print(f"result: {args.rows:,} rows x 91 columns, {nbytes / 1e6:.0f} MB; {args.repeat} runs each, medians")
    print(f"stdlib ProcessPoolExecutor    : {p:.3f} s")
    print(f"sharedexec ProcessPoolExecutor: {s:.3f} s")
    print(f"speed-up: {p / s:.1f}x (target >= 5x: {'PASS' if p / s >= 5 else 'MISS'})")


if __name__ == "__main__":
    main()
