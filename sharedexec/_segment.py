"""Shared-memory segments: create, attach, retire (and unlink), copy into.

This module and :mod:`sharedexec._store` are the only ones that talk to the
operating system about shared memory: the store names, opens, reserves and
removes (a tmpfs directory on Linux, POSIX ``shm_open`` on macOS or with
``SHAREDEXEC_BACKEND=posix``, nothing at all where sharing is unavailable:
:func:`unshared_reason`); this module keeps the format, the checks and the
copying, the same for every store. On Linux a segment is a file in a tmpfs
directory -- ``/dev/shm`` (what ``shm_open`` uses on Linux) or the directory
named by ``SHAREDEXEC_DIR`` -- mapped with ``mmap``. Using the directory
directly, rather than
``multiprocessing.shared_memory.SharedMemory``, gives us four things the stdlib
class does not:

* no resource-tracker registration at all (gh-82300: an attaching process that
  registers or unregisters corrupts the creator's entry, and on 3.11/3.12 there
  is no ``track=False``). Crash cleanup is done by :mod:`sharedexec._reaper`,
  which knows every segment of an owner by its name;
* exact byte sizes and a 0600, ``O_EXCL`` creation with an unguessable name;
* writes that a too small tmpfs refuses with ENOSPC instead of SIGBUS at the
  first touched page (cpython#114390): ``pwrite``, or ``posix_fallocate``
  before the first write through a mapping;
* the same code for ``/dev/shm`` and for file-backed segments on disk.

Layout of a segment::

    0         64                                    layout_offset
    | header | buffer | pad | buffer | pad | ... | layout (pickle) |

The header (64 bytes, little-endian) holds a magic, a version, a ``state`` the
owner sets to RETIRED before unlinking (attached workers read it to drop their
cache entry), the total size, where the layout lies, the creator and owner
pids, and a 16-byte *tag* (see Security). Buffers start on 64-byte boundaries.

Who maps a segment is the kernel's to say (design brief, trap 17): every
process that attaches one holds a shared ``flock`` on it (on the descriptor
the store's ``lock`` gives: the tmpfs file itself, or the POSIX object's lock
file, since XNU cannot flock a shm object) for as long as its mapping lives
-- one lock per segment and process, dropped with the last mapping, or by
the kernel when the process dies, however it dies -- and the owner asks with
a non-blocking exclusive ``flock`` (:func:`in_use`). No bookkeeping that a
crash could leave wrong; what cannot be told counts as "in use".

Names, and finding segments by owner, are in :mod:`sharedexec._names`.

Security
--------
Threat: other local users. ``/dev/shm`` is one world-writable (sticky)
directory whose names anyone can list, and a segment's layout is a pickle.
Whoever gets a file of theirs attached in place of ours -- by recreating the
name of a segment that was just unlinked, say after its publisher died --
would choose what we unpickle, i.e. run code as us. So a segment is used only
if it is provably ours:

* ``attach`` opens with ``O_NOFOLLOW | O_NONBLOCK`` (no symlink is followed,
  a FIFO cannot block us), then checks the *descriptor* (``fstat``, no race
  with the name): owned by our effective uid, mode 0600, the size its header
  claims, and a regular file wherever the kernel reports a type (XNU's shm
  objects report none: the store's ``owns``). Anything else is :class:`SegmentNotOursError`,
  naming the file, its owner and what was expected.
* Its header and layout must carry a valid tag: HMAC-SHA256 (truncated to 16
  bytes) under the creating process's 16-byte key, over the segment's name,
  its header (but the state) and its layout. The key never touches the file
  system: it travels inside the handle, through the pool's own pipe. A tag
  that does not verify is :class:`SegmentCorruptError`, raised before a byte
  of the layout is unpickled. It is checked once per attach (a worker's cache
  attaches a segment once), over the layout only -- the buffers are plain
  numbers, never unpickled -- so it costs microseconds, not a pass over data.
* ``retire``, ``creator_of`` and every sweep (:mod:`sharedexec._names`) touch
  only segments of our uid (``owns``), and never stop at one bad entry; a sweep
  pays one ``lstat`` for another user's file (never an open, never a user-name
  lookup), so thousands of them cannot make a shutdown slow.
* ``create`` refuses a directory in which another user could rename our
  segments, or a symlink to it that another user could re-point (see
  ``unsafe_dir_reason``), and reports ENOSPC/EDQUOT -- no inode left
  counts -- as :class:`SharedMemoryFullError`, which the caller falls back on.

Not protected: processes of the same user (they can read our memory and our
pipes anyway), root, and a parent of ``SHAREDEXEC_DIR`` that other users can
rename.
Buffers are not authenticated: only our uid can write them.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import itertools
import logging
import mmap
import os
import secrets
import stat
import struct
import sys
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no segments there at all (the unshared fallback)
    fcntl = None

from . import _names, _reaper, _store
from ._names import DIR_ENV, new_name, owner_of, shm_dir
from ._errors import (
    SegmentCorruptError,
    SegmentNotFoundError,
    SegmentNotOursError,
    SharedMemoryError,
    SharedMemoryFullError,
)

log = logging.getLogger("sharedexec")

ALIGN = 64
MAGIC = b"SHAREDX\0"
VERSION = 2  # 2: the tag
STATE_LIVE = 0
STATE_RETIRED = 1
STATE_WRITING = 2  # its creator has not finished filling it (see create)

# magic, version, flags, state, total size, layout offset, layout size,
# creator pid, owner pid, tag
HEADER = struct.Struct("<8sHHIQQQII16s")
STATE_OFFSET = 12
TAG_OFFSET = 48
KEY_BYTES = 16
assert HEADER.size == ALIGN and struct.calcsize("<8sHHIQQQII") == TAG_OFFSET

_key: bytes | None = None


def process_key() -> bytes:
    """This process's secret: the key of every segment it creates. It leaves
    the process only inside handles (see Security)."""
    global _key
    if _key is None:
        _key = secrets.token_bytes(KEY_BYTES)
    return _key


def _new_key_in_child() -> None:
    global _key
    _key = None


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_new_key_in_child)


def tag(key: bytes, name: str, header: memoryview | bytes, layout: memoryview | bytes) -> bytes:
    """The tag of a segment: HMAC-SHA256 over its name, its header without
    the state (which changes on retirement) and the tag, and its layout."""
    mac = hmac.new(key, name.encode(), hashlib.sha256)
    mac.update(header[:STATE_OFFSET])
    mac.update(header[STATE_OFFSET + 4 : TAG_OFFSET])
    mac.update(layout)
    return mac.digest()[:16]


# Segments larger than this are filled by two threads (see _fill).
_PARALLEL_COPY_BYTES = 64 << 20
_COPY_CHUNK = 64 << 20
_IOV_MAX = 1024  # buffers per pwritev call (Linux's UIO_MAXIOV)
_ROW_BY_ROW_BYTES = 64 << 10  # rows of a block slice shorter than this are compacted in chunks first
_SCRATCH_BYTES = 16 << 20  # the chunk
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise_call = _libc.madvise
    _madvise_call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.memchr.restype = ctypes.c_void_p
    _libc.memchr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
except (OSError, AttributeError, TypeError):  # Windows: no libc to load by None (and no segments)
    _madvise_call = None


# -- mappings that keep no descriptor ------------------------------------------
#
# ``mmap.mmap`` keeps a dup of the descriptor it maps for as long as the
# mapping lives (for resize() and size(), which we never call): one
# descriptor per live segment, result and cached object -- past ``ulimit -n``
# (1024 on many Linux desktops, 256 on macOS) attach, claim_result and
# create fail with EMFILE. POSIX needs no open descriptor for a mapping to
# stay valid, so segments are mapped here through libc, and the mapping
# lives as long as the buffer object: a process costs a descriptor per
# segment only where it holds its flock (see Hold). Python 3.13 has this as
# ``mmap.mmap(..., trackfd=False)``; use it once 3.13 is the minimum.
_MAP_FAILED = ctypes.c_void_p(-1).value
_ACCESS = {
    mmap.ACCESS_READ: (mmap.PROT_READ, mmap.MAP_SHARED),
    mmap.ACCESS_WRITE: (mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED),
    mmap.ACCESS_COPY: (mmap.PROT_READ | mmap.PROT_WRITE, getattr(mmap, "MAP_PRIVATE", 0)),
}


def map_fd(fd: int, size: int, access: int = mmap.ACCESS_WRITE) -> memoryview:
    """``size`` bytes of ``fd`` mapped with ``access`` (as ``mmap.mmap``
    takes it), as a byte memoryview -- read-only for ACCESS_READ -- that
    keeps no descriptor: the caller may close ``fd`` at once. The memory is
    unmapped when the last view of it (numpy arrays over it included) dies."""
    prot, flags = _ACCESS[access]
    address = _libc.mmap(None, size, prot, flags, fd, 0)
    if address in (_MAP_FAILED, None):
        code = ctypes.get_errno()
        raise OSError(code, f"cannot map {size} bytes of shared memory: {os.strerror(code)}")
    memory = (ctypes.c_ubyte * size).from_address(address)
    # Arrays over it are read-only because the memory is shared, not because
    # a task made them so: _codec sends them back as writable results.
    memory.sharedexec_read_only = access == mmap.ACCESS_READ
    # Not at exit: arrays over it may still be read by later exit hooks.
    weakref.finalize(memory, _libc.munmap, address, size).atexit = False
    view = memoryview(memory).cast("B")
    return view.toreadonly() if access == mmap.ACCESS_READ else view


def find_zero(view: memoryview, start: int, stop: int) -> int:
    """Where the first zero byte of ``view[start:stop]`` is in ``view``, or
    -1: ``memchr``, what ``mmap.find`` does, for a :func:`map_fd` view."""
    if stop <= start:
        return -1
    base = np.frombuffer(view, dtype=np.uint8).ctypes.data
    found = _libc.memchr(base + start, 0, stop - start)
    return -1 if found is None else found - base


def _madvise(address: int, length: int, advice: int) -> None:
    # Through ctypes, not mmap.madvise: ctypes releases the GIL for the call,
    # so the two filling threads fault their pages in at the same time.
    if _madvise_call is not None:
        _madvise_call(address, length, advice)  # a failure only means first-touch faults


_copy_pool: ThreadPoolExecutor | None = None
_copy_pool_lock = threading.Lock()


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(directory: str | None = None) -> tuple[int, int]:
    """(free, total) bytes of the file system holding ``directory``."""
    st = os.statvfs(directory or shm_dir())
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _full_error(nbytes: int, store) -> SharedMemoryFullError:
    directory = store.directory
    if directory is None:  # macOS: the VM system's memory
        return SharedMemoryFullError(
            errno.ENOSPC,
            f"cannot create a {format_bytes(nbytes)} shared-memory segment: the system refused the "
            "memory. Free memory, or share smaller objects.",
        )
    st = os.statvfs(directory)
    if st.f_files and not st.f_favail:
        # Empty files are enough to fill a tmpfs' inodes, and any user may
        # create them in /dev/shm: free bytes do not tell.
        return SharedMemoryFullError(
            errno.ENOSPC,
            f"cannot create a {format_bytes(nbytes)} shared-memory segment: {directory} has no free "
            f"inodes (all {st.f_files} files it can hold exist, though {format_bytes(st.f_bavail * st.f_frsize)} "
            f"are free). Remove the files filling it (as their owner, or ask root), or set {DIR_ENV} to a "
            "directory of yours on another file system.",
        )
    free, total = free_bytes(directory)
    hint = " (Docker's default)" if total <= 64 << 20 else ""
    where = directory if store.kind == "tmpfs" else f"{directory} (where {store.where} lives)"
    also = f", or set {DIR_ENV} to a directory on a larger file system" if store.kind == "tmpfs" else ""
    return SharedMemoryFullError(
        errno.ENOSPC,
        f"cannot create a {format_bytes(nbytes)} shared-memory segment: {where} has "
        f"{format_bytes(free)} free of {format_bytes(total)}{hint}. Free memory there, or start "
        f"the container with a larger --shm-size (e.g. --shm-size=8g){also}.",
    )


# -- which store, or none -------------------------------------------------------

_POSIX = _store.PosixStore()
_reasons: dict[tuple[str, str], str | None] = {}


def current_store(directory: str | None = None):
    """The store segments are created in and attached from: a tmpfs store at
    ``directory`` if given, else the one ``$SHAREDEXEC_BACKEND`` (default:
    the platform's) names. SharedMemoryError where sharing is unavailable."""
    if directory is not None:
        return _store.TmpfsStore(directory)
    kind = os.environ.get(_store.BACKEND_ENV) or _store.default_backend()
    if kind == "tmpfs":
        return _store.TmpfsStore(shm_dir())
    if kind == "posix" and _store._posixshmem is not None:
        return _POSIX
    raise SharedMemoryError(errno.ENOSYS, f"cannot share memory here: {unshared_reason()}")


def unshared_reason() -> str | None:
    """Why this process cannot create segments, with what to do -- so that
    tasks go by plain pickling, as with the standard library -- or None.
    Answered once per (``$SHAREDEXEC_BACKEND``, directory)."""
    key = (os.environ.get(_store.BACKEND_ENV, ""), shm_dir())
    try:
        return _reasons[key]
    except KeyError:
        reason = _reasons[key] = _find_unshared_reason(*key)
        return reason


def prepare_owner() -> None:
    """Before this process creates a segment, or workers write results for
    it: a live reaper that knows where its segments go."""
    store = current_store()
    if store.kind == "posix":
        _check_lock_dir(store.list_dir)
    _reaper.watch(store.kind, store.list_dir)


def list_owned_by(pid: int) -> list[str]:
    """Segments of ours named for owner ``pid``: the files of a tmpfs
    directory, the lock files of the POSIX store (see ``_store``)."""
    if unshared_reason() is not None:
        return []
    store = current_store()
    return [name for name, _, _ in _names.iter_segments(store.list_dir, mine_only=True, owner=pid)]


def _find_unshared_reason(asked: str, directory: str) -> str | None:
    if asked and asked not in _store.BACKENDS:
        return (
            f"{_store.BACKEND_ENV}={asked!r} is not one of {', '.join(_store.BACKENDS)}. "
            f"Unset it to use this platform's default ({_store.default_backend()})."
        )
    kind = asked or _store.default_backend()
    if kind == "unshared":
        if asked:
            return f"sharing is turned off by {_store.BACKEND_ENV}=unshared. Unset it to share."
        return (
            f"this platform ({sys.platform}) has neither POSIX shared memory nor a tmpfs directory "
            "sharedexec can use (Windows is not supported yet). Run on Linux or macOS (on Windows: "
            "in WSL2) to share."
        )
    if kind == "posix":
        if _store._posixshmem is None:
            return (
                "this Python has no POSIX shared memory (the _posixshmem module). Use a Python "
                f"built with it, or set {_store.BACKEND_ENV}=tmpfs on Linux."
            )
        # Another local user can pre-create the lock directory in a shared
        # /tmp (sticky: its victim cannot remove it). That must cost the victim
        # its sharing, not its pool (docs/security.md: denial of service falls
        # back to plain pickling).
        try:
            _check_lock_dir(_POSIX.list_dir)
        except SharedMemoryError as exc:
            return exc.strerror
        return None
    if not os.path.isdir(directory):
        return (
            f"{directory} does not exist. Mount a tmpfs there (Docker: --shm-size=8g), or set "
            f"{DIR_ENV} to a writable directory (a tmpfs is fastest)."
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        return (
            f"{directory} cannot be written (a read-only file system, or its permissions). Mount a "
            f"writable tmpfs there (Docker: --shm-size=8g), or set {DIR_ENV} to a writable directory."
        )
    return None


@dataclass(eq=False)
class Mapping:
    """One process's mapping of a segment.

    ``view`` is a memoryview of the whole segment: writable for the creator and
    for copy-on-write (private) mappings, read-only otherwise. Arrays decoded
    from the segment hold slices of it, which keep the mapping alive; it is
    unmapped when the last of them dies.
    """

    name: str
    size: int
    view: memoryview
    layout_offset: int = 0
    layout_size: int = 0
    key: bytes = field(default=b"", repr=False)  # the key its tag verified with: for the segments its table names

    def state(self) -> int:
        return struct.unpack_from("<I", self.view, STATE_OFFSET)[0]

    def layout(self) -> memoryview:
        return self.view[self.layout_offset : self.layout_offset + self.layout_size]


def _check_name(name: str) -> None:
    if owner_of(name) is None:
        raise SegmentCorruptError(f"{name!r} is not a sharedexec segment name")


def offsets_for(sizes: list[int]) -> tuple[list[int], int]:
    """Where buffers of these sizes go in a segment, and where the layout goes."""
    offsets, end = [], ALIGN
    for size in sizes:
        offsets.append(end)
        end = align(end + size)
    return offsets, end


def create(
    buffers: list[memoryview | None],
    layout: bytes,
    owner_pid: int,
    directory: str | None = None,
    copied: Callable[[int, memoryview], None] | None = None,
) -> Mapping:
    """Create a segment holding ``buffers`` at the offsets ``offsets_for``
    gives, followed by ``layout``, and return the creator's mapping.

    Every page is written with ``pwrite`` or reserved with ``posix_fallocate``
    before it is touched (``_fill``), so a directory without room raises
    :class:`SharedMemoryFullError` -- never SIGBUS (cpython#114390) -- and
    nothing is left behind.

    ``copied(i, view)``, if given, is called in this thread as soon as buffer
    ``i`` is in the segment (in order, once this function holds no reference
    to it: a caller that drops its own may free the source there), with
    ``view`` its bytes in a private, copy-on-write mapping of the segment --
    writable, its writes seen by this process alone (see ``_adopt``). Never
    called where the store cannot map privately (XNU's shm objects, see
    ``_store``): nothing is adopted there.
    """
    store = current_store(directory)
    offsets, layout_offset = offsets_for([buf.nbytes for buf in buffers])
    size = layout_offset + len(layout)
    if store.kind == "tmpfs":
        if not os.path.isdir(store.directory):
            raise SharedMemoryError(
                errno.ENOENT,
                f"cannot create shared memory in {store.directory!r}: no such directory. "
                f"Set {DIR_ENV} to an existing directory (a tmpfs is fastest).",
            )
        _check_dir(store.directory)
    else:
        _check_lock_dir(store.list_dir)
    space = store.free_bytes()
    if space is not None and size > space[0]:
        raise _full_error(size, store)
    if owner_pid == os.getpid():  # results a worker writes are its owner's reaper's
        _reaper.watch(store.kind, store.list_dir)
    name = new_name(owner_pid)
    key = process_key()
    try:
        fd = store.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise _full_error(size, store) if exc.errno in _FULL else exc from None
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: attach requires exactly 0600
        except OSError:  # a shm object where fchmod is not supported: shm_open's mode stands
            pass
        # The header first -- before the size, where the store takes pwrite:
        # whoever finds the segment half-filled (its creator killed
        # meanwhile: a worker writing a result) can tell who made it and that
        # it was never finished, see creator_of().
        header = bytearray(HEADER.pack(
            MAGIC, VERSION, 0, STATE_WRITING, size, layout_offset, len(layout), os.getpid(), owner_pid, b""
        ))
        header[TAG_OFFSET:] = tag(key, name, header, layout)
        if store.writable:
            _write_all(fd, memoryview(header), 0, size, store)
        try:
            os.ftruncate(fd, size)  # once: XNU refuses a second ftruncate of a shm object (see _store)
        except OSError as exc:
            raise _full_error(size, store) if exc.errno in _FULL else exc from None
        view = map_fd(fd, size)
        if not store.writable:
            _fill(fd, view, [(0, memoryview(header))], store)
        placed = [*zip(offsets, buffers), (layout_offset, memoryview(layout))]
        if copied is None or not store.private_maps:
            _fill(fd, view, placed, store)
        else:
            private = map_fd(fd, size, mmap.ACCESS_COPY)
            sizes = [buf.nbytes for buf in buffers]

            def done(i: int) -> None:
                if i < len(sizes):
                    copied(i, private[offsets[i] : offsets[i] + sizes[i]])

            _fill(fd, view, placed, store, done)
        # Finished: a segment still marked writing after its creator died
        # (a worker SIGKILLed mid-result) is one nobody can ever be sent.
        struct.pack_into("<I", view, STATE_OFFSET, STATE_LIVE)
    except BaseException:
        _unlink(store, name)
        raise
    finally:
        os.close(fd)
    return Mapping(name, size, view, layout_offset, len(layout), key)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_checked_dirs: set[str] = set()


def _check_dir(directory: str) -> None:
    """Raise :func:`unsafe_dir_reason` as a SharedMemoryError. Checked once
    per directory and process."""
    if directory in _checked_dirs:
        return
    reason = unsafe_dir_reason(directory)
    if reason is not None:
        raise SharedMemoryError(errno.EPERM, f"refusing to create shared memory in {directory}: {reason}")
    _checked_dirs.add(directory)


def unsafe_dir_reason(directory: str) -> str | None:
    """Why another user could rename or remove our segments in ``directory``
    (hiding them from every clean-up), with what to do; None if nobody can.

    It must be owned by us or root and writable by nobody else, or sticky
    (then only a file's owner, the directory's owner and root may rename it
    -- like /dev/shm). A symbolic link to it must be ours or root's too: its
    owner could point it elsewhere after this check."""
    fix = (
        f"Point {DIR_ENV} at a directory of yours (e.g. mkdir -m 700 /dev/shm/$USER) "
        "or at one like /dev/shm (root's, mode 1777)."
    )
    link = os.lstat(directory)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.geteuid(), 0):
        return (
            f"it is a symbolic link owned by {describe_uid(link.st_uid)} (to {os.path.realpath(directory)}), "
            f"so its owner could point it at another directory at any time. {fix}"
        )
    st = os.stat(directory)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.geteuid(), 0) or (mode & 0o022 and not mode & stat.S_ISVTX):
        return (
            f"it is owned by {describe_uid(st.st_uid)} with mode {mode:04o}, so "
            f"{'its owner' if st.st_uid not in (os.geteuid(), 0) else 'other users'} could rename or "
            f"remove this process's segments. {fix}"
        )
    return None


