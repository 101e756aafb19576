"""The POSIX shared-memory store (macOS's), exercised on Linux.

``.ci/run`` runs the whole suite again with ``SHAREDEXEC_BACKEND=posix``;
these tests pin down, in every run, what differs from the tmpfs store: the
flags macOS's ``shm_open`` accepts, a page-rounded ``fstat`` size, and a
reaper that finds a SIGKILLed process's objects by the names it was told,
with nothing to list.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from sharedexec import _names, _segment, _store

from . import _reliability_scripts as scripts

pytestmark = pytest.mark.skipif(_store._posixshmem is None, reason="this Python has no _posixshmem")


@pytest.fixture
def posix(monkeypatch):
    monkeypatch.setenv(_store.BACKEND_ENV, "posix")
    monkeypatch.setattr(_segment, "_reasons", {})
    return monkeypatch


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


def test_a_page_rounded_size_is_accepted(posix):
    """macOS's fstat reports a whole number of pages; the header has the
    exact size, and the mapping is cut to it."""
    mapping = _segment.create([memoryview(bytes(100))], b"layout", os.getpid())
    try:
        fd = _store.PosixStore().open(mapping.name, os.O_RDWR)
        os.ftruncate(fd, -(-mapping.size // 4096) * 4096)  # what macOS would show
        os.close(fd)
        attached = _segment.attach(mapping.name)
        assert attached.size == mapping.size and len(attached.view) == mapping.size
        assert bytes(attached.layout()) == b"layout"
    finally:
        _segment.retire(mapping.name)


def test_names_live_in_the_posix_namespace_and_go_on_retire(posix):
    mapping = _segment.create([], b"", os.getpid())
    assert len("/" + mapping.name) <= 31
    assert _store.posix_exists(mapping.name)
    assert _segment.retire(mapping.name)
    assert not _store.posix_exists(mapping.name)


def test_the_reaper_removes_announced_names_after_sigkill(tmp_path):
    """Nothing lists POSIX objects on macOS: a SIGKILLed publisher's reaper
    removes them by the names it was told."""
    env = scripts.child_env(SHAREDEXEC_BACKEND="posix", SHAREDEXEC_DIR=_store.PosixStore._LINUX_DIR)
    child = subprocess.Popen(scripts.command("publish-and-wait", tmp_path), env=env)
    try:
        names = scripts.wait_for(
            lambda: (tmp_path / "ready").exists() and json.loads((tmp_path / "ready").read_text()), 60,
            what="published",
        )
        assert len(names) == 2 and all(_store.posix_exists(n) for n in names)  # the frame, the lease board
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        scripts.wait_for(lambda: not any(_store.posix_exists(n) for n in names), 5, what="the reaper's sweep")
    finally:
        scripts.kill_all([child.pid])
        for name in _names.list_segments(_store.PosixStore._LINUX_DIR):
            if name[1] == child.pid:
                _store.remove_posix_if_mine(name[0])
