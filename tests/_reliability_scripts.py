"""Child-process programs for the reliability, load and CLI tests.

Some scenarios need a process the test can SIGKILL, a fresh interpreter (the
"shared memory is full" warning is issued once per process), a private mount
namespace with a tiny tmpfs, or a clean stderr to inspect. Each such scenario
is a function here, run in a child interpreter by :func:`command`::

    python -c "from tests import _reliability_scripts as s; s.main()" <scenario> <args...>

with the project root on ``PYTHONPATH``. Running it by ``-c`` rather than as a
file keeps ``__main__`` empty, so the task functions below are pickled by
reference to ``tests._reliability_scripts`` under every start method (spawn
and forkserver workers import it again from ``sys.path``), as in the test
process itself.

A scenario reports to the test through files in a state directory (for
sequencing: "worker <pid> is running a task") and, when it finishes, one JSON
line on stdout. Nothing here sleeps a fixed time to wait for something: it
polls a file or a condition with a deadline.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np
import pandas as pd

import sharedexec

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # holds the `tests` package
MIN_BYTES = 64 << 10  # share anything above 64 KB: small frames keep tests fast


def command(scenario: str, *args: str) -> list[str]:
    """The argv that runs ``scenario`` in a child interpreter."""
    return [sys.executable, "-c", "from tests import _reliability_scripts as s; s.main()", scenario, *map(str, args)]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for :func:`command`: the ``tests`` package importable,
    and warnings shown (a test asserts on stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.pop("PYTHONWARNINGS", None)
    env.update(extra)
    return env


# -- helpers used by the tasks and by the tests ---------------------------------

#: Exit status of the shell in :func:`run_in_private_tmpfs` when it may not mount.
NO_MOUNT = 77


def run_in_private_tmpfs(mountpoint, size: str, argv: list[str], timeout: float):
    """Run ``argv`` with a ``size`` tmpfs mounted at ``mountpoint`` in a private
    mount namespace (root, or CAP_SYS_ADMIN), as ``SHAREDEXEC_DIR``: the mount is
    seen by that process tree only and vanishes with it. Skips the calling test
    where unshare or mount is not permitted."""
    import pytest

    script = f'mount -t tmpfs -o size={size} tmpfs "$0" || exit {NO_MOUNT}; '
    if os.environ.get("SHAREDEXEC_BACKEND") == "posix":
        # POSIX shared memory has no directory of its own: on Linux it lives
        # in /dev/shm, so the small tmpfs goes there too.
        script += f'mount --bind "$0" /dev/shm || exit {NO_MOUNT}; '
    script += 'exec "$@"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(mountpoint), *argv],
        capture_output=True,
        text=True,
        env=child_env(SHAREDEXEC_DIR=str(mountpoint)),
        timeout=timeout,
    )
    if result.returncode == NO_MOUNT or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {result.stderr.strip()}")
    return result


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.01, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def touch(path: str, text: str = "") -> None:
    """Create ``path`` atomically (write then rename): a reader never sees half of it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def segments_of(pid: int, directory: str | None = None) -> list[str]:
    """Names of the sharedexec segments owned by ``pid``."""
    from sharedexec import _names

    return sorted(name for name, owner, _ in _names.list_segments(directory) if owner == pid)


def lease_board() -> set[str]:
    """The name of this process's lease board, if it has one: it lives as
    long as the process."""
    from sharedexec import _registry

    board = _registry.REGISTRY._board
    return {board.name} if board is not None else set()


def own_leaks(timeout: float = 5.0) -> list[str]:
    """Segments of this process that neither a live publication nor the lease
    board accounts for, once released objects are collected (polled up to
    ``timeout`` s). Like conftest's ``leaked_segments``, but blind to other
    processes' leftovers: other test sessions may share this /dev/shm."""
    import gc

    from sharedexec import _registry

    def leaks() -> list[str]:
        gc.collect()
        registry = _registry.REGISTRY
        registry.collect()
        expected = set(registry._by_name) | lease_board()
        return [name for name in segments_of(os.getpid()) if name not in expected]

    try:
        wait_for(lambda: not leaks(), timeout, interval=0.05)
    except TimeoutError:
        pass
    return leaks()


