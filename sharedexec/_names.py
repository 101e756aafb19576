"""Segment names, and finding segments by owner. Standard library only.

Names are ``sx_<owner pid>_<16 random hex digits>``: 28 characters with the
leading slash ``shm_open`` adds, under macOS's limit of 31; the random part is
unguessable, so nobody can pre-create a segment we are about to create; and the
owner pid lets :mod:`sharedexec._reaper` and ``python -m sharedexec cleanup``
find every segment of a process without any registration.

A name is not proof of ownership: ``/dev/shm`` is one world-writable (sticky)
directory, and anyone may create ``sx_<your pid>_...`` in it. Every sweep here
therefore looks at each entry with ``lstat`` and touches only regular files
owned by this process's effective user (:func:`is_mine`); a foreign entry, or
one that cannot be removed, costs a DEBUG log line and never stops the sweep.

This module imports nothing from the package: the reaper loads it from its file
so that a process that only waits for its parent to die does not import pandas.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterator

NAME_PREFIX = "sx_"
# ASCII digits only (\d also takes other scripts' digits), no leading zero, no
# trailing newline (use fullmatch), and at most 10 digits: a pid is a pid_t.
NAME_RE = re.compile(r"sx_([1-9][0-9]{0,9})_[0-9a-f]{16}", re.ASCII)
MAX_PID = 2**31 - 1
DEFAULT_DIR = "/dev/shm"
DIR_ENV = "SHAREDEXEC_DIR"
HOST = socket.gethostname()

log = logging.getLogger("sharedexec")


def shm_dir() -> str:
    """The directory segments live in: ``$SHAREDEXEC_DIR`` or ``/dev/shm``."""
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def new_name(owner_pid: int) -> str:
    return f"{NAME_PREFIX}{owner_pid}_{secrets.token_hex(8)}"


def owner_of(name: str) -> int | None:
    """The pid encoded in a sharedexec segment name, or None for other names
    (including ones whose "pid" no pid_t can hold)."""
    match = NAME_RE.fullmatch(name)
    pid = int(match.group(1)) if match else None
    return pid if pid is not None and pid <= MAX_PID else None


def is_mine(st: os.stat_result) -> bool:
    """Whether an ``lstat`` result is a regular file of this effective user:
    the only kind of entry a sweep may remove (root included)."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def iter_segments(
    directory: str | None = None, mine_only: bool = False, owner: int | None = None
) -> Iterator[tuple[str, int, int]]:
    """``(name, owner pid, size)`` of every entry named like a sharedexec
    segment in ``directory`` (only :func:`is_mine` ones if ``mine_only``; only
    those named for ``owner`` if given), read lazily. Symlinks are never
    followed, and nothing is opened: a sweep pays one ``lstat`` per entry
    named for its pid, however many files other users put there."""
    directory = directory or shm_dir()
    try:
        entries = os.scandir(directory)
    except OSError as exc:
        log.debug("cannot list %s: %s", directory, exc)
        return
    with entries:
        for entry in entries:
            pid = owner_of(entry.name)
            if pid is None or (owner is not None and pid != owner):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not mine_only or is_mine(st):
                yield entry.name, pid, st.st_size


def list_segments(directory: str | None = None, mine_only: bool = False) -> list[tuple[str, int, int]]:
    """:func:`iter_segments` as a list."""
    return list(iter_segments(directory, mine_only))


def remove_owned_by(pid: int, directory: str | None = None) -> list[str]:
    """Unlink every segment of ours named for owner ``pid``; returns their
    names. Never raises for one entry: see the module docstring."""
    directory = directory or shm_dir()
    removed = []
    for name, _, _ in iter_segments(directory, mine_only=True, owner=pid):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.debug("cannot remove %s: %s", os.path.join(directory, name), exc)
            continue
        removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists. A number no pid_t can hold (from a
    name or a header anyone may write) is not a pid: False, never raised."""
    if pid <= 0:  # kill(0 or -n, 0) would ask about process groups
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def unlink_path(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
