"""The original question's code, with one line added: ``@sharedexec.shared``.

A data scientist wrote this, and RAM exploded::

    p = multiprocessing.Pool(15)
    args = [(df, config1), (df, config2), ...]
    res = p.map_async(func, args)

Each task pickles ``df`` and sends it through a pipe, so 15 workers each
unpickle their own copy. This script runs that code twice on the same frame:
once as written, once with ``func`` decorated. It prints the wall time and the
peak extra memory of all processes (the parent and its workers), measured as
PSS: a page shared by several processes is counted once, not once per process.

    python examples/seed_pool.py                      # ~26 MB frame, 30 tasks
    python examples/seed_pool.py --rows 1500000       # ~400 MB frame

Needs psutil (``pip install psutil``, or the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import threading
import time

import numpy as np
import pandas as pd
import psutil

import sharedexec


def analyse(df: pd.DataFrame, config: dict) -> float:
    """What each task does: a small computation on the big frame."""
    selected = df[config["column"]] > config["threshold"]
    return float(df["target"][selected].mean())


def func(args):  # the original, unchanged
    df, config = args
    return analyse(df, config)


@sharedexec.shared  # the only change
def func_shared(args):
    df, config = args
    return analyse(df, config)


class PeakMemory:
    """Peak extra PSS of this process and its children, sampled every 20 ms.

    PSS (proportional set size) splits each shared page among the processes
    that map it, so the sum over processes counts shared memory once. RSS
    would count it once per process and make sharing look like copying.
    """

    def __init__(self) -> None:
        self.root = psutil.Process()
        self.peak = self.baseline = 0
        self._stop = threading.Event()

    def sample(self) -> int:
        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass  # a worker that just exited holds no memory
        return total

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> PeakMemory:
        gc.collect()  # garbage freed during the run would otherwise hide growth
        self.baseline = self.peak = self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())

    @property
    def extra(self) -> int:
        return self.peak - self.baseline


def make_frame(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.random((rows, 30)), columns=[f"x{i}" for i in range(30)])
    df["target"] = rng.random(rows)
    df["city"] = rng.choice(["Lyon", "Porto", "Oslo", "Graz"], rows).astype(str)
    return df


def run(task, df: pd.DataFrame, configs: list[dict], workers: int, ctx) -> tuple[list, float, int]:
    with PeakMemory() as memory:
        start = time.perf_counter()
        p = ctx.Pool(workers)
        args = [(df, config) for config in configs]
        res = p.map_async(task, args)
        results = res.get()
        p.close()
        p.join()
        seconds = time.perf_counter() - start
    return results, seconds, memory.extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the frame (default 100,000: ~26 MB)")
    parser.add_argument("--configs", type=int, default=30, help="tasks, one per config (default 30)")
    parser.add_argument("--workers", type=int, default=15, help="pool size (default 15, as in the question)")
    parser.add_argument("--start-method", choices=multiprocessing.get_all_start_methods(), default=None)
    args = parser.parse_args()

    ctx = multiprocessing.get_context(args.start_method)
    df = make_frame(args.rows)
    configs = [{"column": f"x{i % 30}", "threshold": 0.5 + 0.01 * (i % 40)} for i in range(args.configs)]
    size_mb = df.memory_usage(deep=True).sum() / 1e6
    print(f"frame: {len(df):,} rows x {df.shape[1]} columns, {size_mb:.0f} MB")
    print(f"{args.workers} workers, {len(configs)} tasks, start method {ctx.get_start_method()}, {os.cpu_count()} CPUs")
    print()
    print(f"{'':<20} {'time':>8}   peak extra memory (PSS, all processes)")
    plain, seconds, extra = run(func, df, configs, args.workers, ctx)
    print(f"{'plain Pool':<20} {seconds:>6.1f} s   {extra / 1e6:,.0f} MB")
    shared, seconds, extra = run(func_shared, df, configs, args.workers, ctx)
    print(f"{'@sharedexec.shared':<20} {seconds:>6.1f} s   {extra / 1e6:,.0f} MB")
    print()
    print(f"same results: {plain == shared}")
    stats = sharedexec.stats()
    print(f"sharedexec copied the frame into shared memory {stats['publications']} time(s); "
          f"the other {stats['reuse_hits']} tasks reused that copy")


if __name__ == "__main__":
    main()
