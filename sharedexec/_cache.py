"""The attaching process's side: handles in, objects out.

A worker meeting a handle for the first time maps the segment (read-only),
decodes the object and keeps it in a per-process cache, so the thousandth task
that uses the same frame pays a dict lookup and a shallow copy
(``_codec.task_view``: what one task does to its frame is not seen by the next).
With ``mmap_mode="c"`` each task maps the segment privately instead
(copy-on-write: writes copy the touched pages, seen by nobody else; a private
copy of it under POSIX shared memory, which XNU maps shared only) and nothing
is cached.

The cache is bounded in bytes and drops the entries whose segment the
publisher has retired, before each task and every half second on a daemon
thread -- a process that receives shared objects through a queue, and runs no
task, drops them too. While it keeps a mapping, the process holds the
segment's shared flock (``_segment``), which tells the publisher it is still
needed; a ``mmap_mode="c"`` task maps privately and briefly, so the cache
keeps a flock alone (``_segment.hold``) for those segments.

Results travel the other way: a worker writes a large result into a segment
named for the *caller* (so the caller's reaper removes it if the caller dies),
and the caller maps it writable and unlinks it at once: nobody else maps it
any more, so its writes are its own, and the memory lives as long as the
caller's object does.
"""

from __future__ import annotations

import bisect
import errno
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _codec, _leases, _names, _publication, _segment
from ._errors import SegmentNotFoundError, SegmentNotOursError, SharedExecWarning, SharedMemoryError

try:
    _PHYS_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
except (AttributeError, ValueError, OSError):  # Windows, or a platform without these names
    _PHYS_BYTES = 8 << 30
CACHE_ENV = "SHAREDEXEC_WORKER_CACHE_BYTES"
_SWEEP_SECONDS = 0.5
# A task sweeps (one read per cached segment) at most this often: tasks of a
# few milliseconds over a large cache would otherwise pay it every time. A
# retired entry is never hit meanwhile: no new handle names a retired segment.
_TASK_SWEEP_SECONDS = 0.05
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str) -> int | None:
    """``"2GB"``, ``"512MiB"``, ``"1000000"`` in bytes; None if it is not a
    size (``"inf"``, ``"1e400"`` and ``"nan"`` are not)."""
    text = text.strip()
    number = text.rstrip("kKmMgGtTiIbB").strip()
    try:
        value = float(number) * _UNITS[text[len(text.rstrip("kKmMgGtTiIbB")) :].upper()]
    except (ValueError, KeyError):
        return None
    return int(value) if math.isfinite(value) and value >= 0 else None


def cache_budget() -> int:
    """``$SHAREDEXEC_WORKER_CACHE_BYTES``, or half the machine's memory; a
    value that is not a size warns and falls back to that (read at import:
    a typo must never make ``import sharedexec`` fail)."""
    text = os.environ.get(CACHE_ENV, "")
    size = parse_size(text) if text.strip() else _PHYS_BYTES // 2
    if size is None:
        warnings.warn(
            f"{CACHE_ENV}={text!r} is not a size in bytes (e.g. 2GB, 512MiB, 1000000): using half "
            f"the machine's memory, {_segment.format_bytes(_PHYS_BYTES // 2)}, per worker instead",
            SharedExecWarning,
            stacklevel=2,
        )
        size = _PHYS_BYTES // 2
    return size


@dataclass(eq=False)
class _Entry:
    obj: Any
    mapping: _segment.Mapping
    nbytes: int
    private: bool  # holds mutable values: each task decodes its own (_codec.FrozenDecode)
    cls: type  # the object's class: pandas may write into its arrays in place (_codec.writes_in_place)
    mappings: list[_segment.Mapping]  # of the segments it lies in


