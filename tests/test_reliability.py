"""Faults, bad input and security (issue 8), each proven with real processes,
signals and files.

* the parent SIGKILLed while tasks run: its segments and its workers are gone
  within 5 s, under every start method and entry point;
* a worker SIGKILLed mid-task: the stdlib's / joblib's own error, nothing left;
* a segment removed or damaged before a worker attaches: a clear error on that
  task's future only;
* a shared-memory directory too small (a real 16 MB tmpfs in a private mount
  namespace) or on disk;
* corrupt and truncated segments, hostile tables;
* unpicklable arguments and results: the stdlib's error, no segment leaked;
* permissions, exclusive creation, unguessable names, sizes never trusted;
* a normal run prints nothing on stderr.

Scenarios that need a process to kill, a fresh interpreter or a private mount
namespace run in a child interpreter (``_reliability_scripts``). Processes
are sequenced through files and polled with deadlines, never with fixed
sleeps.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import gc
import json
import multiprocessing
import os
import pickle
import re
import secrets
import shutil
import signal
import stat
import subprocess
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import psutil
import pytest

import sharedexec
from sharedexec import _names, _publication, _segment

from . import _reliability_scripts as scripts
from .conftest import BACKEND, START_METHODS

MIN_BYTES = scripts.MIN_BYTES
FORK = multiprocessing.get_context("fork")



def own_segments() -> list[str]:
    return scripts.segments_of(os.getpid())


def new_segments(before: set[str]) -> set[str]:
    """Segments of this process created since ``before``, the lease board aside."""
    return set(own_segments()) - before - scripts.lease_board()


def share_new(obj):
    """``sharedexec.share(obj)``, and the name of the segment it created."""
    gc.collect()
    sharedexec.stats()  # no dead publication pending
    before = set(own_segments())
    shared = sharedexec.share(obj)
    (name,) = new_segments(before)
    return shared, name


def still_there(names: set[str], timeout: float = 5.0) -> set[str]:
    """Which of ``names`` still exist once their objects are collected and
    released (polled up to ``timeout`` seconds)."""
    def gone():
        gc.collect()
        sharedexec.stats()  # collects released publications
        return not (names & set(own_segments()))

    try:
        scripts.wait_for(gone, timeout, interval=0.05)
    except TimeoutError:
        pass
    return names & set(own_segments())


def worker_pids(statedir) -> list[int]:
    return sorted(
        int(name.split("-", 1)[1]) for name in os.listdir(statedir) if re.fullmatch(r"worker-\d+", name)
    )


def wait_for_workers(statedir, n: int, timeout: float = 60, child: subprocess.Popen | None = None) -> list[int]:
    """The pids of ``n`` workers running a task (``hold`` or ``block``); fails
    early if ``child``, the process that should start them, exits."""

    def ready():
        pids = worker_pids(statedir)
        if len(pids) >= n:
            return pids
        if child is not None and child.poll() is not None:
            raise AssertionError(f"the child exited ({child.returncode}) before {n} workers started a task")
        return None

    return scripts.wait_for(ready, timeout, what=f"{n} worker(s) running a task")


# -- the parent SIGKILLed ---------------------------------------------------------


def _parent_kill_cases():
    for api in ("executor", "pool"):
        for method in START_METHODS:
            yield pytest.param(api, method, id=f"{api}-{method}")
    yield pytest.param("joblib", "loky", id="joblib-loky")
    yield pytest.param("executor-adopt", "forkserver", id="executor-adopt-forkserver")


@pytest.mark.parametrize("api, method", list(_parent_kill_cases()))
def test_parent_sigkill_leaves_no_segment_and_no_worker(api, method, tmp_path, record_property):
    """The parent holds 2 workers busy on a shared frame, then is SIGKILLed:
    within 5 s no sx_<parent>_* segment is left and the workers have exited;
    then the rest of its tree exits by itself, its resource trackers taking
    loky's semaphores and joblib's folders with them (under loky alone,
    whose workers outlive their parent, those survive ~330 s)."""
    tree: list[int] = []
    with open(tmp_path / "stderr", "w") as err:
        child = subprocess.Popen(
            scripts.command("parent-kill", api, method, tmp_path),
            env=scripts.child_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        try:
            workers = wait_for_workers(tmp_path, 2, child=child)
        except (TimeoutError, AssertionError) as exc:
            pytest.fail(f"{exc}: {(tmp_path / 'stderr').read_text()}")
        tree = [p.pid for p in psutil.Process(child.pid).children(recursive=True)]
        assert set(workers) <= set(tree)
        published = scripts.segments_of(child.pid)
        assert len(published) >= 2, published  # the frame and the lease board at least

        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        killed = time.monotonic()

        def clean():
            return not scripts.segments_of(child.pid) and all(scripts.exited(pid) for pid in workers)

        try:
            scripts.wait_for(clean, timeout=5.0, interval=0.02)
        except TimeoutError:
            pass
        record_property("seconds_to_clean", round(time.monotonic() - killed, 2))
        assert scripts.segments_of(child.pid) == [], "segments left 5 s after the parent's SIGKILL"
        assert [pid for pid in workers if not scripts.exited(pid)] == [], "workers alive 5 s after the parent's SIGKILL"
        # The rest of the tree (resource trackers, reaper, forkserver) ends by
        # itself once the workers are gone: the trackers then remove the
        # multiprocessing/loky semaphores and joblib's folders of the dead
        # parent. Killing them instead is what left those behind.
        def tree_ended_clean():
            return all(map(scripts.exited, tree)) and not scripts.library_files_of([child.pid, *tree])

        try:
            scripts.wait_for(tree_ended_clean, timeout=30, interval=0.05)
        except TimeoutError:
            pass
        assert [pid for pid in tree if not scripts.exited(pid)] == [], "the killed parent's tree alive 30 s later"
        assert scripts.library_files_of([child.pid, *tree]) == [], "semaphores or joblib folders of the killed tree left"
    finally:
        scripts.kill_all(tree + [child.pid])
        scripts.remove_library_files([child.pid, *tree])  # after a failure only: nothing of theirs stays


# -- a worker SIGKILLed mid-task ------------------------------------------------------


def test_worker_sigkill_executor(mp_context, tmp_path):
    gate = tmp_path / "gate"  # never opened: the tasks hold until the pool breaks
    df = scripts.make_frame(11, 200_000)
    before = set(own_segments())
    with sharedexec.ProcessPoolExecutor(2, mp_context=mp_context, min_bytes=MIN_BYTES) as ex:
        futures = [ex.submit(scripts.hold, df, str(tmp_path), str(gate)) for _ in range(4)]
        victim = wait_for_workers(tmp_path, 1)[0]
        pool_pids = list(ex._processes)
        published = new_segments(before)
        assert len(published) == 1  # the frame, once for the four tasks
        os.kill(victim, signal.SIGKILL)
        for future in futures:
            with pytest.raises(BrokenProcessPool):
                future.result(timeout=60)
    assert all(scripts.exited(pid) for pid in pool_pids)
    del df, futures
    assert still_there(published) == set()
    assert scripts.own_leaks() == []


def test_worker_sigkill_while_sending_a_large_result(tmp_path):
    """The worker dies after writing a large result into a segment named for
    us, before sending its name: nobody but our reaper (at our exit) knows
    that segment. After shutdown it must be gone all the same."""
    rec = tmp_path / "rec"
    before = set(own_segments())
    with sharedexec.ProcessPoolExecutor(1, mp_context=FORK, min_bytes=MIN_BYTES) as ex:
        future = ex.submit(scripts.result_then_die, os.getpid(), str(rec), 100_000)
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=60)
    written = set(n for n, _ in _recorded(rec)) - before - scripts.lease_board()
    assert len(written) == 1, "the result frame was written to a segment before the worker died"
    try:
        assert still_there(written, timeout=2.0) == set()
    finally:  # this process lives on: do not leave it to the session's leak check
        for name in written:
            _names.unlink_path(_path(name))


def test_worker_sigkill_joblib():
    import joblib
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    df = scripts.make_frame(12, 200_000)
    before = set(own_segments())
    with joblib.parallel_config(backend=sharedexec.JoblibBackend(min_bytes=MIN_BYTES), n_jobs=2):
        with pytest.raises(TerminatedWorkerError):
            joblib.Parallel(batch_size=1)(joblib.delayed(scripts.kill_self_if)(df, i == 3) for i in range(8))
        # The backend recovers: the next call gets a fresh pool.
        got = joblib.Parallel()(joblib.delayed(scripts.frame_checksum)(df) for _ in range(2))
    assert got == [scripts.frame_sum(12, 200_000)] * 2
    published = new_segments(before)
    assert len(published) == 1  # shared once, across both calls
    del df
    assert still_there(published) == set()
    assert scripts.own_leaks() == []


# -- a segment removed or damaged before a worker attaches ----------------------------


def _remove(path: str) -> None:
    os.unlink(path)


def _bad_magic(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(b"NOTMAGIC")


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "removed": (_remove, sharedexec.SegmentNotFoundError, "removed from"),
    "bad-magic": (_bad_magic, sharedexec.SegmentCorruptError, "bad magic"),
    "truncated": (_truncate, sharedexec.SegmentCorruptError, "truncated"),
}


def _new_publication(before: set[str]) -> str:
    """The name of the next publication, once it is complete. Not merely once
    its file appears: it is being filled then, and truncating a file under
    the process writing into its mapping is a SIGBUS in that process."""
    from sharedexec import _registry

    return scripts.wait_for(
        lambda: sorted(set(_registry.REGISTRY._by_name) - before), 30, what="a new publication"
    )[0]


def _publications() -> set[str]:
    from sharedexec import _registry

    return set(_registry.REGISTRY._by_name)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_segment_fails_only_its_task_executor(damage, tmp_path):
    do_damage, error, cause = DAMAGE[damage]
    gate = tmp_path / "gate"
    victim_df, other_df = scripts.make_frame(21, 100_000), scripts.make_frame(22, 100_000)
    with sharedexec.ProcessPoolExecutor(1, mp_context=FORK, min_bytes=MIN_BYTES) as ex:
        assert ex.submit(scripts.frame_checksum, scripts.make_frame(20, 100_000)).result(timeout=60)
        busy = ex.submit(scripts.block, str(tmp_path), str(gate))
        wait_for_workers(tmp_path, 1)
        # The worker is busy: the next task is pickled (its frame published)
        # and queued, but not read yet.
        before = _publications()
        victim = ex.submit(scripts.frame_checksum, victim_df)
        name = _new_publication(before)
        do_damage(os.path.join(_names.shm_dir(), name))
        other = ex.submit(scripts.frame_checksum, other_df)
        gate.touch()
        assert busy.result(timeout=60)
        with pytest.raises(error) as info:
            victim.result(timeout=60)
        assert name in str(info.value) and cause in str(info.value)
        assert other.result(timeout=60) == scripts.frame_sum(22, 100_000)
        assert ex.submit(scripts.frame_checksum, other_df).result(timeout=60) == scripts.frame_sum(22, 100_000)
        published = _publications() - before
    del victim_df, other_df
    assert still_there(published) == set()
    assert scripts.own_leaks() == []


def test_removed_segment_fails_only_its_task_pool(tmp_path):
    gate = tmp_path / "gate"
    victim_df, other_df = scripts.make_frame(23, 100_000), scripts.make_frame(24, 100_000)
    with FORK.Pool(1) as pool:
        assert pool.apply(scripts.shared_checksum, ((scripts.make_frame(20, 100_000),),))
        busy = pool.apply_async(scripts.shared_block, ((str(tmp_path), str(gate)),))
        (worker,) = wait_for_workers(tmp_path, 1)
        before = _publications()
        victim = pool.apply_async(scripts.shared_checksum, ((victim_df,),))
        name = _new_publication(before)
        os.unlink(os.path.join(_names.shm_dir(), name))
        other = pool.apply_async(scripts.shared_checksum, ((other_df,),))
        gate.touch()
        assert busy.get(timeout=60) == worker
        # Either the task fails, or (the bug) its worker silently exits.
        scripts.wait_for(lambda: victim.ready() or scripts.exited(worker), 60, what="the task's end")
        assert victim.ready(), "the worker exited and the task will never complete"
        with pytest.raises(sharedexec.SegmentNotFoundError, match=name):
            victim.get(timeout=0)
        assert other.get(timeout=60) == scripts.frame_sum(24, 100_000)


def test_removed_segment_error_says_what_happened():
    """The error itself (whatever path raises it): names the segment, its
    publisher, and the likely cause."""
    shared, name = share_new(scripts.make_frame(25, 100_000))
    payload = bytes(multiprocessing.reduction.ForkingPickler.dumps(shared))
    assert name.encode() in payload
    os.unlink(os.path.join(_names.shm_dir(), name))
    with FORK.Pool(1) as pool:
        kind, message = pool.apply(scripts.load_handle, (payload,))
    assert kind == "SegmentNotFoundError"
    assert name in message and str(os.getpid()) in message
    assert "removed from" in message and "publishing process released it" in message
    del shared
    assert scripts.own_leaks() == []


def test_a_shared_object_at_a_reused_address_still_travels_as_a_handle():
    """CPython gives a new object the address -- the id() -- of a dead one
    (standalone, a few dozen share() calls reuse one). Made deterministic
    here: the dead publication gets the new object's id, as if its object
    had lived at that address, before the collector sees it."""
    from sharedexec import _registry

    registry = _registry.REGISTRY
    with registry._lock:  # the collector thread waits
        old = sharedexec.share(scripts.make_frame(26, 5_000))
        y = sharedexec.share(scripts.make_frame(27, 5_000))
        old_pub, old_id = registry.shared_publication(old), id(old)
        old_pub.key = id(y)  # "old lived where y lives now"
        del old  # its publication is queued as dead
    try:
        sharedexec.stats()  # collects it
        payload = bytes(multiprocessing.reduction.ForkingPickler.dumps(y))
        assert len(payload) < 1000, f"a share()d frame pickled in full: {len(payload)} bytes"
    finally:
        if registry._by_id.get(old_id) is old_pub:
            del registry._by_id[old_id]


# -- shared memory too small, full, or on disk ----------------------------------------


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_shm_too_small_falls_back_or_raises_never_sigbus(tmp_path):
    """A real 16 MB tmpfs (Docker's default is 64 MB), in a private mount
    namespace, as SHAREDEXEC_DIR; ~25 MB frames."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    result = scripts.run_in_private_tmpfs(mnt, "16m", scripts.command("shm-full", mnt), timeout=240)
    assert result.returncode == 0, f"exit status {result.returncode} (SIGBUS is -7): {result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["total"] == 16 << 20

    # Default: correct results by plain pickling, with exactly one warning
    # saying what to change.
    assert report["fallback_results"] == report["fallback_expected"]
    assert report["bytes_pickled"] > 0
    assert report["big_result_ok"]
    assert report["pool_results"] == report["expected"]
    assert report["joblib_results"] == report["expected"]
    assert len(report["warnings"]) == 1, report["warnings"]
    warning = report["warnings"][0]
    where = ("/dev/shm",) if BACKEND == "posix" else (str(mnt), "SHAREDEXEC_DIR")
    for hint in (*where, "16.8 MB", "--shm-size", "on_full='raise'"):
        assert hint in warning, hint
    # What fits is still shared.
    assert report["small_result"] == report["small_expected"]
    assert report["small_published"] == 1

    # on_full="raise": the error on the future, an OSError, with the numbers.
    raised = report["raise"]
    assert raised["raised"] == "SharedMemoryFullError" and raised["oserror"], raised
    assert re.search(r"cannot create a [\d.]+ MB shared-memory segment: .* has [\d.]+ MB free of 16\.8 MB", raised["message"])
    assert report["after_raise"] == report["small_expected"]

    # The free-space check was fooled: the write still refuses cleanly.
    assert report["fallocate"]["raised"] == "SharedMemoryFullError", report["fallocate"]
    assert report["other_warnings"] == []
    assert len(report["left"]) <= 1  # the lease board of the (still running) child
    assert all(n.startswith("sx_") for n in report["left"])


@pytest.mark.tmpfs_only
def test_plain_directory_through_sharedexec_dir(tmp_path):
    """SHAREDEXEC_DIR naming an ordinary directory (on disk here) works end to
    end through the three entry points, and is left empty."""
    directory = tmp_path / "segments"
    directory.mkdir()
    result = subprocess.run(
        scripts.command("entry-points", "fork"),
        capture_output=True,
        text=True,
        env=scripts.child_env(SHAREDEXEC_DIR=str(directory)),
        timeout=240,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["dir"] == str(directory)
    assert len(report["segments_in_dir"]) >= 3  # two frames and the lease board were there
    scripts.wait_for(lambda: not os.listdir(directory), 5, what="the directory emptied")
    assert scripts.segments_of(report["pid"]) == []  # and nothing went to /dev/shm


# -- corrupt and truncated segments ---------------------------------------------------

# The header, field by field (``_segment.HEADER``).
FIELDS = ["magic", "version", "flags", "state", "total", "layout_offset", "layout_size", "creator", "owner", "tag"]


@pytest.fixture
def published():
    """A real segment (of a shared frame), and a factory of copies to damage."""
    frame = scripts.make_frame(31, 10_000)
    shared, name = share_new(frame)
    directory = _names.shm_dir()
    copies: list[str] = []

    def clone(data: bytes | None = None) -> str:
        """A copy under a new name, tagged with our key: damage done to it
        afterwards reaches the checks behind the tag."""
        copy = f"sx_{os.getpid()}_{secrets.token_hex(8)}"
        if data is None:
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
        data = seal(copy, data)
        fd = os.open(os.path.join(directory, copy), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        copies.append(copy)
        return copy

    yield frame, shared, name, clone
    for copy in copies:
        _names.unlink_path(os.path.join(directory, copy))
    del shared


def _path(name: str) -> str:
    return os.path.join(_names.shm_dir(), name)


def seal(name: str, data: bytes) -> bytes:
    """``data`` with the tag a segment named ``name`` of ours would carry."""
    fields = dict(zip(FIELDS, _segment.HEADER.unpack(data[: _segment.HEADER.size])))
    start = fields["layout_offset"]
    head = bytearray(data[: _segment.ALIGN])
    head[_segment.TAG_OFFSET :] = _segment.tag(_segment.process_key(), name, head, data[start : start + fields["layout_size"]])
    return bytes(head) + data[_segment.ALIGN :]


def read_segment(name: str):
    """What a worker does with a handle's segment, minus the cache."""
    return _publication.read(_segment.attach(name), _segment.attach)


def header(name: str) -> dict:
    with open(_path(name), "rb") as f:
        return dict(zip(FIELDS, _segment.HEADER.unpack(f.read(_segment.HEADER.size))))


def rewrite_header(name: str, **changes) -> None:
    fields = {**header(name), **changes}
    with open(_path(name), "r+b") as f:
        f.write(_segment.HEADER.pack(*(fields[k] for k in FIELDS)))


def payload(name: str) -> tuple[list, bytes]:
    h = header(name)
    with open(_path(name), "rb") as f:
        f.seek(h["layout_offset"])
        return pickle.loads(f.read(h["layout_size"]))


def with_payload(name: str, table: list, layout: bytes) -> bytes:
    """The bytes of segment ``name`` with its (table, layout) replaced."""
    h = header(name)
    with open(_path(name), "rb") as f:
        data = bytearray(f.read(h["layout_offset"]))
    blob = pickle.dumps((table, layout), protocol=5)
    fields = {**h, "total": len(data) + len(blob), "layout_size": len(blob)}
    data[: _segment.HEADER.size] = _segment.HEADER.pack(*(fields[k] for k in FIELDS))
    return bytes(data) + blob


def test_an_intact_copy_reads_back(published):
    frame, _, name, clone = published
    copy = clone()
    assert read_segment(copy).equals(frame)  # the harness itself works


HEADER_DAMAGE = {
    "bad magic": lambda n: rewrite_header(n, magic=b"NOTSHRDX"),
    "wrong version": lambda n: rewrite_header(n, version=header(n)["version"] + 1),
    "claims more than the file": lambda n: rewrite_header(n, total=header(n)["total"] + (1 << 30)),
    "layout past the end": lambda n: rewrite_header(n, layout_size=header(n)["layout_size"] + 4096),
    "layout inside the header": lambda n: rewrite_header(n, layout_offset=8),
    "huge layout offset": lambda n: rewrite_header(n, layout_offset=(1 << 63)),
    "truncated by a page": lambda n: os.truncate(_path(n), os.path.getsize(_path(n)) - 4096),
    "truncated to 10 bytes": lambda n: os.truncate(_path(n), 10),
    "empty file": lambda n: os.truncate(_path(n), 0),
}


@pytest.mark.parametrize("damage", list(HEADER_DAMAGE))
def test_corrupt_header_is_a_clear_error(published, damage):
    _, _, _, clone = published
    copy = clone()
    HEADER_DAMAGE[damage](copy)
    with pytest.raises(sharedexec.SegmentCorruptError) as info:
        read_segment(copy)
    assert copy in str(info.value)
    assert isinstance(info.value, sharedexec.SharedExecError) and isinstance(info.value, OSError)


TABLE_DAMAGE = {
    # (how to change the table, the error)
    "entry past the buffers": (lambda t, n: [("", t[0][1], 1 << 40)] + t[1:], sharedexec.SegmentCorruptError),
    "entry overlapping the layout": (
        lambda t, n: [("", header(n)["layout_offset"] - 8, 64)] + t[1:],
        sharedexec.SegmentCorruptError,
    ),
    "entry inside the header": (lambda t, n: [("", 0, 64)] + t[1:], sharedexec.SegmentCorruptError),
    "negative length": (lambda t, n: [("", t[0][1], -8)] + t[1:], sharedexec.SegmentCorruptError),
    "negative offset": (lambda t, n: [("", -4096, 8)] + t[1:], sharedexec.SegmentCorruptError),
    "another segment, out of its bounds": (
        lambda t, n: [(n, t[0][1], os.path.getsize(_path(n)))] + t[1:],
        sharedexec.SegmentCorruptError,
    ),
    "a path outside the directory": (lambda t, n: [("../../etc/passwd", 64, 8)] + t[1:], sharedexec.SegmentCorruptError),
    "a segment that does not exist": (
        lambda t, n: [(f"sx_{os.getpid()}_{'0' * 16}", 64, 8)] + t[1:],
        sharedexec.SegmentNotFoundError,
    ),
}


@pytest.mark.parametrize("damage", list(TABLE_DAMAGE))
def test_hostile_table_never_reads_out_of_bounds(published, damage):
    _, _, name, clone = published
    change, error = TABLE_DAMAGE[damage]
    table, layout = payload(name)
    copy = clone(with_payload(name, change(list(table), name), layout))
    with pytest.raises(error) as info:
        read_segment(copy)
    assert re.search(r"sx_\d+_|etc/passwd", str(info.value))  # names what is wrong


def _too_few_entries(table, layout):
    return table[:-1], layout


def _short_buffer(table, layout):
    (name, offset, nbytes), *rest = table
    return [(name, offset, nbytes // 2), *rest], layout


def _truncated_layout(table, layout):
    return table, layout[: len(layout) // 2]


@pytest.mark.parametrize("change", [_too_few_entries, _short_buffer, _truncated_layout], ids=lambda f: f.__name__[1:])
def test_inconsistent_layout_is_a_clear_error(published, change):
    """A table that does not match its layout: no read out of bounds today
    (numpy checks sizes), but a raw IndexError / ValueError / UnpicklingError."""
    _, _, name, clone = published
    copy = clone(with_payload(name, *change(*payload(name))))
    with pytest.raises(sharedexec.SegmentCorruptError, match=copy):
        read_segment(copy)


def test_unreadable_layout_is_a_clear_error(published):
    _, _, name, clone = published
    h = header(name)
    with open(_path(name), "rb") as f:
        data = bytearray(f.read())
    data[h["layout_offset"] : h["layout_offset"] + h["layout_size"]] = b"\x80\x05garbage" + bytes(h["layout_size"] - 9)
    copy = clone(bytes(data))
    with pytest.raises(sharedexec.SegmentCorruptError, match="unreadable layout"):
        read_segment(copy)


def test_corrupt_segment_reaches_a_worker_as_a_clear_error(published):
    """A handle to a segment whose header claims more than the file holds,
    resolved by a real worker: SegmentCorruptError, and the worker lives on."""
    _, shared, name, clone = published
    copy = clone()
    rewrite_header(copy, total=header(copy)["total"] + (1 << 30))
    payload_bytes = bytes(multiprocessing.reduction.ForkingPickler.dumps(shared)).replace(name.encode(), copy.encode())
    with FORK.Pool(1) as pool:
        kind, message = pool.apply(scripts.load_handle, (payload_bytes,))
        assert kind == "SegmentCorruptError" and copy in message, message
        assert pool.apply(scripts.frame_checksum, (shared,)) == scripts.frame_sum(31, 10_000)


# -- unpicklable arguments and results -----------------------------------------------


def _error_of(call) -> tuple[type, str]:
    """The type and message of what ``call()`` raised. Not the exception
    itself: its traceback holds the task, and the task the frame."""
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - the point is to compare them
        return type(exc), str(exc)
    raise AssertionError("no error")


def _recorded(path) -> list[tuple[str, int]]:
    return [tuple(x) for x in json.loads(path.read_text())]


def test_unpicklable_argument_executor(tmp_path):
    df = scripts.make_frame(41, 100_000)
    lock = threading.Lock()
    with cf.ProcessPoolExecutor(1, mp_context=FORK) as ex:
        expected = _error_of(ex.submit(scripts.frame_checksum, df, lock).result)
    before = set(own_segments())
    with sharedexec.ProcessPoolExecutor(1, mp_context=FORK, min_bytes=MIN_BYTES) as ex:
        got = _error_of(ex.submit(scripts.frame_checksum, df, lock).result)
        published = new_segments(before)
        # The pool is not broken by it.
        assert ex.submit(scripts.frame_checksum, df).result(timeout=60) == scripts.frame_sum(41, 100_000)
    assert got == expected
    assert len(published) == 1, "the frame was published before the pickling failed"
    del df
    assert still_there(published) == set()
    assert scripts.own_leaks() == []


def test_unpicklable_result_executor(tmp_path):
    rec = tmp_path / "rec"
    with cf.ProcessPoolExecutor(1, mp_context=FORK) as ex:
        expected = _error_of(ex.submit(scripts.result_then_lock, os.getpid(), str(rec), 100_000).result)
    before = set(own_segments())
    with sharedexec.ProcessPoolExecutor(1, mp_context=FORK, min_bytes=MIN_BYTES) as ex:
        got = _error_of(ex.submit(scripts.result_then_lock, os.getpid(), str(rec), 100_000).result)
        assert ex.submit(scripts.make_result, 3, 100_000).result(timeout=60).equals(scripts.make_frame(3, 100_000))
    assert got == expected
    written = set(n for n, _ in _recorded(rec)) - before - scripts.lease_board()
    assert written, "the worker wrote the result frame to a segment before failing"
    assert still_there(written) == set()
    assert scripts.own_leaks() == []


def test_unpicklable_argument_pool_error_type(tmp_path):
    df = scripts.make_frame(42, 100_000)
    lock = threading.Lock()
    with FORK.Pool(1) as pool:
        expected = _error_of(lambda: pool.apply(scripts.frame_checksum, (df, lock)))
        got = _error_of(lambda: pool.apply(scripts.shared_checksum, ((df, lock),)))
        assert pool.apply(scripts.shared_checksum, ((df,),)) == scripts.frame_sum(42, 100_000)
    assert got == expected


def test_unpicklable_argument_pool_leaks_nothing(tmp_path):
    df = scripts.make_frame(43, 100_000)
    before = set(own_segments())
    with FORK.Pool(1) as pool:
        with pytest.raises(TypeError):
            pool.apply(scripts.shared_checksum, ((df, threading.Lock()),))
    published = new_segments(before)
    assert len(published) == 1
    del df
    assert still_there(published, timeout=2.0) == set()


def test_unpicklable_result_pool(tmp_path):
    rec = tmp_path / "rec"
    with FORK.Pool(1) as pool:
        expected = _error_of(lambda: pool.apply(scripts.result_then_lock, (os.getpid(), str(rec), 100_000)))
        before = set(own_segments())
        got = _error_of(lambda: pool.apply(scripts.shared_result_then_lock, ((os.getpid(), str(rec), 100_000),)))
    assert got[0] is expected[0]  # multiprocessing.pool.MaybeEncodingError (the message names objects)
    written = set(n for n, _ in _recorded(rec)) - before - scripts.lease_board()
    assert written
    assert still_there(written) == set()


def test_unpicklable_argument_and_result_joblib(tmp_path):
    import joblib

    df = scripts.make_frame(44, 100_000)
    rec = tmp_path / "rec"
    errors = {}
    before = set(own_segments())
    publications = sharedexec.stats()["publications"]
    for key, backend in (("loky", "loky"), ("sharedexec", sharedexec.JoblibBackend(min_bytes=MIN_BYTES))):
        with joblib.parallel_config(backend=backend, n_jobs=2):
            arg = _error_of(lambda: joblib.Parallel()(joblib.delayed(scripts.frame_checksum)(df, threading.Lock()) for _ in range(2)))
            # One task: on an error joblib kills the workers still busy, and
            # one killed while writing a result is the test above.
            res = _error_of(lambda: joblib.Parallel()([joblib.delayed(scripts.result_then_lock)(os.getpid(), str(rec), 100_000)]))
        errors[key] = (arg[0], res[0])
    assert errors["sharedexec"] == errors["loky"]
    published = new_segments(before)  # (may be gone already: no worker maps it)
    written = set(n for n, _ in _recorded(rec)) - before - scripts.lease_board()
    assert sharedexec.stats()["publications"] > publications and written
    del df
    assert still_there(published | written) == set()


# -- security ---------------------------------------------------------------------


def test_segments_are_owner_only(tmp_path):
    """Frames, the lease board and results a worker writes: mode 0600, whatever the umask."""
    old = os.umask(0)
    try:
        df = scripts.make_frame(51, 100_000)
        rec = tmp_path / "rec"
        before = set(own_segments())
        with sharedexec.ProcessPoolExecutor(1, mp_context=FORK, min_bytes=MIN_BYTES) as ex:
            result = ex.submit(scripts.frame_checksum, df).result(timeout=60)
            modes = {n: stat.S_IMODE(os.stat(_path(n)).st_mode) for n in set(own_segments()) - before}
            ex.submit(scripts.result_then_lock, os.getpid(), str(rec), 100_000).exception(timeout=60)
    finally:
        os.umask(old)
    assert result == scripts.frame_sum(51, 100_000)
    assert len(modes) >= 1 and set(modes.values()) == {0o600}, modes
    recorded = _recorded(rec)
    assert recorded and {mode for _, mode in recorded} == {0o600}, recorded
    del df
    assert scripts.own_leaks() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_user_can_neither_read_nor_write_a_segment():
    shared, name = share_new(scripts.make_frame(52, 10_000))
    results = []
    for flags in (os.O_RDONLY, os.O_RDWR):
        pid = os.fork()
        if pid == 0:  # the child only drops privileges, tries, and reports
            code = 3
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    os.close(os.open(_path(name), flags))
                    code = 0
                except PermissionError:
                    code = 1
            finally:
                os._exit(code)
        results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    assert results == [1, 1]  # denied, denied
    del shared


@pytest.mark.parametrize("trap", ["file", "symlink"])
def test_creation_is_exclusive(tmp_path, monkeypatch, trap):
    """Someone pre-creates the name sharedexec is about to use (a file, or a
    symlink to a file of the victim's): creation fails, and touches neither."""
    name = f"sx_{os.getpid()}_{secrets.token_hex(8)}"
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    if trap == "file":
        with open(_path(name), "wb") as f:
            f.write(b"planted")
    else:
        os.symlink(target, _path(name))
    monkeypatch.setattr(_segment, "new_name", lambda pid: name)
    monkeypatch.setattr(_names, "new_name", lambda pid: name)
    try:
        with pytest.raises(OSError) as info:
            sharedexec.share(scripts.make_frame(53, 10_000))
        assert info.value.errno == errno.EEXIST
        assert os.path.lexists(_path(name))
        if trap == "file":
            with open(_path(name), "rb") as f:
                assert f.read() == b"planted"
        else:
            assert os.readlink(_path(name)) == str(target)
        assert target.read_bytes() == b"precious"
    finally:
        _names.unlink_path(_path(name))
    monkeypatch.undo()
    gc.collect()
    assert scripts.own_leaks() == []


def test_names_carry_64_random_bits():
    pid = os.getpid()
    names = [_names.new_name(pid) for _ in range(4000)]
    assert len(set(names)) == len(names)
    randoms = []
    for name in names:
        match = re.fullmatch(rf"sx_{pid}_([0-9a-f]{{16}})", name)
        assert match, name
        assert len("/" + name) <= 31 or len(str(pid)) > 7  # macOS: 31 characters with the slash
        randoms.append(match.group(1))
    # Every hex digit shows up in every position: no fixed or counter part.
    for position in range(16):
        assert len({r[position] for r in randoms}) == 16
    # And the owner's pid is all a name tells.
    assert _names.owner_of(names[0]) == pid


def test_handle_names_cannot_escape_the_directory():
    for bad in ("../../etc/passwd", "/etc/passwd", "sx_1_../../../etc", f"sx_{os.getpid()}_{'0' * 15}", "sx_1_" + "g" * 16):
        with pytest.raises(sharedexec.SegmentCorruptError):
            _segment.attach(bad)


# -- a normal run is silent -----------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_normal_run_prints_nothing_on_stderr(method):
    """Executor, Pool with @shared, joblib and share() in a fresh interpreter:
    no resource_tracker warning, no "leaked shared_memory", no traceback, and
    nothing left once it has exited."""
    result = subprocess.run(
        scripts.command("entry-points", method), capture_output=True, text=True, env=scripts.child_env(), timeout=240
    )
    assert result.returncode == 0
    assert result.stderr == ""
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and len(report["segments_in_dir"]) >= 3
    scripts.wait_for(lambda: not scripts.segments_of(report["pid"]), 5, what="its segments removed")