def _check_lock_dir(directory: str) -> None:
    """Create the POSIX store's lock directory (see ``_store``) if it is
    missing, and refuse one that is not ours alone: whoever could write in
    it could remove lock files, so that segments in use looked unused. Once
    per directory and process."""
    if directory in _checked_dirs:
        return
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SharedMemoryError(
            exc.errno,
            f"cannot create {directory}, where sharedexec keeps one lock file per POSIX shared-memory "
            f"segment: {exc.strerror}. Set TMPDIR to a writable directory of yours.",
        ) from None
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise SharedMemoryError(
            errno.EPERM,
            f"refusing {directory} for sharedexec's lock files: it is {file_kind(st.st_mode)} owned by "
            f"{describe_uid(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}, not a directory of "
            f"{describe_uid(os.geteuid())} that nobody else can open. Remove it (as its owner), or set "
            "TMPDIR to a directory of yours.",
        )
    _checked_dirs.add(directory)


def describe_uid(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def file_kind(mode: int) -> str:
    if not stat.S_IFMT(mode):  # XNU's fstat of a shm object (see _store)
        return "a shared-memory object"
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return kind
    return "a device or special file"


def _not_ours(store, name: str, st: os.stat_result | None) -> SegmentNotOursError:
    path = store.describe(name)
    if st is None:
        try:
            st = store.lstat(name)
        except OSError:
            pass
    found = (
        "something this process may not open"
        if st is None
        else f"{file_kind(st.st_mode)} owned by {describe_uid(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}"
    )
    return SegmentNotOursError(
        errno.EPERM,
        f"refusing {path}: it is {found}, not a sharedexec segment of this user (owned by "
        f"{describe_uid(os.geteuid())} with mode 0600). It was not read. Either the segment of this name "
        "was removed and another user or program created this under its name, or its owner or mode was "
        "changed since it was created; remove it as its owner.",
        path,
    )


class _NotOurs(SegmentNotOursError):
    """What :func:`_open_own` raises for a file that is not ours: cheap (no
    user name looked up, no lstat), since sweeps may meet thousands of them;
    ``attach`` turns it into the descriptive message it shows."""

    def __init__(self, path: str, st: os.stat_result | None):
        super().__init__(errno.EPERM, "not a sharedexec segment of this user", path)
        self.st = st


# ELOOP: a symlink; EACCES/EPERM: another user's file; ENXIO: a FIFO opened
# for writing with no reader; EISDIR: a directory opened for writing;
# EWOULDBLOCK: a lease on it. Anything else (EMFILE, ENFILE, EINTR) says
# nothing about the file and is raised as itself.
_NOT_OURS_ERRNOS = frozenset((errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENXIO, errno.EISDIR, errno.EWOULDBLOCK))


def _open_own(store, name: str, flags: int, strict: bool = True) -> tuple[int, os.stat_result]:
    """Open segment ``name`` without following a symlink or blocking on a
    FIFO, and check the descriptor: ours by the store's rules (``owns``: our
    effective uid; a regular file, or no type at all for a POSIX object) and
    mode 0600 if ``strict``. SegmentNotFoundError if absent, _NotOurs if
    not ours. Callers check the size before mapping: on XNU nothing else
    does (mmap checks a size against regular files only)."""
    _check_name(name)
    path = store.describe(name)
    try:
        fd = store.open(name, flags)
    except FileNotFoundError:
        raise SegmentNotFoundError(errno.ENOENT, f"shared-memory segment {path} does not exist", path) from None
    except OSError as exc:
        if exc.errno in _NOT_OURS_ERRNOS:
            raise _NotOurs(path, None) from None
        raise
    st = os.fstat(fd)
    if not store.owns(st) or (strict and stat.S_IMODE(st.st_mode) != 0o600):
        os.close(fd)
        raise _NotOurs(path, st)
    return fd, st


@dataclass(eq=False)
class Hold:
    """This process's shared flock on one segment (on the descriptor the
    store's ``lock`` gives: the segment's own, or its POSIX lock file): taken
    by the first mapping (or :func:`hold`), released with the last."""

    name: str
    fd: int
    refs: int = 0
    header: memoryview | None = None  # :func:`hold`'s, to read the state (keeps no descriptor)

    def state(self) -> int:
        # Through a mapping, not pread: XNU cannot read() a shm object.
        return struct.unpack_from("<I", self.header, STATE_OFFSET)[0]


_holds: dict[str, Hold] = {}
_holds_lock = threading.Lock()


def _take_hold(store, name: str, fd: int) -> Hold | None:
    """This process's hold on ``name`` (``fd``: the segment, which the caller
    still closes), one more reference to it; None if its owner is removing it
    right now -- a mapping stays good (it survives the unlinking), there is
    nothing to keep. Anything else that stops the lock is raised: a mapping
    without its hold could be released under the process."""
    with _holds_lock:
        held = _holds.get(name)
        if held is None:
            try:
                lock = store.lock(name, fd)
            except FileNotFoundError:  # its lock file goes last when it is removed
                return None
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # the owner's exclusive probe (in_use): it is releasing it
                os.close(lock)
                return None
            except BaseException:
                os.close(lock)
                raise
            held = _holds[name] = Hold(name, lock)
        held.refs += 1
        return held


def drop_hold(held: Hold) -> None:
    with _holds_lock:
        held.refs -= 1
        if held.refs == 0:
            if _holds.get(held.name) is held:
                del _holds[held.name]
            if held.fd >= 0:  # not one a fork closed (_forget_holds_in_child)
                os.close(held.fd)


def _forget_holds_in_child() -> None:
    # A forked child inherits our descriptors, and a flock belongs to the
    # open file, not the process: the child's copy would hold the segment
    # "in use" for as long as the child lives, after we dropped it. Its
    # inherited mappings stay valid without it (an unlinked file stays mapped).
    global _holds, _holds_lock
    for held in _holds.values():
        try:
            os.close(held.fd)
        except OSError:
            pass
        held.fd = -1
    _holds, _holds_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_holds_in_child)


