"""Rule 1 of issue 13: in-place writes into a shared frame reach later tasks.

Under pandas Copy-on-Write the publisher holds a reference to the published
blocks (``_codec.write_guard``), so pandas copies a block before writing into
it; the fingerprint sees the new block and only that block is published
again. The reference is the stdlib: a task sees what pickling would send.
"""

from __future__ import annotations

import multiprocessing
import pickle

import joblib
import numpy as np
import pandas as pd
import pytest
from multiprocessing.reduction import ForkingPickler

import sharedexec
from sharedexec import _codec, _leases
from sharedexec._sharing import Options, SharedTask

from . import _lifetime_tasks as tasks
from ._tasks import make_frame

pytestmark = pytest.mark.skipif(not _codec._pandas_copies_on_write(), reason="needs pandas Copy-on-Write")


def frame() -> pd.DataFrame:
    df = make_frame(100_000, strings="arrow")
    df.loc[1, "a"] = np.nan
    return df


def write_loc(df):
    df.loc[0, "a"] = 1.5


def write_iloc(df):
    df.iloc[2, 1] = -3.0


def write_fillna(df):
    df.fillna(0.25, inplace=True)


def write_arrow_string(df):
    df.loc[3, "s"] = "written"


def write_replace_column(df):
    # Column by column, in place: pandas gives the column's Block a new array
    # and keeps the block tuple (``Block.set_inplace``, see _codec).
    df.replace({"s": {"s2": "replaced"}}, inplace=True)


WRITES = [write_loc, write_iloc, write_fillna, write_arrow_string, write_replace_column]


def expected(obj):
    return tasks.head(obj)


def assert_same(got, want):
    if isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got, want, check_exact=True)
    else:
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def run_executor(obj):
    with sharedexec.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), min_bytes=1000) as ex:
        first = ex.submit(tasks.head, obj).result()
        yield first
        yield ex.submit(tasks.head, obj).result()


def run_joblib(obj):
    with joblib.parallel_config(backend=sharedexec.JoblibBackend(min_bytes=1000), n_jobs=2):
        yield joblib.Parallel()(joblib.delayed(tasks.head)(obj) for _ in range(2))[0]
        yield joblib.Parallel()(joblib.delayed(tasks.head)(obj) for _ in range(2))[0]


def run_decorator(obj):
    with multiprocessing.get_context("fork").Pool(1) as pool:
        yield pool.apply(tasks.shared_head, (obj,))
        yield pool.apply(tasks.shared_head, (obj,))


RUNNERS = [run_executor, run_joblib, run_decorator]


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("run", RUNNERS, ids=["executor", "joblib", "decorator"])
def test_next_task_sees_an_in_place_write(run, write):
    df = frame()
    results = run(df)
    assert_same(next(results), expected(df))
    write(df)
    assert_same(next(results), expected(df))


@pytest.mark.parametrize("run", RUNNERS, ids=["executor", "joblib", "decorator"])
def test_series_iloc_write(run):
    s = pd.Series(np.arange(400_000, dtype=np.int64), name="n")
    results = run(s)
    assert_same(next(results), expected(s))
    s.iloc[0] = 7
    assert_same(next(results), expected(s))


def new_blocks_nbytes(before: list, df: pd.DataFrame) -> int:
    return sum(blk.values.nbytes for blk in df._mgr.blocks if not any(blk.values is old for old in before))


@pytest.mark.parametrize("write", WRITES)
def test_only_the_written_blocks_are_copied_again(write):
    df = frame()
    registry = sharedexec._registry.REGISTRY
    # Each lease stands for a task message; end them as its future would, or
    # they keep the frame's segments past this test.
    tokens = [registry.lease_for(df)[-1]]
    before_blocks = [blk.values for blk in df._mgr.blocks]
    copied = sharedexec.stats()["bytes_copied"]
    write(df)
    tokens.append(registry.lease_for(df)[-1])
    registry.end_leases(tokens)
    again = sharedexec.stats()["bytes_copied"] - copied
    assert 0 < again <= new_blocks_nbytes(before_blocks, df) + 4096
    assert again < _codec.nbytes(df) // 2


def test_ten_thousand_tasks_of_an_unchanged_frame_make_one_publication():
    df = frame()
    before = sharedexec.stats()
    leases = _leases.TaskLeases()
    task = SharedTask(tasks.head, Options(min_bytes=1000), leases)
    for _ in range(10_000):
        ForkingPickler.dumps((task, (df,)))
    leases.end()
    after = sharedexec.stats()
    assert after["publications"] - before["publications"] == 1
    assert after["reuse_hits"] - before["reuse_hits"] >= 9_999


def test_a_shared_frame_accepts_in_place_writes():
    """share() returns read-only memory; pandas copies the written block
    first, as for any frame another object references."""
    df = frame()
    shared = sharedexec.share(df)
    shared.loc[0, "a"] = 1.5
    shared.iloc[2, 1] = -3.0
    df.loc[0, "a"] = 1.5
    df.iloc[2, 1] = -3.0
    pd.testing.assert_frame_equal(shared, df, check_exact=True)
    with multiprocessing.get_context("fork").Pool(1) as pool:  # sent as a handle, unarmed
        assert_same(pool.apply(tasks.head, (shared,)), expected(df))
    payload = ForkingPickler.dumps(shared)
    assert len(payload) < 2000
    pickle.loads(payload)  # a message never read would keep its lease until exit