def exited(pid: int) -> bool:
    """True once ``pid`` is gone. A zombie counts as gone: it holds no memory
    and no file, and orphans here may be re-parented to a pid 1 that does
    not reap them."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_all(pids: list[int]) -> None:
    """SIGKILL what is left of ``pids`` (a failed test must not leave processes)."""
    import signal

    for pid in pids:
        if not exited(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


#: What loky and joblib name after the process that made it: named semaphores
#: (``sem.loky-<pid>-<random>``; multiprocessing's own ``sem.mp-<random>``
#: carry no pid) and joblib's memmapping folders.
_LIBRARY_FILE_RE = re.compile(r"(?:sem\.loky-|joblib_memmapping_folder_)([0-9]+)[-_]")


def library_files_of(pids: list[int]) -> list[str]:
    """Paths of the semaphores and joblib folders that ``pids`` created, in
    /dev/shm or the temporary directory (where joblib goes when /dev/shm is
    small). Their resource trackers remove them once every process that
    uses them has exited."""
    import tempfile

    wanted = set(map(str, pids))
    found = []
    for directory in sorted({"/dev/shm", tempfile.gettempdir()}):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        found += [os.path.join(directory, n) for n in names if (m := _LIBRARY_FILE_RE.match(n)) and m.group(1) in wanted]
    return sorted(found)


def remove_library_files(pids: list[int]) -> None:
    """Remove this user's :func:`library_files_of` ``pids``: what their
    trackers would have, had a failed test not killed them."""
    import shutil
    import stat

    for path in library_files_of(pids):
        try:
            st = os.lstat(path)
            if st.st_uid != os.geteuid():
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError:
            continue


def reaper_of(pid: int) -> int | None:
    """The pid of the reaper that watches process ``pid``, if it runs."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) >= 2 and cmd[-2].endswith("_reaper.py") and cmd[-1] == str(pid):
            return proc.pid
    return None


def make_frame(seed: int, rows: int = 100_000) -> pd.DataFrame:
    """A frame of ~2.5 MB per 100k rows with float, int and string columns;
    ``frame_sum(seed, rows)`` is what :func:`checksum` returns for it."""
    return pd.DataFrame(
        {
            "x": np.arange(rows, dtype=np.float64) + seed,
            "i": np.arange(rows, dtype=np.int64) * seed,
            "s": pd.Series([f"s{seed}"] * rows, dtype="str"),
        }
    )


def frame_sum(seed: int, rows: int = 100_000) -> float:
    return float(rows * (rows - 1) / 2 + seed * rows)


def checksum(df: pd.DataFrame) -> float:
    assert (df["s"] == df["s"].iloc[0]).all()
    return float(df["x"].sum())


# -- task functions (module level: importable by every start method) -----------


