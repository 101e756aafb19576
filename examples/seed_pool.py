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
    python examples/seed_pool.py --progress           # then with progress bars, each entry point

``--progress`` then runs the same tasks with a tqdm progress bar through each
of sharedexec's entry points, the way one shows progress with those pools
anyway: tqdm over ``Pool.imap``, over ``executor.map`` and
``as_completed``, and over joblib's ``return_as="generator"``. A bar moves
as results arrive, so it needs an iterator of results, not a list.

Needs psutil (``pip install psutil``, or the ``bench`` extra), and tqdm for
``--progress``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


def with_progress(df: pd.DataFrame, configs: list[dict], workers: int, ctx) -> dict[str, list]:
    """The same tasks, with a progress bar, through each entry point."""
    import joblib
    from tqdm import tqdm

    args = [(df, config) for config in configs]
    n = len(configs)
    results = {}
    # @sharedexec.shared and an unchanged Pool: imap yields results in order as
    # they come (imap_unordered: as they finish); map_async has nothing to count.
    with ctx.Pool(workers) as pool:
        results["Pool.imap"] = list(tqdm(pool.imap(func_shared, args), total=n, desc="Pool.imap"))
    # The executor: map yields in order; as_completed yields futures as they finish.
    with sharedexec.ProcessPoolExecutor(workers, mp_context=ctx) as executor:
        results["executor.map"] = list(tqdm(executor.map(analyse, [df] * n, configs), total=n, desc="executor.map"))
        futures = {executor.submit(analyse, df, config): i for i, config in enumerate(configs)}
        done = [None] * n
        for future in tqdm(concurrent.futures.as_completed(futures), total=n, desc="as_completed"):
            done[futures[future]] = future.result()
        results["as_completed"] = done
    # joblib: return_as="generator" yields results as they arrive, in order
    # ("generator_unordered": as they finish).
    with joblib.parallel_config(backend="sharedexec", n_jobs=workers):
        generator = joblib.Parallel(return_as="generator")(joblib.delayed(analyse)(df, config) for config in configs)
        results["joblib generator"] = list(tqdm(generator, total=n, desc="joblib generator"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the frame (default 100,000: ~26 MB)")
    parser.add_argument("--configs", type=int, default=30, help="tasks, one per config (default 30)")
    parser.add_argument("--workers", type=int, default=15, help="pool size (default 15, as in the question)")
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=None,
        help="how workers start (default: the platform's, fork on Linux before Python 3.14)",
    )
    parser.add_argument("--progress", action="store_true", help="then run the tasks again with progress bars (needs tqdm)")
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
    if args.progress:
        print()
        for way, results in with_progress(df, configs, min(args.workers, 4), ctx).items():
            print(f"with a progress bar, {way}: same results: {results == plain}")
        print(f"the frame is still in shared memory once: {sharedexec.stats()['publications']} publication(s) in all")


if __name__ == "__main__":
    main()