def hold(name: str, directory: str | None = None) -> Hold | None:
    """Say "this process still needs ``name``" without mapping it (the
    copy-on-write tasks map it privately, one task at a time); None if it is
    gone. Give it back with :func:`drop_hold`."""
    store = current_store(directory)
    try:
        fd, st = _open_own(store, name, os.O_RDONLY)
    except SegmentNotFoundError:  # gone, or not ours (SegmentNotOursError)
        return None
    try:
        if st.st_size < ALIGN:
            return None  # not a segment: attach says why
        held = _take_hold(store, name, fd)
        if held is not None and held.header is None:
            held.header = map_fd(fd, ALIGN, mmap.ACCESS_READ)
        return held
    finally:
        os.close(fd)


def in_use(name: str, directory: str | None = None) -> bool:
    """Whether another process (or a mapping of this one's) maps ``name``.
    What cannot be told is "in use": keeping a segment is the safe mistake."""
    store = current_store(directory)
    try:
        fd, _ = _open_own(store, name, os.O_RDONLY)
    except SegmentNotFoundError:  # gone, or not ours (SegmentNotOursError)
        return False
    except OSError:  # out of descriptors, say
        return True
    try:
        lock = store.lock(name, fd)
    except OSError:  # no lock file (removed by a /tmp cleaner?), out of descriptors
        return True
    finally:
        os.close(fd)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:  # BlockingIOError: a holder; anything else: cannot tell
        return True
    finally:
        os.close(lock)  # drops our lock, if we got it


