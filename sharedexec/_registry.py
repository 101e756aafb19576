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
    Each buffer copied into a segment whose source memory cannot change
    (``_codec.unchanging_memory``: a frame's blocks under the publication's
    ``write_guard``, index data; Arrow buffers -- never a writable ndarray)
    is remembered by address and size, valid
    while the array that owns that memory lives (weak reference), and every
    segment this process created is remembered by address range. A derived
    frame (``df.assign(x=...)``, a subset of columns, an object returned by
    :func:`sharedexec.share`) then points at those bytes instead of copying
    them again; so does a slice of them (``df.iloc[a:b]``: ``_codec.encode``
    asks ``_in_shared`` before it compacts strided rows or an Arrow slice).

Lifetime
    A segment is needed while a task that carries its handle may still map
    it (a *lease*, see ``_leases``) or a live process maps it (a shared
    ``flock`` each mapping process holds, see ``_segment.in_use``). When
    neither holds it is unlinked -- even if its object lives: a frame used by
    one parallel step does not keep its shared copy after the pool is gone --
    and published again at the next submission. Objects returned by
    :func:`sharedexec.share` are the exception: their memory *is* the
    segment, which lives as long as they do. Derived publications keep the
    segments their tables name.

        published --(leases ended, nobody maps it)--> unlinked (object lives:
            |                                           republished if sent again)
            +--(object gone, leases ended)----------> unlinked

Retirement
    Before unlinking, the segment's header is marked retired, so that workers
    drop their cached mapping (``_cache``).

A small collector thread finishes releases, polling while anything is published.
"""

from __future__ import annotations

import bisect
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

try:
    import pyarrow as pa
except ImportError:  # pragma: no cover - the no-pyarrow CI job
    pa = None

from . import _adopt, _codec, _leases, _publication, _reaper, _segment

log = logging.getLogger("sharedexec")

# How often the collector looks for segments nobody needs any more.
POLL_SECONDS = 0.1


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
    shared: bool = False  # its source came from share(): backed by the segment itself
    adopted: bool = False  # its source's blocks were re-pointed at it (_adopt): the same
    released: bool = False
    slots: set[int] = field(default_factory=set)
    leased: int = 0  # leases taken so far: a change says "handed out again"
    last_used: float = field(default_factory=time.monotonic)
    dependents: int = 0  # unreleased publications whose tables name this one
    buffer_keys: list[tuple[int, int]] = field(default_factory=list)  # entries of _buffers it uses
    guard: Any = None  # see _codec.write_guard
    checked: int | None = None  # _codec.block_writes() when last found unchanged

    @property
    def name(self) -> str:
        return self.mapping.name

    def unbind(self) -> None:
        """Its source is gone or changed: hold none of the source's memory."""
        self.fingerprint = None
        self.guard = None


@dataclass(eq=False)
class _Buffer:
    """A buffer of ours copied into a segment: where, and while what lives."""

    owner: Callable[[], Any]  # answers while the memory at that address is those bytes
    holder: Publication  # whose segment holds the copy
    offset: int
    users: int = 0  # live publications that copied it or point at it


def _buffer_address(raw: memoryview) -> int:
    return np.frombuffer(raw, dtype=np.uint8).ctypes.data if raw.nbytes else 0


