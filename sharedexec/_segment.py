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
cache entry), the total size, where the layout lies, the creator and owner
pids, and a 16-byte *tag* (see Security). Buffers start on 64-byte boundaries.

Who maps a segment is the kernel's to say (design brief, trap 17): every
process that attaches one holds a shared ``flock`` on it for as long as its
mapping lives -- one lock per segment and process, dropped with the last
mapping, or by the kernel when the process dies, however it dies -- and the
owner asks with a non-blocking exclusive ``flock`` (:func:`in_use`). No
bookkeeping that a crash could leave wrong.

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
  with the name): a regular file, owned by our effective uid, mode 0600, and
  the size its header claims. Anything else is :class:`SegmentNotOursError`,
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
  only regular files of our uid, and never stop at one bad entry; a sweep
  pays one ``lstat`` for another user's file (never an open, never a user-name
  lookup), so thousands of them cannot make a shutdown slow.
* ``create`` refuses a directory in which another user could rename our
  segments (see ``_check_dir``), and reports ENOSPC/EDQUOT -- no inode left
  counts -- as :class:`SharedMemoryFullError`, which the caller falls back on.

Not protected: processes of the same user (they can read our memory and our
pipes anyway), root, and a parent of ``SHAREDEXEC_DIR`` that other users can
rename.
Buffers are not authenticated: only our uid can write them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import hmac
import logging
import mmap
import os
import secrets
import stat
import struct
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ._names import DIR_ENV, is_mine, new_name, owner_of, shm_dir, unlink_path
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
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _madvise(address: int, length: int, advice: int) -> None:
    # Through ctypes, not mmap.madvise: ctypes releases the GIL for the call,
    # so the two filling threads fault their pages in at the same time.
    _libc.madvise(address, length, advice)  # a failure only means first-touch faults
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
    key: bytes = field(default=b"", repr=False)  # the key its tag verified with: for the segments its table names

    def state(self) -> int:
        return struct.unpack_from("<I", self.view, STATE_OFFSET)[0]

    def layout(self) -> memoryview:
        return self.view[self.layout_offset : self.layout_offset + self.layout_size]


def _path(name: str, directory: str | None = None) -> str:
    if owner_of(name) is None:
        raise SegmentCorruptError(f"{name!r} is not a sharedexec segment name")
    return os.path.join(directory or shm_dir(), name)


def offsets_for(sizes: list[int]) -> tuple[list[int], int]:
    """Where buffers of these sizes go in a segment, and where the layout goes."""
    offsets, end = [], ALIGN
    for size in sizes:
        offsets.append(end)
        end = align(end + size)
    return offsets, end


def create(
    buffers: list[memoryview],
    layout: bytes,
    owner_pid: int,
    directory: str | None = None,
) -> Mapping:
    """Create a segment holding ``buffers`` at the offsets ``offsets_for``
    gives, followed by ``layout``, and return the creator's mapping.

    Every page is reserved with ``posix_fallocate`` before it is touched, so a
    directory without room raises :class:`SharedMemoryFullError` -- never
    SIGBUS (cpython#114390) -- and nothing is left behind.
    """
    directory = directory or shm_dir()
    offsets, layout_offset = offsets_for([buf.nbytes for buf in buffers])
    size = layout_offset + len(layout)
    if not os.path.isdir(directory):
        raise SharedMemoryError(
            errno.ENOENT,
            f"cannot create shared memory in {directory!r}: no such directory. "
            f"Set {DIR_ENV} to an existing directory (a tmpfs is fastest).",
        )
    _check_dir(directory)
    free, _ = free_bytes(directory)
    if size > free:
        raise _full_error(size, directory)
    name = new_name(owner_pid)
    path = os.path.join(directory, name)
    key = process_key()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _full_error(size, directory) if exc.errno in _FULL else exc from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask: attach requires exactly 0600
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise _full_error(size, directory) if exc.errno in _FULL else exc from None
        view = memoryview(mmap.mmap(fd, size))
        # The header first: whoever finds the segment half-filled (its
        # creator killed meanwhile) can tell who made it, see creator_of().
        _fill(fd, view, [(0, memoryview(bytes(ALIGN)))], directory)
        header = bytearray(HEADER.pack(
            MAGIC, VERSION, 0, STATE_LIVE, size, layout_offset, len(layout), os.getpid(), owner_pid, b""
        ))
        header[TAG_OFFSET:] = tag(key, name, header, layout)
        view[:ALIGN] = header
        _fill(fd, view, [*zip(offsets, buffers), (layout_offset, memoryview(layout))], directory)
    except BaseException:
        unlink_path(path)
        raise
    finally:
        os.close(fd)
    return Mapping(name, size, view, layout_offset, len(layout), key)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_checked_dirs: set[str] = set()


