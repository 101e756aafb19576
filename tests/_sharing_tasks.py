"""Module-level task functions for test_sharing/test_decorator (spawn and
forkserver workers import them by name)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

import sharedexec
from sharedexec import _cache

from ._exact_tasks import MetaFrame


def describe(obj):
    """What a worker received: type, a digest, and whether it is shared."""
    if isinstance(obj, (list, tuple)):
        return [describe(o) for o in obj]
    if isinstance(obj, dict):
        return {k: describe(v) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and not isinstance(obj, (pd.DataFrame, pd.Series, np.ndarray)):
        return {"attrs": describe(vars(obj))}
    if isinstance(obj, pd.DataFrame):
        return (type(obj).__name__, int(pd.util.hash_pandas_object(obj, index=True).sum()), _in_segment(obj._mgr.blocks[0].values))
    if isinstance(obj, np.ndarray):
        return (type(obj).__name__, float(obj.sum()), _in_segment(obj))
    return obj


def _in_segment(arr) -> bool:
    """Whether arr's memory belongs to a mapping (not the process heap)."""
    base = arr
    while getattr(base, "base", None) is not None:
        base = base.base
    # _segment.map_fd's memory is a ctypes array, which numpy 1.x gives as
    # the base itself (numpy 2: a memoryview of it).
    return isinstance(base, memoryview) or hasattr(base, "sharedexec_read_only") or type(base).__name__ == "mmap"


def cache_names(_=None):
    _cache.CACHE.sweep()
    return sorted(name for name, *_way in _cache.CACHE._entries)


def set_cache_budget(budget):
    _cache.CACHE.budget = budget


def make_frame(rows):
    return pd.DataFrame({"x": np.arange(rows, dtype="f8"), "y": np.arange(rows) % 7})


def len_plus(df, i):
    return len(df) + i


@sharedexec.shared
def shared_len(args):
    """Length of the frame plus the config."""
    df, config = args
    return len(df) + config


@sharedexec.shared
def shared_len2(df, config):
    return len(df) + config


def plain_len(args):
    df, config = args
    return len(df) + config


@sharedexec.shared
def shared_sum_all(args):
    """Touch every page of every column: what a real task does."""
    df, i = args
    return float(sum(df[c].to_numpy().sum() for c in df.columns)) + i


def plain_sum_all(args):
    df, i = args
    return float(sum(df[c].to_numpy().sum() for c in df.columns)) + i


@sharedexec.shared
def shared_describe(obj):
    return describe(obj), os.getpid()


def plain_describe(obj):
    return describe(obj), os.getpid()


@sharedexec.shared
def shared_make_frame(rows):
    return make_frame(rows)


@sharedexec.shared
def shared_hold(args):
    """Keep the frame's pages in use until the parent says so; tell it
    (a file ``<ready>/<i>``, if a ``ready`` directory is given) once every
    column has been read."""
    import time

    df, i, flag, *ready = args
    total = float(sum(df[c].to_numpy().sum() for c in df.columns))
    for directory in ready:
        open(os.path.join(directory, str(i)), "w").close()
    while not os.path.exists(flag):
        time.sleep(0.02)
    return total + i


def plain_hold(args):
    return shared_hold.fn(args)


def blocked_until(flag):
    import time

    while not os.path.exists(flag):
        time.sleep(0.02)
    return True


# -- issue 12: what one task writes, the next does not see ----------------------


def write_into(obj):
    """What the task sees first, then a write of every kind it may try."""
    if isinstance(obj, MetaFrame):
        seen = list(obj.info)
        obj.info.append("written")
        return seen
    seen = obj.tolist()
    try:
        obj.flat[0] = "written" if obj.dtype == object else 99
    except ValueError:  # read-only: mmap_mode="r"
        pass
    if obj.dtype == object and isinstance(seen[0], list):
        obj.flat[1].append("written")  # a list inside an object array
    return seen


def scaled(df):
    return df.attrs["scale"](len(df))


def run_like_dask(message: bytes, conn) -> None:
    """What a Dask worker does with a task: unpickle it with plain pickle,
    call it, hand its result to the next task, and send the result back with
    plain pickle (not through any pool's pickler)."""
    import pickle

    runner, args = pickle.loads(message)
    result = runner(*args)
    conn.send_bytes(pickle.dumps((type(result).__name__, len(result), result)))


def columns_of(df, columns, rows=None):
    return df[columns].iloc[:rows]


def write_everywhere(df):
    """What the task saw, then pandas-level writes that must stay its own."""
    seen = (list(df.columns), [str(t) for t in df.dtypes], df.iloc[0].tolist())
    df.insert(1, "midway", 0)
    df.loc[:, "a"] = 0.5
    df.loc[0, "s"] = "changed"
    df.replace({"b": 1}, {"b": -1}, inplace=True)
    return seen


def itself(obj):
    """What the worker received, sent back."""
    return obj


def write_first_block(df):
    """Write through numpy into the first block; return what was there."""
    values = df._mgr.blocks[0].values
    seen = float(values.flat[0])
    values[(0,) * values.ndim] = -1.0
    return seen
