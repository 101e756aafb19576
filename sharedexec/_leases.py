"""Leases: which pickled handles a worker may still read.

A handle is pickled into a task message long before a worker reads it
(``submit``; an unchanged ``Pool``'s task queue), and a stdlib ``Pool`` tells
nobody when a task ends. So each pickled handle takes a *lease*: one byte in a
small shared *lease board* (one board per publishing process, a segment like
the others)::

    publisher                               worker
    ---------                               ------
    pickle handle: take a free slot,        unpickle handle: map the segment
      write its mark (1..255) there,          (and take a shared flock on it,
      the handle carries (slot, mark)         see _segment), then clear the
    executor future done: end the token       slot -- if it still holds the
      (only if the slot was not taken         handle's mark
      again since: a generation per slot)

A held slot means "a task that carries this handle may still map the segment".
Once the worker has mapped it, the kernel's flock says who still needs it
(``_segment.in_use``), and the board byte is no longer needed.

A message can be pickled and never delivered: ``Pool.terminate()`` (leaving
``with Pool()``, Ctrl-C) drops the tasks still queued, a broken executor drops
its call queue. Nobody clears those slots. Each lease remembers the thread that
pickled it -- a pool's own thread (a ``Pool``'s task handler, an executor's
queue feeder) -- and the pools' terminations end that thread's leases once its
workers are gone (:func:`end_pickled_by`, hooked in by
``_sharing.install_hooks``). An executor's future ends its task's leases when
it is done.

Nothing else ends a lease: in particular, no process's absence does. A message
in a pipe or a ``Queue`` (a ``share()``d object put there before any consumer
is started, a ``Pool`` replacing its worker) is read by a process that may not
exist yet, so "no child alive now" never means "nobody will read it". A lease
of a message no pool sends (a ``share()``d object in a ``Queue`` or in a
``Process``' arguments) ends when a process reads it, else at exit (or by the
reaper, if we are killed).
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import numpy as np

from . import _segment

BOARD_SLOTS = 1 << 20
NO_SLOT = -1
# A publication leased this recently stays even once nobody needs it: the
# next task of the same step usually follows at once, and would copy it again.
GRACE_SECONDS = 1.0
# A thread's list of tokens is pruned of ended ones when it grows past this.
_PRUNE_AT = 4096
_boards: weakref.WeakSet[Board] = weakref.WeakSet()


class Board:
    """The lease board: one byte per outstanding lease, cleared by workers.

    A taken slot holds a mark (1..255, turning over) that travels in the
    handle: a worker clears the slot only while it still holds that mark. The
    publisher's token names the slot and its *generation* (a private counter
    per slot, bumped at every take), so a late end of an old lease never clears
    a newer one, however often the board has wrapped around."""

    def __init__(self, owner_pid: int):
        self.mapping = _segment.create([memoryview(bytes(BOARD_SLOTS))], b"", owner_pid)
        self._mm = self.mapping.view
        self._generations = np.zeros(BOARD_SLOTS, dtype=np.uint64)
        self._cursor = 0
        self._mark = 0
        self.last_taken = 0.0
        self.retired = False
        # take() and end() run in pickling threads and in future callbacks.
        self._lock = threading.Lock()
        self._by_thread: dict[threading.Thread, list[int]] = {}  # tokens by pickling thread
        _boards.add(self)

    @property
    def name(self) -> str:
        return self.mapping.name

    def take(self) -> tuple[int, int]:
        """A free slot: ``(lease, token)``. The lease (slot and mark) goes to
        the worker in the handle; the token ends the lease here."""
        base = _segment.ALIGN
        with self._lock:
            self.last_taken = time.monotonic()
            return self._take(base)

    def _take(self, base: int) -> tuple[int, int]:
        for start, stop in ((self._cursor, BOARD_SLOTS), (0, self._cursor)):
            pos = _segment.find_zero(self._mm, base + start, base + stop)
            if pos >= 0:
                self._mark = self._mark % 255 + 1
                self._mm[pos] = self._mark
                slot = pos - base
                self._cursor = slot + 1
                self._generations[slot] += 1
                token = int(self._generations[slot]) << 32 | slot
                self._note_thread(token)
                return slot << 8 | self._mark, token
        return NO_SLOT, NO_SLOT

    def _note_thread(self, token: int) -> None:
        tokens = self._by_thread.setdefault(threading.current_thread(), [])
        tokens.append(token)
        if len(tokens) > _PRUNE_AT:
            for thread, held in list(self._by_thread.items()):
                held[:] = [t for t in held if self._holds(t)]
                if not held and not thread.is_alive():
                    del self._by_thread[thread]

    def _holds(self, token: int) -> bool:
        slot = token & 0xFFFFFFFF
        return self._generations[slot] == token >> 32 and self._mm[_segment.ALIGN + slot] != 0

    def held(self, slot: int) -> bool:
        return self._mm[_segment.ALIGN + slot] != 0

    def end(self, token: int) -> None:
        with self._lock:
            self._end(token)

    def _end(self, token: int) -> None:
        slot, generation = token & 0xFFFFFFFF, token >> 32
        if not self.retired and self._generations[slot] == generation:
            self._mm[_segment.ALIGN + slot] = 0

    def end_thread(self, thread: threading.Thread) -> None:
        with self._lock:
            for token in self._by_thread.pop(thread, []):
                self._end(token)

    def retire(self) -> None:
        with self._lock:
            self.retired = True
        _segment.retire(self.name)


class TaskLeases(list):
    """The leases taken while pickling one submitted task, as ``(board,
    token)`` pairs.

    The pool's queue feeder thread appends to it as it pickles the task; the
    future's done callback calls :meth:`end`. A task may be pickled *after*
    its future is done: a broken pool fails the tasks still waiting in the
    feeder's buffer, and the feeder pickles (publishes, leases) them all the
    same before it finds the pipe closed. A lease taken then is ended at once,
    or it would keep its segment alive."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._ended = False

    def append(self, lease: tuple[Board, int]) -> None:
        with self._lock:
            if not self._ended:
                super().append(lease)
                return
        end_leases([lease])

    def end(self, _future: Any = None) -> None:
        with self._lock:
            self._ended = True
            leases = list(self)
            self.clear()
        end_leases(leases)


def end_leases(leases: list[tuple[Board, int]]) -> None:
    """The tasks holding these leases are over (done, failed, cancelled),
    or their messages will never be sent."""
    for board, token in leases:
        if token != NO_SLOT:
            board.end(token)


def end_pickled_by(thread: threading.Thread | None) -> None:
    """End the leases of the messages ``thread`` pickled: its pool has
    terminated, and no worker of it will read them."""
    if thread is not None:
        for board in list(_boards):
            board.end_thread(thread)


def clear(board: memoryview, lease: int) -> None:
    """A worker's end of a lease: its slot, if it still holds its mark."""
    slot, mark = lease >> 8, lease & 0xFF
    if board[_segment.ALIGN + slot] == mark:
        board[_segment.ALIGN + slot] = 0