class TaskMemory:
    """Memory of one task's own for the arrays of a cached frame or Series,
    where pandas writes in place (``_codec.writes_in_place``): ``own(arr)``
    is ``arr``'s bytes in a private mapping of its segment
    (``_segment.private_view``: one per segment and task, written pages
    copied), or a copy of them -- object arrays, which live in the process,
    and arrays of a store that cannot map privately (POSIX shared memory,
    to XNU's rules: then each task copies its frame's bytes, as a stdlib
    task receives them)."""

    def __init__(self, mappings: list[_segment.Mapping]) -> None:
        starts = [np.frombuffer(m.view, np.uint8).__array_interface__["data"][0] for m in mappings]
        self._spans = [(start, start + m.size, m) for start, m in zip(starts, mappings)]
        self._views: dict[str, memoryview | None] = {}
        self._given: list[tuple[int, int]] = []  # (start, end) handed out, sorted, disjoint

    def own(self, arr: np.ndarray) -> np.ndarray:
        if arr.nbytes and not arr.dtype.hasobject:
            low, nbytes = _codec.span(arr)
            for start, end, mapping in self._spans:
                if start <= low and low + nbytes <= end:
                    view = self._view(mapping)
                    if view is not None and self._take(low, low + nbytes):
                        offset = arr.__array_interface__["data"][0] - start
                        return np.ndarray(arr.shape, arr.dtype, buffer=view, offset=offset, strides=arr.strides)
                    break
        return arr.copy(order="K")

    def _view(self, mapping: _segment.Mapping) -> memoryview | None:
        if mapping.name not in self._views:
            self._views[mapping.name] = _segment.private_view(mapping)
        return self._views[mapping.name]

    def _take(self, low: int, high: int) -> bool:
        # Arrays over one memory (``pd.DataFrame({"a": x, "b": x},
        # copy=False)`` keeps two blocks over one array) are stored once; a
        # pickle gives each its own, so a write through one must not show
        # through the other: the second gets a copy (as _codec._shared_memory).
        at = bisect.bisect(self._given, (low, high))
        if (at and self._given[at - 1][1] > low) or (at < len(self._given) and self._given[at][0] < high):
            return False
        self._given.insert(at, (low, high))
        return True


