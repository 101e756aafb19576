"""Re-pointing a published frame at its shared copy: one copy in total.

Publishing copies a frame's buffers into a segment; until now the parent kept
its own copy too, so a frame of 60% of memory could not be shared. With
``adopt=True`` the registry hands each block of the frame, as soon as its
bytes are in the segment, to :meth:`Adoption.copied`: the block's array (a
numpy block, the numpy arrays behind a datetime, period, categorical or
nullable extension array, the buffers of an Arrow-backed one) is replaced by
one over a *private* (copy-on-write) mapping of the segment, with the same
dtype, shape, strides and flags, and the private original is freed. The peak
while publishing is the frame plus the blocks being copied, not two frames.

Why a private mapping: the parent's frame must behave exactly as before. Its
arrays stay writable; a write that goes around pandas' Copy-on-Write
(``df["a"].array[0] = 1``) changes the parent's pages only, as it changed
the parent's own memory before, and the workers keep reading the copy made
at publication (the snapshot rule, docs/semantics.md). Writes through pandas
copy the written block first (the publication's ``write_guard``), and that
block alone is published (and adopted) again. The guard is taken before the
copy starts: a block written meanwhile (another thread) is a copy the frame
holds in place of the guarded one, and keeps its memory (:class:`Adoption`).

Only where nothing else can see the difference (:func:`_movable`, checked
before encoding and again just before a block moves):

* pandas with Copy-on-Write (pandas 3; 2.2 with the option on): without it,
  a view (``df["a"]``) shares the block's memory and writes through it;
* a block whose array -- and the memory behind it, allocated by numpy -- is
  referenced by that block alone: no Series view (``s = df["a"]``), no
  user's array a frame was built over with ``copy=False``, no
  ``df["a"].array`` held, no shallow copy. Those see writes through each
  other; re-pointed, they would not. (Arrow buffers are immutable: there the
  array object alone must be the block's.) Counted with
  ``sys.getrefcount``: a reference taken by another thread in between is
  the one case left, and it loses no data;
* Linux, where a private mapping of a tmpfs file sees the bytes written to
  the file after it was made, until it writes a page itself (POSIX leaves
  that unspecified), and the tmpfs store: XNU maps POSIX shared memory
  shared only, so under ``SHAREDEXEC_BACKEND=posix`` (macOS's store) nothing
  is adopted (``_segment.create`` never reports a copy there).

Anything else -- object columns, an Index, a bare ndarray or Arrow object
(whose buffer cannot be swapped under its holder), a subclass's own storage
-- keeps its memory, as before.
"""

from __future__ import annotations

import ctypes
import pickle
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pandas.core.arrays._mixins import NDArrayBackedExtensionArray
from pandas.core.arrays.masked import BaseMaskedArray

from . import _codec

try:
    import pyarrow as pa
    from pandas.core.arrays.arrow import ArrowExtensionArray
except ImportError:  # pragma: no cover - the no-pyarrow CI job
    pa = None
    ArrowExtensionArray = ()

Key = tuple[int, int]  # (address, nbytes), as the registry keys buffers

SUPPORTED = sys.platform.startswith("linux")
GIVE_BACK_BYTES = 32 << 20  # freed originals returned to the system at least this often


class _Holder:
    __slots__ = ("value",)


def _holders(obj: Any) -> int:
    """References to ``obj`` besides the expression passed here: call as
    ``_holders(x.attr)`` (an attribute read), never with a local name."""
    return sys.getrefcount(obj) - _BASE


_BASE = 0
_probe = _Holder()
_probe.value = object()
_BASE = _holders(_probe.value) - 1  # this interpreter's count for one holder
del _probe


def _sole(holder: Any, name: str, ours: int = 0) -> bool:
    """Whether ``holder.name`` is a numpy array held by ``holder`` alone (and
    ``ours`` references of ours) whose memory numpy allocated and nothing else
    references."""
    if not isinstance(getattr(holder, name, None), np.ndarray) or _holders(getattr(holder, name)) != 1 + ours:
        return False
    arr = getattr(holder, name)
    if type(arr) is not np.ndarray or not arr.nbytes or not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        return False
    if arr.base is None:
        return bool(arr.flags.owndata)
    # A view of an array only it holds (a transposed 2-D block, a datetime
    # array's int64 memory): that array's memory goes with it.
    return (
        type(arr.base) is np.ndarray
        and arr.base.base is None
        and bool(arr.base.flags.owndata)
        and _holders(arr.base) == 1
    )


