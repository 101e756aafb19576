"""Segment names, and finding segments by owner. Standard library only.

Names are ``sx_<owner pid>_<16 random hex digits>``: 28 characters with the
leading slash ``shm_open`` adds, under macOS's limit of 31; the random part is
unguessable, so nobody can pre-create a segment we are about to create; and the
owner pid lets :mod:`sharedexec._reaper` and ``python -m sharedexec cleanup``
find every segment of a process without any registration.

This module imports nothing from the package: the reaper loads it from its file
so that a process that only waits for its parent to die does not import pandas.
"""

from __future__ import annotations

import os
import re
import secrets
import socket

NAME_PREFIX = "sx_"
NAME_RE = re.compile(r"^sx_(\d+)_[0-9a-f]{16}$")
DEFAULT_DIR = "/dev/shm"
DIR_ENV = "SHAREDEXEC_DIR"
HOST = socket.gethostname()


def shm_dir() -> str:
    """The directory segments live in: ``$SHAREDEXEC_DIR`` or ``/dev/shm``."""
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def new_name(owner_pid: int) -> str:
    return f"{NAME_PREFIX}{owner_pid}_{secrets.token_hex(8)}"


def owner_of(name: str) -> int | None:
    """The pid encoded in a sharedexec segment name, or None for other names."""
    match = NAME_RE.match(name)
    return int(match.group(1)) if match else None


def list_segments(directory: str | None = None) -> list[tuple[str, int, int]]:
    """``(name, owner pid, size)`` of every sharedexec segment in ``directory``."""
    directory = directory or shm_dir()
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    for entry in entries:
        owner = owner_of(entry.name)
        if owner is None:
            continue
        try:
            found.append((entry.name, owner, entry.stat().st_size))
        except FileNotFoundError:
            continue
    return found


def remove_owned_by(pid: int, directory: str | None = None) -> list[str]:
    """Unlink every segment named for owner ``pid``; returns their names."""
    directory = directory or shm_dir()
    removed = []
    for name, owner, _ in list_segments(directory):
        if owner == pid:
            unlink_path(os.path.join(directory, name))
            removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True




def unlink_path(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