def _unlink(store, name: str) -> None:
    try:
        store.unlink(name)
    except FileNotFoundError:
        pass


def attach(
    name: str,
    copy_on_write: bool = False,
    writable: bool = False,
    directory: str | None = None,
    key: bytes | None = None,
) -> Mapping:
    """Map an existing segment read-only; privately writable if
    ``copy_on_write`` (writes are seen by nobody else: the kernel copies the
    touched pages of a tmpfs file; a POSIX object, which XNU maps shared
    only, is copied whole into private memory); shared writable if
    ``writable`` (the lease board, and a result its owner claims: nobody
    else maps it).

    Only a segment of ours is mapped (see Security): a regular file of our
    uid, mode 0600, whose header matches its size and whose tag verifies with
    ``key`` (the creator's, from the handle; default: this process's). Never
    registers the segment anywhere. A read-only or copy-on-write mapping
    holds the segment's shared flock while it lives: the one descriptor it
    costs (see ``map_fd``); a writable one (the lease board, a claimed
    result) none."""
    store = current_store(directory)
    key = process_key() if key is None else key
    try:
        fd, st = _open_own(store, name, os.O_RDWR if writable else os.O_RDONLY)
    except _NotOurs as exc:
        raise _not_ours(store, name, exc.st) from None
    try:
        size = st.st_size
        if size < ALIGN:
            raise SegmentCorruptError(f"segment {name} is truncated: {size} bytes, smaller than its header")
        if copy_on_write and not store.private_maps:
            view = memoryview(_private_copy(fd, size))  # nothing of the segment stays mapped: no hold
        else:
            access = mmap.ACCESS_COPY if copy_on_write else mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            view = map_fd(fd, size, access)
            if not writable:
                held = _take_hold(store, name, fd)
                if held is not None:
                    weakref.finalize(view.obj, drop_hold, held)
    finally:
        os.close(fd)
    magic, version, _, _, total, layout_offset, layout_size, *_, stored_tag = HEADER.unpack_from(view, 0)
    if not store.exact_size and total <= size < total + _PAGE:
        view = view[:total]  # macOS: fstat's size is a whole number of pages
        size = total
    if magic != MAGIC:
        raise SegmentCorruptError(f"segment {name} has no sharedexec header (bad magic {magic!r})")
    if version != VERSION:
        raise SegmentCorruptError(
            f"segment {name} has layout version {version}, this sharedexec reads {VERSION}: "
            "the publishing and the attaching process run different sharedexec versions"
        )
    if total != size or layout_offset < ALIGN or layout_offset + layout_size > size:
        raise SegmentCorruptError(
            f"segment {name} is truncated or corrupt: header says {total} bytes with a layout at "
            f"{layout_offset}+{layout_size}, the file has {size} bytes"
        )
    layout = view[layout_offset : layout_offset + layout_size]
    if not hmac.compare_digest(stored_tag, tag(key, name, view[:ALIGN], layout)):
        raise SegmentCorruptError(
            f"segment {name} does not authenticate: its header or layout was changed after it was "
            "written, or it is not the segment the handle names (a different key). It is not read."
        )
    return Mapping(name, size, view, layout_offset, layout_size, key)