def _numpy_parts(values: Any) -> list[str] | None:
    """The attributes of an extension array that hold its numpy memory, or
    None if it is not a kind this module moves."""
    if isinstance(values, NDArrayBackedExtensionArray):
        return ["_ndarray"]
    if isinstance(values, BaseMaskedArray):
        return ["_data", "_mask"]
    return None


def _movable(blk: Any, ours: int) -> bool:
    """Whether re-pointing ``blk`` at other memory is invisible: see the
    module docstring. Called with our own references to its memory gone but
    ``ours`` references to its array (the write guard's block, the
    fingerprint), which move with it."""
    values = blk.values
    if isinstance(values, np.ndarray):
        del values
        return values_dtype_ok(blk.values) and _sole(blk, "values", ours)
    if _holders(blk.values) != 2 + ours:  # the block's, ours, and ``values`` here
        return False
    if ArrowExtensionArray and isinstance(values, ArrowExtensionArray):
        return True
    parts = _numpy_parts(values)
    return parts is not None and all(_sole(values, name) for name in parts)


def values_dtype_ok(arr: np.ndarray) -> bool:
    # Python objects cannot live in shared memory; ndarray subclasses keep their own semantics.
    return type(arr) is np.ndarray and not arr.dtype.hasobject


def _key(arr: np.ndarray) -> Key:
    return arr.__array_interface__["data"][0], arr.nbytes


def _arrow_pickle(chunked: Any) -> tuple[bytes, list[Key]]:
    """pyarrow's own pickle of ``chunked``, its buffers out of band (as
    ``_codec`` takes them), and their keys: loaded with other buffers of the
    same bytes, it is the same array over those."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(chunked, protocol=5, buffer_callback=buffers.append)
    raws = [buf.raw() for buf in buffers]
    return data, [(np.frombuffer(raw, np.uint8).ctypes.data if raw.nbytes else 0, raw.nbytes) for raw in raws]


def _keys(values: Any) -> list[Key]:
    """The memory ``values`` is made of, keyed as ``_codec.encode`` keys its buffers."""
    if isinstance(values, np.ndarray):
        return [_key(values)]
    parts = _numpy_parts(values)
    if parts is not None:
        return [_key(getattr(values, name)) for name in parts]
    return _arrow_pickle(values._pa_array)[1]


def _over(arr: np.ndarray, view: memoryview) -> np.ndarray:
    """``arr``'s twin over ``view`` (its bytes, copied there): same dtype,
    shape, strides and writeability."""
    new = np.ndarray(arr.shape, dtype=arr.dtype, buffer=view, strides=arr.strides)
    new.flags.writeable = arr.flags.writeable
    return new


def _moved(values: Any, views: dict[Key, memoryview]) -> Any:
    """``values`` rebuilt over the segment's copies of its memory."""
    if isinstance(values, np.ndarray):
        return _over(values, views[_key(values)])
    before = dict(vars(values))  # (``_from_backing_data`` fills its ``_cache``)
    if isinstance(values, NDArrayBackedExtensionArray):
        new = values._from_backing_data(_over(values._ndarray, views[_key(values._ndarray)]))
    elif isinstance(values, BaseMaskedArray):
        new = type(values)._simple_new(
            _over(values._data, views[_key(values._data)]), _over(values._mask, views[_key(values._mask)])
        )
    else:
        # pyarrow rebuilds the arrays over the buffers it is given: zero-copy.
        data, keys = _arrow_pickle(values._pa_array)
        chunked = pickle.loads(data, buffers=[views[k] for k in keys])
        new = _codec._rebuild_from_state(type(values), {"_pa_array": chunked})
    # The rest of its state exactly as it was (``_freq``, ``_readonly``,
    # ``_cache``: a pickle of the frame carries them), but its memory -- and
    # Arrow's cache, which holds arrays over the old memory.
    # (In its order too: a pickle writes the dict as it is ordered.)
    state = {k: (new.__dict__[k] if k in _MEMORY_ATTRS else v) for k, v in before.items()}
    if "_pa_array" in state and "_cache" in state:
        state["_cache"] = {}
    new.__dict__.clear()
    new.__dict__.update(state)
    return new


_MEMORY_ATTRS = frozenset({"_data", "_mask", "_pa_array"})


@dataclass(slots=True)
class _Block:
    blk: Any  # the frame's block
    guarded: Any  # the write guard's block over the same array
    slot: int | None  # where the fingerprint's identities hold that array


