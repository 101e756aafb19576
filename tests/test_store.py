"""The POSIX shared-memory store (macOS's), exercised on Linux.

``.ci/run`` runs the whole suite again with ``SHAREDEXEC_BACKEND=posix`` and
XNU's rules emulated (``tests/xnu``); these tests pin down, in every run, what
differs from the tmpfs store: the flags macOS's ``shm_open`` accepts, a
page-rounded ``fstat`` size, no file type in ``fstat``, no ``flock``, no
private mapping and no ``pread`` on a shm descriptor, nothing to list but the
store's lock files, and a reaper that finds a SIGKILLed process's objects by
those.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sharedexec import _cache, _names, _segment, _store
from sharedexec._errors import SegmentNotOursError

from . import _reliability_scripts as scripts
from .xnu import xnu_emulation

pytestmark = pytest.mark.skipif(_store._posixshmem is None, reason="this Python has no _posixshmem")


@pytest.fixture
def posix(monkeypatch):
    monkeypatch.setenv(_store.BACKEND_ENV, "posix")
    monkeypatch.setattr(_segment, "_reasons", {})
    return monkeypatch


@pytest.fixture
def xnu(posix):
    """This test's shm descriptors behave as on macOS (``tests/xnu``)."""
    for module, name, replacement in xnu_emulation.patches():
        posix.setattr(module, name, replacement)
    return posix


def exists(name: str) -> bool:
    try:
        os.close(_store.PosixStore().open(name, os.O_RDONLY))
    except FileNotFoundError:
        return False
    return True


def test_macos_gets_only_the_flags_it_accepts(posix):
    seen = []
    real = _store._posixshmem.shm_open

    def shm_open(path, flags, mode):
        seen.append(flags)
        return real(path, flags, mode)

    macos = _store.PosixStore()
    macos._allowed = os.O_ACCMODE | os.O_CREAT | os.O_EXCL  # what __init__ sets off Linux
    posix.setattr(_segment, "_POSIX", macos)
    posix.setattr(_store._posixshmem, "shm_open", shm_open)
    mapping = _segment.create([memoryview(bytes(100))], b"layout", os.getpid())
    try:
        assert bytes(_segment.attach(mapping.name).layout()) == b"layout"
    finally:
        _segment.retire(mapping.name)
    assert seen and all(flags & ~(os.O_ACCMODE | os.O_CREAT | os.O_EXCL) == 0 for flags in seen), seen


def test_a_page_rounded_size_is_accepted(xnu):
    """XNU's fstat reports a whole number of pages (the emulated ftruncate
    makes it so); the header has the exact size, and the mapping is cut to it."""
    mapping = _segment.create([memoryview(bytes(100))], b"layout", os.getpid())
    try:
        fd = _store.PosixStore().open(mapping.name, os.O_RDONLY)
        assert os.fstat(fd).st_size % 4096 == 0 != mapping.size % 4096
        os.close(fd)
        attached = _segment.attach(mapping.name)
        assert attached.size == mapping.size and len(attached.view) == mapping.size
        assert bytes(attached.layout()) == b"layout"
    finally:
        _segment.retire(mapping.name)


def test_names_live_in_the_posix_namespace_and_go_on_retire(posix):
    mapping = _segment.create([], b"", os.getpid())
    lock = os.path.join(_store.lock_dir(), mapping.name)
    assert len("/" + mapping.name) <= 31
    assert exists(mapping.name) and os.path.isfile(lock)
    assert mapping.name in _segment.list_owned_by(os.getpid())
    assert _segment.retire(mapping.name)
    assert not exists(mapping.name) and not os.path.exists(lock)


def test_an_object_without_a_file_type_is_ours(xnu):
    """Issue 17: XNU's fstat has no S_IFREG for a shm object. Attach, holds,
    retire and the reaper's removal must still take our own objects."""
    mapping = _segment.create([memoryview(b"x" * 100)], b"layout", os.getpid())
    fd = _store.PosixStore().open(mapping.name, os.O_RDONLY)
    assert os.fstat(fd).st_mode == 0o600  # the emulation: no type at all
    os.close(fd)
    assert bytes(_segment.attach(mapping.name).layout()) == b"layout"
    assert _segment.creator_of(mapping.name)[0] == os.getpid()
    assert _segment.retire(mapping.name) and not exists(mapping.name)
    again = _segment.create([], b"", os.getpid())
    assert _store.PosixStore().remove_if_mine(again.name) and not exists(again.name)