def _private_copy(fd: int, size: int) -> mmap.mmap:
    """The segment's bytes in private anonymous memory: what a copy-on-write
    mapping gives where MAP_PRIVATE is refused (XNU's shm objects, see
    ``_store``), at the price of one copy instead of copying touched pages."""
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as shared:
        private = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        private[:] = shared
    return private


def private_view(mapping: Mapping) -> memoryview | None:
    """A writable view of ``mapping``'s bytes that is the caller's alone: a
    private (copy-on-write) mapping of the same segment -- one ``mmap``,
    whatever the segment's size; a write copies the pages it touches, seen
    by nobody else, and goes with the view. None where there is none: the
    segment is gone (unlinked by its owner meanwhile), or its store cannot
    map privately (XNU's shm objects, ``_store``): the caller copies instead.
    Opened again by name, as ``attach`` opens it, without a hold: the
    process's mapping of ``mapping`` holds it."""
    try:
        store = current_store()
        if not store.private_maps:
            return None
        fd, st = _open_own(store, mapping.name, os.O_RDONLY)
    except OSError:  # gone, or not ours any more
        return None
    try:
        if st.st_size < mapping.size:  # not the segment mapped (a shorter file would SIGBUS)
            return None
        return map_fd(fd, mapping.size, mmap.ACCESS_COPY)
    except OSError:
        return None
    finally:
        os.close(fd)


