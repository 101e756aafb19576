"""Per-task cost of a wide frame (5 000 mixed columns) against a narrow one.

A task that carries a frame already published pays, in the parent, the
decision "same frame, same publication" (``_registry.find``: one fingerprint)
and, in the worker, its own view of the cached frame (``_codec.task_view``).
Both used to walk every block of the frame: a frame of 5 000 columns of mixed
dtypes -- 2 500 blocks, since each extension-array column is a block of its
own -- cost 20x a 10-column frame per task (issue 15; target: at most 2x).
Neither does now (the parent's check looks at a few identities; see
``_codec.block_writes``). A frame of 1 000 Arrow ``str`` columns (1 000
blocks) is measured too.

Measured three ways, medians of ``--repeat`` runs, one process per side:
per task through a warm ``sharedexec.ProcessPoolExecutor`` (what a user sees;
the frames' runs interleaved), and the parent's and the worker's share of it
in-process (no scheduling noise):

    PYTHONPATH=. python benchmarks/wide_frame.py [--rows 200] [--tasks 400]

Rows do not matter to per-task costs (only to the first publication), so the
default frames are short.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import timeit
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pandas as pd

import sharedexec
from sharedexec import _sharing

# Four numpy kinds (one consolidated block each) and four extension kinds
# (one block per column): 5 000 columns make 2 504 blocks.
KINDS = ["float64", "int64", "bool", "datetime64", "str", "Int64", "category", "datetime-tz"]


def column(kind: str, rows: int, seed: int):
    values = np.arange(rows) + seed
    return {
        "float64": lambda: values.astype("float64"),
        "int64": lambda: values,
        "bool": lambda: values % 2 == 0,
        "datetime64": lambda: pd.date_range("2020", periods=rows, freq="s").to_numpy(),
        "str": lambda: pd.array([f"s{v % 97}" for v in values], dtype="str"),
        "Int64": lambda: pd.array(values, dtype="Int64"),
        "category": lambda: pd.Categorical(values % 7),
        "datetime-tz": lambda: pd.date_range("2020", periods=rows, freq="s", tz="UTC").array,
    }[kind]()


def frame(columns: int, rows: int, kinds: list[str] = KINDS) -> pd.DataFrame:
    return pd.DataFrame({f"c{i}": column(kinds[i % len(kinds)], rows, i) for i in range(columns)})


def trivial(df: pd.DataFrame) -> int:
    return df.shape[1]


def median_seconds(fn, repeat: int) -> float:
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeat))


def in_process(df: pd.DataFrame, repeat: int) -> tuple[float, float]:
    """The parent's and the worker's share of one task, without a pool: the
    worker's in a forked child (a process reading its own handles does not
    cache them)."""
    _sharing.install_hooks()
    task = _sharing.SharedTask(trivial, _sharing.Options(min_bytes=0))
    payload = bytes(ForkingPickler.dumps((task, df)))
    parent = median_seconds(lambda: ForkingPickler.dumps((task, df)), repeat)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        worker = pool.apply(_worker_side, (payload, repeat))
    return parent, worker


def _worker_side(payload: bytes, repeat: int) -> float:
    pickle.loads(payload)  # first attach: the cache holds the frame now
    return median_seconds(lambda: pickle.loads(payload), repeat)


def through_pool(ex: sharedexec.ProcessPoolExecutor, frames: dict[str, pd.DataFrame], tasks: int, repeat: int) -> dict[str, float]:
    """Seconds per task for each frame, the frames' runs interleaved: a busy
    machine's drift (or a pool still settling) then hits every frame alike."""
    for df in frames.values():
        for _ in ex.map(trivial, [df] * 8):  # publish, and attach in every worker
            pass
    times: dict[str, list[float]] = {name: [] for name in frames}
    for _ in range(repeat):
        for name, df in frames.items():
            times[name] += timeit.repeat(lambda: list(ex.map(trivial, [df] * tasks)), number=1, repeat=1)
    return {name: statistics.median(t) / tasks for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--wide", type=int, default=5000, help="columns of the wide frame")
    p.add_argument("--narrow", type=int, default=10, help="columns of the narrow frame")
    p.add_argument("--strings", type=int, default=1000, help="columns of the frame of Arrow str columns only")
    p.add_argument("--tasks", type=int, default=400, help="tasks per pool run")
    p.add_argument("--repeat", type=int, default=7, help="pool runs (in-process: 100x as many calls)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    frames = {
        "narrow": frame(args.narrow, args.rows),
        "wide": frame(args.wide, args.rows),
        "strings": frame(args.strings, args.rows, ["str"]),  # one block per column, each an Arrow array
    }
    figures = {}
    with sharedexec.ProcessPoolExecutor(args.workers, min_bytes=0) as ex:
        pools = through_pool(ex, frames, args.tasks, args.repeat)
        for name, df in frames.items():
            parent, worker = in_process(df, args.repeat * 100)
            pool = pools[name]
            figures[name] = (pool, parent, worker)
            print(
                f"{name:<7} {df.shape[1]:>5} columns {df._mgr.nblocks:>5} blocks: "
                f"{pool * 1e6:8.1f} us per task through the pool "
                f"(in-process: parent {parent * 1e6:.1f} us, worker {worker * 1e6:.1f} us)"
            )
    for name in ("wide", "strings"):
        for i, side in enumerate(["pool", "parent", "worker"]):
            print(f"{name} / narrow, {side:<6}: {figures[name][i] / figures['narrow'][i]:.2f}x"
                  + ("   (target: at most 2x)" if side == "pool" and name == "wide" else ""))


if __name__ == "__main__":
    main()