def hold(df: pd.DataFrame, statedir: str, gate: str = "", timeout: float = 120.0) -> float:
    """Tell the test "worker <pid> runs a task", then wait for the ``gate``
    file (or ``timeout`` seconds, so that a stray worker ends eventually)."""
    touch(os.path.join(statedir, f"worker-{os.getpid()}"))
    deadline = time.monotonic() + timeout
    while not (gate and os.path.exists(gate)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return checksum(df)


@sharedexec.shared(min_bytes=MIN_BYTES)
def shared_hold(args: tuple) -> float:
    return hold(*args)


def frame_checksum(df: pd.DataFrame, *rest: Any) -> float:
    return checksum(df)


@sharedexec.shared(min_bytes=MIN_BYTES)
def shared_checksum(args: tuple) -> float:
    return checksum(args[0])


def make_result(seed: int, rows: int) -> pd.DataFrame:
    return make_frame(seed, rows)


def block(statedir: str, gate: str, timeout: float = 120.0) -> int:
    """Keep a worker busy until the ``gate`` file appears; returns its pid."""
    touch(os.path.join(statedir, f"worker-{os.getpid()}"))
    wait_for(lambda: os.path.exists(gate), timeout, what=f"gate {gate}")
    return os.getpid()


@sharedexec.shared(min_bytes=MIN_BYTES)
def shared_block(args: tuple) -> int:
    return block(*args)


def kill_self_if(df: pd.DataFrame, die: bool) -> float:
    """SIGKILL the worker running this task (mid-task) when ``die``."""
    if die:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    return checksum(df)


def pick(df: pd.DataFrame, k: int) -> tuple[float, str, int]:
    """A tiny task: one value of the frame, its tag, and ``k`` back."""
    return float(df["x"].iat[k % len(df)]), df["s"].iat[0], k


def expected_pick(seed: int, rows: int, k: int) -> tuple[float, str, int]:
    return float(k % rows + seed), f"s{seed}", k


def cache_entries() -> tuple[int, int]:
    """(this worker's pid, how many objects its cache holds)."""
    from sharedexec import _cache

    return os.getpid(), len(_cache.CACHE)


def load_handle(payload: bytes) -> tuple[str, str]:
    """Unpickle ``payload`` (a crafted handle) in a worker; what it raised."""
    import pickle

    try:
        obj = pickle.loads(payload)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "no error", repr(type(obj))


class Recorder:
    """Pickles normally, recording first which segments ``owner`` has (name
    and mode) in ``path``. Placed after a large frame in a task's arguments or
    result, it proves that the frame's segment existed when the pickling
    failed further on (at the lock that follows it)."""

    def __init__(self, owner: int, path: str, die: bool = False):
        self.owner, self.path, self.die = owner, path, die

    def __reduce__(self):
        from sharedexec import _names

        directory = _names.shm_dir()
        found = []
        for name in segments_of(self.owner, directory):
            try:
                found.append((name, os.stat(os.path.join(directory, name)).st_mode & 0o777))
            except FileNotFoundError:
                continue
        touch(self.path, json.dumps(found))
        if self.die:  # SIGKILLed in the middle of sending a result
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return Recorder, (self.owner, self.path)


def result_then_lock(owner: int, path: str, rows: int) -> tuple:
    """A result that cannot be pickled, after a large frame that is shared."""
    import threading

    return make_frame(9, rows), Recorder(owner, path), threading.Lock()


def result_then_die(owner: int, path: str, rows: int) -> tuple:
    """A result whose sending kills the worker, after a large frame in it was
    written to a segment for ``owner``."""
    return make_frame(9, rows), Recorder(owner, path, die=True)


@sharedexec.shared(min_bytes=MIN_BYTES)
def shared_result_then_lock(args: tuple) -> tuple:
    return result_then_lock(*args)


# -- scenarios -----------------------------------------------------------------


def scenario_parent_kill(api: str, method: str, statedir: str, workers: str = "2") -> None:
    """Start ``workers`` workers, each holding a task on a shared frame, then
    wait: the test SIGKILLs this process and checks what is left."""
    n = int(workers)
    df = make_frame(1, 200_000)
    args = [(df, statedir)] * (2 * n)
    ctx = multiprocessing.get_context(method) if method != "loky" else None
    if api in ("executor", "executor-adopt"):  # (adopt: the frame's memory is the segment itself)
        with sharedexec.ProcessPoolExecutor(n, mp_context=ctx, min_bytes=MIN_BYTES, adopt=api == "executor-adopt") as ex:
            futures = [ex.submit(hold, *a) for a in args]
            [f.result() for f in futures]
    elif api == "pool":
        with ctx.Pool(n) as pool:
            pool.map(shared_hold, args, chunksize=1)
    elif api == "joblib":
        import joblib

        backend = sharedexec.JoblibBackend(min_bytes=MIN_BYTES)
        with joblib.parallel_config(backend=backend, n_jobs=n):
            joblib.Parallel(batch_size=1)(joblib.delayed(hold)(*a) for a in args)
    else:
        raise SystemExit(f"unknown api {api!r}")


def _outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    """What ``fn()`` returned or raised, as JSON for the test to judge."""
    try:
        value = fn()
    except Exception as exc:
        return {"raised": type(exc).__name__, "oserror": isinstance(exc, OSError), "message": str(exc)}
    return {"raised": None, "value": repr(value)}


def scenario_shm_full(directory: str) -> None:
    """Run with SHAREDEXEC_DIR=directory, a 16 MB tmpfs: frames too big for
    it fall back to pickling with one warning, or raise with
    on_full="raise"; what fits is still shared; no SIGBUS anywhere (the test
    checks the exit status). Prints a JSON report."""
    import gc

    from sharedexec import _segment

    report: dict[str, Any] = {"dir": directory, "total": _segment.free_bytes(directory)[1]}
    rows = 1_000_000  # ~25 MB: cannot fit
    big = [make_frame(seed, rows) for seed in (1, 2)]
    small = make_frame(3, 100_000)  # ~2.5 MB: fits
    expected = [frame_sum(1, rows), frame_sum(2, rows)]
    ctx = multiprocessing.get_context("fork")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sharedexec.ProcessPoolExecutor(2, mp_context=ctx, min_bytes=MIN_BYTES) as ex:
            # Several tasks and frames that do not fit: still one warning.
            futures = [ex.submit(frame_checksum, big[i % 2]) for i in range(3)]
            report["fallback_results"] = [f.result(timeout=120) for f in futures]
            report["fallback_expected"] = [expected[i % 2] for i in range(3)]
            report["bytes_pickled"] = sharedexec.stats()["bytes_pickled"]
            before = sharedexec.stats()["publications"]
            report["small_result"] = ex.submit(frame_checksum, small).result(timeout=120)
            report["small_expected"] = frame_sum(3, 100_000)
            report["small_published"] = sharedexec.stats()["publications"] - before
            # A large result the worker cannot put in shared memory comes back pickled.
            result = ex.submit(make_result, 4, rows).result(timeout=120)
            report["big_result_ok"] = checksum(result) == frame_sum(4, rows)
            del result
        with sharedexec.ProcessPoolExecutor(2, mp_context=ctx, min_bytes=MIN_BYTES, on_full="raise") as ex:
            report["raise"] = _outcome(lambda: ex.submit(frame_checksum, big[0]).result(timeout=120))
            report["after_raise"] = ex.submit(frame_checksum, small).result(timeout=120)

        # Through an unchanged Pool, and joblib.
        with ctx.Pool(2) as pool:
            report["pool_results"] = pool.map(shared_checksum, [(big[0],), (big[1],)])
        import joblib

        with joblib.parallel_config(backend=sharedexec.JoblibBackend(min_bytes=MIN_BYTES), n_jobs=2):
            report["joblib_results"] = joblib.Parallel()(joblib.delayed(frame_checksum)(b) for b in big)
        report["expected"] = expected

        # The free-space check can be wrong (another process fills the tmpfs
        # between the check and the allocation): the write (pwrite, or
        # posix_fallocate before writing through a mapping) must still turn
        # that into an error, never a SIGBUS at the first write.
        real_free = _segment.free_bytes
        _segment.free_bytes = lambda d=None: (1 << 40, 1 << 40)
        try:
            report["fallocate"] = _outcome(lambda: sharedexec.share(big[0]))
        finally:
            _segment.free_bytes = real_free
    report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, sharedexec.SharedExecWarning)]
    report["other_warnings"] = [
        f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, sharedexec.SharedExecWarning)
    ]

    # Everything released but the lease board; workers left nothing.
    del big, small
    gc.collect()
    own = f"sx_{os.getpid()}_"

    def settled():
        sharedexec.stats()
        left = [n for n in os.listdir(directory) if n.startswith("sx_")]
        return left if len([n for n in left if n.startswith(own)]) <= 1 and len(left) <= 1 else None

    try:
        report["left"] = wait_for(settled, 10, what="segments released")
    except TimeoutError:
        # sx_ only: under SHAREDEXEC_BACKEND=posix the directory is /dev/shm, with loky's sem.* in it
        report["left"] = sorted(n for n in os.listdir(directory) if n.startswith("sx_"))
    print(json.dumps(report))


