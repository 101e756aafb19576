"""``@sharedexec.shared`` through unchanged stdlib pools and joblib, and
``sharedexec.share()``."""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from multiprocessing.reduction import ForkingPickler

import joblib
import numpy as np
import pandas as pd
import pytest

import sharedexec
from sharedexec import _registry
from sharedexec.bench.memory import MemoryMeter

from . import _sharing_tasks as tasks
from . import _wrapping_tasks as wrapping
from ._tasks import wait_until
from .conftest import owned_segments


@pytest.fixture(scope="module")
def df():
    rng = np.random.default_rng(3)
    rows = 400_000
    return pd.DataFrame({"a": rng.random(rows), "b": rng.integers(0, 9, rows), "s": rng.choice(["p", "q"], rows)})


EXPECTED = lambda df, configs: [len(df) + c for c in configs]  # noqa: E731

POOL_CALLS = {
    "map": lambda pool, args: pool.map(tasks.shared_len, args),
    "map_async": lambda pool, args: pool.map_async(tasks.shared_len, args).get(60),
    "imap": lambda pool, args: list(pool.imap(tasks.shared_len, args)),
    "imap_unordered": lambda pool, args: sorted(pool.imap_unordered(tasks.shared_len, args, chunksize=2)),
    "starmap": lambda pool, args: pool.starmap(tasks.shared_len2, args),
    "apply_async": lambda pool, args: [pool.apply_async(tasks.shared_len, (a,)).get(60) for a in args],
}


@pytest.mark.parametrize("call", POOL_CALLS)
def test_every_pool_method_shares(mp_context, df, call):
    configs = list(range(12))
    before = sharedexec.stats()
    with mp_context.Pool(2) as pool:
        result = POOL_CALLS[call](pool, [(df, c) for c in configs])
    after = sharedexec.stats()
    assert result == EXPECTED(df, configs)
    assert after["publications"] - before["publications"] <= 1  # once, if not already
    assert after["reuse_hits"] > before["reuse_hits"]


def test_stdlib_process_pool_executor_shares(mp_context, df):
    before = sharedexec.stats()["reuse_hits"]
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp_context) as ex:
        assert list(ex.map(tasks.shared_len, [(df, c) for c in range(8)])) == EXPECTED(df, range(8))
    assert sharedexec.stats()["reuse_hits"] > before


def test_joblib_default_backend_shares(df):
    before = sharedexec.stats()["reuse_hits"]
    out = joblib.Parallel(n_jobs=2)(joblib.delayed(tasks.shared_len)((df, c)) for c in range(8))
    assert out == EXPECTED(df, range(8))
    assert sharedexec.stats()["reuse_hits"] > before


def test_large_results_come_back_through_shared_memory(mp_context):
    with mp_context.Pool(1) as pool:
        frame = pool.apply(tasks.shared_make_frame, (300_000,))
    pd.testing.assert_frame_equal(frame, tasks.make_frame(300_000), check_exact=True)
    assert all(blk.values.flags.writeable for blk in frame._mgr.blocks)
    assert tasks._in_segment(frame._mgr.blocks[0].values)


def test_undecorated_functions_and_queues_are_unchanged(df):
    message = ForkingPickler.dumps((tasks.plain_len, (df, 1)))
    assert len(message) > df["a"].nbytes  # the frame itself, as before
    shared_message = ForkingPickler.dumps((tasks.shared_len, (df, 1)))
    assert len(shared_message) < 600
    pickle.loads(shared_message)  # read, as a worker would: a message never read keeps its lease
    # what an mp.Queue sends: ForkingPickler.dumps of the item, unarmed
    assert len(ForkingPickler.dumps(df)) > df["a"].nbytes


def test_called_directly_it_is_the_function(df):
    assert tasks.shared_len((df, 3)) == len(df) + 3
    assert tasks.shared_len.__name__ == "shared_len"
    assert tasks.shared_len.__doc__ == "Length of the frame plus the config."
    assert inspect.signature(tasks.shared_len2) == inspect.signature(tasks.shared_len2.__wrapped__)
    clone = pickle.loads(pickle.dumps(tasks.shared_len))  # by reference
    assert clone((df, 1)) == len(df) + 1


