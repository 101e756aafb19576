"""Load (issue 8): many submitters, many tasks, many frames -- correct, bounded, flat.

* 4 threads submit concurrently to one executor, 10 000 tiny tasks over 20
  frames of ~3 MB: every result right, no deadlock (every wait has a
  deadline), each frame published once, nothing left.
* 1 000 distinct frames published and released in a loop: this process's
  segments go back to the baseline, the registry's tables do not grow, and
  neither the workers' memory nor the parent's does (worker caches drop
  what the parent retired).

Memory is PSS (``psutil``'s ``memory_full_info().pss``): RSS counts every
shared page in full in every process that maps it. Shared-memory usage is
the size of *this process's* ``sx_`` segments, not ``statvfs``: other
processes on the machine use /dev/shm too.

The 1 000-frame run (~30 s) is ``slow``; a 150-frame run of it stays in the
normal suite.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import gc
import multiprocessing
import os
import threading
import time

import psutil
import pytest

import sharedexec
from sharedexec import _names, _registry

from . import _reliability_scripts as scripts

MIN_BYTES = 64 << 10
FORK = multiprocessing.get_context("fork")
MB = 1 << 20


def own_bytes() -> int:
    return sum(size for _, owner, size in _names.list_segments() if owner == os.getpid())


def registry_sizes() -> dict[str, int]:
    """The length of every table the registry keeps (whatever they are called)."""
    registry = _registry.REGISTRY
    return {
        name: len(value)
        for name, value in vars(registry).items()
        if isinstance(value, (dict, list, set, collections.deque))
    }


def pss(pid: int) -> int:
    return psutil.Process(pid).memory_full_info().pss


def test_concurrent_submitters(record_property):
    n_tasks = 10_000  # ~10 s on 2 cores
    n_frames, rows, n_threads = 20, 120_000, 4  # ~3 MB each
    frames = [scripts.make_frame(seed, rows) for seed in range(n_frames)]
    before = dict(sharedexec.stats())
    segments_before = set(scripts.segments_of(os.getpid()))
    start = time.monotonic()
    with sharedexec.ProcessPoolExecutor(2, mp_context=FORK, min_bytes=MIN_BYTES) as ex:
        barrier = threading.Barrier(n_threads)

        def submitter(t: int) -> list[tuple[int, int, cf.Future]]:
            barrier.wait(timeout=30)  # all four submit at the same time
            return [(k % n_frames, k, ex.submit(scripts.pick, frames[k % n_frames], k)) for k in range(t, n_tasks, n_threads)]

        with cf.ThreadPoolExecutor(n_threads) as threads:
            submitted = [item for items in threads.map(submitter, range(n_threads), timeout=300) for item in items]
        futures = [f for _, _, f in submitted]
        done, not_done = cf.wait(futures, timeout=600)
        assert not not_done, f"{len(not_done)} tasks never finished (deadlock?)"
        wrong = [
            (seed, k, f.result()) for seed, k, f in submitted if f.result() != scripts.expected_pick(seed, rows, k)
        ]
        assert wrong == []
        # One segment each while the workers map them (they go with the pool).
        published = set(scripts.segments_of(os.getpid())) - segments_before - scripts.lease_board()
        assert len(published) == n_frames
    elapsed = time.monotonic() - start
    record_property("seconds", round(elapsed, 1))
    record_property("tasks_per_second", round(n_tasks / elapsed))
    after = sharedexec.stats()
    assert len(submitted) == n_tasks
    # Published once each, however many threads sent them how often.
    assert after["publications"] - before["publications"] == n_frames
    assert after["reuse_hits"] - before["reuse_hits"] >= n_tasks - n_frames
    del frames, submitted, futures, done

    def released():
        gc.collect()
        sharedexec.stats()
        return not published & set(scripts.segments_of(os.getpid()))

    scripts.wait_for(released, 10, what="the 20 frames' segments released")
    assert scripts.own_leaks() == []


def _release_loop(ex, n: int, rows: int, offset: int) -> None:
    for i in range(n):
        df = scripts.make_frame(offset + i, rows)
        k = i * 7
        assert ex.submit(scripts.pick, df, k).result(timeout=60) == scripts.expected_pick(offset + i, rows, k)
        del df


def _settle(allowed: set[str], timeout: float = 10.0) -> int:
    """This process's segment bytes once released frames are collected: once
    it has no segment but ``allowed`` (what earlier tests keep alive) and the
    lease board."""

    def settled():
        gc.collect()
        sharedexec.stats()
        return set(scripts.segments_of(os.getpid())) <= allowed | scripts.lease_board()

    try:
        scripts.wait_for(settled, timeout, interval=0.05)
    except TimeoutError:
        pass
    return own_bytes()


@pytest.mark.parametrize(
    "n_frames",
    [pytest.param(150, id="150"), pytest.param(1_000, id="1000", marks=pytest.mark.slow)],
)
def test_publish_and_release_many_frames(n_frames, record_property):
    rows = 80_000  # ~2 MB per frame: 2 GB published over the 1 000-frame run
    gc.collect()
    sharedexec.stats()
    kept = set(scripts.segments_of(os.getpid()))  # by earlier tests, if any
    with sharedexec.ProcessPoolExecutor(2, mp_context=FORK, min_bytes=MIN_BYTES) as ex:
        # Warm up: workers started, lease board made, caches and allocators in use.
        _release_loop(ex, 20, rows, offset=10_000)
        workers = list(ex._processes)
        assert len(workers) == 2
        baseline_bytes = _settle(kept)
        gc.collect()
        base_tables = registry_sizes()
        base_parent = pss(os.getpid())
        base_workers = {pid: pss(pid) for pid in workers}
        published = sharedexec.stats()["publications"]

        _release_loop(ex, n_frames, rows, offset=0)

        assert sharedexec.stats()["publications"] - published == n_frames  # each one really was shared
        left_bytes = _settle(kept)
        tables = registry_sizes()
        # Workers drop retired segments before their next task: run one each.
        entries = {}
        for _ in range(20):
            pid, count = ex.submit(scripts.cache_entries).result(timeout=60)
            entries[pid] = count
            if len(entries) == 2:
                break
        parent_growth = pss(os.getpid()) - base_parent
        worker_growth = {pid: pss(pid) - base_workers[pid] for pid in workers}
    record_property("segment_bytes_baseline_after", f"{baseline_bytes} {left_bytes}")
    record_property("parent_pss_growth_mb", round(parent_growth / MB, 1))
    record_property("worker_pss_growth_mb", {pid: round(g / MB, 1) for pid, g in worker_growth.items()})
    record_property("registry_tables", f"{base_tables} -> {tables}")

    assert left_bytes <= baseline_bytes, f"{(left_bytes - baseline_bytes) / MB:.1f} MB of segments not released"
    grown = {name: (base_tables.get(name, 0), size) for name, size in tables.items() if size > base_tables.get(name, 0) + 2}
    assert grown == {}, f"registry tables grew: {grown}"
    assert all(count <= 2 for count in entries.values()), entries
    # Each frame is ~2 MB; had the workers kept them, each would have grown
    # by up to n_frames * 2 MB / 2. Allow allocator noise only.
    assert max(worker_growth.values()) < 24 * MB, worker_growth
    assert parent_growth < 48 * MB, parent_growth
    assert scripts.own_leaks() == []