def descriptor_budget() -> int:
    """How many segments the cache may keep mapped: each holds one
    descriptor (its flock, see ``_segment.map_fd``), and half the soft
    ``RLIMIT_NOFILE`` (1024 on many Linux desktops, 256 on macOS) is left to
    the task and the pool. The soft limit is not raised: see
    docs/how-it-works.md."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 512
    return 1 << 20 if soft == resource.RLIM_INFINITY else max(8, soft // 2)


_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class WorkerCache:
    def __init__(self, budget: int | None = None, max_entries: int | None = None) -> None:
        self.budget = budget if budget is not None else cache_budget()
        self.max_entries = max_entries if max_entries is not None else descriptor_budget()
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str, int], _Entry] = OrderedDict()  # by (segment, strings, protocol)
        self._boards: dict[str, _segment.Mapping] = {}
        self._holds: dict[str, _segment.Hold] = {}  # segments of mmap_mode="c" tasks
        self._sweeper: threading.Thread | None = None
        self._swept = 0.0  # time.monotonic() of the last sweep

    def resolve(self, handle: Handle) -> Any:
        try:
            with _codec.strings_as(handle.strings), _codec.pickled_with(handle.protocol):
                return self._resolve(handle)
        except SegmentNotFoundError as exc:
            raise handle.gone_error(exc) from exc
        finally:
            self._end_lease(handle)

    def _resolve(self, handle: Handle) -> Any:
        if handle.mmap_mode == "c":
            if handle.name not in self._holds:
                held = _segment.hold(handle.name)
                if held is not None:
                    with self._lock:
                        self._holds[handle.name] = held
                        self._start_sweeper()
            return self._read(_segment.attach(handle.name, copy_on_write=True, key=handle.key), copy_on_write=True)
        if handle.publisher == os.getpid():
            # Our own handle read back (Pool.terminate() drains its task
            # queue by unpickling it): caching it would map our own
            # segment, and so keep it, for good.
            return self._read(_segment.attach(handle.name, key=handle.key), copy_on_write=False)
        # One entry per way of decoding: strings="arrow" gives other columns,
        # a pickle protocol under 5 native byte order.
        key = (handle.name, handle.strings, handle.protocol)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is None:
            try:
                mapping = _segment.attach(handle.name, copy_on_write=False, key=handle.key)
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    raise
                # The task's own files, or a lower limit than at start: the
                # oldest half of the cache gives its descriptors back (an
                # entry no task holds is unmapped at once), then once more.
                with self._lock:
                    self._evict(len(self._entries) // 2)
                mapping = _segment.attach(handle.name, copy_on_write=False, key=handle.key)
            others: dict[str, _segment.Mapping] = {}
            with _codec.frozen_decode() as decoded:
                obj = self._read(mapping, copy_on_write=False, others=others)
            # An object with mutable values is never handed out twice.
            mappings = [mapping, *others.values()]
            entry = _Entry(None if decoded.private else obj, mapping, mapping.size, decoded.private, type(obj), mappings)
            with self._lock:
                self._entries[key] = entry
                self._evict()
                self._start_sweeper()
            if entry.private and not _codec.writes_in_place(entry.cls):
                return obj
        return self._for_task(entry)

    def _for_task(self, entry: _Entry) -> Any:
        # What one task does to its object must not reach the next task: a
        # shallow view over read-only data, or a decode of its own when the
        # object holds values that cannot be read-only (a list in an object
        # column). The segment stays mapped by the entry meanwhile. Where
        # pandas writes in place, a frame's arrays are the task's own too.
        in_place = _codec.writes_in_place(entry.cls)
        if not entry.private:
            return _codec.task_view(entry.obj, TaskMemory(entry.mappings).own if in_place else None)
        if in_place:  # a decode over private mappings, writable as a stdlib task's
            return self._read(_segment.attach(entry.mapping.name, copy_on_write=True, key=entry.mapping.key), True)
        with _codec.frozen_decode():
            return self._read(entry.mapping, copy_on_write=False)

    def _end_lease(self, handle: Handle) -> None:
        # The segment is mapped (or will never be): the publisher may free it
        # whenever it likes now. No board (another machine, a dead publisher)
        # means no lease to end, and must not hide the error being raised.
        if handle.lease < 0:
            return
        try:
            _leases.clear(self._board(handle.board, handle.key).view, handle.lease)
        except SharedMemoryError:
            pass

    def _read(self, mapping: _segment.Mapping, copy_on_write: bool, others: dict[str, _segment.Mapping] | None = None) -> Any:
        key = mapping.key  # the handle's: the segments its table names are the same publisher's
        # Other segments a table names (buffers shared with an earlier
        # publication) are mapped with the same access, once per decode
        # (into ``others``).
        others = {} if others is None else others

        def attach_other(other: str) -> _segment.Mapping:
            if other not in others:
                others[other] = _segment.attach(other, copy_on_write=copy_on_write, key=key)
            return others[other]

        return _publication.read(mapping, attach_other)

    def _board(self, name: str, key: bytes) -> _segment.Mapping:
        board = self._boards.get(name)
        if board is None:
            board = self._boards[name] = _segment.attach(name, writable=True, key=key)
        return board

    def _evict(self, max_entries: int | None = None) -> None:
        # Least recently used first, past the byte budget or the descriptor one.
        if max_entries is None:
            max_entries = self.max_entries
        total = sum(e.nbytes for e in self._entries.values())
        while (total > self.budget or len(self._entries) > max_entries) and len(self._entries) > 1:
            _, entry = self._entries.popitem(last=False)
            total -= entry.nbytes

    def sweep_if_due(self) -> None:
        """:meth:`sweep`, unless one ran in the last ``_TASK_SWEEP_SECONDS``."""
        if time.monotonic() - self._swept >= _TASK_SWEEP_SECONDS:
            self.sweep()

    def sweep(self) -> None:
        """Drop entries, holds and lease boards whose publisher retired them."""
        retired = _segment.STATE_RETIRED
        self._swept = time.monotonic()
        with self._lock:
            for name in [n for n, e in self._entries.items() if e.mapping.state() == retired]:
                del self._entries[name]
            for name in [n for n, b in self._boards.items() if b.state() == retired]:
                del self._boards[name]
            for name in [n for n, h in self._holds.items() if h.state() == retired]:
                _segment.drop_hold(self._holds.pop(name))

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_forever, name="sharedexec-sweeper", daemon=True)
            self._sweeper.start()

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(_SWEEP_SECONDS)
            self.sweep()

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Handle:
    """What travels in a task instead of a large object (~170 bytes pickled).

    ``key`` authenticates the segments it names (``_segment``, Security): it
    travels only here, through the pool's own pipe."""

    name: str
    mmap_mode: str
    board: str
    lease: int  # slot << 8 | mark on the board (see _leases); negative: none
    publisher: int
    host: str
    key: bytes = field(repr=False)  # never shown: whoever holds it could forge our segments
    strings: str = "exact"  # the entry point's ``strings`` option
    protocol: int = 5  # the pool's pickle protocol (``_codec.pickled_with``)

    def __reduce__(self):
        return _resolve, (
            self.name, self.mmap_mode, self.board, self.lease, self.publisher, self.host, self.key, self.strings,
            self.protocol,
        )

    def gone_error(self, error: SegmentNotFoundError | None = None) -> SegmentNotFoundError:
        if self.host != _names.HOST:
            cause = (
                f"this process runs on {_names.HOST}: shared memory does not cross machines. On a "
                "cluster, send data with the cluster's own mechanism (e.g. Dask's scatter or Ray's "
                "put) instead of sharedexec"
            )
        elif not _names.pid_alive(self.publisher):
            cause = "the publishing process has exited, and its segments with it"
        else:
            cause = (
                "the publishing process released it (it does when no task it sent and no live "
                "process needs it any more, and when it exits), or it was removed from "
                f"{_names.shm_dir()} by a cleanup script, `rm /dev/shm/sx_*` or a container restart"
            )
        if isinstance(error, SegmentNotOursError):
            # Something that is not a segment of ours is there under its
            # name: the error says what it is and what to do about it.
            dead = "" if _names.pid_alive(self.publisher) else (
                " The publishing process has exited: its segment went with it, and this is not it."
            )
            return SegmentNotOursError(
                error.errno,
                f"cannot rebuild a shared object from segment {self.name}, published by process "
                f"{self.publisher} on {self.host}: {error.strerror}{dead}",
            )
        return SegmentNotFoundError(
            2,
            f"cannot rebuild a shared object: segment {self.name}, published by process "
            f"{self.publisher} on {self.host}, does not exist. Likely cause: {cause}.",
        )


