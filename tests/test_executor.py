"""``sharedexec.ProcessPoolExecutor``: conformance with the stdlib executor, then sharing.

Conformance is one list of cases, each run against
``concurrent.futures.ProcessPoolExecutor`` and ``sharedexec.ProcessPoolExecutor``
(the ``executor_cls`` fixture) with the same expected outcome, once with small
arguments and once with a frame above ``min_bytes`` among them (``frame``), so
that the sharing path is on the line. The core cases also run under fork,
spawn and forkserver. Cases that leave a pool usable share one warm pool per
(executor, start method); the others build their own.

Processes are sequenced with files (``_tasks.block_until``): a task that must
stay busy waits for the test to create its release file, so no case depends on
timing. ``timeout`` arguments are only given where the task cannot finish
before the test releases it.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import multiprocessing
import os
import pickle
import socket
import threading
import weakref
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pandas as pd
import pytest

import sharedexec
from sharedexec import _names, _registry, _segment

from . import _tasks
from ._exact import assert_identical
from ._tasks import block_until, checksum, make_frame, square, touch

EXECUTORS = {"stdlib": cf.ProcessPoolExecutor, "sharedexec": sharedexec.ProcessPoolExecutor}
START_METHODS = ["fork", "spawn", "forkserver"]
FORK = multiprocessing.get_context("fork")


@pytest.fixture(params=list(EXECUTORS))
def executor_cls(request):
    return EXECUTORS[request.param]


@pytest.fixture(scope="module", params=[(n, m) for m in START_METHODS for n in EXECUTORS], ids="-".join)
def warm_pool(request):
    """One pool of 2 workers per (executor, start method), for the cases that
    leave it usable."""
    name, method = request.param
    ex = EXECUTORS[name](max_workers=2, mp_context=multiprocessing.get_context(method))
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def files(tmp_path):
    """Paths for sequencing files: ``files("release")``."""
    return lambda name: str(tmp_path / name)


def owned_segments() -> set[str]:
    """This process's segments, but for its lease board (which lives on)."""
    board = _registry.REGISTRY._board
    return {
        name
        for name, owner, _ in _names.list_segments()
        if owner == os.getpid() and (board is None or name != board.name)
    }


def pickling_error(obj) -> type[BaseException]:
    """The exception pickling ``obj`` raises in this process: which one
    depends on the Python version (3.11 says AttributeError for a local lambda)."""
    try:
        pickle.dumps(obj)
    except Exception as exc:
        return type(exc)
    raise AssertionError(f"{obj!r} pickles")


def is_sharedexec(ex) -> bool:
    return isinstance(ex, sharedexec.ProcessPoolExecutor)


# ---------------------------------------------------------------------------------
# Conformance: cases on the warm pools, all start methods
# ---------------------------------------------------------------------------------


@pytest.mark.compat
def test_submit_returns_the_result(warm_pool, frame):
    futures = [warm_pool.submit(square, x, frame) for x in range(6)]
    assert [f.result() for f in futures] == [(x * x, checksum(frame)) for x in range(6)]
    assert warm_pool.submit(square, x=3, frame=frame).result() == (9, checksum(frame))


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_in_order_with_chunksize(warm_pool, frame, chunksize):
    xs = list(range(10))
    out = list(warm_pool.map(square, xs, [frame] * len(xs), chunksize=chunksize, timeout=120))
    assert out == [(x * x, checksum(frame)) for x in xs]


def test_map_chunks_run_in_one_process(warm_pool, frame):
    pids = [pid for pid, _ in warm_pool.map(_tasks.pid_of, range(12), [frame] * 12, chunksize=4)]
    for start in range(0, 12, 4):
        assert len(set(pids[start : start + 4])) == 1


def test_map_timeout(warm_pool, frame, files):
    release = files("release")
    results = warm_pool.map(block_until, [release], ["v"], [frame], timeout=0.2)
    try:
        with pytest.raises(cf.TimeoutError):
            next(results)
    finally:
        touch(release)
    # The pool is still usable once the blocked task is released.
    assert warm_pool.submit(square, 2, frame).result() == (4, checksum(frame))


def test_exception_type_message_and_worker_traceback(warm_pool, frame):
    future = warm_pool.submit(_tasks.fail_on_purpose, 7, frame)
    exc = future.exception()
    assert type(exc) is ValueError
    assert str(exc) == "task 7 failed on purpose"
    remote = str(exc.__cause__)
    assert "fail_on_purpose" in remote
    assert 'raise ValueError(f"task {x} failed on purpose")' in remote
    with pytest.raises(ValueError, match="task 7 failed on purpose"):
        future.result()


