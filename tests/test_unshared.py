"""Where memory cannot be shared (Windows, no mechanism, a /dev/shm that
cannot be written, or ``SHAREDEXEC_BACKEND=unshared``): import works, every
entry point runs its tasks by plain pickling as the stdlib would, one
SharedExecWarning says why and what to do, and ``doctor`` says the same.

``.ci/run`` also runs the whole conformance suite (executor, joblib, and the
decorator cases below) with ``SHAREDEXEC_BACKEND=unshared``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import joblib
import pytest

import sharedexec
from sharedexec import _segment, _store, cli

from . import _reliability_scripts as scripts
from . import _sharing_tasks as tasks
from .test_decorator import EXPECTED, POOL_CALLS


@pytest.fixture
def reasons(monkeypatch):
    """``unshared_reason()`` recomputed for the environment a test sets."""
    monkeypatch.setattr(_segment, "_reasons", {})
    return monkeypatch


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"SHAREDEXEC_BACKEND": "unshared"}, "turned off by SHAREDEXEC_BACKEND=unshared. Unset it"),
        ({"SHAREDEXEC_BACKEND": "shm"}, "SHAREDEXEC_BACKEND='shm' is not one of tmpfs, posix, unshared"),
        ({"SHAREDEXEC_BACKEND": "tmpfs", "SHAREDEXEC_DIR": "/nonexistent/sx"}, "/nonexistent/sx does not exist"),
    ],
    ids=["forced", "unknown backend", "missing directory"],
)
def test_the_reason_says_why_and_what_to_do(reasons, env, expected):
    for name, value in env.items():
        reasons.setenv(name, value)
    reason = _segment.unshared_reason()
    assert reason is not None and expected in reason


def test_retiring_under_an_unusable_backend_is_no_error(reasons):
    """A sweep (the collector, exit) that runs while $SHAREDEXEC_BACKEND
    names no usable store goes on: it used to raise UnboundLocalError in the
    collector thread, which then died."""
    reasons.setenv("SHAREDEXEC_BACKEND", "shm")
    assert _segment.retire("sx_1_0123456789abcdef") is False


def test_a_platform_without_a_mechanism_is_unshared(reasons):
    reasons.delenv("SHAREDEXEC_BACKEND", raising=False)
    reasons.setattr(_store, "default_backend", lambda: "unshared")
    assert "neither POSIX shared memory nor a tmpfs directory" in _segment.unshared_reason()
    reasons.setattr(_store, "_posixshmem", None)
    reasons.setenv("SHAREDEXEC_BACKEND", "posix")
    assert "no POSIX shared memory (the _posixshmem module)" in _segment.unshared_reason()


def test_this_machine_shares():
    assert _segment.unshared_reason() is None or os.environ.get("SHAREDEXEC_BACKEND") == "unshared"


def _entry_points(env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict | None]:
    result = subprocess.run(
        scripts.command("entry-points", "fork"), capture_output=True, text=True,
        env=scripts.child_env(**env), timeout=240,
    )
    lines = result.stdout.strip().splitlines()
    return result, json.loads(lines[-1]) if result.returncode == 0 and lines else None


def _one_warning(stderr: str, reason: str) -> None:
    assert stderr.count("SharedExecWarning") == 1, stderr
    assert reason in stderr and "plain pickling" in stderr and "sharedexec doctor" in stderr, stderr


def test_forced_unshared_mode_runs_every_entry_point(tmp_path):
    """The executor, share() through a Pool, the decorator and the joblib
    backend give the right results, nothing is written to shared memory, and
    one warning says why."""
    directory = tmp_path / "shm"
    directory.mkdir()
    result, report = _entry_points({"SHAREDEXEC_BACKEND": "unshared", "SHAREDEXEC_DIR": str(directory)})
    assert result.returncode == 0, result.stderr
    assert report["ok"] and report["segments_in_dir"] == []
    assert os.listdir(directory) == []
    _one_warning(result.stderr, "SHAREDEXEC_BACKEND=unshared")


def test_a_read_only_shm_falls_back(tmp_path):
    """A read-only tmpfs (some sandboxes' /dev/shm): no crash, one warning."""
    mount = tmp_path / "ro"
    mount.mkdir()
    script = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" || exit 77; exec "$@"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(mount), *scripts.command("entry-points", "fork")],
        capture_output=True, text=True, timeout=240,
        env=scripts.child_env(SHAREDEXEC_DIR=str(mount), SHAREDEXEC_BACKEND="tmpfs"),
    )
    if result.returncode == 77 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    _one_warning(result.stderr, f"{mount} cannot be written")


def test_a_lock_directory_another_could_change_falls_back(tmp_path):
    """The POSIX store's lock directory sits at a predictable path in the
    temporary directory; one that another user created there first (in a
    sticky /tmp its victim cannot even remove it) costs the victim sharing,
    not the pool: tasks go by plain pickling, with one warning saying why."""
    squatted = tmp_path / f"sharedexec-{os.geteuid()}"
    squatted.mkdir()
    squatted.chmod(0o777)  # what another user's mkdir in /tmp would let them do
    result, report = _entry_points({"SHAREDEXEC_BACKEND": "posix", "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert report["ok"]
    _one_warning(result.stderr, f"refusing {squatted} for sharedexec's lock files")
    assert os.listdir(squatted) == []


def test_doctor_says_why(reasons, capsys):
    reasons.setenv("SHAREDEXEC_BACKEND", "unshared")
    assert cli.main_doctor([]) == 1
    out = capsys.readouterr().out
    assert "unshared" in out and "turned off by SHAREDEXEC_BACKEND=unshared" in out


def test_import_needs_no_shared_memory():
    """A fresh interpreter imports sharedexec with no usable mechanism at all
    (what Windows looks like to it): no _posixshmem, no directory."""
    code = (
        "import sys, joblib\n"  # joblib needs it on POSIX; not on Windows
        "sys.modules['_posixshmem'] = None\n"
        "import sharedexec, warnings\n"
        "from sharedexec import _segment\n"
        "assert 'no POSIX shared memory' in _segment.unshared_reason(), _segment.unshared_reason()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env=scripts.child_env(SHAREDEXEC_BACKEND="posix"),
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


# -- decorator conformance: the same results with and without sharing --------------------


@pytest.mark.conformance
@pytest.mark.parametrize("call", POOL_CALLS)
def test_decorated_function_through_every_pool_method(mp_context, call):
    df = scripts.make_frame(51, 60_000)
    configs = list(range(6))
    with mp_context.Pool(2) as pool:
        assert POOL_CALLS[call](pool, [(df, c) for c in configs]) == EXPECTED(df, configs)


@pytest.mark.conformance
def test_decorated_function_through_the_stdlib_executor_and_joblib(mp_context):
    df = scripts.make_frame(52, 60_000)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp_context) as ex:
        assert list(ex.map(tasks.shared_len, [(df, c) for c in range(4)])) == EXPECTED(df, range(4))
    assert joblib.Parallel(n_jobs=2)(joblib.delayed(tasks.shared_len)((df, c)) for c in range(4)) == EXPECTED(df, range(4))


@pytest.mark.conformance
def test_share_returns_an_equal_object(mp_context):
    df = scripts.make_frame(53, 60_000)
    shared = sharedexec.share(df)
    assert shared.equals(df)
    with mp_context.Pool(1) as pool:
        assert pool.apply(scripts.frame_checksum, (shared,)) == scripts.frame_sum(53, 60_000)