def _check_dir(directory: str) -> None:
    """Refuse a directory where another user could rename or remove our
    segments (hiding them from every clean-up): it must be owned by us or
    root and writable by nobody else, or sticky (then only a file's owner,
    the directory's owner and root may rename it -- like /dev/shm). Checked
    once per directory and process."""
    if directory in _checked_dirs:
        return
    st = os.stat(directory)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.geteuid(), 0) or (mode & 0o022 and not mode & stat.S_ISVTX):
        raise SharedMemoryError(
            errno.EPERM,
            f"refusing to create shared memory in {directory}: it is owned by {describe_uid(st.st_uid)} "
            f"with mode {mode:04o}, so {'its owner' if st.st_uid not in (os.geteuid(), 0) else 'other users'} "
            f"could rename or remove this process's segments. Point {DIR_ENV} at a directory of yours "
            f"(e.g. mkdir -m 700 /dev/shm/$USER) or at one like /dev/shm (root's, mode 1777).",
        )
    _checked_dirs.add(directory)


def describe_uid(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return kind
    return "a device or special file"


def _not_ours(path: str, st: os.stat_result | None) -> SegmentNotOursError:
    if st is None:
        try:
            st = os.lstat(path)
        except OSError:
            pass
    found = (
        "something this process may not open"
        if st is None
        else f"{file_kind(st.st_mode)} owned by {describe_uid(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}"
    )
    return SegmentNotOursError(
        errno.EPERM,
        f"refusing {path}: it is {found}, not a sharedexec segment of this user (a regular file owned by "
        f"{describe_uid(os.geteuid())} with mode 0600). It is never read. The segment of this name is gone, "
        "and another user or program created a file under its name; remove that file as its owner.",
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


def _open_own(path: str, flags: int, strict: bool = True) -> tuple[int, os.stat_result]:
    """Open ``path`` without following a symlink or blocking on a FIFO, and
    check the descriptor: a regular file of our effective uid (and mode 0600
    if ``strict``). SegmentNotFoundError if absent, _NotOurs if not ours."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise SegmentNotFoundError(errno.ENOENT, f"shared-memory segment {path} does not exist", path) from None
    except OSError as exc:
        if exc.errno in _NOT_OURS_ERRNOS:
            raise _NotOurs(path, None) from None
        raise
    st = os.fstat(fd)
    if not is_mine(st) or (strict and stat.S_IMODE(st.st_mode) != 0o600):
        os.close(fd)
        raise _NotOurs(path, st)
    return fd, st


@dataclass(eq=False)
class Hold:
    """This process's shared flock on one segment: taken by the first
    mapping (or :func:`hold`), released with the last."""

    name: str
    fd: int
    refs: int = 0

    def state(self) -> int:
        return struct.unpack("<I", os.pread(self.fd, 4, STATE_OFFSET))[0]


_holds: dict[str, Hold] = {}
_holds_lock = threading.Lock()


def _take_hold(name: str, fd: int) -> tuple[Hold | None, bool]:
    """This process's hold on ``name``, one more reference to it, and
    whether it keeps ``fd`` (the caller must then not close it)."""
    with _holds_lock:
        held = _holds.get(name)
        if held is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                # Its owner is unlinking it right now: the mapping is good
                # (it survives the unlinking), there is nothing to keep.
                return None, False
            held = _holds[name] = Hold(name, fd)
            held.refs = 1
            return held, True
        held.refs += 1
        return held, False


def drop_hold(held: Hold) -> None:
    with _holds_lock:
        held.refs -= 1
        if held.refs == 0:
            if _holds.get(held.name) is held:
                del _holds[held.name]
            os.close(held.fd)


def hold(name: str, directory: str | None = None) -> Hold | None:
    """Say "this process still needs ``name``" without mapping it (the
    copy-on-write tasks map it privately, one task at a time); None if it is
    gone. Give it back with :func:`drop_hold`."""
    try:
        fd, _ = _open_own(_path(name, directory), os.O_RDONLY)
    except SegmentNotFoundError:  # gone, or not ours (SegmentNotOursError)
        return None
    held, kept = _take_hold(name, fd)
    if not kept:
        os.close(fd)
    return held


def in_use(name: str, directory: str | None = None) -> bool:
    """Whether another process (or a mapping of this one's) maps ``name``."""
    try:
        fd, _ = _open_own(_path(name, directory), os.O_RDONLY)
    except SegmentNotFoundError:  # gone, or not ours (SegmentNotOursError)
        return False
    except OSError:  # cannot tell (out of descriptors, say): keep it, the safe mistake
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops our lock, if we got it


def attach(
    name: str,
    copy_on_write: bool = False,
    writable: bool = False,
    directory: str | None = None,
    key: bytes | None = None,
) -> Mapping:
    """Map an existing segment read-only; privately writable if
    ``copy_on_write`` (writes copy the touched pages and are seen by nobody
    else); shared writable if ``writable`` (the lease board only).

    Only a segment of ours is mapped (see Security): a regular file of our
    uid, mode 0600, whose header matches its size and whose tag verifies with
    ``key`` (the creator's, from the handle; default: this process's). Never
    registers the segment anywhere. But for the lease board, the mapping
    holds the segment's shared flock while it lives."""
    path = _path(name, directory)
    key = process_key() if key is None else key
    try:
        fd, st = _open_own(path, os.O_RDWR if writable else os.O_RDONLY)
    except _NotOurs as exc:
        raise _not_ours(path, exc.st) from None
    held, kept = None, False
    try:
        size = st.st_size
        if size < ALIGN:
            raise SegmentCorruptError(f"segment {name} is truncated: {size} bytes, smaller than its header")
        access = mmap.ACCESS_COPY if copy_on_write else mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mm = mmap.mmap(fd, size, access=access)
        if not writable:
            held, kept = _take_hold(name, fd)
            if held is not None:
                weakref.finalize(mm, drop_hold, held)
    finally:
        if not kept:
            os.close(fd)
    view = memoryview(mm)
    magic, version, _, _, total, layout_offset, layout_size, *_, stored_tag = HEADER.unpack_from(view, 0)
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


def creator_of(name: str, directory: str | None = None) -> int | None:
    """The pid that created a segment of ours, from its header (None if it
    is not ours or unreadable)."""
    try:
        fd, _ = _open_own(_path(name, directory), os.O_RDONLY, strict=False)
    except OSError:
        return None
    try:
        header = os.pread(fd, HEADER.size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return HEADER.unpack(header)[7] if len(header) == HEADER.size and header[:8] == MAGIC else None


def retire(name: str, directory: str | None = None) -> bool:
    """Mark a segment of ours retired (so attached workers drop it) and
    unlink it; whether it was.

    Unlinking does not disturb existing mappings: their memory is released
    when the last one is unmapped. Missing segments, files that are not ours
    (left alone) and failures are a DEBUG log line, never an exception: every
    caller is a sweep or a clean-up that must go on."""
    path = _path(name, directory)
    try:
        fd, st = _open_own(path, os.O_WRONLY, strict=False)
    except SegmentNotOursError as exc:
        log.debug("not retiring %s: %s", path, exc.strerror)
        return False
    except FileNotFoundError:
        return False
    except OSError as exc:
        # Out of descriptors (EMFILE, ENFILE) or interrupted: it may well be
        # ours, so unlink it if it is, unmarked (attached workers then keep it
        # mapped until their cache evicts it) -- never leave it behind.
        log.debug("cannot open %s to retire it: %s", path, exc)
        try:
            if is_mine(os.lstat(path)):
                os.unlink(path)
                return True
        except OSError as again:
            log.debug("cannot retire %s: %s", path, again)
        return False
    try:
        os.pwrite(fd, struct.pack("<I", STATE_RETIRED), STATE_OFFSET)
        # Unlink the file we opened, not one that took its name meanwhile.
        current = os.lstat(path)
        if (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
            return True
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("cannot retire %s: %s", path, exc)
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


os.register_at_fork(after_in_child=_reset_copy_pool_in_child)


def _fill(fd: int, view: memoryview, placed: list[tuple[int, memoryview]], directory: str) -> None:
    """Reserve, fault in and copy each ``(offset, source)``, in chunks.

    A fresh tmpfs page costs more to allocate and map than to copy into: the
    naive ``ftruncate`` + copy runs at about 1 GB/s here, all of it on one core
    in page faults. Each chunk is reserved (``posix_fallocate``), its page
    tables filled in one call (``MADV_POPULATE_WRITE``, Linux 5.14+; older
    kernels just fault on first touch) and then copied -- on two threads for
    large totals, since both the kernel work and numpy's copy run without the
    GIL. Measured by benchmarks/publish_speed.py."""
    target = np.frombuffer(view, dtype=np.uint8)
    base = target.ctypes.data
    jobs = []
    for offset, source in placed:
        src = np.frombuffer(source, dtype=np.uint8)
        for start in range(0, max(len(src), 1), _COPY_CHUNK):
            stop = min(start + _COPY_CHUNK, len(src))
            jobs.append((offset + start, src[start:stop]))

    def run(job: tuple[int, np.ndarray]) -> None:
        offset, src = job
        first = offset // _PAGE * _PAGE
        last = -(-(offset + len(src)) // _PAGE) * _PAGE
        last = min(last, len(target))
        if last <= first:
            return
        try:
            os.posix_fallocate(fd, first, last - first)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise _full_error(len(target), directory) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        _madvise(base + first, last - first, _MADV_POPULATE_WRITE)
        target[offset : offset + len(src)] = src

    if sum(len(src) for _, src in jobs) < _PARALLEL_COPY_BYTES or (os.cpu_count() or 1) < 2:
        for job in jobs:
            run(job)
    else:
        list(_get_copy_pool().map(run, jobs))
