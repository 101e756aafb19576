"""The reaper: a tiny process that unlinks a process's segments when it dies.

Why not the stdlib resource tracker? One tracker serves a whole process tree
(every pool worker holds its pipe), so it cleans up only when the *last* worker
has exited -- and stdlib pool workers never notice that their parent was
SIGKILLed: they block on the call queue forever, and the segments with them
(design brief, trap 11). It also cannot delete file-backed segments, and
attaching processes must not talk to it at all (gh-82300).

The reaper is one child per publishing process, started at the first segment
it owns. It holds the only read end of a pipe whose only write end stays in
that process: forked children close their copy (``register_at_fork``), spawned
ones never inherit it. When the process exits -- normally, by exception or by
SIGKILL -- the reaper reads EOF and unlinks every segment whose name carries
that pid, in each store it was told about: a tmpfs directory, or a POSIX
store's lock directory, whose lock files name its objects (nothing lists the
shm namespace on macOS, see :mod:`sharedexec._store`) -- only those of its
own uid (a file another user made under such a name is left alone and does
not stop the sweep, see :mod:`sharedexec._names`). That includes results that
workers created on the process's behalf, since those are named for their
owner too. It sweeps again a few seconds later, for a result a worker was still
writing when the owner died (workers exit within a fraction of a second of
their parent's death, see ``_worker.watch_parent``).

Run as a script, not as ``-m sharedexec._reaper``, so that the process that
only waits imports neither the package nor pandas.
"""

from __future__ import annotations

import os
import sys
import threading

_SWEEP_DELAYS = (0.0, 1.0, 3.0)

_lock = threading.Lock()
_pipe_w: int | None = None
_reaper_pid: int | None = None
_told: set[str] = set()  # lines that name a store: "d<tmpfs dir>", "p<POSIX lock dir>"


def _send(lines: list[str]) -> None:
    os.write(_pipe_w, "".join(line + "\n" for line in lines).encode())


def _ensure() -> None:
    """A live reaper (a replaced one is told everything again). Call with
    ``_lock`` held."""
    global _pipe_w, _reaper_pid
    if _pipe_w is not None and not _alive(_reaper_pid):
        os.close(_pipe_w)
        _pipe_w = None
    if _pipe_w is None:
        _pipe_w, _reaper_pid = _spawn()
        _send(sorted(_told))


def watch(kind: str, directory: str) -> None:
    """Make sure this process has a live reaper, that will clean the store
    of this ``kind`` listed in ``directory`` (a tmpfs store's directory, a
    POSIX store's lock directory).

    Called before every publication, so a reaper that was killed (say by a
    ``pkill -f python``) is replaced before the next segment is created."""
    line = ("p" if kind == "posix" else "d") + directory
    with _lock:
        _ensure()
        if line not in _told:
            _told.add(line)
            _send([line])


def watching() -> bool:
    """Whether this process started a reaper (so it may own segments)."""
    return _pipe_w is not None


def _alive(pid: int | None) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # our child: a dead one is a zombie
        return finished == 0
    except ChildProcessError:  # reaped by someone else's waitpid(-1)
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _spawn() -> tuple[int, int]:
    read_end, write_end = os.pipe()  # both non-inheritable (PEP 446)
    devnull = os.devnull
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid())],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 3),
                (os.POSIX_SPAWN_OPEN, 0, devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, devnull, os.O_WRONLY, 0),
            ],
            # Its own session: a Ctrl-C or a signal sent to our process group
            # must not kill the reaper before it has cleaned up after us.
            setsid=True,
        )
    finally:
        os.close(read_end)
    return write_end, pid


def _forget_in_child() -> None:
    # A forked child must not keep the pipe open: the reaper would then wait
    # for the child's death too. The child gets its own reaper if it publishes.
    global _pipe_w, _reaper_pid, _lock
    if _pipe_w is not None:
        os.close(_pipe_w)
    _pipe_w, _reaper_pid, _lock = None, None, threading.Lock()
    _told.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_in_child)


def _main(owner_pid: int) -> None:
    import signal
    import time

    from _store import PosixStore, TmpfsStore

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stores = {}
    pending = b""
    while True:
        chunk = os.read(3, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in (raw.decode() for raw in lines if raw):
            stores[line] = PosixStore(line[1:]) if line[0] == "p" else TmpfsStore(line[1:])
    start = time.monotonic()
    for delay in _SWEEP_DELAYS:
        time.sleep(max(0.0, start + delay - time.monotonic()))
        for store in stores.values():
            try:
                store.remove_owned_by(owner_pid)  # skips what is not ours, entry by entry
            except Exception:  # noqa: BLE001 - the other stores and sweeps must still run
                pass


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _main(int(sys.argv[1]))
