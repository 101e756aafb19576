"""Tasks that return large DataFrames.

Each task simulates random-walk paths and returns them as a frame. A pool
normally pickles every result in the worker, sends it through a pipe and
unpickles it in the parent: two copies and a pipe for each result. With
sharedexec, a worker writes a large result (1 MiB or more) into shared
memory once, and the parent maps it: no pipe, no second copy. The parent
owns the result like any other frame: it can write into it, and the memory
is freed when the frame is garbage collected.

    python examples/large_results.py                   # 8 results of ~40 MB
    python examples/large_results.py --rows 4000000    # 8 results of ~320 MB
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import numpy as np
import pandas as pd

import sharedexec


def simulate(seed: int, rows: int) -> pd.DataFrame:
    """Ten random-walk price paths of ``rows`` steps: a new rows x 10 frame."""
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((rows, 10))
    return pd.DataFrame(100 + steps.cumsum(axis=0), columns=[f"path_{i}" for i in range(10)])


def run(executor_class, chunks: int, rows: int, workers: int) -> tuple[list[pd.DataFrame], float]:
    with executor_class(workers) as executor:
        executor.submit(simulate, 0, 10).result()  # start the workers: not timed
        start = time.perf_counter()
        results = list(executor.map(simulate, range(chunks), [rows] * chunks))
        return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=8, help="tasks, one result each (default 8)")
    parser.add_argument("--rows", type=int, default=500_000, help="rows per result (default 500,000: 40 MB)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()

    stdlib, seconds = run(concurrent.futures.ProcessPoolExecutor, args.chunks, args.rows, args.workers)
    size_mb = stdlib[0].memory_usage().sum() / 1e6
    print(f"{args.chunks} results of {args.rows:,} rows x {stdlib[0].shape[1]} columns ({size_mb:.0f} MB each)")
    print(f"concurrent.futures.ProcessPoolExecutor: {seconds:5.2f} s")
    del stdlib

    shared, seconds = run(sharedexec.ProcessPoolExecutor, args.chunks, args.rows, args.workers)
    print(f"sharedexec.ProcessPoolExecutor:         {seconds:5.2f} s")

    first = shared[0]
    print(f"same values as computed here: {first.equals(simulate(0, args.rows))}")
    first.loc[0, "path_0"] = -1.0  # results belong to the caller: writable
    first["spread"] = first["path_0"] - first["path_1"]
    print(f"result is writable: {first.loc[0, 'path_0'] == -1.0}")


if __name__ == "__main__":
    main()