class Adoption:
    """The blocks of one frame that move to its segment as it is written.

    Made before the frame is encoded (references are counted then), after
    its ``guard`` (``_codec.write_guard``) and the identities of its
    fingerprint (``idents``, a list) were taken; the registry then says which
    buffers are new in the segment (:meth:`expect`), drops its own references
    to a block's memory when :meth:`needs` says so, and reports each buffer
    copied (:meth:`copied`). A block moves only while it is still the guarded
    one: a write made meanwhile (another thread) gave the frame a copy of it
    (pandas copies a referenced block) which must keep the write. The
    guard's block and ``idents`` follow a block that moves."""

    def __init__(self, obj: Any, guard: Any, idents: list) -> None:
        self.blocks: list[tuple[_Block, list[Key]]] = []
        self.moved: list[tuple[Key, memoryview]] = []  # each moved buffer: its key, its private view
        self._views: dict[Key, memoryview] = {}
        self._needed: set[Key] = set()
        self._unreturned = 0  # bytes freed since the last give_back()
        self._idents = idents
        if not SUPPORTED or not isinstance(obj, (pd.DataFrame, pd.Series)) or guard is None:
            return
        slots = {id(x): i for i, x in enumerate(idents)}
        for blk, guarded in zip(obj._mgr.blocks, guard._mgr.blocks):
            # The array itself rather than pandas' view of it: one reference
            # of ours to count, and none to the memory under it. (The guard
            # guards by its block, registered in ``blk.refs``.)
            guarded.values = blk.values
            block = _Block(blk, guarded, slots.get(id(blk.values)))
            if self._ours(block) is not None:
                self.blocks.append((block, _keys(blk.values)))

    def done(self) -> None:
        """After the last buffer: what was freed goes back to the system."""
        if self._unreturned:
            give_back()

    def expect(self, new: set[Key]) -> None:
        """``new``: the keys of the buffers this segment gets. A block moves
        only if all its memory is among them (else it is in another segment
        already, or was compacted)."""
        self.blocks = [(blk, keys) for blk, keys in self.blocks if keys and all(k in new for k in keys)]
        self._needed = {k for _, keys in self.blocks for k in keys}

    def needs(self, key: Key) -> bool:
        """Whether the buffer ``key`` belongs to a block that moves (whose
        references the registry must drop once it is copied)."""
        return key in self._needed

    def copied(self, key: Key, view: memoryview) -> None:
        """The buffer ``key`` is in the segment, at ``view`` (private
        mapping): move every block whose memory is all there now."""
        if key not in self._needed:
            return
        self._views[key] = view
        waiting = []
        for blk, keys in self.blocks:
            if all(k in self._views for k in keys):
                self._move(blk, keys)
            else:
                waiting.append((blk, keys))
        self.blocks = waiting

    def _ours(self, block: _Block) -> int | None:
        """Our references to the block's array if it may move, else None."""
        blk, slot = block.blk, block.slot
        if block.guarded.values is not blk.values:  # written since the guard was taken
            return None
        ours = 1 + (slot is not None and self._idents[slot] is blk.values)
        return ours if _movable(blk, ours) else None  # (another reference appeared meanwhile)

    def _move(self, block: _Block, keys: list[Key]) -> None:
        if self._ours(block) is None:
            return
        blk, guarded, slot = block.blk, block.guarded, block.slot
        views = {k: self._views[k] for k in keys}
        new = _moved(blk.values, views)
        # Checked again next to the swap: pandas may have given the block a
        # written copy of its array while ``new`` was built (``set_inplace``).
        if guarded.values is not blk.values:
            return
        if slot is not None and self._idents[slot] is blk.values:
            self._idents[slot] = new
        blk.values = guarded.values = new
        _codec.note_block_write()
        self.moved.extend(views.items())
        self._unreturned += sum(view.nbytes for view in views.values())
        if self._unreturned >= GIVE_BACK_BYTES:  # the peak stays the frame plus a block or so
            give_back()
            self._unreturned = 0


try:  # glibc: give the heap's free pages back (others return large blocks by themselves)
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError, TypeError):
    _malloc_trim = None


def give_back() -> None:
    """Return the memory of the originals just freed to the system: glibc
    keeps freed blocks below its mmap threshold (32 MB at most) in its heap,
    Arrow's allocator (mimalloc, jemalloc) its freed pages, for reuse by this
    process -- not what a frame moved out of the process should leave."""
    if _malloc_trim is not None:
        _malloc_trim(0)
    if pa is not None:
        pa.default_memory_pool().release_unused()