def test_user_exception_type_survives(warm_pool, frame):
    exc = warm_pool.submit(_tasks.fail_with_task_error, 3, frame).exception()
    assert type(exc) is _tasks.TaskError
    assert exc.args == ("custom", 3)
    assert "fail_with_task_error" in str(exc.__cause__)


def test_exception_through_map(warm_pool, frame):
    results = warm_pool.map(_tasks.fail_on_purpose, [1, 2], [frame] * 2)
    with pytest.raises(ValueError, match="task 1 failed on purpose"):
        list(results)


def test_unrelated_read_only_error_is_still_a_value_error(warm_pool, frame):
    # sharedexec adds advice to numpy's read-only error (SharedReadOnlyError,
    # a ValueError) even when the array is the task's own: by design, hedged.
    exc = warm_pool.submit(_tasks.fail_numpy_read_only, 1, frame).exception()
    assert isinstance(exc, ValueError)
    assert str(exc).startswith("assignment destination is read-only")
    assert type(exc) is (sharedexec.SharedReadOnlyError if is_sharedexec(warm_pool) else ValueError)


def test_unpicklable_argument_fails_its_future_only(warm_pool, frame):
    # The frame comes first: sharedexec has published it when the lock fails.
    exc = warm_pool.submit(square, (frame, threading.Lock())).exception()
    assert type(exc) is TypeError and "pickle" in str(exc)
    local = lambda: 1  # noqa: E731
    assert type(warm_pool.submit(square, local, frame).exception()) is pickling_error(local)
    assert warm_pool.submit(square, 3, frame).result() == (9, checksum(frame))


def test_a_frame_plain_pickle_refuses_fails_as_under_the_stdlib(warm_pool, big_frame):
    """Issue 12, defect 6: what cannot be shared is pickled as the stdlib
    would (here: refused the same way), never failed by sharedexec."""
    df = big_frame.copy()
    df.attrs["scale"] = lambda n: 2 * n
    exc = warm_pool.submit(square, 3, df).exception()
    assert type(exc) is pickling_error(df.attrs["scale"]) and "lambda" in str(exc)
    assert warm_pool.submit(square, 3, big_frame).result() == (9, checksum(big_frame))


def test_unpicklable_function_fails_its_future(warm_pool, frame):
    local = lambda x: x  # noqa: E731
    assert type(warm_pool.submit(local, frame).exception()) is pickling_error(local)
    assert warm_pool.submit(square, 3, frame).result() == (9, checksum(frame))


def test_unpicklable_result_fails_its_future_only(warm_pool, frame):
    exc = warm_pool.submit(_tasks.return_lock, 1, frame).exception()
    assert type(exc) is TypeError and "pickle" in str(exc)
    exc = warm_pool.submit(_tasks.return_lambda, 1, frame).exception()
    assert type(exc) is pickling_error(_tasks.return_lambda(1))
    assert warm_pool.submit(square, 3, frame).result() == (9, checksum(frame))


def test_decorated_task_function(warm_pool, frame):
    futures = [warm_pool.submit(_tasks.square_shared, x, frame) for x in range(3)]
    assert [f.result() for f in futures] == [(x * x, checksum(frame)) for x in range(3)]


def test_as_completed_and_wait(warm_pool, frame, files):
    release, started = files("release"), files("started")
    slow = warm_pool.submit(block_until, release, "slow", frame, started=started)
    _tasks.wait_for(started)  # one worker is busy: the quick tasks run on the other
    quick = [warm_pool.submit(square, x, frame) for x in range(4)]
    try:
        done, not_done = cf.wait([slow, *quick], return_when=cf.FIRST_COMPLETED)
        assert slow in not_done and done and done <= set(quick)
        done, not_done = cf.wait(quick, return_when=cf.ALL_COMPLETED)
        assert done == set(quick) and not not_done
        with pytest.raises(cf.TimeoutError):
            next(cf.as_completed([slow], timeout=0.1))
        order = []
        for future in cf.as_completed([slow, *quick]):
            order.append(future)
            if len(order) == len(quick):
                touch(release)
        assert order[-1] is slow and set(order[:-1]) == set(quick)
    finally:
        touch(release)
    assert slow.result() == ("slow", checksum(frame))