def creator_of(name: str, directory: str | None = None) -> tuple[int, bool] | None:
    """The pid that created a segment of ours and whether it finished
    writing it, from its header (None if it is not ours or unreadable)."""
    try:
        fd, st = _open_own(current_store(directory), name, os.O_RDONLY, strict=False)
    except OSError:
        return None
    try:
        if st.st_size < HEADER.size:
            return None
        # Through a mapping, not pread: XNU cannot read() a shm object.
        with mmap.mmap(fd, HEADER.size, access=mmap.ACCESS_READ) as mm:
            header = mm[: HEADER.size]
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if len(header) != HEADER.size or header[:8] != MAGIC:
        return None
    fields = HEADER.unpack(header)
    return fields[7], fields[3] != STATE_WRITING


def retire(name: str, directory: str | None = None) -> bool:
    """Mark a segment of ours retired (so attached workers drop it) and
    unlink it; whether it was.

    Unlinking does not disturb existing mappings: their memory is released
    when the last one is unmapped. Missing segments, files that are not ours
    (left alone) and failures are a DEBUG log line, never an exception: every
    caller is a sweep or a clean-up that must go on."""
    try:
        store = current_store(directory)
    except SharedMemoryError as exc:  # $SHAREDEXEC_BACKEND changed under us: the exit sweep has it
        log.debug("not retiring %s: %s", name, exc.strerror)
        return False
    try:
        # O_RDWR, not O_WRONLY: macOS's shm_open takes no O_WRONLY.
        fd, st = _open_own(store, name, os.O_RDWR, strict=False)
    except SegmentNotOursError as exc:  # our segment is gone: something else has its name
        log.debug("not retiring %s: %s", name, exc.strerror)
        store.forget(name)
        return False
    except FileNotFoundError:  # removed by someone else (a cleanup script, say)
        store.forget(name)
        return False
    except OSError as exc:
        # Out of descriptors (EMFILE, ENFILE) or interrupted: it may well be
        # ours, so unlink it if it is, unmarked (attached workers then keep it
        # mapped until their cache evicts it) -- never leave it behind.
        log.debug("cannot open %s to retire it: %s", name, exc)
        try:
            st = store.lstat(name)  # None where there is nothing to look at (POSIX objects)
            if st is not None and store.owns(st):
                _unlink(store, name)
                return True
        except OSError as again:
            log.debug("cannot retire %s: %s", name, again)
        return False
    try:
        if st.st_size >= ALIGN:  # else nobody has it mapped as a segment
            # Through a mapping, not pwrite: XNU cannot write() a shm object.
            with mmap.mmap(fd, ALIGN) as mm:
                mm[STATE_OFFSET : STATE_OFFSET + 4] = struct.pack("<I", STATE_RETIRED)
        # Unlink the file we opened, not one that took its name meanwhile.
        if store.same(name, st):
            _unlink(store, name)
            return True
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("cannot retire %s: %s", name, exc)
    finally:
        os.close(fd)
    return False


