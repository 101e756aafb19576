"""The publishing process's side: what it has published, and for how long.

One :class:`Registry` per process (``REGISTRY``). It answers one question per
large object met while pickling a task -- "which segment holds this?" -- and
decides when a segment can go.

Publish once
    Publications are keyed by ``id(obj)``, checked against a weak reference to
    the object and its structural fingerprint (``_codec.fingerprint``), never by
    ``id()`` alone: ids are reused once an object dies (design brief, trap 8).
    A changed structure, or a new object, is published anew.

Copy only what is new
    Each buffer copied into a segment is remembered by address and size, valid
    while the array that owns that memory lives (weak reference), and every
    segment this process created is remembered by address range. A derived
    frame (``df.assign(x=...)``, a subset of columns, an object returned by
    :func:`sharedexec.share`) then points at those bytes instead of copying
    them again.

Leases
    A segment is unlinked when its object is gone *and* no task that carries
    its handle can still need it. Tasks may be pickled long before a worker
    reads them (``submit``; an unchanged ``Pool``'s task queue), and a stdlib
    ``Pool`` tells nobody when a task ends, so a lease is a byte in a small
    shared *lease board*: 1 when the handle is pickled, 0 once a worker has
    mapped the segment (on Linux a mapped segment survives its unlinking).
    Executors that know when a future ends clear their bytes themselves too,
    which covers cancelled tasks and dead workers.

Retirement
    Before unlinking, the segment's header is marked retired, so that workers
    drop their cached mapping at their next task (``_cache``).

A small collector thread finishes releases whose leases were still held.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

try:
    import pyarrow as pa
except ImportError:  # pragma: no cover - the no-pyarrow CI job
    pa = None

from . import _codec, _names, _publication, _reaper, _segment

log = logging.getLogger("sharedexec")

BOARD_SLOTS = 1 << 20
NO_SLOT = -1


@dataclass(eq=False)
class Publication:
    mapping: _segment.Mapping
    nbytes: int  # bytes of data the object holds (copied here or referenced)
    depends: list[Publication]  # publications whose buffers the table names
    fingerprint: Any = None
    key: int = 0  # id() of the source object, valid while `source` lives
    source: weakref.ref | None = None
    source_alive: bool = True
    pinned: bool = False  # a lease could not get a board slot: keep till exit
    slots: set[int] = field(default_factory=set)
    dependents: int = 0
    buffer_keys: list[tuple[int, int]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.mapping.name


class _Board:
    """The lease board: one byte per outstanding lease, cleared by workers.

    A taken slot holds a mark (1..255, turning over), and a lease is ended by
    the publisher only while its slot still holds its mark: a worker may have
    cleared the slot already, and the slot been taken again for another task,
    whose lease must not end with this one."""

    def __init__(self, owner_pid: int):
        self.mapping = _segment.create([memoryview(bytes(BOARD_SLOTS))], b"", owner_pid)
        self._mm = self.mapping.view.obj
        self._cursor = 0
        self._mark = 0

    @property
    def name(self) -> str:
        return self.mapping.name

    def take(self) -> tuple[int, int]:
        """A free slot and the lease token for it (slot and mark)."""
        base = _segment.ALIGN
        for start, stop in ((self._cursor, BOARD_SLOTS), (0, self._cursor)):
            pos = self._mm.find(b"\0", base + start, base + stop)
            if pos >= 0:
                self._mark = self._mark % 255 + 1
                self._mm[pos] = self._mark
                self._cursor = pos - base + 1
                slot = pos - base
                return slot, slot << 8 | self._mark
        return NO_SLOT, NO_SLOT

    def held(self, slot: int) -> bool:
        return self._mm[_segment.ALIGN + slot] != 0

    def end(self, token: int) -> None:
        slot, mark = token >> 8, token & 0xFF
        if self._mm[_segment.ALIGN + slot] == mark:
            self._mm[_segment.ALIGN + slot] = 0


def _buffer_address(raw: memoryview) -> int:
    return np.frombuffer(raw, dtype=np.uint8).ctypes.data if raw.nbytes else 0


def _memory_owner(raw: memoryview) -> Callable[[], Any] | None:
    """A reference to what owns ``raw``'s memory: while it answers, a buffer
    at the same address and size is the same bytes.

    numpy's owner is held weakly: it may be a temporary (a contiguous copy of
    a strided array) that must not be kept. pyarrow wraps each buffer in a
    new ``pa.Buffer`` every time an array is pickled, so that wrapper is held
    strongly; it keeps the source's own memory, no more, and only until the
    entry goes with its source (``Registry.collect``)."""
    owner = raw.obj
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    if pa is not None and isinstance(owner, pa.Buffer):
        return lambda: owner
    try:
        return weakref.ref(owner)
    except TypeError:
        return None


class Registry:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.RLock()
        self._by_id: dict[int, Publication] = {}
        self._by_name: dict[str, Publication] = {}
        self._buffers: dict[tuple[int, int], tuple[Callable[[], Any], Publication, int]] = {}
        self._ranges: list[tuple[int, int, Publication]] = []  # (start, end, pub), sorted
        self._shared_ids: set[int] = set()  # objects returned by share(): sent as handles by any pickler
        self._waiting: set[Publication] = set()
        self._dead: deque[Publication] = deque()
        self._wake = threading.Event()
        self._collector: threading.Thread | None = None
        self._board: _Board | None = None
        self.counters = {"publications": 0, "reuse_hits": 0, "bytes_copied": 0, "bytes_reused": 0, "bytes_pickled": 0}

    # -- publishing -----------------------------------------------------------

    def find(self, obj: Any) -> Publication | None:
        """The live publication of ``obj`` if its structure is unchanged."""
        pub = self._by_id.get(id(obj))
        if pub is None or pub.source is None or pub.source() is not obj:
            return None
        if not _codec.same_fingerprint(pub.fingerprint, _codec.fingerprint(obj)):
            return None
        return pub

    def publish(self, obj: Any, min_bytes: int = 0, cloudpickle_fallback: bool = False) -> Publication | None:
        """The publication of ``obj``: found again (the per-task path: one
        fingerprint), or created now -- a copy of the buffers no live segment
        of ours holds yet -- unless ``obj`` is smaller than ``min_bytes``.
        ``cloudpickle_fallback``: see ``_codec.encode``."""
        pub = self.find(obj)
        if pub is None and min_bytes and _codec.nbytes(obj) < min_bytes:
            return None
        with self._lock:
            if pub is None:
                pub = self.find(obj)  # another thread may have published it meanwhile
            if pub is not None:
                self.counters["reuse_hits"] += 1
                return pub
            self._start_collector()
            _reaper.watch(_names.shm_dir())
            if self._board is None:  # first, so that a full directory fails here, not in lease()
                self._board = _Board(self.pid)
            layout, buffers = _codec.encode(obj, cloudpickle_fallback)
            raws = [buf.raw() for buf in buffers]
            refs, new, depends = [], [], []
            for raw in raws:
                found = self._locate(raw)
                if found is None:
                    refs.append(len(new))
                    new.append(raw)
                else:
                    owner, (name, offset) = found
                    refs.append((name, offset, raw.nbytes))
                    if owner not in depends:
                        depends.append(owner)
            mapping, placed = _publication.write(layout, new, refs, self.pid)
            pub = Publication(mapping, sum(r.nbytes for r in raws), depends, _codec.fingerprint(obj))
            for dep in depends:
                dep.dependents += 1
            copied = sum(r.nbytes for r in new)
            self.counters["publications"] += 1
            self.counters["bytes_copied"] += copied
            self.counters["bytes_reused"] += pub.nbytes - copied
            self._remember_buffers(pub, new, placed)
            self._by_name[pub.name] = pub
            self._add_range(pub)
            self._bind(pub, obj)
            log.debug(
                "published %s %s as %s: %s copied, %s reused from %d segment(s)",
                type(obj).__name__, getattr(obj, "shape", ""), pub.name,
                _segment.format_bytes(copied), _segment.format_bytes(pub.nbytes - copied), len(depends),
            )
            return pub

    def _bind(self, pub: Publication, obj: Any) -> None:
        if self._by_id.get(pub.key) is pub:
            del self._by_id[pub.key]
        key = pub.key = id(obj)
        pub.source = weakref.ref(obj, lambda _ref, pub=pub: self._source_died(pub))
        previous = self._by_id.get(key)
        if previous is not None and previous is not pub:
            # obj changed structure: the old publication stays for the tasks
            # that carry it and goes when their leases end.
            previous.source = None
            self._source_died(previous)
        self._by_id[key] = pub

    def _locate(self, raw: memoryview) -> tuple[Publication, tuple[str, int]] | None:
        address = _buffer_address(raw)
        entry = self._buffers.get((address, raw.nbytes))
        if entry is not None:
            owner_ref, pub, offset = entry
            if owner_ref() is not None and pub.name in self._by_name:
                return pub, (pub.name, offset)
        i = bisect.bisect_right(self._ranges, (address, float("inf"))) - 1
        if i >= 0:
            start, end, pub = self._ranges[i]
            if address + raw.nbytes <= end:
                return pub, (pub.name, address - start)
        return None

    def _remember_buffers(self, pub: Publication, new: list[memoryview], placed) -> None:
        for raw, (_, offset, _) in zip(new, placed):
            owner = _memory_owner(raw)
            if owner is not None and raw.nbytes:
                key = (_buffer_address(raw), raw.nbytes)
                self._buffers[key] = (owner, pub, offset)
                pub.buffer_keys.append(key)

    def _add_range(self, pub: Publication) -> None:
        start = _buffer_address(pub.mapping.view)
        bisect.insort(self._ranges, (start, start + pub.mapping.size, pub), key=lambda r: r[:2])

    # -- share() ----------------------------------------------------------------

    def share(self, obj: Any) -> Any:
        """Publish ``obj`` and return an equal object backed by the segment."""
        with self._lock:
            if self.shared_publication(obj) is not None:
                return obj  # already one
            pub = self.publish(obj)
            view = pub.mapping.view.toreadonly()
            shared = _publication.read(
                _segment.Mapping(pub.name, pub.mapping.size, view, pub.mapping.layout_offset, pub.mapping.layout_size),
                lambda name: self._by_name[name].mapping,
            )
            pub.fingerprint = _codec.fingerprint(shared)
            self._bind(pub, shared)
            pub.source_alive = True
            self._waiting.discard(pub)
            self._shared_ids.add(id(shared))
            return shared

    def shared_publication(self, obj: Any) -> Publication | None:
        if id(obj) not in self._shared_ids:
            return None
        return self.find(obj)

    # -- leases -----------------------------------------------------------------

    def lease(self, pub: Publication) -> tuple[str, int, int]:
        """Take a lease on ``pub`` for one pickled handle: the board's name,
        the slot a worker clears, and the token to end it with here."""
        with self._lock:
            slot, token = self._board.take()
            if slot == NO_SLOT:
                pub.pinned = True
            else:
                pub.slots.add(slot)
            return self._board.name, slot, token

    def end_leases(self, tokens: list[int]) -> None:
        """The tasks holding these leases are over (done, failed, cancelled)."""
        if not tokens:
            return
        with self._lock:
            for token in tokens:
                if token != NO_SLOT and self._board is not None:
                    self._board.end(token)
        self._wake.set()

    # -- releasing --------------------------------------------------------------

    def _source_died(self, pub: Publication) -> None:
        # Runs inside garbage collection, possibly in any thread and in the
        # middle of one of our own methods: only queue it.
        self._dead.append(pub)
        self._wake.set()

    def _start_collector(self) -> None:
        if self._collector is None:
            self._collector = threading.Thread(target=self._collect_forever, name="sharedexec-collector", daemon=True)
            self._collector.start()

    def _collect_forever(self) -> None:
        while True:
            self._wake.wait(0.05 if self._waiting else None)
            self._wake.clear()
            self.collect()

    def collect(self) -> None:
        """Release every publication whose object is gone and whose leases ended."""
        with self._lock:
            while self._dead:
                pub = self._dead.popleft()
                if pub.source_alive and (pub.source is None or pub.source() is None):
                    pub.source_alive = False
                    pub.fingerprint = None  # it holds the source's arrays alive
                    if self._by_id.get(pub.key) in (None, pub):  # not an id reused by a newer share()
                        self._shared_ids.discard(pub.key)
                    for key in pub.buffer_keys:
                        if self._buffers.get(key, (None, None))[1] is pub:
                            del self._buffers[key]
                    pub.buffer_keys.clear()
                    self._waiting.add(pub)
            for pub in list(self._waiting):
                self._try_release(pub)

    def _try_release(self, pub: Publication) -> None:
        if pub.source_alive or pub.dependents or pub.pinned:
            return
        if self._board is not None:
            pub.slots = {slot for slot in pub.slots if self._board.held(slot)}
        if pub.slots:
            return
        self._waiting.discard(pub)
        if self._by_id.get(pub.key) is pub:
            del self._by_id[pub.key]
        self._by_name.pop(pub.name, None)
        self._ranges = [r for r in self._ranges if r[2] is not pub]
        _segment.retire(pub.name)
        log.debug("released %s", pub.name)
        for dep in pub.depends:
            dep.dependents -= 1
            self._try_release(dep)

    def release_all(self) -> None:
        """At exit: unlink everything this process owns, leases or not."""
        with self._lock:
            for pub in list(self._by_name.values()):
                _segment.retire(pub.name)
            if self._board is not None:
                _segment.retire(self._board.name)
            self._by_name.clear()
            self._by_id.clear()
        if _reaper.watching():  # results workers wrote for us, claimed or not
            _names.remove_owned_by(self.pid)

    def stats(self) -> dict[str, int]:
        self.collect()
        with self._lock:
            return {
                "segments": len(self._by_name),
                "bytes_shared": sum(p.mapping.size for p in self._by_name.values()),
                **self.counters,
            }


class TaskLeases(list):
    """The lease tokens taken while pickling one submitted task.

    The pool's queue feeder thread appends to it as it pickles the task; the
    future's done callback calls :meth:`end`. A task may be pickled *after*
    its future is done: a broken pool fails the tasks still waiting in the
    feeder's buffer, and the feeder pickles (publishes, leases) them all the
    same before it finds the pipe closed. A lease taken then is ended at once,
    or it would keep its segment alive until the process exits."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._ended = False

    def append(self, token: int) -> None:
        with self._lock:
            if not self._ended:
                super().append(token)
                return
        REGISTRY.end_leases([token])

    def end(self, _future: Any = None) -> None:
        with self._lock:
            self._ended = True
            tokens = list(self)
            self.clear()
        REGISTRY.end_leases(tokens)


REGISTRY = Registry()


def _new_registry_in_child() -> None:
    # A forked child inherits our tables but not our collector thread, and
    # must never unlink its parent's segments: it starts from nothing.
    global REGISTRY
    REGISTRY = Registry()


os.register_at_fork(after_in_child=_new_registry_in_child)
atexit.register(lambda: REGISTRY.release_all() if REGISTRY.pid == os.getpid() else None)