def test_wait_first_exception(warm_pool, frame, files):
    release, started = files("release"), files("started")
    slow = warm_pool.submit(block_until, release, "slow", frame, started=started)
    try:
        _tasks.wait_for(started)
        failing = warm_pool.submit(_tasks.fail_on_purpose, 1, frame)
        done, not_done = cf.wait([slow, failing], return_when=cf.FIRST_EXCEPTION)
        assert done == {failing} and not_done == {slow}
    finally:
        touch(release)
    assert slow.result()[0] == "slow"


def test_cancel_pending_not_running(warm_pool, frame, files):
    release = files("release")
    started = [files(f"started{i}") for i in range(2)]
    blockers = [warm_pool.submit(block_until, release, i, frame, started=s) for i, s in enumerate(started)]
    try:
        for path in started:
            _tasks.wait_for(path)  # both workers busy
        # The call queue holds max_workers + 1 items: the last two stay pending.
        queued = [warm_pool.submit(square, x, frame) for x in range(5)]
        assert not blockers[0].cancel()  # running
        assert queued[-1].cancel() and queued[-2].cancel()
        assert queued[-1].cancelled()
    finally:
        touch(release)
    assert [b.result()[0] for b in blockers] == [0, 1]
    with pytest.raises(cf.CancelledError):
        queued[-1].result()
    assert [f.result() for f in queued[:3]] == [(x * x, checksum(frame)) for x in range(3)]


# ---------------------------------------------------------------------------------
# Conformance: cases that need a pool of their own, all start methods
# ---------------------------------------------------------------------------------


def test_initializer_and_initargs(executor_cls, mp_context, frame):
    with executor_cls(1, mp_context, _tasks.set_init_value, ("from-initargs",)) as ex:
        assert ex.submit(_tasks.get_init_value, 1, frame).result() == ("from-initargs", 1, checksum(frame))


def test_failing_initializer_breaks_the_pool(executor_cls, mp_context, frame):
    ex = executor_cls(1, mp_context, _tasks.failing_initializer)
    try:
        future = ex.submit(square, 1, frame)
        with pytest.raises(BrokenProcessPool):
            future.result()
        with pytest.raises(BrokenProcessPool):
            ex.submit(square, 2, frame)
    finally:
        ex.shutdown(wait=True)


def test_worker_killed_mid_task_breaks_the_pool(executor_cls, mp_context, frame):
    # One worker: under spawn and forkserver the stdlib starts workers on
    # demand, and (3.11) does not watch one started after its manager thread
    # last woke up: its death goes unnoticed until the next submit or result.
    ex = executor_cls(1, mp_context)
    try:
        killed = ex.submit(_tasks.kill_self, 1, frame)
        queued = ex.submit(square, 2, frame)
        with pytest.raises(BrokenProcessPool):
            killed.result()
        with pytest.raises(BrokenProcessPool):
            queued.result()  # pending work fails with it
        with pytest.raises(BrokenProcessPool):
            ex.submit(square, 1, frame)
    finally:
        ex.shutdown(wait=True)


# ---------------------------------------------------------------------------------
# Conformance: lifecycle (fork only: nothing here depends on the start method)
# ---------------------------------------------------------------------------------


def test_context_manager_waits_then_refuses_work(executor_cls, frame):
    with executor_cls(2, FORK) as ex:
        futures = [ex.submit(square, x, frame) for x in range(5)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [(x * x, checksum(frame)) for x in range(5)]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 1, frame)


def test_shutdown_wait_false_cancel_futures(executor_cls, frame, files):
    release, started = files("release"), files("started")
    ex = executor_cls(1, FORK)
    running = ex.submit(block_until, release, "running", frame, started=started)
    try:
        _tasks.wait_for(started)
        pending = [ex.submit(square, x, frame) for x in range(6)]
        # The call queue holds max_workers + 1 items: two move there (running).
        _tasks.wait_until(lambda: pending[0].running() and pending[1].running())
        ex.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(square, 1, frame)
    finally:
        touch(release)
    assert running.result() == ("running", checksum(frame))
    # Those already in the call queue run; the rest are cancelled.
    assert [f.cancelled() for f in pending] == [False] * 2 + [True] * 4
    assert [f.result() for f in pending[:2]] == [(0, checksum(frame)), (1, checksum(frame))]
    ex.shutdown(wait=True)