def test_objects_that_are_not_ours_are_refused_and_named(xnu):
    """What does report a type (a FIFO in /dev/shm), or has another mode, is
    not ours: never mapped, never unlinked, and the message says what it is
    (not that the segment "is gone")."""
    fifo = _names.new_name(os.getpid())
    os.mkfifo(os.path.join("/dev/shm", fifo), 0o600)
    loose = _segment.create([], b"", os.getpid())
    os.chmod(os.path.join("/dev/shm", loose.name), 0o644)  # Linux shows the object as this file
    try:
        for name, what in ((fifo, "a FIFO"), (loose.name, "a shared-memory object")):
            with pytest.raises(SegmentNotOursError, match=f"it is {what} owned by .* with mode") as info:
                _segment.attach(name)
            handle = _cache.Handle(name, "r", "", -1, os.getpid(), _names.HOST, b"")
            message = str(handle.gone_error(info.value))
            assert "is gone" not in message and "not read" in message, message
        assert not _segment.retire(fifo) and os.path.exists(os.path.join("/dev/shm", fifo))
        assert not _store.PosixStore().remove_if_mine(fifo) and os.path.exists(os.path.join("/dev/shm", fifo))
    finally:
        os.unlink(os.path.join("/dev/shm", fifo))
        _store.PosixStore().unlink(loose.name)


def test_holds_and_in_use_without_flock_on_shm(xnu):
    """Issue 17: XNU's flock takes vnodes only (ENOTSUP on a shm descriptor).
    A mapping still holds its segment, through the lock file, and in_use
    says so; "cannot tell" is never "not in use"."""
    mapping = _segment.create([memoryview(bytes(100))], b"layout", os.getpid())
    try:
        attached = _segment.attach(mapping.name)
        assert _segment.in_use(mapping.name)
        del attached
        assert not _segment.in_use(mapping.name)
        held = _segment.hold(mapping.name)
        assert held is not None and _segment.in_use(mapping.name)
        assert held.state() == _segment.STATE_LIVE  # through a mapping: XNU has no pread on shm
        _segment.drop_hold(held)
        os.unlink(os.path.join(_store.lock_dir(), mapping.name))  # a /tmp cleaner, say
        assert _segment.in_use(mapping.name)  # cannot tell: keep it
    finally:
        _segment.retire(mapping.name)


def test_a_hold_sees_retirement_without_pread(xnu):
    mapping = _segment.create([memoryview(bytes(100))], b"layout", os.getpid())
    held = _segment.hold(mapping.name)
    try:
        assert held.state() == _segment.STATE_LIVE
        _segment.retire(mapping.name)
        assert held.state() == _segment.STATE_RETIRED
    finally:
        _segment.drop_hold(held)


def test_copy_on_write_without_map_private(xnu):
    """Issue 17: XNU maps shm objects MAP_SHARED only. A copy-on-write
    attach gets private memory: its writes reach nobody else."""
    mapping = _segment.create([memoryview(bytes(100))], b"layout", os.getpid())
    try:
        private = _segment.attach(mapping.name, copy_on_write=True)
        private.view[_segment.ALIGN] = 7
        assert _segment.attach(mapping.name).view[_segment.ALIGN] == 0
        assert _segment.attach(mapping.name, copy_on_write=True).view[_segment.ALIGN] == 0
    finally:
        _segment.retire(mapping.name)


def test_no_fallocate_is_fine(posix):
    """macOS has no posix_fallocate: the store goes without."""
    posix.delattr(os, "posix_fallocate")
    mapping = _segment.create([memoryview(b"y" * 100_000)], b"layout", os.getpid())
    try:
        assert bytes(_segment.attach(mapping.name).view[_segment.ALIGN : _segment.ALIGN + 3]) == b"yyy"
    finally:
        _segment.retire(mapping.name)


def test_orphan_results_are_found_without_listing_dev_shm(xnu):
    """Issue 17: nothing lists the shm namespace on macOS (no /dev/shm). A
    result a dead worker wrote for us is found by its lock file."""
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.realpath(path) == "/dev/shm":
            raise FileNotFoundError(errno.ENOENT, "no /dev/shm on macOS", path)
        return real_scandir(path)

    xnu.setattr(os, "scandir", scandir)
    child = subprocess.run(
        [sys.executable, "-c", "import os, sys; from sharedexec import _segment; "
         "print(_segment.create([], b'', int(sys.argv[1])).name, os.getpid())", str(os.getpid())],
        env=scripts.child_env(SHAREDEXEC_BACKEND="posix"), capture_output=True, text=True, timeout=60, check=True,
    )
    orphan, creator = child.stdout.split()
    assert exists(orphan)
    assert _cache.remove_orphan_results(os.getpid(), {int(creator)}) == [orphan]
    assert not exists(orphan)


