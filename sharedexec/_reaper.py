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
that pid, in each directory it was told about -- only regular files of its
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

# Results written for another process are pruned from the announced names
# (those their owner has claimed, i.e. unlinked) once there are this many.
_PRUNE_AT = 1024

_lock = threading.Lock()
_pipe_w: int | None = None
_reaper_pid: int | None = None
_told_dirs: set[str] = set()
_own_names: set[str] = set()  # POSIX objects of ours
_names_for: dict[str, int] = {}  # POSIX objects written for another owner (results)


def _send(lines: list[str]) -> None:
    os.write(_pipe_w, "".join(line + "\n" for line in lines).encode())


def _ensure() -> bool:
    """A live reaper (a replaced one is told everything again); whether it
    is new. Call with ``_lock`` held."""
    global _pipe_w, _reaper_pid
    if _pipe_w is not None and not _alive(_reaper_pid):
        os.close(_pipe_w)
        _pipe_w = None
    if _pipe_w is not None:
        return False
    _pipe_w, _reaper_pid = _spawn()
    _send([f"d{d}" for d in sorted(_told_dirs)] + [f"+{n}" for n in sorted(_own_names)]
          + [f"r{owner} {n}" for n, owner in sorted(_names_for.items())])
    return True


def watch(directory: str | None = None) -> None:
    """Make sure this process has a live reaper, that will clean
    ``directory`` (a tmpfs store's) if given.

    Called before every publication, so a reaper that was killed (say by a
    ``pkill -f python``) is replaced before the next segment is created."""
    with _lock:
        _ensure()
        if directory is not None and directory not in _told_dirs:
            _told_dirs.add(directory)
            _send([f"d{directory}"])


def announce(name: str, owner_pid: int) -> None:
    """A POSIX object is about to be created under ``name``: nothing can list
    them on macOS, so the reaper is told each name. Ours is unlinked when we
    die; a result written for ``owner_pid`` once both of us are dead (until
    then the owner may still claim it)."""
    with _lock:
        _ensure()
        if owner_pid == os.getpid():
            _own_names.add(name)
            _send([f"+{name}"])
            return
        if len(_names_for) >= _PRUNE_AT:
            _prune_claimed()
        _names_for[name] = owner_pid
        _send([f"r{owner_pid} {name}"])


def forget(name: str) -> None:
    """``name`` was unlinked (by us): the reaper may forget it."""
    with _lock:
        if name in _own_names or name in _names_for:
            _own_names.discard(name)
            _names_for.pop(name, None)
            if _pipe_w is not None:
                _send([f"-{name}"])


def _prune_claimed() -> None:
    from ._store import posix_exists

    gone = [name for name in _names_for if not posix_exists(name)]
    for name in gone:
        del _names_for[name]
    if gone:
        _send([f"-{name}" for name in gone])


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
    _told_dirs.clear()
    _own_names.clear()
    _names_for.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_in_child)


def _main(owner_pid: int) -> None:
    import signal
    import time

    from _names import pid_alive, remove_owned_by
    from _store import posix_exists, remove_posix_if_mine

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    directories: set[str] = set()
    own: set[str] = set()
    results: dict[str, int] = {}
    pending = b""
    while True:
        chunk = os.read(3, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in (raw.decode() for raw in lines if raw):
            kind, rest = line[0], line[1:]
            if kind == "d":
                directories.add(rest)
            elif kind == "+":
                own.add(rest)
            elif kind == "-":
                own.discard(rest)
                results.pop(rest, None)
            elif kind == "r":
                owner, name = rest.split(" ", 1)
                results[name] = int(owner)
    start = time.monotonic()
    for delay in _SWEEP_DELAYS:
        time.sleep(max(0.0, start + delay - time.monotonic()))
        for directory in directories:
            try:
                remove_owned_by(owner_pid, directory)  # skips what is not ours, entry by entry
            except Exception:  # noqa: BLE001 - the other directories and sweeps must still run
                pass
        for name in own:  # POSIX objects: every name was announced
            remove_posix_if_mine(name)
        own.clear()
    # Results written for another process: it may claim them while it lives.
    while results:
        for name, owner in list(results.items()):
            if not posix_exists(name):  # claimed
                del results[name]
            elif not pid_alive(owner):
                remove_posix_if_mine(name)
                del results[name]
        time.sleep(0.5)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _main(int(sys.argv[1]))
