"""The joblib backend "sharedexec": conformance with "loky", then sharing.

Conformance is one list of ``Parallel`` scenarios run under ``backend="loky"``
and ``backend="sharedexec"`` (the ``backend`` fixture) with the same expected
outcome, once with small arguments and once with a frame above ``min_bytes``
among them (``frame``). Both backends run on joblib's reusable loky executor,
so the workers stay warm between cases; the cases that break or reconfigure
the executor (timeout, crash, ``inner_max_num_threads``) restart it.

Processes are sequenced with files (``_tasks.block_until``), never sleeps.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
from joblib import Parallel, delayed, parallel_config
from joblib.externals.loky.process_executor import TerminatedWorkerError

import sharedexec

from . import _sharing_tasks, _tasks
from ._exact import assert_identical
from ._tasks import block_until, checksum, make_frame, square, touch

BACKENDS = ["loky", "sharedexec"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def files(tmp_path):
    return lambda name: str(tmp_path / name)


def expected_squares(xs, frame):
    summary = checksum(frame)
    return [(x * x, summary) for x in xs]


# ---------------------------------------------------------------------------------
# Conformance: "loky" and "sharedexec" give the same outcomes
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_jobs", [2, -1])
def test_n_jobs_runs_in_worker_processes(backend, frame, n_jobs):
    out = Parallel(n_jobs=n_jobs, backend=backend)(delayed(_tasks.pid_of)(x, frame) for x in range(8))
    assert [x for _, x in out] == list(range(8))
    assert os.getpid() not in {pid for pid, _ in out}


def test_n_jobs_none_runs_in_this_process(backend, frame):
    out = Parallel(n_jobs=None, backend=backend)(delayed(_tasks.pid_of)(x, frame) for x in range(3))
    assert out == [(os.getpid(), x) for x in range(3)]


def test_auto_batching_groups_quick_tasks(backend, frame):
    parallel = Parallel(n_jobs=2, backend=backend, batch_size="auto")
    out = parallel(delayed(square)(x, frame) for x in range(3000))
    assert out == expected_squares(range(3000), frame)
    assert parallel.n_dispatched_tasks == 3000
    # Trivial tasks finish far below joblib's target batch duration, so the
    # batches grow; this would need a single task to take > 0.2 s to fail.
    assert parallel.n_dispatched_batches < 3000


def test_explicit_batch_size(backend, frame):
    parallel = Parallel(n_jobs=2, backend=backend, batch_size=4)
    assert parallel(delayed(square)(x, frame) for x in range(20)) == expected_squares(range(20), frame)
    # Batches of 4, but joblib splits the last ones to balance the end.
    assert 5 <= parallel.n_dispatched_batches < 20


@pytest.mark.compat
@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_return_as(backend, frame, return_as):
    out = Parallel(n_jobs=2, backend=backend, return_as=return_as)(delayed(square)(x, frame) for x in range(10))
    if return_as == "list":
        assert isinstance(out, list)
    else:
        assert not isinstance(out, list)
        out = list(out)
    if return_as == "generator_unordered":
        out = sorted(out)
    assert out == expected_squares(range(10), frame)


def test_timeout(backend, frame, files):
    release = files("release")
    try:
        with pytest.raises(multiprocessing.TimeoutError):  # joblib's choice, not the builtin
            Parallel(n_jobs=2, backend=backend, timeout=0.3)(
                delayed(block_until)(release, x, frame) for x in range(2)
            )
    finally:
        touch(release)
    # joblib killed the workers: the next call gets new ones and works.
    assert Parallel(n_jobs=2, backend=backend)(delayed(square)(x, frame) for x in range(3)) == expected_squares(
        range(3), frame
    )


VERBOSE_LINE = re.compile(
    r"^\[Parallel\(n_jobs=2\)\]: (Using backend \w+ with 2 concurrent workers\."
    r"|Done +\d+ (tasks|out of +\d+) *\| elapsed: .+"
    r"|Batch computation too (fast|slow) .+ Setting batch_size=\d+\.)$"
)


def test_verbose_progress(backend, frame, capsys):
    Parallel(n_jobs=2, backend=backend, verbose=10)(delayed(square)(x, frame) for x in range(6))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and [line for line in lines if not VERBOSE_LINE.match(line)] == []
    assert lines[0].startswith("[Parallel(n_jobs=2)]: Using backend ")
    # Which progress lines appear depends on timing (joblib prints the final
    # "finished" line only if dispatching ended before the last result).
    assert re.search(r"Done +\d+ (tasks|out of +6) *\| elapsed", lines[-1])


def test_exception_type_and_worker_traceback(backend, frame):
    with pytest.raises(ValueError, match=r"task \d failed on purpose") as info:
        Parallel(n_jobs=2, backend=backend)(delayed(_tasks.fail_on_purpose)(x, frame) for x in range(4))
    remote = str(info.value.__cause__)
    assert "fail_on_purpose" in remote
    assert 'raise ValueError(f"task {x} failed on purpose")' in remote


def test_user_exception_type_survives(backend, frame):
    with pytest.raises(_tasks.TaskError) as info:
        Parallel(n_jobs=2, backend=backend)(delayed(_tasks.fail_with_task_error)(x, frame) for x in range(1))
    assert info.value.args == ("custom", 0)


def test_decorated_task_function(backend, frame):
    out = Parallel(n_jobs=2, backend=backend)(delayed(_tasks.square_shared)(x, frame) for x in range(3))
    assert out == expected_squares(range(3), frame)


def test_pre_dispatch_limits_what_is_consumed(backend, frame, files):
    release = files("release")
    consumed = []

    def tasks():
        for x in range(10):
            consumed.append(x)
            yield delayed(block_until)(release, x, frame)

    parallel = Parallel(n_jobs=2, backend=backend, pre_dispatch=3, batch_size=1, return_as="generator")
    try:
        out = parallel(tasks())
        # No task can finish before the release: only pre_dispatch were taken.
        assert consumed == [0, 1, 2]
    finally:
        touch(release)
    assert list(out) == [(x, checksum(frame)) for x in range(10)]
    assert consumed == list(range(10))


@pytest.mark.parametrize("inner", [None, "same"])
def test_nested_parallel(backend, frame, inner):
    inner_backend = backend if inner == "same" else None
    out = Parallel(n_jobs=2, backend=backend)(
        delayed(_tasks.nested_parallel)(x, inner_backend, frame) for x in range(3)
    )
    assert out == [([(x + k) ** 2 for k in range(3)], checksum(frame)) for x in range(3)]


def test_workers_are_reused_across_calls(backend, files):
    def both_workers(round_: str) -> set[int]:
        # Each task waits until two distinct workers have started one: both
        # workers take part, whatever the scheduling.
        folder = files(round_)
        os.mkdir(folder)
        out = Parallel(n_jobs=2, backend=backend, batch_size=1)(
            delayed(_tasks.meet)(folder, 2) for _ in range(2)
        )
        return set(out)

    first, second = both_workers("first"), both_workers("second")
    assert len(first) == 2 and first == second


def test_worker_crash_raises_terminated_worker_error(backend, frame):
    with pytest.raises(TerminatedWorkerError):
        Parallel(n_jobs=2, backend=backend)(delayed(_tasks.kill_self)(x, frame) for x in range(2))
    # A new executor replaces the broken one.
    assert Parallel(n_jobs=2, backend=backend)(delayed(square)(x, frame) for x in range(3)) == expected_squares(
        range(3), frame
    )


def test_inner_max_num_threads(backend):
    with parallel_config(backend=backend, inner_max_num_threads=1):
        out = Parallel(n_jobs=2)(delayed(_tasks.thread_limits)(x) for x in range(2))
    assert out == [("1", "1", x) for x in range(2)]


def test_unpicklable_argument(backend, frame):
    # The frame comes first: sharedexec has published it when the lock fails.
    with pytest.raises(pickle.PicklingError, match="Could not pickle the task") as info:
        Parallel(n_jobs=2, backend=backend)(delayed(square)((frame, threading.Lock())) for _ in range(1))
    assert "cannot pickle '_thread.lock' object" in str(info.value.__cause__)


def test_unpicklable_result(backend, frame):
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock' object"):
        Parallel(n_jobs=2, backend=backend)(delayed(_tasks.return_lock)(x, frame) for x in range(1))


def test_results_are_cloudpickled(backend, frame):
    (fn,) = Parallel(n_jobs=2, backend=backend)(delayed(_tasks.return_lambda)(x, frame) for x in range(1))
    assert fn() == 0


@pytest.mark.parametrize("case", _tasks.READ_ONLY_CASES)
def test_results_have_the_flags_loky_gives(case):
    # loky pickles results with protocol 5, which keeps a read-only
    # contiguous array read-only; a claimed result used to arrive writable.
    ref, got = (Parallel(n_jobs=2, backend=b)([delayed(_tasks.read_only_result)(case)])[0] for b in BACKENDS)
    assert_identical(got, ref)


def test_a_shared_input_passed_back_comes_back_writable():
    # Read-only in the worker only because it is shared (a stdlib task's copy
    # is writable): not a read-only result. (loky itself memmaps it, so it is
    # not the reference here.)
    arr = np.arange(1 << 18, dtype=np.float64)
    (got,) = Parallel(n_jobs=2, backend="sharedexec")([delayed(_tasks.echo)(arr)])
    assert got.flags.writeable and np.array_equal(got, arr)


# ---------------------------------------------------------------------------------
# Ways to select the backend
# ---------------------------------------------------------------------------------


def _published_by(run) -> int:
    df = make_frame(50_000, seed=31)
    before = sharedexec.stats()["publications"]
    out = run(df)
    assert out == expected_squares(range(4), df)
    return sharedexec.stats()["publications"] - before


def test_selected_by_name_in_parallel():
    def run(df):
        return Parallel(n_jobs=2, backend="sharedexec")(delayed(square)(x, df) for x in range(4))

    assert _published_by(run) == 1


def test_selected_by_parallel_config():
    def run(df):
        with parallel_config(backend="sharedexec", n_jobs=2):
            return Parallel()(delayed(square)(x, df) for x in range(4))

    assert _published_by(run) == 1


def test_default_loky_publishes_nothing():
    def run(df):
        return Parallel(n_jobs=2, backend="loky")(delayed(square)(x, df) for x in range(4))

    assert _published_by(run) == 0


def test_instance_with_options():
    df = make_frame(5_000, seed=32)  # ~200 KB: below the default min_bytes
    head = float(df["a"].iloc[0])
    before = sharedexec.stats()["publications"]
    with parallel_config(backend=sharedexec.JoblibBackend(min_bytes=10_000, mmap_mode="c"), n_jobs=2):
        written = Parallel()(delayed(_tasks.write_via_to_numpy)(df, -5.0) for _ in range(4))
        read = Parallel()(delayed(_tasks.read_frame_head)(df) for _ in range(4))
        backing = Parallel()(delayed(_tasks.backing_of)(0, df) for _ in range(2))
    assert sharedexec.stats()["publications"] - before == 1
    assert written == [-5.0] * 4  # copy-on-write: each task writes privately...
    assert read == [head] * 4  # ...seen by no other task...
    assert float(df["a"].iloc[0]) == head  # ...nor by the parent
    assert backing == [{"a": (True, True), "b": (True, True), "i": (True, True)}] * 2


def test_default_instance_is_read_only():
    arr = np.arange(200_000, dtype=np.float64)
    with pytest.raises(sharedexec.SharedReadOnlyError, match="mmap_mode='c'"):
        Parallel(n_jobs=2, backend="sharedexec")(delayed(_tasks.write_array)(arr) for _ in range(1))
    assert arr[0] == 0


def test_instance_options_are_validated():
    with pytest.raises(ValueError, match="mmap_mode"):
        sharedexec.JoblibBackend(mmap_mode="w+")


def test_registered_on_import():
    from joblib.parallel import BACKENDS as JOBLIB_BACKENDS

    assert JOBLIB_BACKENDS["sharedexec"] is sharedexec.JoblibBackend


def test_built_on_joblibs_vendored_loky():
    from joblib._parallel_backends import LokyBackend

    assert issubclass(sharedexec.JoblibBackend, LokyBackend)
    # Importing standalone loky after joblib breaks joblib's reducers (joblib#1482).
    code = "import sys, sharedexec; print('loky' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "False\n"


# ---------------------------------------------------------------------------------
# Sharing
# ---------------------------------------------------------------------------------


@pytest.mark.compat
@pytest.mark.parametrize("strings", ["object", "arrow", None], ids=["object-str", "arrow-str", "numeric"])
def test_frame_is_published_once_across_calls(strings, no_leaks):
    if strings == "arrow":
        pytest.importorskip("pyarrow")
    df = make_frame(100_000, strings=strings, seed=33)
    if strings == "arrow":
        assert "Arrow" in type(df["s"].array).__name__
    expected = checksum(df)
    before = sharedexec.stats()
    with parallel_config(backend="sharedexec", n_jobs=2):
        first = Parallel()(delayed(square)(x, df) for x in range(6))
        second = Parallel(batch_size=2)(delayed(square)(x, df) for x in range(6))
        backing = Parallel()(delayed(_tasks.backing_of)(0, df) for _ in range(2))
    after = sharedexec.stats()
    assert first == second == [(x * x, expected) for x in range(6)]
    assert after["publications"] - before["publications"] == 1
    assert after["reuse_hits"] - before["reuse_hits"] >= 6
    assert backing == [dict.fromkeys("abi", (True, _tasks.MAPPED_WRITABLE))] * 2
    del df, backing
    gc.collect()


@pytest.mark.compat
@pytest.mark.parametrize("kind", ["frame", "array"])
def test_large_results_come_back_through_shared_memory(kind, no_leaks):
    with parallel_config(backend="sharedexec", n_jobs=2):
        if kind == "frame":
            out = Parallel()(delayed(_tasks.frame_result)(100_000, seed) for seed in range(2))
            for seed, result in enumerate(out):
                pd.testing.assert_frame_equal(result, make_frame(100_000, seed=seed))
            arrays = [a for result in out for a in _tasks.numeric_blocks(result)]
        else:
            out = Parallel()(delayed(_tasks.array_result)(500_000) for _ in range(2))
            for result in out:
                np.testing.assert_array_equal(result, np.arange(500_000, dtype=np.float64))
            arrays = out
    assert arrays and all(_tasks.is_mapped(a) and a.flags.writeable for a in arrays)
    arrays[0][0] = 42  # private, copy-on-write
    assert arrays[0].flat[0] == 42


def test_segments_are_freed_after_a_timeout(files, no_leaks):
    release = files("release")
    df = make_frame(100_000, seed=34)
    segments = sharedexec.stats()["segments"]
    try:
        with pytest.raises(multiprocessing.TimeoutError):
            Parallel(n_jobs=2, backend="sharedexec", timeout=0.3, batch_size=1)(
                delayed(block_until)(release, x, df) for x in range(6)
            )
    finally:
        touch(release)
    assert sharedexec.stats()["segments"] == segments + 1
    del df
    gc.collect()
    assert sharedexec.stats()["segments"] == segments


def test_segments_are_freed_after_a_worker_crash(files, no_leaks):
    kill = files("kill")
    df = make_frame(100_000, seed=35)
    segments = sharedexec.stats()["segments"]
    publications = sharedexec.stats()["publications"]

    def tasks():
        yield delayed(_tasks.kill_when)(kill, df)
        yield delayed(_tasks.kill_when)(kill, df)
        for x in range(4):
            yield delayed(square)(x, df)  # in the call queue or not yet sent
        # All dispatched, the frame published: now the workers die.
        _tasks.wait_until(lambda: sharedexec.stats()["publications"] > publications)
        touch(kill)

    with pytest.raises(TerminatedWorkerError):
        Parallel(n_jobs=2, backend="sharedexec", batch_size=1, pre_dispatch="all")(tasks())
    del df
    gc.collect()
    assert sharedexec.stats()["segments"] == segments


def test_a_frame_loky_can_send_is_sent(backend, big_frame):
    """Issue 12, defect 6: a lambda in attrs (cloudpickle sends it) failed
    under "sharedexec", whose layouts were written with plain pickle."""
    df = big_frame.copy()
    df.attrs["scale"] = lambda n: 2 * n
    out = Parallel(n_jobs=2, backend=backend)(delayed(_sharing_tasks.scaled)(df) for _ in range(3))
    assert out == [2 * len(df)] * 3
