"""Fixtures shared by the whole suite.

* ``mp_context``: runs a test under fork, spawn and forkserver.
* The session ends by checking that this process leaves no ``sx_`` segment
  but the live ones it still owns (its lease board; objects a test keeps), and
  that no process of ours left one behind (``.ci/run`` checks /dev/shm again
  after pytest has exited, once every reaper has run).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time

import pytest
from hypothesis import HealthCheck, Phase, settings

import sharedexec
from sharedexec import _names, _publication, _registry, _segment, _store

from ._tasks import make_frame
from .xnu import xnu_emulation

# SX_EMULATE_XNU=1 (.ci/run's POSIX run): POSIX shm descriptors behave as on
# macOS, here and in every process the suite starts (see tests/xnu).
if os.environ.get(xnu_emulation.ENV) == "1":
    xnu_emulation.install()
    _XNU_DIR = os.path.dirname(os.path.abspath(xnu_emulation.__file__))
    if _XNU_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_XNU_DIR, os.environ.get("PYTHONPATH")) if p)

START_METHODS = ["fork", "spawn", "forkserver"]

# Hypothesis: "ci" (the default) is bounded and derandomized, so CI stays fast
# and a failure is the same on every run; "long" explores (`pytest
# --hypothesis-profile=long tests/test_exactness.py`). Tests that set their
# own max_examples keep it. Workers make examples slow to run: no deadline.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=12, derandomize=True, database=None, deadline=None,
                          suppress_health_check=_SLOW_OK, print_blob=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: bounded
settings.register_profile("long", max_examples=600, deadline=None, suppress_health_check=_SLOW_OK, print_blob=True)
settings.load_profile("ci")

#: The store this run uses (``.ci/run`` runs the suite once per store, and the
#: conformance cases once more with sharing turned off).
BACKEND = os.environ.get("SHAREDEXEC_BACKEND") or _store.default_backend()
#: ``writable`` parameters of the tests that force a store to be filled with
#: ``pwrite`` or through its mapping: not the first under POSIX shared memory,
#: where XNU refuses write(2) on a shm object (the POSIX run emulates it).
WRITABLE = [pytest.param(True, id="pwrite", marks=pytest.mark.skipif(
    BACKEND == "posix", reason="XNU refuses write(2) on POSIX shared memory (emulated in this run)")),
    pytest.param(False, id="mapping")]
#: Fixtures that mark a conformance case: the same scenario against the stdlib
#: (or loky) and sharedexec, expecting the same outcome.
CONFORMANCE_FIXTURES = {"executor_cls", "warm_pool", "backend"}


def pytest_collection_modifyitems(config, items):
    """Under ``SHAREDEXEC_BACKEND=posix``, skip the tests of the tmpfs store
    itself (``tmpfs_only``); under ``unshared``, run the conformance cases
    only: every other test checks that something *is* shared."""
    for item in items:
        if BACKEND == "posix" and item.get_closest_marker("tmpfs_only"):
            item.add_marker(pytest.mark.skip(reason="tests the tmpfs store (SHAREDEXEC_DIR); this run uses POSIX shm"))
        if BACKEND == "unshared" and not (
            CONFORMANCE_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("conformance")
        ):
            item.add_marker(pytest.mark.skip(reason="checks sharing; this run has sharing turned off (unshared)"))


@pytest.fixture(params=START_METHODS)
def mp_context(request):
    return multiprocessing.get_context(request.param)


def owned_segments(pid: int | None = None) -> list[str]:
    pid = os.getpid() if pid is None else pid
    return sorted(name for name, owner, _ in _names.list_segments() if owner == pid)


def leaked_segments(timeout: float = 5.0) -> list[str]:
    """Segments of this process that no live publication accounts for, and
    segments of exited processes, after giving reapers ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        registry = _registry.REGISTRY
        registry.collect()
        expected = set(registry._by_name)
        if registry._board is not None:
            expected.add(registry._board.name)
        leaked = [
            (name, what)
            for name, owner, what in _listed()
            if (owner == os.getpid() and name not in expected) or (owner != os.getpid() and not _names.pid_alive(owner))
        ]
        if not leaked or time.monotonic() > deadline:
            return [_describe(name) if what is None else f"{name} ({what})" for name, what in leaked]
        time.sleep(0.1)


def _listed() -> list[tuple[str, int, str | None]]:
    """(name, owner, None) of the segments in the directory, and under the
    POSIX store (name, owner, "lock file") of its lock files: one left behind
    is a leak too."""
    listed = [(name, owner, None) for name, owner, _ in _names.list_segments()]
    if BACKEND == "posix":
        listed += [(name, owner, "lock file") for name, owner, _ in _names.list_segments(_store.lock_dir())]
    return listed


def _describe(name: str) -> str:
    """A leaked segment's name, with who created it and its size, for the report."""
    try:
        with open(os.path.join(_names.shm_dir(), name), "rb") as f:
            header = _segment.HEADER.unpack(f.read(_segment.HEADER.size))
        return f"{name} (created by pid {header[7]}, owner {header[8]}, {header[4]} bytes)"
    except (OSError, ValueError) as exc:
        return f"{name} ({exc})"


@pytest.fixture(scope="module")
def big_frame():
    """A frame above the default min_bytes (1 MiB): shared by default."""
    frame = make_frame(150_000)  # ~4 MB
    assert sharedexec._codec.nbytes(frame) > 1 << 20
    return frame


@pytest.fixture(params=["small-args", "large-frame"])
def frame(request, big_frame):
    """Each conformance case with small arguments only, then with a large frame."""
    return None if request.param == "small-args" else big_frame


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves a segment behind once its objects are gone."""
    yield
    assert leaked_segments() == []


@pytest.fixture(scope="session", autouse=True)
def _session_leak_check():
    yield
    assert leaked_segments() == [], "sx_ segments leaked by the test session"


def write_while_copying(monkeypatch, write, adopt: bool) -> None:
    """Make ``write`` run during the next publication's copy, as another
    thread's would: once the bytes are in the segment (under adoption: once
    the first buffer is, before its block moves)."""
    real = _publication.write

    def writing(layout, new, refs, pid, copied=None):
        if not adopt:
            placed = real(layout, new, refs, pid, copied)
            write()
            return placed

        def copied_then_write(i, view):
            if not done:
                done.append(write())
            copied(i, view)

        done = []
        return real(layout, new, refs, pid, copied_then_write)

    monkeypatch.setattr(_publication, "write", writing)
