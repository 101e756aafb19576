"""Shared-memory segments: create, attach, retire (and unlink), copy into.

This is the only module that talks to the operating system about shared
memory. A segment is a file in a tmpfs directory -- ``/dev/shm`` (what
``shm_open`` uses on Linux) or the directory named by ``SHAREDEXEC_DIR`` --
mapped with ``mmap``. Using the directory directly, rather than
``multiprocessing.shared_memory.SharedMemory``, gives us four things the stdlib
class does not:

* no resource-tracker registration at all (gh-82300: an attaching process that
  registers or unregisters corrupts the creator's entry, and on 3.11/3.12 there
  is no ``track=False``). Crash cleanup is done by :mod:`sharedexec._reaper`,
  which knows every segment of an owner by its name;
* exact byte sizes and a 0600, ``O_EXCL`` creation with an unguessable name;
* ``posix_fallocate`` before the first write, so a too small tmpfs fails with
  ENOSPC instead of SIGBUS at the first touched page (cpython#114390);
* the same code for ``/dev/shm`` and for file-backed segments on disk.

Layout of a segment::

    0         64                                    layout_offset
    | header | buffer | pad | buffer | pad | ... | layout (pickle) |

The header (64 bytes, little-endian) holds a magic, a version, a ``state`` the
owner sets to RETIRED before unlinking (attached workers read it to drop their
cache entry), the total size, where the layout lies, and the creator and
owner pids. Buffers start on 64-byte boundaries.

Names, and finding segments by owner, are in :mod:`sharedexec._names`.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ._names import DIR_ENV, NAME_RE, new_name, shm_dir, unlink_path
from ._errors import (
    SegmentCorruptError,
    SegmentNotFoundError,
    SharedMemoryError,
    SharedMemoryFullError,
)

ALIGN = 64
MAGIC = b"SHAREDX\0"
VERSION = 1
STATE_LIVE = 0
STATE_RETIRED = 1

# magic, version, flags, state, total size, layout offset, layout size,
# creator pid, owner pid, reserved
HEADER = struct.Struct("<8sHHIQQQIIQ")
STATE_OFFSET = 12
assert HEADER.size <= ALIGN


# Copies larger than this are split over two threads: numpy releases the GIL
# while copying, and one thread alone does not saturate memory bandwidth.
_PARALLEL_COPY_BYTES = 64 << 20
_COPY_CHUNK = 16 << 20
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


def _full_error(nbytes: int, directory: str) -> SharedMemoryFullError:
    free, total = free_bytes(directory)
    hint = " (Docker's default)" if total <= 64 << 20 else ""
    return SharedMemoryFullError(
        errno.ENOSPC,
        f"cannot create a {format_bytes(nbytes)} shared-memory segment: {directory} has "
        f"{format_bytes(free)} free of {format_bytes(total)}{hint}. Free memory there, start "
        f"the container with a larger --shm-size (e.g. --shm-size=8g), or set "
        f"{DIR_ENV} to a directory on a larger file system.",
    )


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

    def state(self) -> int:
        return struct.unpack_from("<I", self.view, STATE_OFFSET)[0]

    def layout(self) -> memoryview:
        return self.view[self.layout_offset : self.layout_offset + self.layout_size]


def _path(name: str, directory: str | None = None) -> str:
    if not NAME_RE.match(name):
        raise SegmentCorruptError(f"{name!r} is not a sharedexec segment name")
    return os.path.join(directory or shm_dir(), name)


def create(
    buffers_size: int,
    layout_size: int,
    owner_pid: int,
    directory: str | None = None,
) -> Mapping:
    """Create a segment with room for ``buffers_size`` bytes of aligned buffers
    followed by a ``layout_size``-byte layout, reserve its memory and map it.

    Raises :class:`SharedMemoryFullError` (never SIGBUS) when the directory has
    no room.
    """
    directory = directory or shm_dir()
    layout_offset = ALIGN + align(buffers_size)
    size = layout_offset + layout_size
    free, _ = free_bytes(directory)
    if size > free:
        raise _full_error(size, directory)
    name = new_name(owner_pid)
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        raise SharedMemoryError(
            errno.ENOENT,
            f"cannot create shared memory in {directory!r}: no such directory. "
            f"Set {DIR_ENV} to an existing directory (a tmpfs is fastest).",
        ) from None
    try:
        try:
            # Reserve every page now: on a tmpfs this both fails cleanly when
            # there is no room and faults the pages in faster than first-touch.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise _full_error(size, directory) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, size, flags=flags)
    except BaseException:
        os.close(fd)
        unlink_path(path)
        raise
    os.close(fd)
    view = memoryview(mm)
    HEADER.pack_into(
        view, 0, MAGIC, VERSION, 0, STATE_LIVE, size, layout_offset, layout_size,
        os.getpid(), owner_pid, 0,
    )
    return Mapping(name, size, view, layout_offset, layout_size)


def attach(
    name: str, copy_on_write: bool = False, writable: bool = False, directory: str | None = None
) -> Mapping:
    """Map an existing segment read-only; privately writable if
    ``copy_on_write`` (writes copy the touched pages and are seen by nobody
    else); shared writable if ``writable`` (the lease board only). Validates
    the header against the file's real size; never registers the segment
    anywhere."""
    path = _path(name, directory)
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        raise SegmentNotFoundError(errno.ENOENT, f"shared-memory segment {name} does not exist", path) from None
    try:
        size = os.fstat(fd).st_size
        if size < ALIGN:
            raise SegmentCorruptError(f"segment {name} is truncated: {size} bytes, smaller than its header")
        access = mmap.ACCESS_COPY if copy_on_write else mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mm = mmap.mmap(fd, size, access=access)
    finally:
        os.close(fd)
    view = memoryview(mm)
    magic, version, _, _, total, layout_offset, layout_size, *_ = HEADER.unpack_from(view, 0)
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
    return Mapping(name, size, view, layout_offset, layout_size)


def retire(name: str, directory: str | None = None) -> None:
    """Mark a segment retired (so attached workers drop it) and unlink it.

    Unlinking does not disturb existing mappings: their memory is released
    when the last one is unmapped. Missing segments are ignored."""
    path = _path(name, directory)
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        os.pwrite(fd, struct.pack("<I", STATE_RETIRED), STATE_OFFSET)
    finally:
        os.close(fd)
    unlink_path(path)


def _get_copy_pool() -> ThreadPoolExecutor:
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sharedexec-copy")
        return _copy_pool


def _reset_copy_pool_in_child() -> None:
    global _copy_pool, _copy_pool_lock
    _copy_pool, _copy_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_reset_copy_pool_in_child)


def copy_buffers(dest: memoryview, placed: list[tuple[int, memoryview]]) -> None:
    """Copy each ``(offset, source)`` into ``dest``, on two threads for large totals."""
    target = np.frombuffer(dest, dtype=np.uint8)
    jobs = []
    for offset, source in placed:
        src = np.frombuffer(source, dtype=np.uint8)
        for start in range(0, len(src), _COPY_CHUNK):
            stop = min(start + _COPY_CHUNK, len(src))
            jobs.append((target[offset + start : offset + stop], src[start:stop]))
    total = sum(len(s) for _, s in jobs)
    if total < _PARALLEL_COPY_BYTES or (os.cpu_count() or 1) < 2:
        for dst, src in jobs:
            np.copyto(dst, src)
        return
    list(_get_copy_pool().map(lambda job: np.copyto(*job), jobs))