CACHE = WorkerCache()


class Unresolved:
    """Stands in a task's arguments for an object whose handle failed; the
    task raises the error when it runs (see ``defer_errors``)."""

    def __init__(self, error: Exception):
        self.error = error


_deferral = threading.local()


def defer_errors(errors: list[Exception] | None) -> None:
    """While a task is being unpickled, collect handle errors in ``errors``
    instead of raising them: raised while a worker reads its call queue, they
    would break the whole pool (BrokenProcessPool; a ``Pool`` would hang),
    not fail the one task. ``None`` stops deferring."""
    _deferral.errors = errors


def _resolve(
    name: str, mmap_mode: str, board: str, lease: int, publisher: int, host: str, key: bytes, strings: str = "exact",
    protocol: int = 5,
) -> Any:
    try:
        return CACHE.resolve(Handle(name, mmap_mode, board, lease, publisher, host, key, strings, protocol))
    except Exception as exc:
        errors = getattr(_deferral, "errors", None)
        if errors is None:
            raise
        errors.append(exc)
        return Unresolved(exc)


def write_result(
    obj: Any, owner_pid: int, cloudpickle_fallback: bool = False
) -> tuple[_segment.Mapping, tuple[int, ...]]:
    """Write a task's result into a new segment owned by ``owner_pid``
    (``cloudpickle_fallback``: see ``_codec.encode``); with the numbers of
    its buffers that a protocol-5 pickle gives back read-only."""
    read_only: set[int] = set()
    layout, buffers = _codec.encode(obj, cloudpickle_fallback, read_only=read_only)
    raws = list(map(_codec.raw_view, buffers))
    mapping, _ = _publication.write(layout, raws, list(range(len(raws))), owner_pid)
    return mapping, tuple(sorted(read_only))