def test_shutdown_wait_true_runs_what_was_submitted(executor_cls, frame):
    ex = executor_cls(1, FORK)
    futures = [ex.submit(square, x, frame) for x in range(6)]
    ex.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == [(x * x, checksum(frame)) for x in range(6)]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_max_tasks_per_child_replaces_workers(executor_cls, frame, method):
    with executor_cls(1, multiprocessing.get_context(method), max_tasks_per_child=1) as ex:
        first, second = (ex.submit(_tasks.pid_of, x, frame).result() for x in range(2))
    assert first[1] == 0 and second[1] == 1
    assert first[0] != second[0]


def test_max_tasks_per_child_refuses_fork(executor_cls):
    with pytest.raises(ValueError, match="fork"):
        executor_cls(1, FORK, max_tasks_per_child=1)


def test_constructor_validation(executor_cls):
    with pytest.raises(ValueError):
        executor_cls(0)
    with pytest.raises(TypeError):
        executor_cls(1, initializer="not callable")


def test_result_only_multiprocessing_can_pickle(executor_cls, frame):
    with executor_cls(1, FORK) as ex:
        future = ex.submit(_tasks.return_socket, 1, frame)
        exc = future.exception()
        assert exc is None, exc
        with future.result() as sock:
            assert isinstance(sock, socket.socket)


# ---------------------------------------------------------------------------------
# Sharing (sharedexec only)
# ---------------------------------------------------------------------------------


@pytest.mark.compat
def test_frame_is_published_once_across_tasks_and_maps(mp_context, no_leaks):
    df = make_frame(100_000, seed=11)
    expected = checksum(df)
    before = sharedexec.stats()
    with sharedexec.ProcessPoolExecutor(2, mp_context) as ex:
        first = list(ex.map(square, range(8), [df] * 8))
        second = list(ex.map(square, range(8), [df] * 8, chunksize=3))  # 3 chunks
        futures = [ex.submit(square, x, df) for x in range(4)]
        third = [f.result() for f in futures]
        backing = ex.submit(_tasks.backing_of, 0, df).result()
    after = sharedexec.stats()
    assert first == second == [(x * x, expected) for x in range(8)]
    assert third == [(x * x, expected) for x in range(4)]
    assert after["publications"] - before["publications"] == 1
    assert after["reuse_hits"] - before["reuse_hits"] == 8 + 3 + 4 + 1 - 1
    # The workers read the parent's segment, read-only (pandas without Copy-on-Write:
    # a private mapping of it, writable); no pickled copy.
    assert backing == dict.fromkeys("abi", (True, _tasks.MAPPED_WRITABLE))


def test_small_frame_is_pickled_unless_min_bytes_allows(no_leaks):
    df = make_frame(1000, seed=12)  # ~40 KB: below the default min_bytes
    before = sharedexec.stats()["publications"]
    with sharedexec.ProcessPoolExecutor(1, FORK) as ex:
        pickled = ex.submit(_tasks.backing_of, 0, df).result()
    assert pickled == {"a": (False, True), "b": (False, True), "i": (False, True)}
    assert sharedexec.stats()["publications"] == before
    with sharedexec.ProcessPoolExecutor(1, FORK, min_bytes=1000) as ex:
        assert ex.submit(_tasks.backing_of, 0, df).result()["a"] == (True, _tasks.MAPPED_WRITABLE)
    assert sharedexec.stats()["publications"] == before + 1


@pytest.mark.compat
@pytest.mark.parametrize("kind", ["frame", "array"])
def test_large_result_comes_back_writable_and_its_segment_is_gone(kind, no_leaks):
    with sharedexec.ProcessPoolExecutor(1, FORK) as ex:
        segments_before = owned_segments()
        if kind == "frame":
            result = ex.submit(_tasks.frame_result, 100_000, 5).result()
            pd.testing.assert_frame_equal(result, make_frame(100_000, seed=5))
            arrays = _tasks.numeric_blocks(result)
        else:
            result = ex.submit(_tasks.array_result, 500_000).result()
            np.testing.assert_array_equal(result, np.arange(500_000, dtype=np.float64))
            arrays = [result]
        assert owned_segments() == segments_before  # claimed and unlinked already
    assert arrays and all(_tasks.is_mapped(a) and a.flags.writeable for a in arrays)
    arrays[0][0] = 42  # private: copy-on-write
    assert arrays[0].flat[0] == 42


@pytest.mark.parametrize("case", _tasks.READ_ONLY_CASES)
def test_results_have_the_flags_the_stdlib_gives(case, no_leaks):
    # multiprocessing pickles with protocol 4 (3.11-3.13): every array
    # arrives writable, read-only ones too.
    def result(name: str):
        with EXECUTORS[name](1, FORK) as ex:
            return ex.submit(_tasks.read_only_result, case).result()

    assert_identical(result("sharedexec"), result("stdlib"))


