"""``assert_identical(got, expected)``: the two objects are the same data, exactly.

The house rule for tests of data (design brief, traps 13 and 20): what a
sharedexec worker receives is what a stdlib worker receives. ``==`` is not
enough -- it merges 0.0 and -0.0, ``Decimal("1.1")`` and ``Decimal("1.10")``,
``1`` and ``True``, Timestamps of one instant in two zones, and is False for
NaN -- and ``pandas.testing`` ignores attrs, ``_metadata``, flags and the types
of the elements of object columns. So this walks both objects side by side
and compares, at each place:

* the exact type (subclasses, np.matrix, np.ma, element types in object arrays);
* numbers bit for bit (sign of zero, NaN and its payload), Decimals by their
  digits and exponent, datetimes by instant, tz (name and offset) and fold,
  pandas Timestamps and Timedeltas by value and unit;
* ndarrays by dtype (byte order, fields), shape, C/F order, ``writeable``,
  and bytes (or element by element for Python objects);
* pandas objects by blocks (placement, dtype, values), axes (type, names,
  freq, every label), name, ``attrs``, ``flags``, ``_metadata``; extension
  arrays by the arrays behind them;
* Arrow objects by type and schema (metadata included), chunking, validity
  and every value.

``mmap_mode`` says how the data was shared, and so which arrays may differ
from the stdlib's in ``writeable`` by design: with ``"r"`` an array may be
read-only where the stdlib's is writable, with ``"c"`` writable where the
stdlib's is read-only (a read-only source: protocol 5 keeps that flag). With
None the flag must match. A failure names the path to the first difference
(``obj.block[1].values[3]``).
"""

from __future__ import annotations

import datetime as dt
import decimal
import struct
import types
from typing import Any

import numpy as np
import pandas as pd

try:
    import pyarrow as pa
except ImportError:  # pragma: no cover - the no-pyarrow CI job
    pa = None


class NotIdentical(AssertionError):
    pass


def assert_identical(got: Any, expected: Any, *, mmap_mode: str | None = None, path: str = "obj") -> None:
    """Raise :class:`NotIdentical` (an AssertionError) naming the first place
    where ``got`` differs from ``expected``."""
    _Walk(mmap_mode).same(got, expected, path)


