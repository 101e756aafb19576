"""Where segments live: a tmpfs directory, or POSIX shared memory. Standard library only.

Two implementations of one small interface -- ``open`` a name (creating it,
or an existing one without following links or blocking), ``unlink`` it, tell
whether a name is still the object opened (``same``), ``reserve`` pages,
``free_bytes`` -- under which :mod:`sharedexec._segment` keeps the format,
the checks and the copying, identical for both:

``TmpfsStore`` (Linux, the default there)
    Files in ``/dev/shm`` or ``$SHAREDEXEC_DIR``, which can be listed: the
    reaper and ``cleanup`` find a process's segments by their names.

``PosixStore`` (macOS, and ``SHAREDEXEC_BACKEND=posix`` anywhere)
    ``shm_open`` / ``shm_unlink`` through CPython's ``_posixshmem`` (what
    ``multiprocessing.shared_memory`` uses), written to macOS's rules: names
    of at most 31 bytes with the slash (``sx_<pid>_<16 hex>`` is 28 at most),
    no namespace to list (every name a process creates is announced to its
    reaper, see :mod:`sharedexec._reaper`), the size set once by
    ``ftruncate``, and a size seen by ``fstat`` that may be rounded up to a
    page. Only ``O_RDONLY``/``O_RDWR``/``O_CREAT``/``O_EXCL`` are passed to
    ``shm_open`` there; the object namespace holds no symlinks or FIFOs.
    ``posix_fallocate`` is used where the OS has it (Linux's shm objects live
    in the /dev/shm tmpfs, where reserving turns SIGBUS into ENOSPC); macOS
    has none, and its capacity is the VM system's.

This module imports nothing from the package (but ``_names``): the reaper
loads it from its file, like ``_names``.
"""

from __future__ import annotations

import os
import sys

try:
    from . import _names
except ImportError:  # loaded by the reaper as a top-level module
    import _names  # type: ignore[no-redef]

try:
    import _posixshmem
except ImportError:  # Windows, or a Python built without it
    _posixshmem = None

BACKEND_ENV = "SHAREDEXEC_BACKEND"
BACKENDS = ("tmpfs", "posix", "unshared")

_SAFE = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


class TmpfsStore:
    kind = "tmpfs"
    exact_size = True  # fstat gives the size ftruncate set
    listable = True
    writable = True  # filled with pwrite (see _segment._fill)

    def __init__(self, directory: str):
        self.directory = directory
        self.where = directory

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def describe(self, name: str) -> str:
        return self.path(name)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        # O_NOFOLLOW: a symlink at the name is refused, never followed;
        # O_NONBLOCK: a FIFO there cannot block the open.
        return os.open(self.path(name), flags | _SAFE, mode)

    def lstat(self, name: str) -> os.stat_result | None:
        return os.lstat(self.path(name))

    def same(self, name: str, st: os.stat_result) -> bool:
        now = os.lstat(self.path(name))
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    def unlink(self, name: str) -> None:
        os.unlink(self.path(name))

    def reserve(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)

    def free_bytes(self) -> tuple[int, int] | None:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def list(self) -> list[tuple[str, int, int]]:
        return _names.list_segments(self.directory)


class PosixStore:
    kind = "posix"
    exact_size = False  # macOS rounds fstat's size up to a page
    listable = sys.platform.startswith("linux")  # Linux shows them in /dev/shm; macOS shows nothing
    writable = listable  # Linux: tmpfs files; macOS refuses write(2) on a shm object
    where = "POSIX shared memory"
    # Linux's shm objects are files in this tmpfs: its free space is theirs.
    _LINUX_DIR = "/dev/shm"

    def __init__(self) -> None:
        self.directory = self._LINUX_DIR if self.listable else None
        # macOS's shm_open takes these flags only (EINVAL otherwise); glibc
        # adds O_NOFOLLOW and O_CLOEXEC itself and passes the rest on.
        self._allowed = -1 if self.listable else (os.O_ACCMODE | os.O_CREAT | os.O_EXCL)

    def describe(self, name: str) -> str:
        return f"POSIX shared memory object /{name}"

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        fd = _posixshmem.shm_open("/" + name, (flags | _SAFE) & self._allowed, mode)
        if hasattr(os, "set_inheritable"):
            os.set_inheritable(fd, False)
        return fd

    def lstat(self, name: str) -> os.stat_result | None:
        if self.listable:
            return os.lstat(os.path.join(self._LINUX_DIR, name))
        return None  # no namespace to look at without opening

    def same(self, name: str, st: os.stat_result) -> bool:
        # Only processes of our uid can unlink our object and reuse its
        # (random) name: nothing to compare with on macOS.
        return True

    def unlink(self, name: str) -> None:
        _posixshmem.shm_unlink("/" + name)

    def reserve(self, fd: int, offset: int, length: int) -> None:
        if hasattr(os, "posix_fallocate"):  # Linux: the tmpfs behind it; macOS: none
            os.posix_fallocate(fd, offset, length)

    def free_bytes(self) -> tuple[int, int] | None:
        if self.listable:
            st = os.statvfs(self._LINUX_DIR)
            return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        return None  # the VM system's: nothing to check up front

    def list(self) -> list[tuple[str, int, int]]:
        return _names.list_segments(self._LINUX_DIR) if self.listable else []


def posix_exists(name: str) -> bool:
    try:
        os.close(PosixStore().open(name, os.O_RDONLY))
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True


def remove_posix_if_mine(name: str) -> bool:
    """``shm_unlink`` a POSIX object if it is a regular object of our uid
    (the reaper's sweep); never raises."""
    try:
        fd = PosixStore().open(name, os.O_RDONLY)
    except OSError:
        return False
    try:
        mine = _names.is_mine(os.fstat(fd))
    finally:
        os.close(fd)
    if mine:
        try:
            _posixshmem.shm_unlink("/" + name)
            return True
        except OSError:
            pass
    return False


def default_backend() -> str:
    """The implementation this platform uses when ``SHAREDEXEC_BACKEND`` is unset."""
    if sys.platform.startswith("linux"):
        return "tmpfs"
    if _posixshmem is not None and os.name == "posix":
        return "posix"
    return "unshared"