def test_the_reaper_removes_a_killed_publishers_objects(tmp_path):
    """A SIGKILLed publisher's reaper finds its objects by their lock files."""
    # The scenario reports the names it finds in SHAREDEXEC_DIR: where Linux shows shm objects.
    env = scripts.child_env(SHAREDEXEC_BACKEND="posix", SHAREDEXEC_DIR="/dev/shm")
    child = subprocess.Popen(scripts.command("publish-and-wait", tmp_path), env=env)
    try:
        names = scripts.wait_for(
            lambda: (tmp_path / "ready").exists() and json.loads((tmp_path / "ready").read_text()), 60,
            what="published",
        )
        assert len(names) == 2 and all(exists(n) for n in names)  # the frame, the lease board
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        scripts.wait_for(lambda: not any(exists(n) for n in names), 5, what="the reaper's sweep")
        assert not any(os.path.exists(os.path.join(_store.lock_dir(), n)) for n in names)
    finally:
        scripts.kill_all([child.pid])
        _store.PosixStore().remove_owned_by(child.pid)


POOL_ON_MACOS = textwrap.dedent('''
    import json, multiprocessing, os, time
    import numpy as np, pandas as pd, sharedexec
    from sharedexec import _leases

    def column_sum(df):
        return float(df["a"].sum())

    def make_array(n):
        return np.arange(float(n))

    def bump_first(a):
        a[0] += 1
        return float(a[0])

    if __name__ == "__main__":
        out = {"pid": os.getpid()}
        df = pd.DataFrame({"a": np.arange(1_000_000.0)})
        with sharedexec.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
            out["sums"] = [f.result() for f in [ex.submit(column_sum, df) for _ in range(4)]]
            out["big"] = float(ex.submit(make_array, 300_000).result().sum())
            time.sleep(_leases.GRACE_SECONDS + 1.0)  # the collector asks in_use(): no flock on shm
            out["segments"] = sharedexec.stats()["segments"]
        with sharedexec.ProcessPoolExecutor(2, mmap_mode="c") as ex:
            out["private"] = [ex.submit(bump_first, np.zeros(300_000)).result() for _ in range(3)]
        print(json.dumps(out), flush=True)
''')


def test_a_pool_on_emulated_macos(tmp_path):
    """The attacks of the issue 17 review, together: a pool under the XNU
    emulation (ownership without S_IFREG, holds without flock, "c" without
    MAP_PRIVATE) gives the right results with a clean stderr, and leaves
    nothing behind (objects, lock files) once its reaper has run."""
    xnu_dir = os.path.dirname(os.path.abspath(xnu_emulation.__file__))
    env = scripts.child_env(SHAREDEXEC_BACKEND="posix", SX_EMULATE_XNU="1")
    env["PYTHONPATH"] = os.pathsep.join([xnu_dir, env["PYTHONPATH"]])
    script = tmp_path / "pool.py"
    script.write_text(POOL_ON_MACOS)
    child = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert child.returncode == 0 and child.stderr == "", child.stderr
    out = json.loads(child.stdout.splitlines()[-1])
    assert out["sums"] == [499999500000.0] * 4 and out["big"] == 300_000 * 299_999 / 2
    assert out["private"] == [1.0, 1.0, 1.0]

    def left() -> list[str]:
        return [n for d in ("/dev/shm", _store.lock_dir()) for n, owner, _ in _names.list_segments(d) if owner == out["pid"]]

    scripts.wait_for(lambda: not left(), 8, what="the reaper's sweep")


def test_adopt_publishes_without_adopting(xnu):
    """adopt=True (issue 18) re-points a frame at a private mapping of its
    segment, which XNU refuses: under POSIX shared memory the frame is
    published as without it, and keeps its own memory."""
    import numpy as np
    import pandas as pd

    from sharedexec import _registry

    registry = _registry.Registry()  # its own: the process's lease board stays in the run's store
    frame = pd.DataFrame({"a": np.arange(200_000.0)})
    before = frame._mgr.blocks[0].values.ctypes.data
    pub = registry.publish(frame, adopt=True)
    try:
        assert not pub.adopted and frame._mgr.blocks[0].values.ctypes.data == before
    finally:
        registry.release_all()
