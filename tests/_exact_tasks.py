"""The worker side of ``test_exactness``: compare what arrived with what the
stdlib's pickling sends, then write into it the ways a task can.

Module-level and importable, so that spawn and forkserver workers find the
functions and the classes the generated objects are made of (design brief,
trap 5).
"""

from __future__ import annotations

import os
import pickle
import traceback
import warnings
from typing import Any

import numpy as np
import pandas as pd

import sharedexec
from sharedexec import _codec

from ._exact import assert_identical


class MetaFrame(pd.DataFrame):
    """A DataFrame subclass with ``_metadata``, as geopandas' GeoDataFrame."""

    _metadata = ["info", "weights"]

    @property
    def _constructor(self):
        return MetaFrame


class MetaSeries(pd.Series):
    _metadata = ["_name", "info"]  # a Series subclass keeps pandas' own (its name)

    @property
    def _constructor(self):
        return MetaSeries


class Tagged(np.ndarray):
    """An ndarray subclass that keeps its own attribute through views."""

    def __array_finalize__(self, obj: Any) -> None:
        self.tag = getattr(obj, "tag", None)


class Scribble:
    """What the tasks write: equal to nothing the generators make."""

    def __repr__(self) -> str:
        return "<written by a task>"


def check(obj: Any, expected_pickle: bytes, mmap_mode: str, write: str | None = None) -> tuple[int, str | None]:
    """Compare ``obj`` with what the stdlib's pickling sent (``expected_pickle``,
    unpickled here, in the same worker), then write into ``obj``: everywhere
    (``scribble``), or the one way named ``write`` (``WRITES``), into the
    stdlib's object too, and compare what each write did. Returns the
    worker's pid and the difference, if any."""
    expected = pickle.loads(expected_pickle)
    try:
        assert_identical(obj, expected, mmap_mode=mmap_mode)
        if write is not None:
            assert_identical(written(obj, write), written(expected, write), mmap_mode=mmap_mode)
    except AssertionError as exc:
        return os.getpid(), str(exc)
    except Exception:
        return os.getpid(), traceback.format_exc()
    if write is None:
        scribble(obj)
    return os.getpid(), None


@sharedexec.shared(min_bytes=0)
def shared_check(args: tuple) -> tuple[int, str | None]:
    """``check`` for an unchanged multiprocessing.Pool: one argument."""
    return check(*args)


def serve(requests: Any, replies: Any) -> None:
    """A ``Process`` that checks what comes through a queue (``share()``'s
    objects travel as handles) until it gets None."""
    while (request := requests.get()) is not None:
        replies.put(check(*request))


# -- writes --------------------------------------------------------------------


def _last(obj: Any) -> Any:
    return obj.iloc[-1] if isinstance(obj, pd.Series) else obj.iloc[-1, 0]


def _setitem(target: Any, key: Any, value: Any) -> None:
    target[key] = value


#: The ways a task writes into a frame or Series it received, by name: each
#: takes the object. pandas-level first; then those that go around pandas
#: (into ``.values`` or ``.array``), which pandas 3's Copy-on-Write does not
#: see: under ``mmap_mode="r"`` they meet read-only memory by design there
#: (docs/semantics.md), so they are compared where pandas writes in place
#: and under ``"c"``.
WRITES = {
    "iloc-cell": lambda o: _setitem(o.iloc, (0, 0) if o.ndim == 2 else 0, _last(o)),
    "iloc-row": lambda o: _setitem(o.iloc, 0, o.iloc[-1]),
    "iloc-column": lambda o: _setitem(o.iloc, (slice(None), 0) if o.ndim == 2 else slice(None), o.iloc[::-1].iloc[:, 0].array if o.ndim == 2 else o.iloc[::-1].array),
    "loc-first-label": lambda o: _setitem(o.loc, (o.index[0], o.columns[0]) if o.ndim == 2 else o.index[0], _last(o)),
    "chained-series": lambda o: _setitem((o.iloc[:, 0] if o.ndim == 2 else o).iloc, 0, _last(o)),
    "ffill-inplace": lambda o: o.ffill(inplace=True),
    "bfill-inplace": lambda o: o.bfill(inplace=True),
    "replace-inplace": lambda o: o.replace(_last(o), o.iloc[0] if o.ndim == 1 else o.iloc[0, 0], inplace=True),
    "add-column-then-write": lambda o: (_setitem(o, "added", 1), _setitem(o.iloc, (0, -1) if o.ndim == 2 else 0, 2)),
    "values": lambda o: _setitem(o.values, (0, 0) if o.ndim == 2 else 0, o.values[-1, 0] if o.ndim == 2 else o.values[-1]),
    "array": lambda o: _setitem((o.iloc[:, 0] if o.ndim == 2 else o).array, 0, _last(o)),
}
AROUND_PANDAS = ("values", "array")