def test_large_result_that_fails_to_pickle_leaves_nothing(no_leaks):
    before = owned_segments()
    with sharedexec.ProcessPoolExecutor(1, FORK) as ex:
        # The array goes to a segment first; then the lock fails the result.
        exc = ex.submit(_tasks.array_and_lock, 500_000).exception()
    assert type(exc) is TypeError and "pickle" in str(exc)
    assert owned_segments() == before


def test_large_result_of_a_worker_that_died_sending_it_is_freed(no_leaks):
    before = owned_segments()
    ex = sharedexec.ProcessPoolExecutor(1, FORK)
    try:
        with pytest.raises(BrokenProcessPool):
            ex.submit(_tasks.array_then_die, 500_000).result()
    finally:
        ex.shutdown(wait=True)
    gc.collect()
    sharedexec.stats()
    orphans = owned_segments() - before
    for name in orphans:  # while this fails: clean up for the leak checks
        _segment.retire(name)
    assert not orphans


def test_submit_delete_the_frame_then_run(files, no_leaks):
    """The worker reads the second task's handle after the caller dropped the
    frame. (The stdlib executor keeps a task's arguments in its pending work
    items until the result arrives, so the frame itself dies only then; the
    frame and its segment must go once the task is done.)"""
    release, started = files("release"), files("started")
    df = make_frame(100_000, seed=13)
    expected = checksum(df)
    publications = sharedexec.stats()["publications"]
    before = owned_segments()
    with sharedexec.ProcessPoolExecutor(1, FORK) as ex:
        busy = ex.submit(block_until, release, "busy", started=started)
        _tasks.wait_for(started)
        later = ex.submit(square, 1, df)
        # The call queue's feeder thread pickles (publishes) the second task
        # while the worker is still busy with the first.
        _tasks.wait_until(lambda: sharedexec.stats()["publications"] > publications)
        ref = weakref.ref(df)
        del df
        gc.collect()
        touch(release)
        assert busy.result() == ("busy", None)
        assert later.result() == (1, expected)
        del later
    gc.collect()
    assert ref() is None
    sharedexec.stats()
    assert owned_segments() == before


def test_segments_are_freed_at_shutdown_once_the_frame_is_gone(no_leaks):
    df = make_frame(100_000, seed=14)
    before = owned_segments()
    ex = sharedexec.ProcessPoolExecutor(2, FORK)
    assert list(ex.map(square, range(4), [df] * 4))[-1] == (9, checksum(df))
    published = owned_segments() - before
    assert len(published) >= 1
    del df
    gc.collect()
    ex.shutdown(wait=True)
    assert not published & owned_segments()


def test_segments_are_freed_when_the_frame_dies_after_shutdown(no_leaks):
    df = make_frame(100_000, seed=15)
    before = owned_segments()
    with sharedexec.ProcessPoolExecutor(2, FORK) as ex:
        list(ex.map(square, range(4), [df] * 4))
    published = owned_segments() - before
    assert published and published <= owned_segments()  # the frame is alive: kept
    del df
    gc.collect()
    sharedexec.stats()  # collects released publications
    assert not published & owned_segments()


def test_segments_are_freed_after_a_worker_crash(files, no_leaks):
    kill = files("kill")
    df = make_frame(100_000, seed=16)
    publications = sharedexec.stats()["publications"]
    before = owned_segments()
    ex = sharedexec.ProcessPoolExecutor(1, FORK)
    try:
        killer = ex.submit(_tasks.kill_when, kill, df)
        queued = [ex.submit(square, x, df) for x in range(3)]  # leased, never read
        _tasks.wait_until(lambda: sharedexec.stats()["publications"] > publications)
        touch(kill)
        with pytest.raises(BrokenProcessPool):
            killer.result()
        assert all(isinstance(f.exception(), BrokenProcessPool) for f in queued)
    finally:
        touch(kill)
        ex.shutdown(wait=True)
    published = owned_segments() - before
    assert published
    del df, killer, queued
    gc.collect()
    sharedexec.stats()
    assert not published & owned_segments()


def test_leases_end_when_pickling_fails(no_leaks):
    df = make_frame(100_000, seed=20)
    segments = sharedexec.stats()["segments"]
    with sharedexec.ProcessPoolExecutor(1, FORK) as ex:
        # The frame is published and leased, then the lock fails the task.
        assert type(ex.submit(square, (df, threading.Lock())).exception()) is TypeError
        assert sharedexec.stats()["segments"] == segments + 1
        # The feeder thread holds the failed call item until it sends the next.
        assert ex.submit(square, 1).result() == (1, None)
        del df
        gc.collect()
        assert sharedexec.stats()["segments"] == segments  # no worker ever read the handle