def test_decorator_with_options(df):
    decorated = sharedexec.shared(min_bytes=1 << 40)(tasks.plain_len)
    assert decorated.options.min_bytes == 1 << 40
    with pytest.raises(ValueError, match="mmap_mode"):
        sharedexec.shared(mmap_mode="w")


def test_no_task_fails_when_its_frame_is_dropped_early(mp_context):
    flag = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sx-release-{os.getpid()}-{mp_context.get_start_method()}")
    with mp_context.Pool(1) as pool:
        blocker = pool.apply_async(tasks.shared_hold, ((tasks.make_frame(10), 0, flag),))
        frame = tasks.make_frame(300_000)
        late = pool.apply_async(tasks.shared_len, ((frame, 5),))
        time.sleep(0.5)  # the task is pickled and queued behind the blocker
        del frame
        import gc

        gc.collect()
        _registry.REGISTRY.collect()
        open(flag, "w").close()
        try:
            assert late.get(60) == 300_005
            blocker.get(60)
        finally:
            os.unlink(flag)


def test_share_sends_handles_through_any_multiprocessing_pickle(mp_context, df):
    shared = sharedexec.share(df)
    message = ForkingPickler.dumps(shared)
    assert len(message) < 400
    pickle.loads(message)  # read: a message never read keeps its lease
    with mp_context.Pool(1) as pool:
        received, _ = pool.apply(tasks.plain_describe, (shared,))
    assert received == ("DataFrame", int(pd.util.hash_pandas_object(df).sum()), True)
    process = mp_context.Process(target=tasks.describe, args=(shared,))
    process.start()
    process.join(60)
    assert process.exitcode == 0


class _TreeMeter(MemoryMeter):
    """The memory meter, counting of shared memory only the segments of
    this process tree: other sessions' files come and go in /dev/shm (one
    freed during a run once made 8 private copies of 160 MB peak at 334 MB)."""

    def __init__(self):
        super().__init__(shm_dirs=())

    def sample(self) -> int:
        tree = {os.getpid(), *(child.pid for child in multiprocessing.active_children())}
        return super().sample() + sum(size for _, owner, size in sharedexec._names.list_segments() if owner in tree)