def scenario_entry_points(method: str) -> None:
    """A normal run of the three entry points (and share()), checking every
    result; the test asserts that stderr stays empty and nothing is left."""
    import joblib

    from sharedexec import _names

    directory = _names.shm_dir()
    ctx = multiprocessing.get_context(method)
    rows = 100_000  # ~2.7 MB: above joblib's and sharedexec's 1 MiB default
    frames = [make_frame(seed, rows) for seed in (1, 2)]
    expected = [frame_sum(seed, rows) for seed in (1, 2)]
    with sharedexec.ProcessPoolExecutor(2, mp_context=ctx, min_bytes=MIN_BYTES) as ex:
        got = list(ex.map(frame_checksum, frames * 3))
        assert got == expected * 3, got
        in_dir = segments_of(os.getpid(), directory)  # the frames, the lease board
        big = ex.submit(make_result, 5, rows).result()  # a large result comes back shared
        assert checksum(big) == frame_sum(5, rows)
    shared = sharedexec.share(frames[0])
    with ctx.Pool(2) as pool:
        got = pool.map(shared_checksum, [(f,) for f in frames * 3])
        assert got == expected * 3, got
        got = list(pool.imap(shared_checksum, [(f,) for f in frames]))
        assert got == expected, got
        assert pool.apply(frame_checksum, (shared,)) == expected[0]  # share(): any function
    with joblib.parallel_config(backend="sharedexec", n_jobs=2):
        got = joblib.Parallel()(joblib.delayed(frame_checksum)(f) for f in frames * 3)
        assert got == expected * 3, got
    print(json.dumps({"pid": os.getpid(), "dir": directory, "segments_in_dir": in_dir, "ok": True}))


def scenario_publish_and_wait(statedir: str, timeout: str = "120") -> None:
    """Publish a frame, say so (``ready`` holds the segment names), and wait
    to be killed (or ``timeout`` seconds)."""
    from sharedexec import _names

    shared = sharedexec.share(make_frame(1, 100_000))
    touch(os.path.join(statedir, "ready"), json.dumps(segments_of(os.getpid(), _names.shm_dir())))
    deadline = time.monotonic() + float(timeout)
    while time.monotonic() < deadline:
        time.sleep(0.05)
    del shared


SCENARIOS = {
    "publish-and-wait": scenario_publish_and_wait,
    "parent-kill": scenario_parent_kill,
    "shm-full": scenario_shm_full,
    "entry-points": scenario_entry_points,
}


def main() -> None:
    scenario, *args = sys.argv[1:]
    SCENARIOS[scenario](*args)