def test_leases_end_for_tasks_pickled_after_the_pool_broke(files, no_leaks):
    """A broken pool fails the tasks still waiting in the queue feeder's buffer;
    the feeder pickles (publishes, leases) them afterwards all the same."""
    kill, reached, opened = files("kill"), files("reached"), files("opened")
    df = make_frame(100_000, seed=21)
    segments = sharedexec.stats()["segments"]
    ex = sharedexec.ProcessPoolExecutor(1, FORK)
    try:
        killer = ex.submit(_tasks.kill_when, kill)
        victim = ex.submit(square, (_tasks.Gate(reached, opened), df))
        _tasks.wait_for(reached)  # the feeder thread is held before the frame
        touch(kill)
        with pytest.raises(BrokenProcessPool):
            killer.result()
        assert isinstance(victim.exception(), BrokenProcessPool)
        touch(opened)  # now the feeder publishes and leases the frame
    finally:
        touch(kill)
        touch(opened)
        ex.shutdown(wait=True)
    del df
    gc.collect()
    assert sharedexec.stats()["segments"] == segments


@pytest.mark.compat
def test_each_task_gets_its_own_frame(executor_cls):
    """What a task does to its frame (new column, attrs, axis names) is not
    seen by the next task in the same worker, nor by the parent."""
    df = make_frame(50_000, seed=17)
    df.attrs["origin"] = "parent"
    kwargs = {"min_bytes": 1000} if executor_cls is sharedexec.ProcessPoolExecutor else {}
    with executor_cls(1, FORK, **kwargs) as ex:
        first = ex.submit(_tasks.mutate_and_describe, df).result()
        second = ex.submit(_tasks.mutate_and_describe, df).result()
    assert first[0] == second[0]  # the same worker
    original = (("a", "b", "i", "s"), {"origin": "parent"}, None, None)
    assert first[1] == second[1] == original
    assert (tuple(df.columns), df.attrs, df.index.name, df.columns.name) == original


def test_writing_into_shared_data_raises_a_helpful_error(no_leaks):
    arr = np.arange(200_000, dtype=np.float64)
    with sharedexec.ProcessPoolExecutor(1, FORK) as ex:
        exc = ex.submit(_tasks.write_array, arr).exception()
    assert isinstance(exc, sharedexec.SharedReadOnlyError)
    assert isinstance(exc, ValueError) and isinstance(exc, sharedexec.SharedExecError)
    assert "mmap_mode='c'" in str(exc)
    assert arr[0] == 0


def test_writing_through_to_numpy_raises_a_helpful_error(no_leaks):
    df = make_frame(100_000, seed=18)
    with sharedexec.ProcessPoolExecutor(1, FORK) as ex:
        exc = ex.submit(_tasks.write_via_to_numpy, df).exception()
    assert isinstance(exc, sharedexec.SharedReadOnlyError)
    assert "mmap_mode='c'" in str(exc)


def test_copy_on_write_mode_keeps_writes_private(no_leaks):
    arr = np.arange(200_000, dtype=np.float64)
    df = make_frame(100_000, seed=19)
    head = float(df["a"].iloc[0])
    with sharedexec.ProcessPoolExecutor(1, FORK, mmap_mode="c") as ex:
        assert ex.submit(_tasks.write_array, arr, -5.0).result() == -5.0
        assert ex.submit(_tasks.read_array_head, arr).result() == 0.0
        assert ex.submit(_tasks.write_via_to_numpy, df, -5.0).result() == -5.0
        assert ex.submit(_tasks.read_frame_head, df).result() == head
        assert ex.submit(_tasks.backing_of, 0, df).result()["a"] == (True, True)
    assert arr[0] == 0.0 and float(df["a"].iloc[0]) == head


def test_sharing_options_are_validated():
    with pytest.raises(ValueError, match="mmap_mode"):
        sharedexec.ProcessPoolExecutor(1, mmap_mode="w+")
    with pytest.raises(ValueError, match="min_bytes"):
        sharedexec.ProcessPoolExecutor(1, min_bytes=-1)
    with pytest.raises(ValueError, match="on_full"):
        sharedexec.ProcessPoolExecutor(1, on_full="ignore")