def written(obj: Any, write: str) -> tuple[Any, Any, list]:
    """What writing ``obj`` the way named ``write`` does: ``obj`` after it,
    the error it raised (type and message) and the warnings it gave."""
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            WRITES[write](obj)
        except Exception as exc:  # an error is part of what it does: the stdlib's task has it too
            error = (type(exc).__name__, str(exc))
    if _codec._pandas_copies_on_write():
        # Under Copy-on-Write pandas copies what a task writes out of blocks
        # that another object references (a task's frame's are), where the
        # stdlib's task writes into its blocks in place: same values, other
        # blocks and memory layout -- and an in-place operation that fails
        # part-way (replace on a column that cannot take the value) leaves
        # such a frame as it was, the stdlib's with the columns written
        # before the error. Compared there: the error, or the values.
        if error is not None:
            return None, error, [(w.category.__name__, str(w.message)) for w in caught]
        columns = [obj.iloc[:, i] for i in range(obj.shape[1])] if obj.ndim == 2 else [obj]
        obj = (obj.axes, obj.attrs, [(str(c.dtype), c.to_numpy(copy=True)) for c in columns])
    return obj, error, [(w.category.__name__, str(w.message)) for w in caught]


def scribble(obj: Any) -> None:
    """Write into ``obj`` everywhere a task could: array bytes, object
    elements, lists and dicts inside them, attrs, _metadata, names, columns.
    Read-only data refuses (mmap_mode="r"): that is fine, a leak is not."""
    _Scribbler().walk(obj, 0)


class _Scribbler:
    def __init__(self) -> None:
        self.seen: set[int] = set()

    def walk(self, obj: Any, depth: int) -> None:
        if id(obj) in self.seen or depth > 6:
            return
        self.seen.add(id(obj))
        try:
            self.write(obj, depth)
        except Exception:  # read-only, or not writable that way: only a leak fails
            pass

    def write(self, obj: Any, depth: int) -> None:
        if isinstance(obj, (pd.DataFrame, pd.Series)):
            self.walk(obj.attrs, depth + 1)
            for name in obj._metadata:
                self.walk(getattr(obj, name, None), depth + 1)
            for block in obj._mgr.blocks:
                self.walk(block.values, depth + 1)
            obj.attrs["written"] = Scribble()
            obj.index.name = "written"
            for name in obj._metadata:
                object.__setattr__(obj, name, Scribble())
            if isinstance(obj, pd.DataFrame):
                obj["written"] = 0
            else:
                obj.name = "written"
        elif isinstance(obj, pd.Index):
            obj.name = "written"
        elif isinstance(obj, np.ndarray):
            self.array(obj, depth)
        elif isinstance(obj, pd.api.extensions.ExtensionArray):
            for part in ("_ndarray", "_data", "_mask", "_left", "_right", "sp_values"):
                if hasattr(obj, part):
                    self.walk(getattr(obj, part), depth + 1)
        elif isinstance(obj, list):
            for item in obj:
                self.walk(item, depth + 1)
            obj.append(Scribble())
        elif isinstance(obj, dict):
            for item in list(obj.values()):
                self.walk(item, depth + 1)
            obj["written"] = Scribble()
        elif isinstance(obj, (tuple, set, frozenset)):
            for item in obj:
                self.walk(item, depth + 1)
        # Not the __dict__ of other objects: pandas' Timestamp and Timedelta
        # have one, which no worker cache can make read-only (docs: semantics).

    def array(self, arr: np.ndarray, depth: int) -> None:
        if isinstance(arr, np.ma.MaskedArray):
            self.walk(np.ma.getmaskarray(arr), depth + 1)
            if arr._mask is not np.ma.nomask:
                self.walk(arr._mask, depth + 1)
            if arr._fill_value is not None:
                self.walk(arr._fill_value, depth + 1)
        if type(arr) is Tagged:
            arr.tag = Scribble()
        if arr.dtype.hasobject:
            if arr.dtype == object:
                for item in arr.ravel()[:8]:
                    self.walk(item, depth + 1)
                if arr.size:
                    arr.flat[0] = Scribble()
            return
        if arr.size and arr.dtype.itemsize:
            plain = arr.view(np.ndarray)
            first = (0,) * plain.ndim
            plain[first] = _another(plain[first], plain.dtype)


def _another(value: Any, dtype: np.dtype) -> Any:
    """A value of ``dtype`` other than ``value``."""
    if dtype.kind in "US":
        return "w" if value != "w" else "x"
    if dtype.names:
        return np.zeros((), dtype)[()] if np.array(value, dtype).tobytes() != bytes(dtype.itemsize) else np.ones((), dtype)[()]
    raw = np.array([value], dtype=dtype).view(np.uint8)
    raw ^= 0x01 if dtype.kind == "b" else 0xFF  # every bit: NaN payloads, -0.0
    return raw.view(dtype)[0]