def _memory_owner(raw: memoryview, unchanging: bool) -> Callable[[], Any] | None:
    """A reference to what owns ``raw``'s memory: while it answers, a buffer
    at the same address and size is the same bytes; None where that is not
    so. Arrow's buffers are immutable; numpy memory keeps its bytes only
    where ``_codec.unchanging_memory`` says so (``unchanging``).

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
    if not unchanging:
        return None
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
        self._buffers: dict[tuple[int, int], _Buffer] = {}  # by (address, size)
        self._buffer_keys: list[tuple[int, int]] = []  # the same keys, sorted
        self._ranges: list[tuple[int, int, Publication]] = []  # (start, end, pub), sorted
        self._shared_ids: set[int] = set()  # objects returned by share(): sent as handles by any pickler
        self._waiting: set[Publication] = set()
        self._dead: deque[Publication] = deque()
        self._wake = threading.Event()
        self._collector: threading.Thread | None = None
        self._board: _leases.Board | None = None
        self.counters = {"publications": 0, "reuse_hits": 0, "bytes_copied": 0, "bytes_reused": 0, "bytes_pickled": 0}

    # -- publishing -----------------------------------------------------------

    def find(self, obj: Any) -> Publication | None:
        """The live publication of ``obj`` if its structure is unchanged."""
        pub = self._by_id.get(id(obj))
        if pub is None or pub.source is None or pub.source() is not obj:
            return None
        checked = _codec.block_writes()
        if not _codec.unchanged(obj, pub.fingerprint, pub.checked):
            return None
        pub.checked = checked
        return pub

    def publish(
        self, obj: Any, min_bytes: int = 0, cloudpickle_fallback: bool = False, adopt: bool = False
    ) -> Publication | None:
        """The publication of ``obj``: found again (the per-task path: one
        fingerprint), or created now -- a copy of the buffers no live segment
        of ours holds yet -- unless ``obj`` is smaller than ``min_bytes``.
        ``cloudpickle_fallback``: see ``_codec.encode``. ``adopt``: re-point
        ``obj``'s blocks at the copy as it is made (``_adopt``)."""
        pub = self.find(obj)
        if pub is None and min_bytes and _codec.nbytes(obj) < min_bytes:
            return None
        with self._lock:
            if pub is None:
                pub = self.find(obj)  # another thread may have published it meanwhile
            if pub is not None:
                self.counters["reuse_hits"] += 1
                return pub
            _segment.prepare_owner()
            if self._board is None:  # first, so that a full directory fails here, not in lease()
                self._board = _leases.Board(self.pid)
            self._start_collector()
            # The write guard and the fingerprint before the copy: a write
            # made while it runs (another thread) then replaces the block
            # it writes (pandas copies a referenced block), and the next
            # find() sees it. Taken after, that write went in place into
            # memory already copied, under identities that still matched.
            guard = _codec.write_guard(obj)
            idents, values = _codec.fingerprint(obj)
            idents = list(idents)  # adoption re-points some
            # Counted before encoding, which takes references to the memory.
            adoption = _adopt.Adoption(obj, guard, idents) if adopt else None
            copies: set[tuple[int, int]] = set()  # compacted slices: not worth remembering
            layout, buffers = _codec.encode(obj, cloudpickle_fallback, self._in_shared, copies)
            unchanging = _codec.unchanging_memory(obj)
            raws = list(map(_codec.raw_view, buffers))
            nbytes = sum(r.nbytes for r in raws)
            refs, new, new_keys, depends, found_private = [], [], [], [], []
            for raw in raws:
                # (rows of a block slice not in shared memory -- encode asked
                # -- are new: their bytes in C order are found nowhere)
                found = self._locate(raw) if raw.c_contiguous else None
                if found is None:
                    refs.append(len(new))
                    new.append(raw)
                    new_keys.append((_buffer_address(raw), raw.nbytes) if raw.c_contiguous else None)
                else:
                    holder, offset, private = found
                    refs.append((holder.name, offset, raw.nbytes))
                    if holder not in depends:
                        depends.append(holder)
                    if private:
                        found_private.append((raw, holder, offset))
            copied = sum(r.nbytes for r in new)
            on_copied = None
            if adoption is not None:
                adoption.expect(set(new_keys))
                del buffers, raws  # ``new`` holds what is still to copy: dropped as it is

                def on_copied(i: int, view: memoryview) -> None:
                    if adoption.needs(new_keys[i]):
                        new[i] = None  # the last reference of ours: the block may move, its memory go
                    adoption.copied(new_keys[i], view)

            mapping, placed = _publication.write(layout, new, refs, self.pid, on_copied)
            pub = Publication(mapping, nbytes, depends, (tuple(idents), values))
            for dep in depends:
                dep.dependents += 1
            self.counters["publications"] += 1
            self.counters["bytes_copied"] += copied
            self.counters["bytes_reused"] += pub.nbytes - copied
            for raw, key, (_, offset, _) in zip(new, new_keys, placed):
                if raw is not None and key is not None and key not in copies:
                    self._remember(pub, raw, pub, offset, unchanging)
            for raw, holder, offset in found_private:
                # Found again through this publication too: the next one
                # (after another in-place write) finds it while this lives.
                self._remember(pub, raw, holder, offset, unchanging)
            if adoption is not None and adoption.moved:
                # The frame's own memory now: it lives while the frame does.
                pub.adopted = True
                adoption.done()
                offsets = {key: offset for key, (_, offset, _) in zip(new_keys, placed)}
                for key, view in adoption.moved:
                    self._remember(pub, view, pub, offsets[key], {(_buffer_address(view), view.nbytes)})
            self._by_name[pub.name] = pub
            self._add_range(pub)
            self._bind(pub, obj)
            pub.shared = id(obj) in self._shared_ids  # a share()d object written in place
            pub.guard = guard
            log.debug(
                "published %s %s as %s: %s copied, %s reused from %d segment(s)",
                type(obj).__name__, getattr(obj, "shape", ""), pub.name,
                _segment.format_bytes(copied), _segment.format_bytes(pub.nbytes - copied), len(depends),
            )
            self._wake.set()  # a collector idle since its last release polls again
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
            previous.unbind()
            self._source_died(previous)
        self._by_id[key] = pub

    def _locate(self, raw: memoryview) -> tuple[Publication, int, bool] | None:
        return self._find(_buffer_address(raw), raw.nbytes)

    def _in_shared(self, address: int, nbytes: int) -> bool:
        # For _codec.encode: a slice of these bytes (strided rows, an Arrow
        # slice) is sent as the span it covers, found here, not compacted.
        return self._find(address, nbytes) is not None

    def _find(self, address: int, nbytes: int) -> tuple[Publication, int, bool] | None:
        """Which live segment of ours holds these bytes already: the
        publication, the offset there, and whether it was found as a private
        buffer (else inside a segment: a share()d object's memory)."""
        key = (address, nbytes)
        # The buffer itself, or one holding it (pandas' Copy-on-Write splits
        # a block it copies a column of into views of the old block).
        candidates = [key] if key in self._buffers else []
        i = bisect.bisect_right(self._buffer_keys, (address, float("inf")))
        candidates += self._buffer_keys[max(0, i - 4) : i][::-1]
        for start, size in candidates:
            entry = self._buffers[(start, size)]
            if (
                start <= address
                and address + nbytes <= start + size
                and entry.owner() is not None
                and entry.holder.name in self._by_name
            ):
                return entry.holder, entry.offset + address - start, True
        i = bisect.bisect_right(self._ranges, (address, float("inf"))) - 1
        if i >= 0:
            start, end, pub = self._ranges[i]
            if address + nbytes <= end:
                return pub, address - start, False
        return None

    def _remember(self, pub: Publication, raw: memoryview, holder: Publication, offset: int, unchanging: set) -> None:
        # Only memory that provably keeps these bytes (``_memory_owner``): a
        # new object over it is then sent from this segment.
        key = (_buffer_address(raw), raw.nbytes)
        owner = _memory_owner(raw, key in unchanging)
        if owner is None or not raw.nbytes:
            return
        entry = self._buffers.get(key)
        if entry is None or entry.holder is not holder or entry.offset != offset:
            if entry is None:
                bisect.insort(self._buffer_keys, key)
            entry = self._buffers[key] = _Buffer(owner, holder, offset)
        entry.users += 1
        pub.buffer_keys.append(key)

    def _forget_buffers(self, pub: Publication) -> None:
        for key in pub.buffer_keys:
            entry = self._buffers.get(key)
            if entry is not None:
                entry.users -= 1
                if entry.users <= 0:
                    del self._buffers[key]
                    del self._buffer_keys[bisect.bisect_left(self._buffer_keys, key)]
        pub.buffer_keys.clear()

    def _add_range(self, pub: Publication) -> None:
        start = _buffer_address(pub.mapping.view)
        bisect.insort(self._ranges, (start, start + pub.mapping.size, pub), key=lambda r: r[:2])

    # -- share() ----------------------------------------------------------------

    def share(self, obj: Any, adopt: bool = False) -> Any:
        """Publish ``obj`` and return an equal object backed by the segment:
        with ``adopt``, ``obj`` itself if its blocks could be re-pointed."""
        with self._lock:
            if self.shared_publication(obj) is not None:
                return obj  # already one
            pub = self.publish(obj, adopt=adopt)
            if pub.adopted:
                pub.shared = True
                self._shared_ids.add(id(obj))
                return obj
            view = pub.mapping.view.toreadonly()
            shared = _publication.read(
                _segment.Mapping(pub.name, pub.mapping.size, view, pub.mapping.layout_offset, pub.mapping.layout_size),
                lambda name: self._by_name[name].mapping,
            )
            pub.fingerprint, pub.checked = _codec.fingerprint(shared), None
            self._bind(pub, shared)
            pub.source_alive = True
            pub.shared = True
            # Its buffers are read-only: pandas must copy before writing.
            pub.guard = _codec.write_guard(shared)
            self._waiting.discard(pub)
            self._shared_ids.add(id(shared))
            return shared

    def shared_publication(self, obj: Any) -> Publication | None:
        """The publication of an object returned by :meth:`share` (None for
        any other object), published again if it was written in place."""
        if id(obj) not in self._shared_ids:
            return None
        pub = self._by_id.get(id(obj))
        if pub is None or pub.source is None or pub.source() is not obj:
            return None  # an object at a dead one's address
        return self.find(obj) or self.publish(obj, adopt=pub.adopted)

    # -- leases -----------------------------------------------------------------

    def lease(self, pub: Publication) -> tuple[str, int, tuple[_leases.Board, int]]:
        """Take a lease on ``pub`` for one pickled handle: the board's name,
        the lease a worker clears, and what ends it here (``end_leases``)."""
        with self._lock:
            lease, token = self._board.take()
            if lease == _leases.NO_SLOT:
                pub.pinned = True
            else:
                pub.slots.add(lease >> 8)
            pub.leased += 1
            pub.last_used = self._board.last_taken
            return self._board.name, lease, (self._board, token)

    def lease_for(
        self, obj: Any, min_bytes: int = 0, cloudpickle_fallback: bool = False, adopt: bool = False
    ) -> tuple[Publication, str, int, tuple[_leases.Board, int]] | None:
        """``obj``'s publication (see :meth:`publish`) and a lease on it, at
        once: a publication the collector released meanwhile is published
        again."""
        pub = self.publish(obj, min_bytes, cloudpickle_fallback, adopt)
        if pub is None:
            return None
        with self._lock:
            if pub.released:
                pub = self.publish(obj, 0, cloudpickle_fallback, adopt)
            return pub, *self.lease(pub)

    def end_leases(self, leases: list[tuple[_leases.Board, int]]) -> None:
        """The tasks holding these leases are over (done, failed, cancelled)."""
        _leases.end_leases(leases)
        if leases:
            self._wake.set()

    # -- releasing --------------------------------------------------------------

    def _source_died(self, pub: Publication) -> None:
        # Runs inside garbage collection, possibly in any thread and in the
        # middle of one of our own methods: only queue it.
        self._dead.append(pub)
        self._wake.set()

    def _start_collector(self) -> None:
        if self._collector is None:
            # Trap 18: atexit runs hooks last-registered-first, and
            # multiprocessing's -- registered when multiprocessing.util is
            # first imported, perhaps by joblib before us -- joins the children
            # still running. Our release must come after that join, or a
            # child started with a shared object and never joined finds its
            # segment gone: multiprocessing runs the finalizers of negative
            # priority after joining the children. (Registered here, per
            # process: a multiprocessing child forgets its parent's finalizers.)
            multiprocessing.util.Finalize(None, _release_at_exit, exitpriority=-100)
            self._collector = threading.Thread(target=self._collect_forever, name="sharedexec-collector", daemon=True)
            self._collector.start()

    def _collect_forever(self) -> None:
        # Polls while anything is published: what ends a need -- a worker
        # clearing a slot, a worker exiting (the kernel drops its flock) --
        # tells this process nothing. Idle otherwise, until a publication.
        while True:
            self._wake.wait(POLL_SECONDS if self._by_name or self._board is not None else None)
            self._wake.clear()
            self.collect()

    def collect(self) -> None:
        """Release every publication no task and no process needs any more."""
        with self._lock:
            while self._dead:
                pub = self._dead.popleft()
                if pub.released:
                    continue  # released while its source lived: nothing of it is left to keep
                if pub.source_alive and (pub.source is None or pub.source() is None):
                    pub.source_alive = False
                    pub.unbind()  # the fingerprint holds the source's arrays alive
                    if self._by_id.get(pub.key) in (None, pub):  # not an id reused by a newer share()
                        self._shared_ids.discard(pub.key)
                    self._forget_buffers(pub)
                    self._waiting.add(pub)
            for pub in list(self._waiting):
                if self._unleased(pub):
                    self._release(pub)
            now = time.monotonic()
            idle = [
                (pub, pub.leased)
                for pub in self._by_name.values()
                if not (pub.shared or pub.adopted) and now - pub.last_used > _leases.GRACE_SECONDS and self._unleased(pub)
            ]
        # Asking the kernel costs two system calls a publication: not under
        # the lock that the per-task path takes. A lease taken meanwhile
        # (``leased`` moved) cancels the release.
        unmapped = [(pub, leased) for pub, leased in idle if not _segment.in_use(pub.name)]
        with self._lock:
            for pub, leased in unmapped:
                if pub.leased == leased and self._unleased(pub):
                    self._release(pub)
            if not self._by_name and self._board is not None:
                self._board.retire()  # ends nothing: no lease can be held without a publication
                self._board = None

    def _unleased(self, pub: Publication) -> bool:
        """Whether ``pub`` may go as far as tasks are concerned: no dependent
        publication, no outstanding lease, a pinned one never."""
        if pub.released or pub.dependents or pub.pinned:
            return False
        if self._board is not None:
            pub.slots = {slot for slot in pub.slots if self._board.held(slot)}
        return not pub.slots

    def _release(self, pub: Publication) -> None:
        pub.released = True  # once: the dependencies below are counted down once
        self._waiting.discard(pub)
        if self._by_id.get(pub.key) is pub:
            del self._by_id[pub.key]
        # Nothing of ours may keep the publication -- and so its mapping of
        # the now unlinked segment -- past this point: its source's weak
        # reference goes (its callback holds the publication, and would queue
        # it when the source dies; see collect).
        pub.source = None
        pub.unbind()
        self._forget_buffers(pub)
        self._by_name.pop(pub.name, None)
        self._ranges = [r for r in self._ranges if r[2] is not pub]
        _segment.retire(pub.name)
        log.debug("released %s", pub.name)
        for dep in pub.depends:
            dep.dependents -= 1
            if dep in self._waiting and self._unleased(dep):
                self._release(dep)

    def release_all(self) -> None:
        """At exit: unlink everything this process owns, leases or not."""
        with self._lock:
            for pub in list(self._by_name.values()):
                _segment.retire(pub.name)
            if self._board is not None:
                self._board.retire()
            self._by_name.clear()
            self._by_id.clear()
        if _reaper.watching():  # results workers wrote for us, claimed or not
            for name in _segment.list_owned_by(self.pid):
                _segment.retire(name)

    def stats(self) -> dict[str, int]:
        self.collect()
        with self._lock:
            return {
                "segments": len(self._by_name),
                "bytes_shared": sum(p.mapping.size for p in self._by_name.values()),
                **self.counters,
            }


REGISTRY = Registry()


def _new_registry_in_child() -> None:
    # A forked child inherits our tables but not our collector thread, and
    # must never unlink its parent's segments: it starts from nothing.
    global REGISTRY
    REGISTRY = Registry()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_new_registry_in_child)


def _release_at_exit() -> None:
    if REGISTRY.pid == os.getpid():
        REGISTRY.release_all()

