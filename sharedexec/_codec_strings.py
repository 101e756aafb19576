"""Object arrays of strings <-> Arrow's string layout: the strings part of _codec.

An ``object`` array whose every element is exactly ``str`` -- or one missing
value object among them: ``None``, or numpy's ``nan`` itself -- goes into a
segment as one Arrow ``large_string`` array (offsets and UTF-8 bytes, out of
band) instead of pickled Python strings. pyarrow builds it in C, in a
fraction of the time pickling takes (500 000 strings: ~20 ms against ~75 ms),
and turns it back into Python strings faster than unpickling does. Anything
else -- a ``str`` subclass (``np.str_``), another missing value, a float NaN
that is not ``np.nan``, a string that is no valid UTF-8 (a lone surrogate), an
array without any string -- is not taken here and stays with _codec's
pickled object arrays.

Exact by default: a worker gets an ``object`` array of ``str`` equal to the
original, element by element, missing values as the same object (``None``
or ``np.nan``), same shape and memory order. When most values repeat, one
string object per distinct value is shared by all its places, as _codec's
pickled object arrays do (``repeats``).

The opt-in ``strings="arrow"`` (an entry point's option; ``strings_as``
here) hands *columns* -- a frame's object blocks, a Series' values -- over as
pandas' Arrow-backed ``str`` dtype instead, on top of the segment: no Python
string is made, and every worker reads the same memory. Missing values become
that dtype's NaN. Other object arrays (an Index, a bare ndarray) stay exact.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from . import _codec  # (partly initialised while _codec imports us: used at call time)

_state = threading.local()


@contextlib.contextmanager
def strings_as(mode: str) -> Iterator[None]:
    """Decodes in this block hand object columns of strings over as ``mode``:
    ``"exact"`` or ``"arrow"``."""
    outer = getattr(_state, "mode", "exact")
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = outer


def _missing_kind(flat: np.ndarray) -> str | None:
    """"" (no missing value), "none" or "nan" when every element of ``flat``
    is exactly ``str`` or that missing value; else None."""
    kinds = set(map(type, flat))
    if str not in kinds:
        return None
    kinds.discard(str)
    if not kinds:
        return ""
    if kinds == {type(None)}:
        return "none"
    # np.nan itself only: another NaN may differ in sign or payload.
    if kinds == {float} and all(v is np.nan for v in flat if type(v) is float):
        return "nan"
    return None


def _part(flat: np.ndarray) -> tuple | np.ndarray:
    """One column (or a whole non-column array), flat: (Arrow array as
    ``_buffers``, missing, repeats), or the object array itself when it is
    not all strings."""
    missing = _missing_kind(flat)
    if missing is not None:
        repeats = len(flat) >= 1024 and _codec._repeats_enough(flat[:4096].tolist())
        try:
            array = pa.array(flat, type=pa.large_string(), from_pandas=missing == "nan")
        except (pa.ArrowException, UnicodeError):  # a lone surrogate has no UTF-8
            return flat
        return _buffers(array), missing, repeats
    return flat


def _buffers(array: pa.Array) -> tuple:
    # The array's buffers moved into numpy arrays (one memcpy): the registry
    # remembers the memory it copies while its owner lives, and would keep a
    # pa.Buffer -- a temporary here -- for as long as the frame lives.
    buffers = [None if b is None else np.frombuffer(b, np.uint8).copy() for b in array.buffers()]
    return len(array), array.null_count, buffers


def _array(length: int, null_count: int, buffers: list) -> pa.Array:
    return pa.Array.from_buffers(
        pa.large_string(), length, [None if b is None else pa.py_buffer(b) for b in buffers], null_count
    )


class ArrowStrings:
    """An object array with strings, in the layout, as ``parts``: one per
    column for a column's values (a frame's block: its rows; a Series' values),
    else one for the whole array; each an Arrow part or, for a column that is
    not all strings, its object array (pickled as _codec pickles those).
    ``column``: the array is a column's values, so ``strings="arrow"`` applies.
    Parts hold the data in C order; ``order`` is the original's memory order."""

    def __init__(self, parts: list, shape: tuple, order: str, column: bool):
        self.parts, self.shape, self.order, self.column = parts, shape, order, column

    @classmethod
    def of(cls, arr: np.ndarray, column: bool) -> ArrowStrings | None:
        if not arr.size:
            return None  # no string in it
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        rows = arr.reshape(-1, arr.shape[-1]) if column and arr.ndim == 2 else arr.reshape(1, -1)
        parts = [_part(row) for row in rows]
        if all(isinstance(part, np.ndarray) for part in parts):
            return None
        return cls(parts, arr.shape, order, column)

    def __reduce__(self):
        return _rebuild, (self.parts, self.shape, self.order, self.column)


def _arrow_str_dtype() -> pd.StringDtype:
    try:  # pandas 3's default "str"; pandas 2.2 spells it "pyarrow_numpy"
        return pd.StringDtype("pyarrow", na_value=np.nan)
    except TypeError:  # pragma: no cover - pandas 2.2
        return pd.StringDtype("pyarrow_numpy")


def _objects(part: tuple | np.ndarray) -> np.ndarray:
    if isinstance(part, np.ndarray):
        return part
    array, missing, repeats = _array(*part[0]), part[1], part[2]
    if repeats:
        # One object per distinct value, shared by its places (memory: a
        # pointer per element instead of a string).
        encoded = array.dictionary_encode()
        distinct = np.append(encoded.dictionary.to_numpy(zero_copy_only=False), None)
        flat = distinct[encoded.indices.fill_null(len(distinct) - 1).to_numpy()]
    else:
        flat = array.to_numpy(zero_copy_only=False)
    if missing == "nan" and array.null_count:
        flat[array.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return flat


def _column(part: tuple | np.ndarray, dtype: pd.StringDtype) -> Any:
    if isinstance(part, np.ndarray):  # a column that is not all strings stays as it is
        return part
    return dtype.__from_arrow__(pa.chunked_array([_array(*part[0])], type=pa.large_string()))


def _rebuild(parts: list, shape: tuple, order: str, column: bool) -> Any:
    if column and getattr(_state, "mode", "exact") == "arrow":
        dtype = _arrow_str_dtype()
        return ArrowColumns(_column(part, dtype) for part in parts)
    flat = np.concatenate([_objects(part) for part in parts]) if len(parts) > 1 else _objects(parts[0])
    if order == "F":  # (a copy of the pointers, as pickling makes one)
        return _codec._freeze(np.asfortranarray(flat.reshape(shape)), ())
    # Frozen before reshaping: the task's array and its .base are both read-only.
    return _codec._freeze(flat, ()).reshape(shape)  # str, None, nan: nothing mutable


class ArrowColumns(list):
    """A block's columns under ``strings="arrow"``: pandas ``str`` arrays, or
    object arrays for columns that are not all strings. ``_codec`` makes a
    block of each."""
