"""Objects <-> a small layout plus raw buffers, and back without copying.

All dtype knowledge of sharedexec lives here. ``encode(obj)`` returns a
*layout* (pickle protocol 5 bytes, small: no column data) and the list of
out-of-band buffers holding the data; ``decode(layout, views)`` rebuilds the
object on top of ``views`` -- memoryviews of a shared segment -- without
copying a single column.

Why our own reducers instead of ``pickle.dumps(df, protocol=5)``: pandas'
``__reduce__`` is not zero-copy for most of its arrays (design brief, trap 4).
datetime64/timedelta64 ndarrays go in-band because the buffer protocol refuses
their dtype; pandas 3 builds a frame from its arrays and may consolidate
(copy) them; ``Series(ndarray)`` infers ``str`` from object arrays; the
Arrow-backed arrays are pickled through their ``__dict__``. So a pickler subclass
intercepts each pandas / numpy object, whatever its subclass (trap 7,
GeoDataFrame-like classes come back as themselves), and reduces it to its
parts: a DataFrame to its blocks and their placement, a block to its array, an
array to its raw bytes. pyarrow pickles its arrays, tables and batches down to
``pa.Buffer`` objects itself, chunks kept; we take those buffers out of band
(pandas' Arrow-backed arrays combine theirs first, as their pickle does).

Buffers are numbered by the encoder, not by pickle's ``buffer_callback`` (see
``_Encoder``): a decoded array is writable exactly when the memory it is
decoded from is (a copy-on-write mapping), whatever the source was, and memory
met twice (two views of one array, an Arrow dictionary shared by chunks) is
stored once and comes back shared.

What ends up where (``tests/test_codec.py`` checks each line, by address):

=====================================  =========================================
zero-copy: a view of the segment       numpy bool, int*, uint*, float* (float16
                                       to longdouble), complex*; big-endian
                                       too; datetime64 and timedelta64, any
                                       unit, with or without tz; Period;
                                       Categorical codes, and its categories
                                       when their dtype is one of these;
                                       nullable Int*/UInt*/Float*/boolean (data
                                       and mask); every Arrow-backed array
                                       (pandas 3's ``str`` with pyarrow,
                                       ``string[pyarrow]``, ``ArrowDtype``:
                                       lists, structs, dictionaries, ...);
                                       Sparse values and index; Interval
                                       bounds; structured and fixed-width
                                       (``S``/``U``/``V``) numpy dtypes; pyarrow
                                       Array / ChunkedArray / RecordBatch /
                                       Table; the same in Index form and in
                                       MultiIndex levels and codes; polars
                                       DataFrame / Series columns of every
                                       dtype Arrow carries (``_codec_polars``)
in Arrow's string layout, turned into   ``object`` arrays, columns and labels
Python strings once per worker          whose values are all exactly ``str``
                                       (missing: None or np.nan), with pyarrow
                                       (``_codec_strings``); zero-copy as
                                       pandas ``str`` with ``strings="arrow"``
once per worker: pickled by value into other ``object`` columns and labels,
the layout, which lives in the segment  ``string[python]``, pandas 3's
too, unpickled when a worker first     ``str`` without pyarrow, numpy
meets the object (the worker cache     ``StringDType`` and structured dtypes
keeps it)                              with object fields, ndarray subclasses
                                       (``np.matrix``, ``np.ma``), attrs and
                                       ``_metadata`` values that are not arrays,
                                       polars Int128/UInt128 columns
no buffer at all                       RangeIndex, empty arrays
=====================================  =========================================

``np.memmap`` comes back as a memmap without a file (over the segment), as a
pickle gives it. A non-native (big-endian) array comes back as it is from
loky's workers, and in native byte order, same values, from multiprocessing's
before Python 3.14 (``pickled_with``): what each pool's pickle protocol gives.

Decoding touches each block once: its cost grows with the number of columns,
not of rows (``benchmarks/decode_cost.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import fractions
import functools
import io
import itertools
import logging
import math
import operator
import os
import pickle
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator

import cloudpickle
import numpy as np
import pandas as pd
from pandas.core.arrays._mixins import NDArrayBackedExtensionArray
from pandas.core.arrays.masked import BaseMaskedArray

from ._errors import SharedExecError

try:  # pyarrow is optional; pandas' Arrow-backed arrays exist only with it
    import pyarrow as pa
    from pandas.core.arrays.arrow import ArrowExtensionArray

    from . import _codec_strings
except ImportError:  # pragma: no cover - exercised by the no-pyarrow CI job
    pa = None
    ArrowExtensionArray = None
    _codec_strings = None

try:  # pandas >= 3.0
    from pandas.core.internals.api import _make_block
except ImportError:  # pandas 2.2
    from pandas.core.internals.api import make_block as _make_block_2

    def _make_block(values, placement):
        return _make_block_2(values, placement, ndim=2)


from pandas.core.internals import BlockManager, SingleBlockManager

PROTOCOL = 5

#: The types the reducer shares when they are large; subclasses included.
SHAREABLE_TYPES: tuple[type, ...] = (pd.DataFrame, pd.Series, pd.Index, np.ndarray)
SHAREABLE_NAMES = "pandas DataFrame, Series or Index, numpy ndarray"
if pa is not None:
    SHAREABLE_TYPES += (pa.Array, pa.ChunkedArray, pa.RecordBatch, pa.Table)
    SHAREABLE_NAMES += ", or pyarrow Array, ChunkedArray, RecordBatch or Table"


# -- encoding ------------------------------------------------------------------


def _frame_state(obj: pd.DataFrame | pd.Series) -> tuple:
    metadata = {name: getattr(obj, name, None) for name in obj._metadata}
    return obj.attrs, obj.flags.allows_duplicate_labels, metadata


def _placement(locs) -> slice | np.ndarray:
    return locs.as_slice if locs.is_slice_like else locs.as_array


def _reduce_frame(df: pd.DataFrame, enc: _Encoder):
    mgr = df._mgr
    # A block's placement as a slice when it is one (most are): the layout
    # stays a few bytes per block instead of an array buffer per block.
    blocks = [(_column_values(blk.values, enc), _placement(blk.mgr_locs)) for blk in mgr.blocks]
    return _rebuild_frame, (type(df), blocks, mgr.axes[1], mgr.axes[0], *_frame_state(df))


def _reduce_series(s: pd.Series, enc: _Encoder):
    return _rebuild_series, (type(s), _column_values(s._values, enc), s.index, s.name, *_frame_state(s))


def _column_values(values: Any, enc: _Encoder) -> Any:
    # A column's object array of strings may come back Arrow-backed
    # (strings="arrow"): marked as a column here, where that is known.
    if type(values) is np.ndarray and values.dtype == object:
        return _arrow_strings(values, enc, column=True) or values
    return values


def _reduce_index(idx: pd.Index, enc: _Encoder):
    if isinstance(idx, pd.RangeIndex):
        return NotImplemented  # start/stop/step: pickles small already
    if isinstance(idx, pd.MultiIndex):
        return _rebuild_multiindex, (type(idx), list(idx.levels), list(idx.codes), list(idx.names), idx.sortorder)
    # pandas 3 keeps a DatetimeIndex's freq on the index, pandas 2 on its array.
    return _rebuild_index, (type(idx), idx._values, idx.name, getattr(idx, "freq", None))


def _reduce_ndarray(arr: np.ndarray, enc: _Encoder):
    if type(arr) not in (np.ndarray, np.memmap) or (arr.dtype.hasobject and arr.dtype != object):
        return _reduce_in_band(arr, enc)
    if arr.dtype == object:
        return _reduce_object_array(arr, enc)
    if not arr.dtype.isnative and arr.dtype.names is None and (
        arr.dtype.kind in "mM" or not (arr.flags.c_contiguous or arr.flags.f_contiguous)
    ):
        # numpy's own reduction of these (no buffer protocol; not contiguous)
        # sends a non-native array in native byte order: a stdlib worker gets
        # the same values, native. So do we.
        arr = arr.astype(arr.dtype.newbyteorder("="), order="A" if arr.flags.f_contiguous else "C")
    if arr.flags.c_contiguous:
        order = "C"
    elif arr.flags.f_contiguous:
        order = "F"  # pandas' 2-D blocks are column-major: keep them as they are
    else:
        low, nbytes = span(arr)
        if enc.in_shared(low, nbytes):
            # A slice (rows of a 2-D block) of memory already in shared
            # memory: name the bytes it spans and rebuild the same view.
            raw = np.asarray(_Memory(arr, low, nbytes))
            offset = arr.__array_interface__["data"][0] - low
            return _rebuild_strided, (enc.out_of_band(raw), arr.dtype, arr.shape, arr.strides, offset)
        order = "C"  # only the slice's own bytes
        if not _rows_contiguous(arr):
            arr = np.ascontiguousarray(arr)
            enc.copies.add((arr.__array_interface__["data"][0], arr.nbytes))
    # A uint8 view: the buffer protocol refuses datetime64/timedelta64, and
    # this keeps the exact bytes of any dtype, big-endian included. Rows of
    # a 2-D block (``df.iloc[a:b]``) stay the slice itself: the segment gets
    # its bytes row after row, in C order, with no compact copy made first
    # (``raw_view``, ``_segment._fill``).
    raw = arr.view(np.uint8) if _rows_contiguous(arr) else arr.ravel(order="K").view(np.uint8)
    # np.memmap: a pickle gives a memmap with no file (numpy's own reduction).
    memmap = (np.memmap,) if isinstance(arr, np.memmap) else ()
    number = enc.out_of_band(raw)
    if not arr.flags.writeable and _pickle5_keeps_read_only(arr) and not _in_read_only_segment(arr):
        enc.read_only.add(number)
    return _rebuild_ndarray, (number, arr.dtype, arr.shape, order, *memmap)


def _in_read_only_segment(arr: np.ndarray) -> bool:
    # A view of a segment this process maps read-only (``_segment.map_fd``):
    # a shared input, writable in a stdlib task. A task passing it through
    # returns it writable, as there.
    # (np.frombuffer keeps the memoryview as the base, np.ndarray(buffer=)
    # -- _rebuild_strided -- the object under it.)
    root = arr
    while isinstance(root, np.ndarray) and root.base is not None:
        root = root.base
    return getattr(root.obj if isinstance(root, memoryview) else root, "sharedexec_read_only", False)


def _pickle5_keeps_read_only(arr: np.ndarray) -> bool:
    # numpy's __reduce_ex__(5) (array_reduce_ex) sends a contiguous array of
    # exact type as a PickleBuffer: in-band, a read-only one is bytes and
    # comes back read-only (loky's results). Anything else -- a subclass, a
    # strided array, datetime64/timedelta64 (no buffer protocol) -- goes by
    # __reduce__, a copy: writable, as under protocol 4.
    return type(arr) is np.ndarray and arr.dtype.kind not in "mM" and (arr.flags.c_contiguous or arr.flags.f_contiguous)


# Exact types whose equal values are interchangeable: two equal ``str``s are
# the same string, but equal floats may differ in the sign of zero, equal
# Timestamps in their tz, equal Decimals in their exponent, equal tuples in
# the types of their items (design brief, trap 13). Subclasses (np.str_) may
# carry more than their value.
_INTERCHANGEABLE = frozenset({str, bytes, int, bool, type(None)})


def _reduce_object_array(arr: np.ndarray, enc: _Encoder):
    """Object columns go in-band and become Python objects in every worker
    that decodes them -- memory no process can share. Equal values of the
    ``_INTERCHANGEABLE`` types are stored once (pickle's memo then makes every
    worker's array point at one object per distinct value): a column of
    500 000 strings of a few distinct values costs each worker 4 MB of
    pointers instead of 35 MB of strings. Any other value is stored as itself
    (pickle's memo already stores one object met twice once). Arrays of
    strings only are not pickled at all: they go in Arrow's layout
    (``_codec_strings``)."""
    strings = _arrow_strings(arr, enc, column=False)
    if strings is not None:
        return strings.__reduce__()
    # Flattened and rebuilt in one and the same order, whatever the strides
    # (a transposed or sliced array is neither C- nor F-contiguous).
    order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    values = arr.ravel(order=order).tolist() if arr.ndim else [arr.item()]
    if len(values) >= 1024 and _repeats_enough(values):
        canonical: dict = {}
        values = [canonical.setdefault((type(v), v), v) if type(v) in _INTERCHANGEABLE else v for v in values]
    return _rebuild_object_array, (values, arr.shape, order)


def _arrow_strings(arr: np.ndarray, enc: _Encoder, column: bool) -> Any:
    """``arr`` as Arrow strings (``_codec_strings``) if all its values are
    strings, else None (remembered: a frame's block is met twice)."""
    if _codec_strings is None or id(arr) in enc.not_strings:
        return None
    strings = _codec_strings.ArrowStrings.of(arr, column)
    if strings is None:
        enc.not_strings.add(id(arr))
    else:  # its columns that are not all strings are pickled next: as they are
        enc.not_strings.update(id(part) for part in strings.parts if isinstance(part, np.ndarray))
    return strings


def _repeats_enough(values: list) -> bool:
    # Sampled: a column of mostly distinct values is not worth a second pass.
    sample = [(type(v), v) for v in values[:4096] if type(v) in _INTERCHANGEABLE]
    return len(set(sample)) <= len(values[:4096]) // 2


def _reduce_in_band(arr: np.ndarray, enc: _Encoder):
    """numpy's own reduction (in-band, unpickled once per worker), for
    ndarray subclasses (np.matrix, np.ma keep their own semantics) and
    structured dtypes with object fields; wrapped so that the worker cache
    can make what it keeps read-only (``frozen_decode``)."""
    enc.in_band.add(id(arr))
    return _rebuild_in_band, (arr,)


def _rows_contiguous(arr: np.ndarray) -> bool:
    """A 2-D array neither C- nor F-contiguous whose rows each are."""
    return arr.ndim == 2 and arr.strides[1] == arr.itemsize and not (arr.flags.c_contiguous or arr.flags.f_contiguous)


def span(arr: np.ndarray) -> tuple[int, int]:
    """The address and size of the bytes from ``arr``'s lowest element to
    the end of its highest (strides may be negative)."""
    start = arr.__array_interface__["data"][0]
    low = start + sum((n - 1) * s for n, s in zip(arr.shape, arr.strides) if s < 0)
    high = start + sum((n - 1) * s for n, s in zip(arr.shape, arr.strides) if s > 0) + arr.itemsize
    return low, high - low


class _Memory:
    """Bytes of another array's memory as a uint8 array (keeps it alive)."""

    def __init__(self, owner: np.ndarray, address: int, nbytes: int) -> None:
        self.owner = owner
        self.__array_interface__ = {"data": (address, True), "shape": (nbytes,), "typestr": "|u1", "version": 3}


def _reduce_arrow_array(arr, enc: _Encoder):
    """pyarrow pickles a slice with its parent's whole buffers (and the
    slice's offset and length): right when they are in shared memory already
    (nothing is copied), but a partition of a frame never shared would copy
    each column once per piece. A slice of memory not shared yet goes as a
    compact copy of its own values."""
    buffers = [buf for buf in arr.buffers() if buf is not None and buf.size]
    # (nbytes leaves out an offset and bitmap rounding: a few bytes a buffer)
    if arr.get_total_buffer_size() - arr.nbytes <= 64 * len(buffers) or all(
        enc.in_shared(buf.address, buf.size) for buf in buffers
    ):
        return NotImplemented
    compact = pa.concat_arrays([arr])
    enc.copies.update((buf.address, buf.size) for buf in compact.buffers() if buf is not None)
    return _same, (compact,)


def _reduce_arrow_buffer(buf, enc: _Encoder):
    # pyarrow pickles every array down to its pa.Buffer objects, and those to
    # PickleBuffers: taking them here puts them in the same numbered list.
    return _rebuild_arrow_buffer, (enc.out_of_band(buf),)


def _reduce_ndarray_backed(arr: NDArrayBackedExtensionArray, enc: _Encoder):
    # Datetime, Timedelta, Period, Categorical (codes), NumpyExtensionArray.
    return _rebuild_ndarray_backed, (type(arr), arr._ndarray, arr.dtype, getattr(arr, "_freq", None))


def _reduce_masked(arr: BaseMaskedArray, enc: _Encoder):
    return _rebuild_masked, (type(arr), arr._data, arr._mask)


def _reduce_arrow_backed(arr, enc: _Encoder):
    # ``_readonly`` is where the array lives, not what it holds: a decoded
    # array is as writable as its memory (``_Encoder``), as numpy's are.
    state = {k: v for k, v in arr.__dict__.items() if k not in ("_cache", "_readonly")}
    state["_cache"] = {}  # (recomputed; __setitem__ clears it, so it must exist)
    chunked = state["_pa_array"]
    if chunked.num_chunks != 1:
        # pandas' __getstate__ combines the chunks (GH 42600, until
        # ARROW-10739): a stdlib task gets one chunk -- a frame made by
        # pd.concat included -- and so does ours. A copy, made when the
        # object is encoded: once per publication or result, never per task.
        # A single chunk is sent as it is: a slice of a shared frame stays a
        # view of the segment.
        combined = chunked.combine_chunks()
        enc.copies.update((buf.address, buf.size) for buf in combined.buffers() if buf is not None)
        state["_pa_array"] = pa.chunked_array([combined], type=chunked.type)
    return _rebuild_from_state, (type(arr), state)


_HANDLERS: list[tuple[type, Callable]] = [
    (pd.DataFrame, _reduce_frame),
    (pd.Series, _reduce_series),
    (pd.Index, _reduce_index),
    (np.ndarray, _reduce_ndarray),
    (NDArrayBackedExtensionArray, _reduce_ndarray_backed),
    (BaseMaskedArray, _reduce_masked),
]
if pa is not None:
    _HANDLERS += [(ArrowExtensionArray, _reduce_arrow_backed), (pa.Array, _reduce_arrow_array), (pa.Buffer, _reduce_arrow_buffer)]

_handler_cache: dict[type, Callable | None] = {}


def _handler_for(cls: type) -> Callable | None:
    try:
        return _handler_cache[cls]
    except KeyError:
        pass
    _load_polars()
    handler = None
    for base, candidate in _HANDLERS:
        if issubclass(cls, base):
            handler = candidate
            break
    _handler_cache[cls] = handler
    return handler


def _bytes_key(data: np.ndarray | pa.Buffer) -> tuple:
    """What determines the bytes ``data`` holds: their address and size if
    they are contiguous; else also the shape and strides of the uint8 view
    (rows of block slices over the same memory with other row strides --
    ``concat([df.iloc[:, 0:2], df.iloc[:, 0:4:2]], axis=1)`` -- start at the
    same address with as many bytes and are other bytes)."""
    if not isinstance(data, np.ndarray):
        return data.address, data.size
    key = data.__array_interface__["data"][0], data.nbytes
    return key if data.flags.c_contiguous else (*key, data.shape, data.strides)


class _Encoder(pickle.Pickler):
    """Numbers the buffers itself instead of pickle's ``buffer_callback``:
    pickle marks a buffer that was read-only when pickled (READONLY_BUFFER)
    and the unpickler then hands out a read-only view whatever the memory
    given back is. A read-only source (an array under pandas 3's
    copy-on-write, ``Series.values``, a frame built on a shared one) would
    then come back read-only from a copy-on-write mapping too. With our own
    numbering, a decoded array is exactly as writable as ``views`` are.
    PickleBuffers of objects we do not reduce go in-band."""

    def __init__(
        self, file: io.BytesIO, in_shared: Callable[[int, int], bool] | None = None, copies: set | None = None
    ) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self.in_shared = in_shared or _nowhere
        self.copies = set() if copies is None else copies  # (address, nbytes) of copies made here
        self.buffers: list[pickle.PickleBuffer] = []
        self._numbers: dict[tuple, int] = {}  # by _bytes_key
        self.in_band: set[int] = set()  # ids of arrays numpy reduces itself
        self.not_strings: set[int] = set()  # ids of object arrays that are not all strings
        self.read_only: set[int] = set()  # buffers a protocol-5 pickle would give read-only

    def out_of_band(self, data: np.ndarray | pa.Buffer) -> int:
        """The number of ``data`` (a uint8 ndarray, contiguous or 2-D with
        contiguous rows, or a pa.Buffer) among the buffers. The same memory
        met again through another object (pyarrow wraps each buffer in a new
        pa.Buffer whenever an array is pickled; a dictionary shared by chunks;
        two views of one array) gets the same number: it is copied once and
        stays shared once decoded."""
        number = self._numbers.get(key := _bytes_key(data))
        if number is None:
            number = self._numbers[key] = len(self.buffers)
            self.buffers.append(pickle.PickleBuffer(data))
        return number

    def reducer_override(self, obj: Any):
        handler = _handler_for(type(obj))
        if handler is None or id(obj) in self.in_band:
            return self.reduce_other(obj)
        return handler(obj, self)

    def reduce_other(self, obj: Any):
        return NotImplemented


class _CloudEncoder(_Encoder, cloudpickle.Pickler):
    """The same, writing what plain pickle refuses (a lambda in ``attrs``)
    the way loky's cloudpickle does: a layout is then as picklable as the
    object was for the pool that sends it (loky's workers have cloudpickle)."""

    def reduce_other(self, obj: Any):
        return cloudpickle.Pickler.reducer_override(self, obj)


def _nowhere(address: int, nbytes: int) -> bool:
    return False


class UnencodableError(SharedExecError, pickle.PicklingError):
    """The pickler of the layout refused part of the object: it cannot be
    shared, and goes by the pool's own pickling instead."""


def encode(
    obj: Any,
    cloudpickle_fallback: bool = False,
    in_shared: Callable[[int, int], bool] | None = None,
    copies: set[tuple[int, int]] | None = None,
    read_only: set[int] | None = None,
) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """``obj`` as (layout, out-of-band buffers). The buffers are views of
    ``obj``'s own memory (or of a contiguous copy, for strided arrays);
    :func:`raw_view` gives their bytes.

    ``in_shared(address, nbytes)`` says whether memory is in shared memory
    already: a slice of such memory (strided rows of a 2-D block, an Arrow
    slice) is sent as the bytes it spans, to be found there and not copied;
    a slice of other memory as a compact copy of its own values only, whose
    ``(address, nbytes)`` go into ``copies``: memory nothing else points at.
    ``read_only`` gets the numbers of the buffers that a pickle of protocol
    5 would give back read-only (loky's results keep a read-only array so).

    The layout is written with plain pickle, or -- when that fails and
    ``cloudpickle_fallback`` says the pool pickles with cloudpickle (loky) --
    with cloudpickle. Raises :class:`UnencodableError` if neither can."""
    encoders = (_Encoder, _CloudEncoder) if cloudpickle_fallback else (_Encoder,)
    for encoder_cls in encoders:
        stream = io.BytesIO()
        encoder = encoder_cls(stream, in_shared, copies)
        try:
            encoder.dump(obj)
        except Exception as exc:  # pickle raises TypeError, AttributeError, PicklingError...
            error = exc
            continue
        if read_only is not None:
            read_only.update(encoder.read_only)
        return stream.getvalue(), encoder.buffers
    raise UnencodableError(
        f"cannot share this {type(obj).__name__}: part of it cannot be pickled ({error}). Remove "
        "that value (from attrs, say), or send the object without sharedexec."
    ) from error


def raw_view(buffer: pickle.PickleBuffer) -> memoryview:
    """The bytes of one of :func:`encode`'s buffers: a contiguous memoryview,
    or for the rows of a 2-D block slice a 2-D one whose rows (each
    contiguous) are the bytes in C order, to be written one after another."""
    try:
        return buffer.raw()
    except BufferError:  # (raw() refuses what is not contiguous)
        return memoryview(buffer)


# The views of the decode running in this thread: rebuild functions find their
# buffer by number here (see _Encoder for why not pickle's ``buffers=``).
_decoding = threading.local()


def decode(layout: bytes | memoryview, views: list[memoryview]) -> Any:
    """Rebuild the object from its layout on top of ``views`` (one per buffer,
    in order). Arrays are views of ``views``: writable exactly if they are,
    and then never two over the same memory (``_shared_memory``)."""
    outer = getattr(_decoding, "views", None), getattr(_decoding, "aliased", None)
    _decoding.views = views
    _decoding.aliased = _shared_memory(views)
    try:
        return pickle.loads(layout)
    finally:
        _decoding.views, _decoding.aliased = outer


def _shared_memory(views: list[memoryview]) -> set[int]:
    """The numbers of the writable views whose memory an earlier view (by
    address) also covers. Distinct objects over one memory -- two columns of
    a pandas 3 lazy copy (``df["b"] = df["a"]``), ``arr`` and ``arr.view()``
    -- are stored once, but a pickle gives each its own copy: where a task
    can write, each must get its own memory too (a write through one must
    not show through the other). One object met twice is one object (pickle's
    memo), decoded once."""
    spans = sorted(
        (np.frombuffer(view, np.uint8).ctypes.data, view.nbytes, number)
        for number, view in enumerate(views)
        if view.nbytes and not view.readonly
    )
    aliased, end = set(), 0
    for start, size, number in spans:
        if start < end:
            aliased.add(number)
        end = max(end, start + size)
    return aliased


class FrozenDecode:
    """What a :func:`frozen_decode` found: ``private`` is true when the object
    holds values that cannot be made read-only (a list in an object column, a
    dict in ``_metadata``): each task must then get a decode of its own."""

    private = False


@contextlib.contextmanager
def frozen_decode() -> Iterator[FrozenDecode]:
    """Decodes in this block are for the worker cache of ``mmap_mode="r"``,
    whose object every task of the worker is handed: the arrays decoded
    in-band (object columns, np.matrix, np.ma data and mask) are made
    read-only, as the ones in the segment are, and values that cannot be
    are reported (``FrozenDecode.private``). Outside, in-band arrays are
    writable, as the stdlib's are."""
    outer = getattr(_decoding, "frozen", None)
    _decoding.frozen = report = FrozenDecode()
    try:
        yield report
    finally:
        _decoding.frozen = outer


def strings_as(mode: str) -> contextlib.AbstractContextManager:
    """Decodes in this block hand a frame's or Series' object columns of
    strings over as ``mode``: ``"exact"`` (object arrays of ``str``) or
    ``"arrow"`` (pandas' Arrow-backed ``str``; see ``_codec_strings``)."""
    return contextlib.nullcontext() if _codec_strings is None else _codec_strings.strings_as(mode)


@contextlib.contextmanager
def pickled_with(protocol: int) -> Iterator[None]:
    """Decodes in this block give what the pool's pickle of this protocol
    gives: under protocol 5, numpy sends a non-native array (structured ones
    aside) in native byte order, same values -- multiprocessing pickles with
    protocol 4 before Python 3.14, loky with 5."""
    outer = getattr(_decoding, "protocol", PROTOCOL)
    _decoding.protocol = protocol
    try:
        yield
    finally:
        _decoding.protocol = outer


def _to_native(dtype: np.dtype) -> bool:
    return not dtype.isnative and dtype.names is None and getattr(_decoding, "protocol", PROTOCOL) < 5


def _view(index: int) -> memoryview:
    views = getattr(_decoding, "views", None)
    if views is None:
        raise RuntimeError("sharedexec layouts are read with _codec.decode, not pickle.loads")
    return views[index]


# Values a task cannot change in place (exact types: a subclass may add
# mutable attributes). np.void is left out: it can be a view of an array.
_IMMUTABLE = frozenset(
    {str, bytes, int, float, complex, bool, type(None), decimal.Decimal, fractions.Fraction,
     dt.datetime, dt.date, dt.time, dt.timedelta, pd.Timestamp, pd.Timedelta, pd.Period, pd.Interval,
     type(pd.NaT), type(pd.NA), range}
)


def _immutable(value: Any) -> bool:
    cls = type(value)
    if cls in _IMMUTABLE or (isinstance(value, np.generic) and not isinstance(value, np.void)):
        return True
    if cls is tuple or cls is frozenset:
        return all(map(_immutable, value))
    # An array the frozen decode made read-only (its elements were checked).
    return isinstance(value, np.ndarray) and not value.flags.writeable


def _freeze(arr: np.ndarray, values: Any) -> np.ndarray:
    """In a frozen decode: ``arr`` read-only, and ``values`` (its Python
    objects, if any) checked; else ``arr`` as it is."""
    report = getattr(_decoding, "frozen", None)
    if report is None:
        return arr
    arr.flags.writeable = False
    _note_mutable(values)
    return arr


def _note_mutable(values: Any) -> None:
    report = getattr(_decoding, "frozen", None)
    if report is not None and not report.private and not all(map(_immutable, values)):
        report.private = True


# -- decoding (module-level functions: spawn and forkserver workers import them)


def _rebuild_ndarray(index: int, dtype: np.dtype, shape: tuple, order: str, cls: type = np.ndarray) -> np.ndarray:
    if not dtype.itemsize:  # np.frombuffer refuses (S0, V0): no data anyway
        return np.empty(shape, dtype=dtype, order=order)
    # An empty array too comes from its (empty) view: as writable as the others.
    view = _view(index)
    flat = _unaliased(index, view, np.frombuffer(view, dtype=dtype, count=math.prod(shape)))
    return _as_pickled(flat.reshape(shape, order=order), view, cls)


def _rebuild_strided(index: int, dtype: np.dtype, shape: tuple, strides: tuple, offset: int) -> np.ndarray:
    view = _view(index)
    arr = np.ndarray(shape, dtype=dtype, buffer=view, offset=offset, strides=strides)
    return _as_pickled(_unaliased(index, view, arr), view)


def _unaliased(index: int, view: memoryview, arr: np.ndarray) -> np.ndarray:
    if view.nbytes and not view.readonly:
        aliased = _decoding.aliased
        if index in aliased:
            arr = arr.copy()  # see _shared_memory
        aliased.add(index)  # the next array over this memory copies it
    return arr


def _as_pickled(arr: np.ndarray, view: memoryview, cls: type = np.ndarray) -> np.ndarray:
    """``arr`` as the pool's pickle gives it (``pickled_with``): in native
    byte order under a protocol below 5; np.memmap as itself."""
    if _to_native(arr.dtype):
        arr = arr.astype(arr.dtype.newbyteorder("="))
        arr.flags.writeable = not view.readonly
    return arr if cls is np.ndarray else arr.view(cls)


def _rebuild_arrow_buffer(index: int):
    return pa.py_buffer(_view(index))


def _rebuild_object_array(values: list, shape: tuple, order: str) -> np.ndarray:
    # fromiter: each value is one element (np.array would nest tuples and lists).
    flat = np.fromiter(values, dtype=object, count=len(values))
    # Frozen before reshaping: the task's array and its .base are both read-only.
    return _freeze(flat, values).reshape(shape, order=order)


def _rebuild_in_band(arr: np.ndarray) -> np.ndarray:
    if _to_native(arr.dtype):
        arr = pickle.loads(pickle.dumps(arr, protocol=_decoding.protocol))  # what the pool's pickle gives
    if getattr(_decoding, "frozen", None) is None:
        return arr
    mask = getattr(arr, "_mask", None)  # np.ma: the mask is an array of its own
    if isinstance(mask, np.ndarray):
        mask.flags.writeable = False
    values = arr.view(np.ndarray).ravel() if arr.dtype == object else ()
    if arr.dtype.hasobject and arr.dtype != object:
        values = [object()]  # structured with object fields: not looked into, kept private
    return _freeze(arr, values)


def _rebuild_ndarray_backed(cls, ndarray, dtype, freq):
    arr = cls._simple_new(ndarray, dtype=dtype)
    if freq is not None:
        arr._freq = freq
    return arr


def _rebuild_masked(cls, data, mask):
    return cls._simple_new(data, mask)


def _rebuild_from_state(cls, state):
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _restore_frame_state(obj, attrs, allows_duplicate_labels, metadata):
    if attrs:
        obj.attrs = attrs  # (every task gets a deep copy: pandas' __finalize__)
    _note_mutable(metadata.values())
    for name, value in metadata.items():
        object.__setattr__(obj, name, value)
    if not allows_duplicate_labels:
        obj.flags.allows_duplicate_labels = False
    return obj


def _rebuild_frame(cls, blocks, index, columns, attrs, allows_duplicate_labels, metadata):
    with warnings.catch_warnings():
        # pandas 2.2 flags make_block as internal API; it is the zero-copy path
        # (pyarrow's to_pandas uses the same one for the same reason).
        warnings.simplefilter("ignore", DeprecationWarning)
        mgr = BlockManager(tuple(_make_blocks(blocks)), [columns, index])
    if getattr(_decoding, "frozen", None) is not None:
        _freeze_blocks(mgr)
    return _restore_frame_state(cls._from_mgr(mgr, mgr.axes), attrs, allows_duplicate_labels, metadata)


def _make_blocks(blocks: list) -> Iterator:
    for values, placement in blocks:
        if isinstance(values, list):  # an object block's columns, some as Arrow strings: a block each
            locs = range(placement.start, placement.stop, placement.step or 1) if isinstance(placement, slice) else placement
            for column, loc in zip(values, locs):
                yield _make_block(column.reshape(1, -1) if isinstance(column, np.ndarray) else column, slice(loc, loc + 1))
        else:
            yield _make_block(values, placement)


def _rebuild_series(cls, values, index, name, attrs, allows_duplicate_labels, metadata):
    if isinstance(values, list):  # Arrow strings (one column)
        values = values[0]
    mgr = SingleBlockManager.from_array(values, index)
    if getattr(_decoding, "frozen", None) is not None:
        _freeze_blocks(mgr)
    series = cls._from_mgr(mgr, mgr.axes)
    series.name = name
    return _restore_frame_state(series, attrs, allows_duplicate_labels, metadata)


def _rebuild_index(cls, values, name, freq):
    idx = cls._simple_new(values, name=name)
    if freq is not None and idx.freq != freq:
        idx._freq = freq
    return idx


def _rebuild_multiindex(cls, levels, codes, names, sortorder):
    return cls(levels=levels, codes=codes, names=names, sortorder=sortorder, verify_integrity=False)


# -- polars: optional, shared once the program has imported it ----------------
# Its dtype knowledge is in _codec_polars, which imports polars: loaded only
# when polars already is in sys.modules (sharedexec never imports it).

_POLARS_TYPES: tuple[type, ...] = ()
_polars_loaded = False
_polars_codec: Any = None


def _load_polars() -> tuple[type, ...]:
    """polars' types once polars is imported (and pyarrow installed), else ()."""
    global _POLARS_TYPES, SHAREABLE_TYPES, SHAREABLE_NAMES, _polars_loaded, _polars_codec
    if _polars_loaded or "polars" not in sys.modules:
        return _POLARS_TYPES
    _polars_loaded = True
    if pa is None:
        logging.getLogger("sharedexec").debug("polars objects go by pickling: sharing them needs pyarrow")
        return _POLARS_TYPES
    import polars as pl

    from . import _codec_polars

    _polars_codec = _codec_polars
    _POLARS_TYPES = (pl.DataFrame, pl.Series)
    SHAREABLE_TYPES += _POLARS_TYPES
    SHAREABLE_NAMES += ", or polars DataFrame or Series"
    _HANDLERS.extend([(pl.DataFrame, _codec_polars.reduce_frame), (pl.Series, _codec_polars.reduce_series)])
    _handler_cache.clear()
    return _POLARS_TYPES


def _polars_pool_running() -> bool:
    # polars names the threads of its pool "polars-<n>" (others, e.g. its
    # "polars-ooc-clea..." cleaner, exist from import on and survive fork).
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith("polars-") and name[7:].isdigit():
            return True
    return False


#: True in a process forked while polars' thread pool ran in its parent:
#: polars calls that use the pool never return there (see _codec_polars).
forked_with_polars_pool = False
_pool_at_fork = False


def _before_fork() -> None:
    global _pool_at_fork
    _pool_at_fork = "polars" in sys.modules and _polars_pool_running()


def _after_fork_in_child() -> None:
    global forked_with_polars_pool
    forked_with_polars_pool = forked_with_polars_pool or _pool_at_fork


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


# -- what the registry and the worker cache ask of an object -------------------


def is_shareable(obj: Any) -> bool:
    return isinstance(obj, SHAREABLE_TYPES) or (not _polars_loaded and isinstance(obj, _load_polars()))


def nbytes(obj: Any) -> int:
    """The bytes an object's data occupies, cheaply (no deep object sizes)."""
    if isinstance(obj, pd.DataFrame):
        return sum(blk.values.nbytes for blk in obj._mgr.blocks) + obj.index.nbytes
    if isinstance(obj, pd.Series):
        return obj.nbytes + obj.index.nbytes
    if isinstance(obj, _load_polars()):
        return _polars_codec.nbytes(obj)
    return int(obj.nbytes)


def parts(obj: Any) -> list[np.ndarray]:
    """The arrays a pickler meets inside ``obj`` after ``obj`` itself: its
    blocks and the arrays behind them (not the axes, which are small or are
    shared objects of their own)."""
    if isinstance(obj, pd.DataFrame):
        values = [blk.values for blk in obj._mgr.blocks]
    elif isinstance(obj, pd.Series):
        values = [obj._values]
    else:
        return []
    found = []
    for value in values:
        found.append(value)
        found.extend(getattr(value, attr) for attr in ("_ndarray", "_data", "_mask", "_pa_array") if hasattr(value, attr))
    return found


def unchanging_memory(obj: Any) -> set[tuple[int, int]]:
    """The memory of ``obj`` that keeps its bytes while its publication holds
    ``write_guard(obj)``, as (address, nbytes) keys: a later object over the
    same memory (``df.assign(c=...)``, ``df[["a"]]``) holds the same bytes.
    Its blocks (pandas copies one before writing into it) and its axes' data
    (pandas never writes into an Index). Nothing else: a numpy array can be
    written in place by whoever holds it or a view of it (``arr[0] = 7``,
    then ``arr[:]`` sent), and so can the array a frame was built on with
    ``copy=False`` (docs, semantics: the snapshot rule)."""
    if write_guard(obj) is None:
        return set()
    arrays = parts(obj) + [arr for axis in obj._mgr.axes for arr in _axis_arrays(axis)]
    return {
        (arr.__array_interface__["data"][0], arr.nbytes)
        for arr in arrays
        if isinstance(arr, np.ndarray) and arr.nbytes and (arr.flags.c_contiguous or arr.flags.f_contiguous)
    }


def _axis_arrays(axis: pd.Index) -> list[np.ndarray]:
    if isinstance(axis, pd.MultiIndex):
        return [arr for level in axis.levels for arr in _axis_arrays(level)] + list(axis.codes)
    values = axis._values
    return [values] if isinstance(values, np.ndarray) else [getattr(values, "_ndarray", None)]


def _axis_state(axis: pd.Index) -> tuple:
    # Names and freq are set on the Index object in place (``df.index.name =``,
    # ``df.index.freq = "D"``, statsmodels' idiom): its identity alone misses them.
    return tuple(axis.names), getattr(axis, "freq", None)


def _frame_values(obj: pd.DataFrame | pd.Series) -> tuple:
    metadata = tuple(getattr(obj, name, None) for name in obj._metadata)
    return obj.attrs, obj.flags.allows_duplicate_labels, metadata


class _Pinned:
    """Values that cannot be pickled to compare (a lambda, a lock in
    ``attrs``): equal while they are the very same objects, so the object is
    published once and reused until one of them is replaced (a changed item
    of such an ``attrs`` dict is not seen)."""

    def __init__(self, values: tuple) -> None:
        self.values = values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Pinned) and _same_objects(self.values, other.values)

    __hash__ = None


def _same_objects(a: Any, b: Any) -> bool:
    # The tuples are built afresh for each fingerprint; what they hold is not.
    if type(a) is tuple and type(b) is tuple:
        return len(a) == len(b) and all(map(_same_objects, a, b))
    return a is b


def _snapshot(values: tuple) -> bytes | _Pinned:
    """``values`` in a form compared exactly: their pickle. ``==`` would
    merge values a worker tells apart (1 and True as a name, Decimal("1.1")
    and Decimal("1.10"), 0.0 and -0.0, Timestamps in two zones: trap 13),
    raise for arrays, and a live reference would equal itself after an
    in-place change (``df.attrs["unit"] = "m"``). pandas deep-copies attrs
    on every operation, so they are small."""
    try:
        return pickle.dumps(values, protocol=PROTOCOL)
    except Exception:
        return _Pinned(values)


_BLOCK_VALUES = operator.attrgetter("values")


# -- what the per-task check of a frame may skip --------------------------------
#
# A frame published before is sent again while its manager, block tuple, axes
# and each block's array are the very objects they were (``fingerprint``).
# Every pandas write into a published frame replaces the block tuple -- the
# publication's ``write_guard`` makes pandas copy the written block into a new
# Block, Arrow string cells included (``BlockManager.column_setitem`` splits
# the block first) -- but one: a whole-column write into a single-column
# block (``BlockManager._iset_single``: ``replace(..., inplace=True)``
# column by column) gives the same Block object a new array,
# ``Block.set_inplace(copy=True)``, the only pandas code that does. Looking
# at every block's array costs ~100 ns a block, 250 us a task for a frame of
# 2 500 blocks; so calls of ``set_inplace`` are counted, and the arrays are
# looked at only when one ran since the frame was last found unchanged.
_set_inplace_calls = itertools.count()  # (next() is atomic: threads may write)
_last_set_inplace = next(_set_inplace_calls)


def block_writes() -> int:
    """A number that moves whenever pandas gives an existing Block a new
    array (see above): pass it to :func:`unchanged` as ``since`` once the
    frame was found unchanged, read *before* that check."""
    return _last_set_inplace


def note_block_write() -> None:
    """An existing Block was given a new array outside pandas (``_adopt``
    re-points blocks at their segment): the next checks look at the arrays."""
    global _last_set_inplace
    _last_set_inplace = next(_set_inplace_calls)


def _counted(set_inplace: Callable) -> Callable:
    @functools.wraps(set_inplace)
    def counted(self, *args, **kwargs):
        global _last_set_inplace
        # Before and after: a check running meanwhile is followed by one
        # that looks at every array again.
        _last_set_inplace = next(_set_inplace_calls)
        try:
            return set_inplace(self, *args, **kwargs)
        finally:
            _last_set_inplace = next(_set_inplace_calls)

    counted.__sharedexec__ = True
    return counted


def _count_set_inplace() -> None:
    from pandas.core.internals import blocks

    for cls in vars(blocks).values():
        method = vars(cls).get("set_inplace") if isinstance(cls, type) else None
        if method is not None and not getattr(method, "__sharedexec__", False):
            cls.set_inplace = _counted(method)


_count_set_inplace()


def fingerprint(obj: Any) -> tuple[tuple, Any]:
    """What must not change for a published object to be reused:
    ``(identities, values)``, compared with ``is`` and ``==`` respectively.

    Identities are the frame's manager, its block arrays and its axes: a
    replaced or added column, a reassigned index or an in-place structural
    operation changes one of them. Values are what can change in place on
    those same objects: axis names and freq, attrs, flags, ``_metadata``
    (a ``_snapshot``). Values written in place into an existing array change
    none of them (see docs: semantics)."""
    if isinstance(obj, pd.DataFrame):
        mgr = obj._mgr
        blocks = mgr.blocks
        # The blocks' arrays too, not only the blocks: a whole-column write
        # into a single-column block that another object references (pandas'
        # copy-on-write) gives the same Block object a new array
        # (``BlockManager._iset_single``). Walked in C: ~20 ns a block.
        idents = (mgr, blocks, *mgr.axes, *map(_BLOCK_VALUES, blocks))
        return idents, _frame_snapshot(obj)
    if isinstance(obj, pd.Series):
        return (obj._mgr, obj._values, obj.index), _snapshot((obj.name, *_frame_values(obj), _axis_state(obj.index)))
    if isinstance(obj, pd.Index):
        return (), _snapshot(_axis_state(obj))
    if isinstance(obj, np.ndarray):
        # ndarray.resize() reallocates in place: the address says so. A
        # structured dtype's fields are renamed in place (``dtype.names =``):
        # the dtype object always equals itself, its descr (names, titles,
        # nested fields) is a snapshot by value.
        dtype = obj.dtype
        return (), (obj.shape, obj.strides, dtype.str, dtype, dtype.names and dtype.descr, obj.__array_interface__["data"][0])
    if isinstance(obj, _load_polars()):
        return _polars_codec.fingerprint(obj)
    return (), ()  # pyarrow objects are immutable


try:  # pandas 2.2: an option, read at each call (a user may turn it on after importing us)
    from pandas._config import using_copy_on_write as _pandas_copies_on_write
except ImportError:  # pandas >= 3: always

    def _pandas_copies_on_write() -> bool:
        return True


def write_guard(obj: Any) -> Any:
    """A reference to ``obj``'s blocks that pandas sees, or None.

    Under Copy-on-Write pandas copies a block before writing into it while
    another object references it (``Block.refs.has_reference()``: a shallow
    copy is one, see pandas' ``internals/managers.py``, ``column_setitem``,
    ``setitem_inplace``; ``internals/blocks.py``, ``_get_refs_and_copy``).
    Held by the publisher, it makes every in-place write -- ``df.loc``,
    ``iloc``, ``fillna(inplace=True)``, an Arrow string cell, ``s.iloc[0] =``
    -- replace the written block (or column) with a new object: the
    fingerprint sees it, and only that block is published again. Blocks that
    are not written are never copied. pandas 2.2 without Copy-on-Write and
    numpy arrays write in place whatever references exist: None (the
    snapshot rule, docs/semantics.md)."""
    if isinstance(obj, (pd.DataFrame, pd.Series)) and _pandas_copies_on_write():
        return obj.copy(deep=False)
    return None


def _frame_snapshot(df: pd.DataFrame) -> bytes | _Pinned:
    return _snapshot((*_frame_values(df), _axis_state(df.index), _axis_state(df.columns)))


def unchanged(obj: Any, fp: tuple[tuple, Any], since: int | None = None) -> bool:
    """``same_fingerprint(fp, fingerprint(obj))``; for a frame building
    nothing, and without looking at its blocks' arrays if ``since`` -- what
    :func:`block_writes` was before the frame was last found unchanged -- is
    still current: the per-task check of a frame of any width is O(1)."""
    if not isinstance(obj, pd.DataFrame):
        return same_fingerprint(fp, fingerprint(obj))
    idents, values = fp
    mgr = obj._mgr
    blocks, axes = mgr.blocks, mgr.axes
    head = 2 + len(axes)
    return (
        len(idents) == head + len(blocks)
        and all(map(operator.is_, (mgr, blocks, *axes), idents[:head]))
        and (
            since == _last_set_inplace
            or all(map(operator.is_, map(_BLOCK_VALUES, blocks), itertools.islice(idents, head, None)))
        )
        and bool(values == _frame_snapshot(obj))
    )


def same_fingerprint(a: tuple[tuple, Any], b: tuple[tuple, Any]) -> bool:
    idents_a, values_a = a
    idents_b, values_b = b
    if len(idents_a) != len(idents_b) or not all(map(operator.is_, idents_a, idents_b)):
        return False
    return bool(values_a == values_b)


def _axis_view(axis: pd.Index) -> pd.Index:
    view = axis.view()
    if not isinstance(axis, (pd.DatetimeIndex, pd.TimedeltaIndex)):
        return view  # (a RangeIndex's _data would materialise every label)
    values = axis._data
    if getattr(values, "_freq", None) is not None and view._data is values:
        # pandas 2 keeps a DatetimeIndex's freq on its array, which Index.view()
        # shares: ``view.index.freq = None`` would reach the cached frame.
        data = values._from_backing_data(values._ndarray)
        data._freq = values._freq
        view = type(axis)._simple_new(data, name=axis.name)
    return view


# -- a task's own frame over the worker cache's blocks --------------------------
#
# ``df.copy(deep=False)`` makes a Block object per block (and a view per
# extension array): 5 ms per task for a frame of 2 500 blocks. A task gets
# instead its own manager -- its own block tuple, axes and block maps, all
# that pandas changes when a task adds, drops or replaces columns -- over the
# cache's Block objects, which must then never change:
#
# * pandas-level writes must copy first: each block is referenced by a marker
#   that stands for the other processes mapping the same memory, so that
#   pandas' copy-on-write always sees a reference (BlockValuesRefs);
# * writes that bypass copy-on-write (``df["s"].array[0] = x``; Arrow arrays
#   replace their data in place) meet read-only arrays: extension arrays are
#   marked ``_readonly`` (pandas >= 3), as the numpy ones already are;
# * the two pandas paths that change an existing Block object in place
#   (``_TaskManager``) get a shallow copy of their own first.

_SHARED_ELSEWHERE = pd.Index([])
_FAST_VIEWS = hasattr(pd.api.extensions.ExtensionArray, "_readonly")  # pandas >= 3
_frozen_managers: weakref.WeakValueDictionary[int, BlockManager] = weakref.WeakValueDictionary()


def _freeze_blocks(mgr: BlockManager | SingleBlockManager) -> None:
    """Make ``mgr``'s blocks safe to share by every task of a worker, or to
    hand one task over read-only memory (a frozen decode: the cache's, or
    a task's own decode of an object with mutable values): under
    Copy-on-Write, a write copies the block first."""
    for blk in mgr.blocks:
        blk.refs.add_index_reference(_SHARED_ELSEWHERE)
    if not (_FAST_VIEWS and isinstance(mgr, BlockManager)):
        return  # (a Series' task view has extension arrays of its own: Block.copy views them)
    for blk in mgr.blocks:
        if isinstance(blk.values, pd.api.extensions.ExtensionArray):
            blk.values._readonly = True
    mgr.blknos  # noqa: B018 - computed once here, copied per task
    _frozen_managers[id(mgr)] = mgr


def reduce_writable(obj: Any):
    """For results pickled by value: an extension array a frozen decode made
    read-only (or a view of one) travels as a writable one -- read-only is
    where it lived in the worker, not what the task returns, as for numpy
    arrays, whose pickles never carry the flag. NotImplemented otherwise."""
    if not isinstance(obj, pd.api.extensions.ExtensionArray) or not vars(obj).get("_readonly"):
        return NotImplemented
    view = obj.view()
    del view._readonly  # the class default: what a stdlib task's array has
    return _same, (view,)


def _same(obj: Any) -> Any:
    return obj


class _TaskManager(BlockManager):
    """A task's manager over Block objects it shares with the worker cache."""

    __slots__ = ()

    def _own_block(self, blkno: int):
        blk = self.blocks[blkno].copy(deep=False)
        self.blocks = (*self.blocks[:blkno], blk, *self.blocks[blkno + 1 :])
        return blk

    def _iset_single(self, loc, value, inplace, blkno, blk, refs=None):
        # A full-column write into a single-column block replaces the values
        # of the Block object itself (``set_inplace(copy=True)``).
        if inplace:
            blk = self._own_block(blkno)
        return super()._iset_single(loc, value, inplace, blkno, blk, refs)

    def _insert_update_mgr_locs(self, loc):
        # Inserting a column moves the placement of the blocks after it in place.
        for blkno in np.unique(self.blknos[loc:]):
            self._own_block(blkno)
        return super()._insert_update_mgr_locs(loc)

    def __reduce__(self):
        return BlockManager, (self.blocks, self.axes)  # plain pandas on the wire


def _frame_view(obj: pd.DataFrame) -> pd.DataFrame:
    mgr = obj._mgr
    if _frozen_managers.get(id(mgr)) is not mgr:
        view = obj.copy(deep=False)
        view.index = _axis_view(obj.index)
        view.columns = _axis_view(obj.columns)
        return view
    new = _TaskManager(mgr.blocks, [_axis_view(mgr.axes[0]), _axis_view(mgr.axes[1])], verify_integrity=False)
    # pandas updates these maps in place (two int arrays, one item per column).
    new._blknos, new._blklocs = mgr.blknos.copy(), mgr.blklocs.copy()
    return obj._constructor_from_mgr(new, new.axes).__finalize__(obj, method="copy")


def task_view(obj: Any, own: Callable[[np.ndarray], np.ndarray] | None = None) -> Any:
    """A new, shallow object over the same data, so that whatever one task
    does to its object (add, drop or replace columns, rename an axis, set its
    freq, set ``attrs``) is never seen by another task in the same worker.
    A frame from a frozen decode costs the same whatever its width.

    Where pandas writes in place (``writes_in_place``), a frame's or
    Series' arrays are ``own(arr)`` instead: memory of the task's own."""
    if own is not None and writes_in_place(type(obj)):
        return _owned_view(obj, own)
    if isinstance(obj, pd.DataFrame):
        return _frame_view(obj)
    if isinstance(obj, pd.Series):
        view = obj.copy(deep=False)
        view.index = _axis_view(obj.index)
        return view
    if isinstance(obj, pd.Index):
        return _axis_view(obj)
    if isinstance(obj, np.ndarray):
        view = obj.view()
        if isinstance(view, np.ma.MaskedArray) and obj._fill_value is not None:
            # A view shares the 0-d fill value `.fill_value = x` sets in place,
            # or converts it (to the array's dtype): the task gets its own, as it was.
            view._fill_value = obj._fill_value.copy()
        return view
    if isinstance(obj, _load_polars()):
        return _polars_codec.task_view(obj)
    return obj  # pyarrow objects are immutable


# -- a task's own arrays, where pandas writes in place --------------------------
#
# pandas without Copy-on-Write (2.2 with the option off) writes into a block's
# arrays in place, whoever else uses them: over the cache's arrays, a task's
# ``df.loc[0, "a"] = 1`` would meet read-only memory where a stdlib task
# writes, and a write into a writable array would reach the next task. So
# there a task's frame or Series is rebuilt over arrays of its own, block by
# block -- ``own(arr)``, from the worker cache: the same bytes in a private
# mapping of the segment, or a copy (object arrays, which live in the
# process) -- and extension arrays around them are new objects (pandas
# replaces an Arrow array's data, or clears a DatetimeArray's freq, on the
# array object itself). Per task: a Block and an array view per block, no
# bytes copied but object columns' pointers.


def writes_in_place(cls: type) -> bool:
    """Whether pandas writes into the arrays of a ``cls`` object in place,
    whoever else uses them: a frame or Series under pandas without
    Copy-on-Write."""
    return issubclass(cls, (pd.DataFrame, pd.Series)) and not _pandas_copies_on_write()


_REBUILT_AROUND_ARRAYS = {_reduce_ndarray_backed, _reduce_masked, _reduce_arrow_backed}


def _owned_values(values: Any, own: Callable[[np.ndarray], np.ndarray]) -> Any:
    if isinstance(values, np.ndarray):
        return own(values)
    handler = _handler_for(type(values))
    if handler not in _REBUILT_AROUND_ARRAYS:
        # Interval, Sparse, another library's array: insides we do not
        # rebuild. A copy of its own, as the stdlib's task has.
        return values.copy()
    rebuild, args = handler(values, None)
    return rebuild(*(own(arg) if isinstance(arg, np.ndarray) else arg for arg in args))


def _owned_view(obj: pd.DataFrame | pd.Series, own: Callable[[np.ndarray], np.ndarray]) -> pd.DataFrame | pd.Series:
    mgr = obj._mgr
    blocks = tuple(blk.make_block_same_class(_owned_values(blk.values, own)) for blk in mgr.blocks)
    axes = [_axis_view(axis) for axis in mgr.axes]
    if isinstance(obj, pd.DataFrame):
        new = BlockManager(blocks, axes, verify_integrity=False)
    else:
        new = SingleBlockManager(blocks[0], axes[0], verify_integrity=False)
    return obj._constructor_from_mgr(new, new.axes).__finalize__(obj, method="copy")