@pytest.mark.slow
def test_eight_workers_hold_one_copy_not_eight(tmp_path):
    """Peak extra memory of the whole process tree (PSS without shared pages,
    plus its segments), once 8 workers have each read every column and hold
    the frame."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({f"c{i}": rng.random(1_000_000) for i in range(20)})  # 160 MB
    size = frame.memory_usage().sum()
    context = multiprocessing.get_context("forkserver")
    peaks = {}
    for name, function in (("plain", tasks.plain_hold), ("shared", tasks.shared_hold)):
        flag, ready = tmp_path / name, tmp_path / f"{name}-ready"
        ready.mkdir()
        with context.Pool(8) as pool:
            pool.map(tasks.cache_names, range(64))  # warm: 8 workers up, pandas imported
            with _TreeMeter() as meter:  # its last sample: on leaving, every worker holding the frame
                pending = pool.map_async(function, [(frame, i, str(flag), str(ready)) for i in range(8)], chunksize=1)
                wait_until(lambda: len(os.listdir(ready)) == 8)
            flag.touch()
            assert len(pending.get(120)) == 8
            peaks[name] = meter.peak_extra
    assert peaks["shared"] <= 1.3 * size, peaks
    assert peaks["plain"] >= 4 * size, peaks  # the baseline really copies


def test_a_vanished_segment_fails_its_task_not_the_pool(mp_context, tmp_path):
    flag = str(tmp_path / "go")
    with mp_context.Pool(1) as pool:
        blocker = pool.apply_async(tasks.blocked_until, (flag,))
        frame = tasks.make_frame(300_000)
        doomed = pool.apply_async(tasks.shared_len, ((frame, 1),))
        deadline = time.monotonic() + 30
        while _registry.REGISTRY.find(frame) is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until the task handler has pickled (published) it
        name = _registry.REGISTRY.find(frame).name
        os.unlink(os.path.join(sharedexec._names.shm_dir(), name))  # "someone else"
        open(flag, "w").close()
        with pytest.raises(sharedexec.SegmentNotFoundError, match=name):
            doomed.get(60)
        assert blocker.get(60) is True
        assert pool.apply(tasks.shared_len, ((tasks.make_frame(300_000), 2),)) == 300_002  # still serving


@pytest.fixture(scope="module")
def small_df():
    return tasks.make_frame(100_000)  # 1.6 MB: shared under the default min_bytes


def _run_forms(run) -> dict:
    return {name: run(fn) for name, fn in wrapping.forms().items()}


@pytest.mark.parametrize("pool_kind", ["Pool", "ProcessPoolExecutor"])
def test_every_wrapping_form_shares_through_stdlib_pools(mp_context, small_df, pool_kind):
    args = [(small_df, i) for i in range(3)]
    expected = {name: [(len(small_df) + i, True) for i in range(3)] for name in wrapping.forms()}
    if pool_kind == "Pool":
        with mp_context.Pool(2) as pool:
            got = _run_forms(lambda fn: pool.starmap(fn, args))
    else:
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp_context) as ex:
            got = _run_forms(lambda fn: list(ex.map(fn, *zip(*args))))
    assert got == expected


def test_every_wrapping_form_shares_through_joblib_default_backend(small_df):
    expected = {name: [(len(small_df) + i, True) for i in range(3)] for name in wrapping.forms()}
    with joblib.Parallel(n_jobs=2) as parallel:
        got = _run_forms(lambda fn: parallel(joblib.delayed(fn)(small_df, i) for i in range(3)))
    assert got == expected


def test_a_wrapper_pickles_as_the_function_plus_its_options():
    message = pickle.dumps(sharedexec.shared(min_bytes=7)(wrapping.len_and_shared))
    assert len(message) < 400
    runner = pickle.loads(message)
    assert runner.fn is wrapping.len_and_shared and runner.options.min_bytes == 7


def _nested():
    def inner(df, i):
        return len(df) + i

    return inner


@pytest.mark.parametrize("fn", [lambda df, i: len(df) + i, _nested()], ids=["lambda", "nested"])
def test_what_a_pool_cannot_send_is_refused_in_the_parent(fn, small_df):
    with pytest.raises(pickle.PicklingError, match="cannot send it. Define it at the top level of a module"):
        ForkingPickler.dumps(sharedexec.shared(fn))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        with pytest.raises(pickle.PicklingError, match="is not found as"):
            pool.starmap(sharedexec.shared(fn), [(small_df, 1)])
    # joblib's cloudpickle sends them by value, wrapped or not: so do we.
    assert joblib.Parallel(n_jobs=2)(joblib.delayed(sharedexec.shared(fn))(small_df, i) for i in range(2)) == [
        len(small_df),
        len(small_df) + 1,
    ]


MAIN_SCRIPT = """
import multiprocessing, joblib, numpy as np, pandas as pd, sharedexec

@sharedexec.shared
def task(df, i):
    return len(df) + i

def plain(df, i):
    return len(df) - i

if __name__ == "__main__":
    df = pd.DataFrame({"a": np.arange(500_000)})
    print(joblib.Parallel(n_jobs=2)(joblib.delayed(task)(df, i) for i in range(4)))
    print(joblib.Parallel(n_jobs=2)(joblib.delayed(sharedexec.shared(plain))(df, i) for i in range(2)))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        print(pool.starmap(sharedexec.shared(plain), [(df, i) for i in range(2)]))
    print(sharedexec.stats()["publications"])
"""


def test_functions_of_the_main_script_decorated_or_wrapped_inline(tmp_path):
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[500000, 500001, 500002, 500003]", "[500000, 499999]", "[500000, 499999]", "1"]
    assert done.stderr == ""


@pytest.mark.parametrize("obj", [[np.arange(10)], {"a": np.arange(10)}, (np.arange(10),), 3.5], ids=["list", "dict", "tuple", "float"])
def test_share_refuses_other_types_before_writing_anything(obj):
    """Issue 12, defect 5: share([..]) wrote a segment, then failed on a weak reference."""
    before = owned_segments()
    with pytest.raises(TypeError, match=r"share\(\) takes one pandas DataFrame, Series or Index, numpy ndarray") as info:
        sharedexec.share(obj)
    assert isinstance(info.value, sharedexec.SharedExecError)
    assert owned_segments() == before