def _fail(path: str, what: str, got: Any, expected: Any) -> None:
    raise NotIdentical(f"{path}: {what} differs: got {_short(got)}, expected {_short(expected)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + "..."


def _float_bits(value: float) -> bytes:
    return struct.pack("<d", value)


class _Walk:
    def __init__(self, mmap_mode: str | None) -> None:
        # The value of `writeable` the sharing mode gives, whatever the stdlib's.
        self.by_design = {"r": False, "c": True}.get(mmap_mode)
        self.seen: set[tuple[int, int]] = set()  # cycles in containers

    def same(self, got: Any, expected: Any, path: str) -> None:
        if type(got) is not type(expected):
            _fail(path, "type", type(got), type(expected))
        if expected is None or expected is pd.NaT or expected is pd.NA:
            if got is not expected:
                _fail(path, "singleton", got, expected)
            return
        key = (id(got), id(expected))
        if key in self.seen:
            return
        self.seen.add(key)
        for cls, method in _DISPATCH:
            if isinstance(expected, cls):
                method(self, got, expected, path)
                return
        if pa is not None and type(expected).__module__.startswith("pyarrow"):
            self.arrow(got, expected, path)
        elif type(expected).__module__.startswith("polars."):
            self.polars(got, expected, path)
        elif hasattr(expected, "__dict__") and not callable(expected):
            self.same(vars(got), vars(expected), path + ".__dict__")
        else:
            try:
                equal = bool(got == expected)
            except Exception as exc:  # an object that cannot say
                raise NotIdentical(f"{path}: cannot compare {type(expected).__name__}: {exc}") from exc
            if not equal:
                _fail(path, "value", got, expected)

    # -- scalars ----------------------------------------------------------------

    def scalar(self, got: Any, expected: Any, path: str) -> None:
        if got != expected:
            _fail(path, "value", got, expected)

    def float_(self, got: float, expected: float, path: str) -> None:
        if _float_bits(got) != _float_bits(expected):  # -0.0, NaN payloads
            _fail(path, "bits", got, expected)

    def complex_(self, got: complex, expected: complex, path: str) -> None:
        self.float_(got.real, expected.real, path + ".real")
        self.float_(got.imag, expected.imag, path + ".imag")

    def decimal_(self, got: decimal.Decimal, expected: decimal.Decimal, path: str) -> None:
        if got.as_tuple() != expected.as_tuple():  # 1.1 vs 1.10, -0, NaN
            _fail(path, "digits and exponent", got, expected)

    def numpy_scalar(self, got: np.generic, expected: np.generic, path: str) -> None:
        if got.dtype != expected.dtype or got.dtype.str != expected.dtype.str:
            _fail(path, "dtype", got.dtype, expected.dtype)
        if got.dtype.hasobject:
            self.same(got.item(), expected.item(), path + ".item()")
        elif np.asarray(got).tobytes() != np.asarray(expected).tobytes():
            _fail(path, "bytes", got, expected)

    def tz(self, got: Any, expected: Any, path: str) -> None:
        if (got is None) != (expected is None):
            _fail(path, "tz", got, expected)
        if expected is not None and (type(got) is not type(expected) or str(got) != str(expected)):
            _fail(path, "tz", got, expected)

    def datetime_(self, got: Any, expected: Any, path: str) -> None:
        if isinstance(expected, (pd.Timestamp, pd.Timedelta)):
            # In its own unit (.value would overflow outside nanoseconds' range).
            if (str(got.asm8), got.unit) != (str(expected.asm8), expected.unit):
                _fail(path, "value and unit", (got.asm8, got.unit), (expected.asm8, expected.unit))
            if isinstance(expected, pd.Timedelta):
                return
        if isinstance(expected, dt.timedelta):
            if got != expected:
                _fail(path, "value", got, expected)
            return
        # An instant and a zone: 12:00 UTC == 13:00 Europe/Paris, but they differ.
        if got != expected or (isinstance(expected, (dt.datetime, dt.time)) and got.fold != expected.fold):
            _fail(path, "value", got, expected)
        if isinstance(expected, (dt.datetime, dt.time)):
            self.tz(got.tzinfo, expected.tzinfo, path + ".tzinfo")
            if isinstance(expected, dt.datetime) and got.utcoffset() != expected.utcoffset():
                _fail(path, "utc offset", got.utcoffset(), expected.utcoffset())
            if got.isoformat() != expected.isoformat():
                _fail(path, "wall time", got.isoformat(), expected.isoformat())

    def function(self, got: types.FunctionType, expected: types.FunctionType, path: str) -> None:
        # Sent by value (cloudpickle: a lambda in attrs): two objects, one code.
        if (got.__module__, got.__qualname__) != (expected.__module__, expected.__qualname__):
            _fail(path, "name", got, expected)
        if got.__code__.co_code != expected.__code__.co_code:
            _fail(path, "code", got, expected)
        self.same(got.__defaults__, expected.__defaults__, path + ".__defaults__")

    # -- containers -------------------------------------------------------------

    def sequence(self, got: Any, expected: Any, path: str) -> None:
        if len(got) != len(expected):
            _fail(path, "length", len(got), len(expected))
        for i, (g, e) in enumerate(zip(got, expected)):
            self.same(g, e, f"{path}[{i}]")

    def mapping(self, got: dict, expected: dict, path: str) -> None:
        if len(got) != len(expected):
            _fail(path, "keys", list(got), list(expected))
        for (gk, gv), (ek, ev) in zip(got.items(), expected.items()):  # in order
            self.same(gk, ek, f"{path}.keys()[{ek!r}]")
            self.same(gv, ev, f"{path}[{ek!r}]")

    def set_(self, got: Any, expected: Any, path: str) -> None:
        if got != expected:
            _fail(path, "items", got, expected)
        # Equal sets may hold items of other types (1 and True, 0.0 and -0.0).
        self.sequence(sorted(got, key=repr), sorted(expected, key=repr), path)

    # -- numpy ------------------------------------------------------------------

    def flags(self, got: np.ndarray, expected: np.ndarray, path: str) -> None:
        for flag in ("c_contiguous", "f_contiguous"):
            if getattr(got.flags, flag) != getattr(expected.flags, flag):
                _fail(path, f"flags.{flag}", getattr(got.flags, flag), getattr(expected.flags, flag))
        if got.flags.writeable not in (expected.flags.writeable, self.by_design):
            _fail(path, "flags.writeable", got.flags.writeable, expected.flags.writeable)

    def ndarray(self, got: np.ndarray, expected: np.ndarray, path: str) -> None:
        if got.dtype != expected.dtype or got.dtype.str != expected.dtype.str or got.dtype.descr != expected.dtype.descr:
            _fail(path, "dtype", got.dtype, expected.dtype)
        if got.shape != expected.shape:
            _fail(path, "shape", got.shape, expected.shape)
        self.flags(got, expected, path)
        if isinstance(expected, np.ma.MaskedArray):
            self.masked(got, expected, path)
            return
        if type(expected) is not np.ndarray:
            self.same(getattr(got, "__dict__", {}), getattr(expected, "__dict__", {}), path + ".__dict__")
        self.values(got.view(np.ndarray), expected.view(np.ndarray), path)

    def values(self, got: np.ndarray, expected: np.ndarray, path: str) -> None:
        if expected.dtype.hasobject:
            for index in np.ndindex(expected.shape):  # in logical order, whatever the strides
                where = f"{path}[{', '.join(map(str, index))}]"
                g, e = got[index], expected[index]
                if expected.dtype.names:
                    g, e = g.item(), e.item()
                self.same(g, e, where)
        elif got.tobytes(order="C") != expected.tobytes(order="C"):
            _fail(path, "bytes", got, expected)

    def masked(self, got: np.ma.MaskedArray, expected: np.ma.MaskedArray, path: str) -> None:
        self.values(got.view(np.ndarray), expected.view(np.ndarray), path + ".data")
        self.same(np.ma.getmaskarray(got), np.ma.getmaskarray(expected), path + ".mask")
        self.same(got.fill_value, expected.fill_value, path + ".fill_value")
        for attr in ("_hardmask", "_baseclass"):
            if getattr(got, attr) != getattr(expected, attr):
                _fail(f"{path}.{attr}", "value", getattr(got, attr), getattr(expected, attr))

    # -- pandas -----------------------------------------------------------------

    def ndframe(self, got: Any, expected: Any, path: str) -> None:
        self.same(got.attrs, expected.attrs, path + ".attrs")
        if got.flags.allows_duplicate_labels != expected.flags.allows_duplicate_labels:
            _fail(path, "flags.allows_duplicate_labels", got.flags, expected.flags)
        for name in expected._metadata:
            self.same(getattr(got, name, None), getattr(expected, name, None), f"{path}.{name}")

    def frame(self, got: pd.DataFrame, expected: pd.DataFrame, path: str) -> None:
        self.same(got.columns, expected.columns, path + ".columns")
        self.same(got.index, expected.index, path + ".index")
        self.ndframe(got, expected, path)
        # Block by block: the placement of columns, the 2-D order of each block.
        got_blocks, expected_blocks = got._mgr.blocks, expected._mgr.blocks
        if len(got_blocks) != len(expected_blocks):
            _fail(path, "number of blocks", len(got_blocks), len(expected_blocks))
        for i, (g, e) in enumerate(zip(got_blocks, expected_blocks)):
            if list(g.mgr_locs.as_array) != list(e.mgr_locs.as_array):
                _fail(f"{path}.block[{i}]", "placement", g.mgr_locs, e.mgr_locs)
            self.same(g.values, e.values, f"{path}.block[{i}].values")

    def series(self, got: pd.Series, expected: pd.Series, path: str) -> None:
        self.same(got.name, expected.name, path + ".name")
        self.same(got.index, expected.index, path + ".index")
        self.ndframe(got, expected, path)
        self.same(got._values, expected._values, path + ".values")

    def index(self, got: pd.Index, expected: pd.Index, path: str) -> None:
        if got.dtype != expected.dtype:
            _fail(path, "dtype", got.dtype, expected.dtype)
        self.same(list(got.names), list(expected.names), path + ".names")
        if isinstance(expected, pd.RangeIndex):
            if (got.start, got.stop, got.step) != (expected.start, expected.stop, expected.step):
                _fail(path, "range", got, expected)
            return
        if isinstance(expected, pd.MultiIndex):
            self.same(list(got.levels), list(expected.levels), path + ".levels")
            self.same(list(got.codes), list(expected.codes), path + ".codes")
            if got.sortorder != expected.sortorder:
                _fail(path, "sortorder", got.sortorder, expected.sortorder)
            return
        if hasattr(expected, "freq") and got.freq != expected.freq:
            _fail(path, "freq", got.freq, expected.freq)
        self.same(got._values, expected._values, path + ".values")

    def extension_array(self, got: Any, expected: Any, path: str) -> None:
        if got.dtype != expected.dtype or str(got.dtype) != str(expected.dtype):
            _fail(path, "dtype", got.dtype, expected.dtype)
        if len(got) != len(expected):
            _fail(path, "length", len(got), len(expected))
        # The arrays behind it, by the names pandas gives them.
        parts = ("_ndarray", "_data", "_mask", "_pa_array", "_left", "_right", "sp_values")
        if hasattr(expected, "_pa_array"):  # (pandas 2.2's Arrow arrays call it _data too, deprecated)
            parts = ("_pa_array",)
        found = [p for p in parts if hasattr(expected, p)]
        for part in found:
            self.same(getattr(got, part), getattr(expected, part), f"{path}.{part}")
        if isinstance(expected, pd.Categorical):
            self.same(got.categories, expected.categories, path + ".categories")
        if hasattr(expected, "freq"):
            if got.freq != expected.freq:
                _fail(path, "freq", got.freq, expected.freq)
        if isinstance(expected, pd.arrays.SparseArray):
            self.same(got.sp_index.indices, expected.sp_index.indices, path + ".sp_index")
            self.same(got.fill_value, expected.fill_value, path + ".fill_value")
        if not found:  # an array we do not know the insides of: every element
            self.sequence(list(got), list(expected), path)

    # -- Arrow ------------------------------------------------------------------

    def arrow(self, got: Any, expected: Any, path: str) -> None:
        if isinstance(expected, (pa.DataType, pa.Schema, pa.Field)):
            equal = got.equals(expected, check_metadata=True) if isinstance(expected, pa.Schema) else got.equals(expected)
            if not equal:
                _fail(path, "type", got, expected)
            return
        if hasattr(expected, "schema"):
            if not got.schema.equals(expected.schema, check_metadata=True):
                _fail(path, "schema", got.schema, expected.schema)
        elif not got.type.equals(expected.type):
            _fail(path, "type", got.type, expected.type)
        if isinstance(expected, (pa.Table, pa.RecordBatch)):
            for name, g, e in zip(expected.column_names, got.columns, expected.columns):
                self.same(g, e, f"{path}[{name!r}]")
            return
        if isinstance(expected, pa.ChunkedArray):
            self.same(list(got.chunks), list(expected.chunks), path + ".chunks")
            return
        if isinstance(expected, pa.Array):
            # Not the offset: pyarrow itself keeps a slice's offset into its
            # buffers when pickling out of band, and drops it in band.
            if (len(got), got.null_count) != (len(expected), expected.null_count):
                _fail(path, "length, nulls", (len(got), got.null_count), (len(expected), expected.null_count))
            # Value by value (Arrow's equals says NaN != NaN and -0.0 == 0.0).
            self.sequence(got.to_pylist(), expected.to_pylist(), path)
            return
        if isinstance(expected, pa.Scalar):
            self.same(got.as_py(), expected.as_py(), path)
            return
        if not got.equals(expected):
            _fail(path, "value", got, expected)


    def polars(self, got: Any, expected: Any, path: str) -> None:
        """polars objects column by column: name, dtype (Enum categories, time
        zones, ...), chunking and every value, through the column's Arrow
        array where pyarrow can read it (not Int128). Not by sorted flags:
        polars' own pickling marks some all-null struct columns sorted that
        the sender's were not (tests/test_codec_polars.py compares flags with
        the sender's)."""
        import polars as pl

        if isinstance(expected, pl.DataFrame):
            if got.columns != expected.columns:
                _fail(path, "columns", got.columns, expected.columns)
            for g, e in zip(got.iter_columns(), expected.iter_columns()):
                self.polars(g, e, f"{path}[{e.name!r}]")
            return
        if (got.name, got.dtype, got.n_chunks()) != (expected.name, expected.dtype, expected.n_chunks()):
            _fail(path, "name, dtype, chunks", (got.name, got.dtype, got.n_chunks()), (expected.name, expected.dtype, expected.n_chunks()))
        newest = pl.CompatLevel.newest()
        try:
            arrays = got.to_frame().to_arrow(compat_level=newest), expected.to_frame().to_arrow(compat_level=newest)
        except pa.ArrowInvalid:  # 128-bit integers: Python ints
            self.sequence(got.to_list(), expected.to_list(), path)
        else:
            self.arrow(*arrays, path)


_DISPATCH: list[tuple[type, Any]] = [
    (bool, _Walk.scalar),
    (float, _Walk.float_),
    (complex, _Walk.complex_),
    ((int, str, bytes), _Walk.scalar),
    (decimal.Decimal, _Walk.decimal_),
    ((dt.datetime, dt.date, dt.time, dt.timedelta), _Walk.datetime_),
    (np.ndarray, _Walk.ndarray),
    (np.generic, _Walk.numpy_scalar),
    (pd.DataFrame, _Walk.frame),
    (pd.Series, _Walk.series),
    (pd.Index, _Walk.index),
    (pd.api.extensions.ExtensionArray, _Walk.extension_array),
    ((list, tuple), _Walk.sequence),
    (dict, _Walk.mapping),
    ((set, frozenset), _Walk.set_),
    (types.FunctionType, _Walk.function),
]
