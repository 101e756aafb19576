"""Where segments live: a tmpfs directory, or POSIX shared memory. Standard library only.

Two implementations of one small interface -- ``open`` a name (creating it,
or an existing one without following links or blocking), ``owns`` (is what
``fstat`` says about it ours), ``lock`` (the descriptor its holders
``flock``), ``unlink``, ``same`` (is the name still the object opened),
``reserve`` pages, ``free_bytes``, ``list`` and ``remove_owned_by`` -- under
which :mod:`sharedexec._segment` keeps the format, the checks and the
copying, identical for both:

``TmpfsStore`` (Linux, the default there)
    Files in ``/dev/shm`` or ``$SHAREDEXEC_DIR``: regular files that can be
    listed, locked and mapped privately.

``PosixStore`` (macOS, and ``SHAREDEXEC_BACKEND=posix`` anywhere)
    ``shm_open`` / ``shm_unlink`` through CPython's ``_posixshmem`` (what
    ``multiprocessing.shared_memory`` uses), written to macOS's rules *on
    every platform*, so that CI's POSIX run on Linux runs the code a Mac runs
    (``tests/xnu`` emulates XNU there). Each rule is a fact of XNU's
    ``bsd/kern/posix_shm.c`` (apple/darwin-xnu):

    * names of at most 31 bytes with the slash (``PSHMNAMLEN``;
      ``sx_<pid>_<16 hex>`` is 28 at most);
    * ``fstat`` reports the mode ``shm_open`` was given and no file type
      (``pshm_stat``: ``st_mode = pshm_mode``, which ``shm_open`` keeps as
      ``cmode & ALLPERMS``), and a size rounded up to a page
      (``pshm_truncate``: ``round_page_64``): :meth:`PosixStore.owns`
      accepts no type or a regular file, never a FIFO, a directory or a link;
    * ``ftruncate`` works once (``pshm_truncate``: EINVAL once allocated; see
      also osvenskan/posix_ipc#5): ``_segment.create`` calls it once;
    * ``mmap`` is ``MAP_SHARED`` only (``pshm_mmap``: EINVAL otherwise), and
      refuses more than the object's size: copy-on-write tasks get a private
      copy instead (``_segment.attach``);
    * no ``read``/``write``/``pread`` (``pshm_read`` is ENOTSUP): headers are
      read and written through mappings;
    * no ``flock``: it takes a vnode (``flock`` in ``bsd/kern/kern_descrip.c``
      starts with ``fp_getfvp``, ENOTSUP for a shm descriptor). Who maps a
      segment is told by a ``flock`` on a *lock file* of the same name in a
      private per-user directory (:func:`lock_dir`), created before the
      object and removed after it -- which also makes a process's objects
      listable, as nothing lists the shm namespace on macOS;
    * no ``posix_fallocate`` on macOS: capacity is the VM system's. Linux's
      shm objects are files in the /dev/shm tmpfs, where reserving turns
      SIGBUS into ENOSPC (cpython#114390): done where the call exists.
    Only ``O_RDONLY``/``O_RDWR``/``O_CREAT``/``O_EXCL`` are passed to macOS's
    ``shm_open`` (EINVAL otherwise); glibc adds ``O_NOFOLLOW`` itself and
    takes ``O_NONBLOCK``, which keeps a FIFO in /dev/shm from blocking us.

This module imports nothing from the package (but ``_names``): the reaper
loads it from its file, like ``_names``.
"""

from __future__ import annotations

import os
import stat
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
    writable = True  # filled with pwrite (see _segment._fill)
    private_maps = True  # MAP_PRIVATE works: copy-on-write by the kernel

    def __init__(self, directory: str):
        self.directory = directory  # where the segments are, and the capacity is
        self.list_dir = directory  # where a process's segments are listed
        self.where = directory

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def describe(self, name: str) -> str:
        return self.path(name)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        # O_NOFOLLOW: a symlink at the name is refused, never followed;
        # O_NONBLOCK: a FIFO there cannot block the open.
        return os.open(self.path(name), flags | _SAFE, mode)

    def owns(self, st: os.stat_result) -> bool:
        return _names.is_mine(st)

    def lock(self, name: str, fd: int) -> int:
        # The segment's own descriptor carries the flock: a duplicate shares
        # its open file, so the lock lives as long as the duplicate.
        return os.dup(fd)

    def forget(self, name: str) -> None:
        """``name`` is gone (or not ours): nothing of it to drop here."""

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

    def remove_owned_by(self, pid: int) -> list[str]:
        return _names.remove_owned_by(pid, self.directory)


def lock_dir() -> str:
    """This user's directory of POSIX lock files: ``sharedexec-<euid>`` in
    the temporary directory (``$TMPDIR``, per user on macOS). Created (0700)
    and checked by ``_segment`` before a process creates its first object."""
    import tempfile  # here: the reaper is told the directory, and never imports this

    return os.path.join(tempfile.gettempdir(), f"sharedexec-{os.geteuid()}")


