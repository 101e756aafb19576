"""File descriptors: what mappings, results and the worker cache cost.

``ulimit -n`` is 1024 on many Linux desktops and 256 on macOS. A mapping
that keeps a descriptor makes live results, publications and cached segments
fail with EMFILE there, where the standard library's pool, which copies,
returns them all. These run pools under a lowered soft limit, which their
workers inherit.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import resource

import numpy as np
import pytest

import sharedexec
from sharedexec import _cache, _segment

from . import _tasks

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")


def segment_fds(mappings) -> int:
    """How many of this process's descriptors are open on these segments
    (a POSIX segment's hold is on its lock file, named after it)."""
    names = {m.name for m in mappings}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own, another thread's)
            continue
        count += os.path.basename(target).split(" ")[0] in names  # (" (deleted)" once unlinked)
    return count


@contextlib.contextmanager
def soft_fd_limit(n: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_mapping_costs_its_hold_only_and_a_writable_one_nothing(no_leaks):
    created = [_segment.create([memoryview(np.arange(1000.0))], b"", os.getpid()) for _ in range(20)]
    try:
        assert segment_fds(created) == 0  # the creator's mappings keep no descriptor
        attached = [_segment.attach(m.name) for m in created for _ in range(2)]
        assert segment_fds(created) == 20  # one flock per segment, however often it is mapped
        claimed = [_segment.attach(m.name, writable=True) for m in created]  # as claim_result maps a result
        assert segment_fds(created) == 20
        assert all(bytes(c.view) == bytes(m.view) for c, m in zip(claimed, created))
        del attached
        assert segment_fds(created) == 0  # the flock goes with the last mapping
    finally:
        for m in created:
            _segment.retire(m.name)


def test_live_results_cost_no_descriptor(mp_context, no_leaks):
    # 300 live results under a limit of 256: two descriptors each failed
    # after ~100 (BrokenProcessPool; a Pool hung).
    with soft_fd_limit(256), sharedexec.ProcessPoolExecutor(1, mp_context=mp_context, min_bytes=4096) as ex:
        results = list(ex.map(_tasks.array_result, [1024] * 300))
    assert len(results) == 300 and all(np.array_equal(r, np.arange(1024.0)) for r in results)


def test_the_worker_cache_keeps_within_the_descriptor_limit(no_leaks):
    # 300 frames alive in the parent, each cached by the one worker: past
    # the limit it evicts the oldest instead of failing tasks with EMFILE.
    arrays = [np.full(1024, float(i)) for i in range(300)]
    with soft_fd_limit(256), sharedexec.ProcessPoolExecutor(1, min_bytes=4096) as ex:
        sums = [ex.submit(np.sum, a).result() for a in arrays]
    assert sums == [1024.0 * i for i in range(300)]


def test_descriptor_budget_is_half_the_soft_limit():
    with soft_fd_limit(256):
        assert _cache.descriptor_budget() == 128


@pytest.fixture
def third_claim_fails(monkeypatch):
    """The parent runs out of descriptors while claiming its third result."""
    attach, claims = _segment.attach, []

    def failing(name, *args, **kwargs):
        if kwargs.get("writable"):  # claim_result's (the parent maps no lease board)
            claims.append(name)
            if len(claims) == 3:
                raise OSError(errno.EMFILE, "Too many open files")
        return attach(name, *args, **kwargs)

    monkeypatch.setattr(_segment, "attach", failing)


def test_a_result_that_cannot_be_claimed_fails_its_task_not_the_executor(third_claim_fails, no_leaks):
    with sharedexec.ProcessPoolExecutor(1, min_bytes=4096) as ex:
        futures = [ex.submit(_tasks.array_result, 1024) for _ in range(5)]
        errors = [f.exception(timeout=60) for f in futures]
        assert [e is None for e in errors] == [True, True, False, True, True]
        assert isinstance(errors[2], sharedexec.SharedExecError) and errors[2].errno == errno.EMFILE
        assert "no file descriptor left" in str(errors[2]) and "ulimit -n" in str(errors[2])
        assert np.array_equal(ex.submit(_tasks.array_result, 1024).result(timeout=60), np.arange(1024.0))


def test_a_result_that_cannot_be_claimed_fails_its_task_not_the_pool(third_claim_fails, no_leaks):
    task = sharedexec.shared(_tasks.array_result, min_bytes=4096)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        results = [pool.apply_async(task, (1024,)) for _ in range(5)]
        for r in results:
            r.wait(timeout=60)  # the result handler used to exit: no result ever came
        assert [r.successful() for r in results] == [True, True, False, True, True]
        with pytest.raises(sharedexec.SharedExecError, match="no file descriptor left"):
            results[2].get()
        assert len(pool.map(task, [1024] * 4)) == 4
