"""The per-task path of a shared frame: handle size, and its cost on each side.

What every task that carries an already published frame pays: in the parent,
pickling the frame as a handle (a registry lookup, one fingerprint, a lease);
in the worker, unpickling the handle (a cache hit and a shallow task view);
and once per worker, the first attach (map, check, decode). Issue 14 added an
owner/mode check and an HMAC tag to the attach and a 16-byte key to the
handle; issue 13 a shared flock per mapping and a write guard per
publication. This script measures all three -- the parent's side for a
``share()``d frame and for a frame an executor's (armed) pickler sends -- in this
process and the worker's in one forked worker (no pool scheduling noise), so
that the same script run against two versions gives their ratio:

    PYTHONPATH=<old tree> python benchmarks/handle_cost.py --json old.json
    PYTHONPATH=<new tree> python benchmarks/handle_cost.py --json new.json --baseline old.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import statistics
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pandas as pd

import sharedexec
from sharedexec import _cache
from sharedexec._sharing import Options, SharedTask


def frame(rows: int, columns: int, strings: bool = True) -> pd.DataFrame:
    data = {f"f{i}": np.arange(rows, dtype=np.float64) + i for i in range(columns)}
    if strings:  # (Python objects on pandas 2.2: a task's own copy of them there, see docs: semantics)
        data["s"] = pd.Series([f"s{i % 1000}" for i in range(rows)], dtype="str")
    return pd.DataFrame(data)


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker_figures(payload: bytes, repeat: int) -> dict[str, float]:
    """The worker's side, in a worker: a process that did not publish the
    frame (the publisher reads its own handles back uncached)."""
    pickle.loads(payload)  # warm the cache

    def first_attach() -> None:
        _cache.CACHE._entries.clear()
        pickle.loads(payload)

    return {
        "worker_per_task_s": median_seconds(lambda: pickle.loads(payload), repeat),
        "first_attach_s": median_seconds(first_attach, max(repeat // 20, 5)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--columns", type=int, default=90)
    p.add_argument("--repeat", type=int, default=2001)
    p.add_argument("--no-strings", action="store_true", help="leave out the string column (default: one)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--baseline", metavar="PATH", help="a JSON of another run: print the ratios")
    args = p.parse_args()
    shared = sharedexec.share(frame(args.rows, args.columns, not args.no_strings))
    payload = bytes(ForkingPickler.dumps(shared))
    plain = frame(args.rows, args.columns, not args.no_strings)  # sent by the executors' armed pickler
    task = SharedTask(len, Options())
    figures = {
        "handle_bytes": len(payload),
        "parent_per_task_s": median_seconds(lambda: ForkingPickler.dumps(shared), args.repeat),
        "parent_per_task_armed_s": median_seconds(lambda: ForkingPickler.dumps((task, (plain,))), args.repeat),
    }
    with multiprocessing.get_context("fork").Pool(1) as pool:
        figures.update(pool.apply(worker_figures, (payload, args.repeat)))
    baseline = json.load(open(args.baseline)) if args.baseline else {}
    for key, value in figures.items():
        shown = f"{value}" if key == "handle_bytes" else f"{value * 1e6:.1f} us"
        ratio = f"   {value / baseline[key]:.2f}x the baseline" if key in baseline else ""
        print(f"{key:<20} {shown}{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f)


if __name__ == "__main__":
    main()