class PosixStore:
    kind = "posix"
    exact_size = False  # XNU rounds fstat's size up to a page
    writable = False  # XNU refuses write(2) on a shm object (pshm_write: ENOTSUP): filled through a mapping
    private_maps = False  # XNU maps shm objects MAP_SHARED only
    where = "POSIX shared memory"
    # Linux's shm objects are files in this tmpfs: its free space is theirs.
    _LINUX_DIR = "/dev/shm"

    def __init__(self, locks: str | None = None) -> None:
        linux = sys.platform.startswith("linux")
        self.directory = self._LINUX_DIR if linux else None  # capacity only: never listed
        self.list_dir = locks or lock_dir()
        # macOS's shm_open takes these flags only (EINVAL otherwise); glibc
        # adds O_NOFOLLOW and O_CLOEXEC itself and passes the rest on.
        self._allowed = -1 if linux else (os.O_ACCMODE | os.O_CREAT | os.O_EXCL)

    def describe(self, name: str) -> str:
        return f"POSIX shared memory object /{name}"

    def _lock_path(self, name: str) -> str:
        return os.path.join(self.list_dir, name)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        if flags & os.O_CREAT:
            # The lock file first, the object second (and unlinked in the
            # other order): whoever lists the directory sees every object.
            os.close(os.open(self._lock_path(name), os.O_RDONLY | os.O_CREAT | os.O_EXCL | _SAFE, 0o600))
        try:
            fd = _posixshmem.shm_open("/" + name, (flags | _SAFE) & self._allowed, mode)
        except BaseException:
            if flags & os.O_CREAT:
                self.forget(name)
            raise
        if hasattr(os, "set_inheritable"):
            os.set_inheritable(fd, False)
        return fd

    def owns(self, st: os.stat_result) -> bool:
        # No file type on XNU (see the module docstring); a FIFO, a directory
        # or anything else that says what it is is not an object of ours.
        return stat.S_IFMT(st.st_mode) in (0, stat.S_IFREG) and st.st_uid == os.geteuid()

    def lock(self, name: str, fd: int) -> int:
        """A descriptor of ``name``'s lock file, checked like a segment: a
        regular file of our uid, mode 0600 (FileNotFoundError if it has none;
        PermissionError if it is not ours)."""
        lock = os.open(self._lock_path(name), os.O_RDONLY | _SAFE)
        st = os.fstat(lock)
        if not (_names.is_mine(st) and stat.S_IMODE(st.st_mode) == 0o600):
            os.close(lock)
            raise PermissionError(f"{self._lock_path(name)} is not a lock file of this user")
        return lock

    def lstat(self, name: str) -> os.stat_result | None:
        # What a name holds, to describe it: Linux shows shm objects as files
        # in /dev/shm; macOS has nothing to look at without opening.
        return os.lstat(os.path.join(self.directory, name)) if self.directory else None

    def same(self, name: str, st: os.stat_result) -> bool:
        # Only processes of our uid can unlink our object and reuse its
        # (random) name: nothing to compare with on macOS.
        return True

    def unlink(self, name: str) -> None:
        try:
            _posixshmem.shm_unlink("/" + name)
        finally:
            self.forget(name)

    def forget(self, name: str) -> None:
        """``name`` is gone (or not ours): drop its lock file."""
        _names.unlink_path(self._lock_path(name))

    def reserve(self, fd: int, offset: int, length: int) -> None:
        if hasattr(os, "posix_fallocate"):  # Linux: the tmpfs behind it; macOS: none
            os.posix_fallocate(fd, offset, length)

    def free_bytes(self) -> tuple[int, int] | None:
        if self.directory is not None:
            st = os.statvfs(self.directory)
            return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        return None  # the VM system's: nothing to check up front

    def list(self) -> list[tuple[str, int, int]]:
        """Every object with a lock file (sizes are the lock files': 0)."""
        return _names.list_segments(self.list_dir)

    def remove_if_mine(self, name: str) -> bool:
        """``shm_unlink`` an object if it is ours (:meth:`owns`), then its
        lock file -- unless the object could not be looked at (out of
        descriptors, say): both stay for a later sweep. Never raises."""
        removed = False
        try:
            fd = self.open(name, os.O_RDONLY)
        except (FileNotFoundError, PermissionError):  # gone, or not ours: only the lock file is
            fd = None
        except OSError:
            return False
        if fd is not None:
            try:
                mine = self.owns(os.fstat(fd))
            finally:
                os.close(fd)
            if mine:
                try:
                    _posixshmem.shm_unlink("/" + name)
                    removed = True
                except OSError:
                    pass
        self.forget(name)
        return removed

    def remove_owned_by(self, pid: int) -> list[str]:
        """Remove the objects (and lock files) of ours named for ``pid``: the
        reaper's sweep. Never raises for one entry."""
        removed = []
        for name, _, _ in _names.iter_segments(self.list_dir, mine_only=True, owner=pid):
            try:
                if self.remove_if_mine(name):
                    removed.append(name)
            except OSError:
                continue
        return removed


def default_backend() -> str:
    """The implementation this platform uses when ``SHAREDEXEC_BACKEND`` is unset."""
    if sys.platform.startswith("linux"):
        return "tmpfs"
    if _posixshmem is not None and os.name == "posix":
        return "posix"
    return "unshared"