def remove_orphan_results(
    owner_pid: int, creators: set[int], unfinished_only: bool = False, left: set[int] | None = None
) -> list[str]:
    """Unlink results written for ``owner_pid`` by the dead processes among
    ``creators`` (a worker killed mid-send: joblib kills busy workers when a
    task fails; a terminated pool's). A pool removes its own workers'
    results alone: another pool's may be in flight from a worker that has
    already exited (max_tasks_per_child). Call only when no result of theirs
    can still be claimed -- after the pool's end -- or with
    ``unfinished_only``, where it removes only the results their writer died
    filling, which no message can name; ``left`` collects the creators of
    the finished ones it leaves then."""
    removed = []
    # Only our own files are opened: another user's files named for our pid
    # cost an lstat each, not an open (a DoS amplifier otherwise).
    for name in _segment.list_owned_by(owner_pid) if creators else ():
        origin = _segment.creator_of(name)
        if origin is None:
            continue
        creator, finished = origin
        if creator != owner_pid and creator in creators and not _names.pid_alive(creator):
            if unfinished_only and finished:
                if left is not None:
                    left.add(creator)
                continue
            _segment.retire(name)
            removed.append(name)
    return removed


def claim_result(name: str, key: bytes, protocol: int = 5, read_only: tuple[int, ...] = ()) -> Any:
    """Map a result writable and unlink it: it is ours alone now (the worker
    that wrote it unmapped it; a shared mapping, so no copy where private
    ones are refused, see ``_store``). Other segments its table names are
    someone else's too: privately.
    ``key`` is the writing worker's (``_segment``, Security); ``protocol`` the
    pickle protocol its message was written with (``_codec.pickled_with``);
    ``read_only`` the buffers that pickle would have given read-only (none
    under protocol 4).

    While :func:`defer_claims` collects, a result that cannot be read is
    reported there (and None stands in for it) instead of raised: raised
    while a pool's result thread reads its queue, the error would break the
    whole executor (BrokenProcessPool) or end a ``Pool``'s result handler,
    which reads any OSError as "pipe closed" and leaves ``map`` waiting for
    ever -- not fail the one task."""
    try:
        try:
            mapping = _segment.attach(name, writable=True, key=key)  # (no hold: nobody else maps it)
            with _codec.pickled_with(protocol):
                return _publication.read(
                    mapping, lambda other: _segment.attach(other, copy_on_write=True, key=key), read_only
                )
        finally:
            _segment.retire(name)
    except Exception as exc:
        error = _claim_error(name, exc)
        errors = getattr(_claims, "errors", None)
        if errors is None:
            raise error from exc
        error.__cause__ = exc
        errors.append(error)
        return None


def _claim_error(name: str, exc: Exception) -> Exception:
    if isinstance(exc, SegmentNotFoundError):
        return type(exc)(
            exc.errno,
            f"the result of a task was written to shared-memory segment {name}, which no longer "
            f"exists: it was removed from {_names.shm_dir()} before this process read it. {exc.strerror}",
        )
    if isinstance(exc, OSError) and exc.errno in _OUT_OF_DESCRIPTORS:
        return SharedMemoryError(
            exc.errno,
            f"cannot read the result of a task from shared-memory segment {name}: this process has no "
            f"file descriptor left to open it ({_descriptors_in_use()}). Close files or sockets it keeps "
            "open, or raise the limit (`ulimit -n`, or resource.setrlimit(RLIMIT_NOFILE) in the parent).",
        )
    return exc


def _descriptors_in_use() -> str:
    import resource  # wherever there are segments (POSIX)

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        return f"{len(os.listdir('/proc/self/fd'))} open, soft limit {soft}"
    except OSError:  # no /proc (macOS), or no descriptor to list it with
        return f"soft limit {soft}"


_claims = threading.local()


def defer_claims(errors: list[Exception] | None) -> None:
    """While a result message is being unpickled, collect the errors of its
    results in ``errors`` instead of raising them (see :func:`claim_result`);
    ``None`` stops collecting."""
    _claims.errors = errors


def _new_cache_in_child() -> None:
    global CACHE
    CACHE = WorkerCache()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_new_cache_in_child)