def _get_copy_pool() -> ThreadPoolExecutor:
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sharedexec-copy")
        return _copy_pool


def _reset_copy_pool_in_child() -> None:
    global _copy_pool, _copy_pool_lock
    _copy_pool, _copy_pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_copy_pool_in_child)


def _fill(
    fd: int,
    view: memoryview,
    placed: list[tuple[int, memoryview] | None],
    store,
    done: Callable[[int], None] | None = None,
) -> None:
    """Write each ``(offset, source)`` into the segment, in chunks.

    A fresh tmpfs page costs more to allocate and map than to copy into: the
    naive ``ftruncate`` + copy through the mapping runs at about 1 GB/s here,
    all of it on one core in page faults. Where the store is a file
    (``store.writable``: Linux) the bytes go in with ``pwrite``: the kernel
    allocates each page and copies into it without mapping it into this
    process -- no page tables to fill, half the CPU time of reserving
    (``posix_fallocate``) and faulting in (``MADV_POPULATE_WRITE``) the pages
    first, and a full tmpfs answers ENOSPC, never SIGBUS (cpython#114390). One
    thread: tmpfs serialises writes to one file (the inode lock), and the
    core left free runs the workers reading earlier pieces. Elsewhere (macOS
    refuses ``write`` on shared-memory objects) each chunk is reserved, its
    page tables filled in one call (Linux 5.14+; older kernels just fault on
    first touch) and copied through the mapping, on two threads for large
    totals: the kernel work and numpy's copy run without the GIL. Measured by
    benchmarks/publish_speed.py.

    Each entry of ``placed`` is dropped (set to None) as soon as its source is
    written, then ``done(i)`` is called, in order and in this thread."""
    if store.writable:
        for i in range(len(placed)):  # (enumerate would keep the item: its source)
            _write_all(fd, placed[i][1], placed[i][0], len(view), store)
            _written(placed, i, done)
        return
    placed[:] = [(offset, _contiguous(source)) for offset, source in placed]
    target = np.frombuffer(view, dtype=np.uint8)
    base = target.ctypes.data
    # Jobs name their source by index, not by reference: a source copied is
    # released at once, not when the last job is.
    jobs = [
        (i, start, min(start + _COPY_CHUNK, source.nbytes))
        for i, (_, source) in enumerate(placed)
        for start in range(0, max(source.nbytes, 1), _COPY_CHUNK)
    ]
    last_job = {i: n for n, (i, _, _) in enumerate(jobs)}

    def run(job: tuple[int, int, int]) -> None:
        i, start, stop = job
        offset, source = placed[i]
        src = np.frombuffer(source, dtype=np.uint8)[start:stop]
        del source
        offset += start
        first = offset // _PAGE * _PAGE
        last = -(-(offset + len(src)) // _PAGE) * _PAGE
        last = min(last, len(target))
        if last <= first:
            return
        try:
            store.reserve(fd, first, last - first)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise _full_error(len(target), store) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        _madvise(base + first, last - first, _MADV_POPULATE_WRITE)
        target[offset : offset + len(src)] = src

    if sum(stop - start for _, start, stop in jobs) < _PARALLEL_COPY_BYTES or (os.cpu_count() or 1) < 2:
        results = map(run, jobs)
    else:
        results = _get_copy_pool().map(run, jobs)
    for n, _ in enumerate(results):  # in order, whatever order the threads finish in
        i = jobs[n][0]
        if last_job[i] == n:
            _written(placed, i, done)


def _write_all(fd: int, source: memoryview, offset: int, size: int, store) -> None:
    """``pwrite`` all of ``source`` at ``offset``: its bytes in C order (a
    2-D view with contiguous rows, row after row; rows shorter than
    ``_ROW_BY_ROW_BYTES`` compacted ``_SCRATCH_BYTES`` at a time), at most ``_COPY_CHUNK``
    bytes and ``_IOV_MAX`` pieces a call; a short write -- a signal, a full
    file system -- goes on where it stopped."""
    if not source.nbytes:
        return
    if source.c_contiguous:
        rows = [source.cast("B")]
    elif source.shape[1] < _ROW_BY_ROW_BYTES:
        # Short rows (``X[:, :2]`` of a tall (N, 4) array: N rows of 16
        # bytes) cost more as an iovec each than as a copy: compacted a
        # chunk at a time into one scratch buffer (bounded extra memory).
        whole = np.asarray(source)
        per = max(1, _SCRATCH_BYTES // whole.shape[1])
        scratch = np.empty((min(per, len(whole)), whole.shape[1]), np.uint8)
        for start in range(0, len(whole), per):
            part = scratch[: len(whole[start : start + per])]
            np.copyto(part, whole[start : start + per])
            _write_all(fd, memoryview(part).cast("B"), offset + start * whole.shape[1], size, store)
        return
    else:
        rows = list(np.asarray(source))
    pieces = deque(
        memoryview(row)[start : start + _COPY_CHUNK] for row in rows for start in range(0, len(row), _COPY_CHUNK)
    )
    while pieces:
        batch, nbytes = [], 0
        for piece in itertools.islice(pieces, _IOV_MAX):
            if batch and nbytes + piece.nbytes > _COPY_CHUNK:
                break
            batch.append(piece)
            nbytes += piece.nbytes
        try:
            n = os.pwritev(fd, batch, offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise _full_error(size, store) from None
            raise
        if n == 0:  # no progress and no error: full, rather than loop
            raise _full_error(size, store)
        offset += n
        while n:
            if n >= pieces[0].nbytes:
                n -= pieces.popleft().nbytes
            else:
                pieces[0], n = pieces[0][n:], 0


def _contiguous(source: memoryview) -> memoryview:
    # The mapping path copies flat chunks: rows of a block slice are made
    # one contiguous buffer first (only where write() cannot be used).
    return source if source.c_contiguous else memoryview(np.ascontiguousarray(np.asarray(source))).cast("B")


def _written(placed: list, i: int, done: Callable[[int], None] | None) -> None:
    placed[i] = None
    if done is not None:
        done(i)
