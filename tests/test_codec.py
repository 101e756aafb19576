"""The codec (``sharedexec._codec``): exact round trips, zero copies, writes.

Every object goes the way the library sends it: ``encode``, the buffers copied
into a real segment by ``_publication.write``, the segment attached by name and
decoded by ``_publication.read``. Then

* the decoded object equals the original exactly: class, dtypes, names, freq,
  flags, attrs, metadata, byte for byte;
* its data lies inside the segment's mapping (zero-copy), for every dtype the
  codec's docstring lists as zero-copy. Test ids end in ``zero_copy`` or
  ``once_per_worker``: the second hold Python objects (or are ndarray
  subclasses), pickled by value and unpickled into the decoding process --
  once per worker, thanks to the worker cache -- while their other parts
  still come from the segment;
* arrays from a read-only mapping refuse writes; from a copy-on-write mapping
  they accept them, privately;
* what a task does to its ``task_view`` never reaches the cached object.

Cases build their objects at run time, so that ``pytest.importorskip`` skips
the ones that need pyarrow on an installation without it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import importlib.util
import os
import pickle
import threading
from typing import Any, Callable, NamedTuple

import numpy as np
import pandas as pd
import pandas.testing as tm
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pandas.core.arrays.masked import BaseMaskedArray

from sharedexec import _cache, _codec, _names, _publication, _segment

from . import _exact as exact
from ._exact_tasks import MetaFrame

pytestmark = pytest.mark.compat

PANDAS_3 = int(pd.__version__.split(".")[0]) >= 3
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
# pandas 3's default string dtype is Arrow-backed when pyarrow is installed and
# holds Python objects otherwise; pandas 2 stores strings as objects. Index
# labels and categories of strings follow the same rule.
STR_KIND = "zero_copy" if PANDAS_3 and HAS_PYARROW else "once_per_worker"
N = 24  # rows per column case: enough for NaN/NA at several places, fast


# -- publishing the way the library does --------------------------------------


@contextlib.contextmanager
def published(obj: Any):
    """The name of a segment holding ``obj``, retired on exit."""
    layout, buffers = _codec.encode(obj)
    raws = list(map(_codec.raw_view, buffers))
    mapping, _ = _publication.write(layout, raws, list(range(len(raws))), os.getpid())
    try:
        yield mapping.name
    finally:
        _segment.retire(mapping.name)


def decode(name: str, copy_on_write: bool = False) -> tuple[Any, _segment.Mapping]:
    mapping = _segment.attach(name, copy_on_write=copy_on_write)
    obj = _publication.read(mapping, lambda other: _segment.attach(other, copy_on_write=copy_on_write))
    return obj, mapping


def roundtrip(obj: Any) -> tuple[Any, _segment.Mapping]:
    with published(obj) as name:
        return decode(name)


def cached_roundtrip(obj: Any) -> Any:
    """``obj`` decoded as the worker cache decodes what every task is handed."""
    with published(obj) as name, _codec.frozen_decode():
        return decode(name)[0]


@contextlib.contextmanager
def in_worker(obj: Any, frozen: bool = True):
    """``obj`` decoded (as the worker cache does if ``frozen``) and its
    mapping, while its segment exists (as it does while a task runs)."""
    with published(obj) as name:
        with _codec.frozen_decode() if frozen else contextlib.nullcontext():
            got = decode(name)
        yield got


def task_view(obj: Any, mapping: _segment.Mapping) -> Any:
    """What the worker cache hands a task (``WorkerCache._for_task``): its
    own view of ``obj``, over memory of its own where pandas writes in place."""
    return _codec.task_view(obj, _cache.TaskMemory([mapping]).own)


# -- exact equality -------------------------------------------------------------


def assert_same_state(got: Any, expected: Any) -> None:
    """attrs and _metadata (assert_frame_equal looks at neither)."""
    assert_identical(got.attrs, expected.attrs)
    for name in expected._metadata:
        assert_identical(getattr(got, name, None), getattr(expected, name, None))


def assert_identical(got: Any, expected: Any) -> None:
    assert type(got) is type(expected), (type(got), type(expected))
    if isinstance(expected, pd.DataFrame):
        tm.assert_frame_equal(
            got, expected, check_exact=True, check_freq=True, check_flags=True,
            check_index_type=True, check_column_type=True, check_frame_type=True,
        )
        assert_identical(got.index, expected.index)
        assert_identical(got.columns, expected.columns)
        assert_same_state(got, expected)
    elif isinstance(expected, pd.Series):
        tm.assert_series_equal(
            got, expected, check_exact=True, check_freq=True, check_flags=True,
            check_index_type=True, check_series_type=True,
        )
        assert_identical(got.index, expected.index)
        assert_same_state(got, expected)
    elif isinstance(expected, pd.Index):
        tm.assert_index_equal(got, expected, exact=True, check_exact=True, check_categorical=True)
        assert got.names == expected.names
        assert getattr(got, "freq", None) == getattr(expected, "freq", None)
    elif isinstance(expected, np.ndarray):
        assert got.dtype.str == expected.dtype.str and got.dtype == expected.dtype  # byte order too
        assert got.shape == expected.shape
        if expected.dtype.hasobject:
            np.testing.assert_array_equal(got, expected)
        else:
            assert got.tobytes() == expected.tobytes()  # bit for bit: NaN payloads, -0.0
        if expected.flags.f_contiguous and not expected.flags.c_contiguous:
            assert got.flags.f_contiguous  # column-major stays column-major
        if isinstance(expected, np.ma.MaskedArray):
            assert np.array_equal(np.ma.getmaskarray(got), np.ma.getmaskarray(expected))
    elif type(expected).__module__.startswith("pyarrow"):
        assert got.equals(expected)
        if hasattr(expected, "schema"):
            assert got.schema.equals(expected.schema, check_metadata=True)
        if hasattr(expected, "num_chunks"):
            assert [len(c) for c in got.chunks] == [len(c) for c in expected.chunks]
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_identical(g, e)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_identical(got[key], expected[key])
    else:
        assert got == expected


# -- where the decoded data lives ---------------------------------------------


class Buf(NamedTuple):
    where: str
    address: int
    nbytes: int
    by_value: bool  # Python objects, or an ndarray subclass: pickled, not shared


def data_buffers(obj: Any, where: str = "") -> list[Buf]:
    """Every data buffer ``obj`` is made of, walked through pandas' internals."""
    from pandas.core.arrays._mixins import NDArrayBackedExtensionArray
    from pandas.core.arrays.masked import BaseMaskedArray

    walk = data_buffers
    if obj is None or isinstance(obj, (int, float, str, bytes)):
        return []
    if isinstance(obj, np.ndarray):
        if obj.nbytes == 0:
            return []
        by_value = obj.dtype.hasobject or type(obj) not in (np.ndarray, np.memmap)
        return [Buf(where, obj.__array_interface__["data"][0], obj.nbytes, by_value)]
    if isinstance(obj, pd.DataFrame):
        blocks = [walk(blk.values, f"{where}block{i}.") for i, blk in enumerate(obj._mgr.blocks)]
        return sum(blocks, []) + walk(obj.index, where + "index.") + walk(obj.columns, where + "columns.")
    if isinstance(obj, pd.Series):
        return walk(obj._values, where + "values.") + walk(obj.index, where + "index.")
    if isinstance(obj, pd.RangeIndex):
        return []
    if isinstance(obj, pd.MultiIndex):
        levels = [walk(level, f"{where}level{i}.") for i, level in enumerate(obj.levels)]
        codes = [walk(code, f"{where}codes{i}.") for i, code in enumerate(obj.codes)]
        return sum(levels + codes, [])
    if isinstance(obj, pd.Index):
        return walk(obj._values, where)
    if isinstance(obj, pd.Categorical):
        return walk(obj._ndarray, where + "codes.") + walk(obj.categories, where + "categories.")
    if isinstance(obj, NDArrayBackedExtensionArray):
        return walk(obj._ndarray, where)
    if isinstance(obj, BaseMaskedArray):
        return walk(obj._data, where + "data.") + walk(obj._mask, where + "mask.")
    if isinstance(obj, pd.arrays.IntervalArray):
        return walk(obj._left, where + "left.") + walk(obj._right, where + "right.")
    if isinstance(obj, pd.arrays.SparseArray):
        index = obj.sp_index  # a BlockIndex computes .indices afresh: walk what it stores
        parts = {"blocs": index.blocs, "blengths": index.blengths} if obj.kind == "block" else {"indices": index.indices}
        return walk(obj.sp_values, where + "sp_values.") + walk(parts, where + "sp_index.")
    if isinstance(obj, (list, tuple)):
        return sum((walk(item, f"{where}{i}.") for i, item in enumerate(obj)), [])
    if isinstance(obj, dict):
        return sum((walk(item, f"{where}{key}.") for key, item in obj.items()), [])
    module = type(obj).__module__
    if module.startswith("pandas") and hasattr(obj, "_pa_array"):
        return walk(obj._pa_array, where + "arrow.")
    if module.startswith("pyarrow"):
        import pyarrow as pa

        if isinstance(obj, pa.ChunkedArray):
            return sum((walk(c, f"{where}chunk{i}.") for i, c in enumerate(obj.chunks)), [])
        if isinstance(obj, (pa.Table, pa.RecordBatch)):
            return sum((walk(c, f"{where}{n}.") for n, c in zip(obj.column_names, obj.columns)), [])
        if isinstance(obj, pa.Array):
            bufs = [Buf(where, b.address, b.size, False) for b in obj.buffers() if b is not None and b.size]
            if isinstance(obj, pa.DictionaryArray):
                bufs += walk(obj.dictionary, where + "dictionary.")
            return bufs
    raise AssertionError(f"data_buffers does not know {type(obj).__name__} (at {where or 'top'})")


def check_placement(obj: Any, mapping: _segment.Mapping, kind: str) -> None:
    """zero_copy: every buffer is inside the mapping and none was pickled by
    value. once_per_worker: the buffers pickled by value were unpickled into
    this process; every other buffer is still inside the mapping."""
    start = np.frombuffer(mapping.view, np.uint8).ctypes.data
    end = start + mapping.size
    bufs = data_buffers(obj)
    inside = {b.where: start <= b.address and b.address + b.nbytes <= end for b in bufs}
    objects = [b.where for b in bufs if b.by_value]
    assert all(inside[b.where] for b in bufs if not b.by_value), inside
    if kind == "zero_copy":
        assert objects == []
    else:
        assert objects and not any(inside[w] for w in objects), inside


# -- the dtype matrix ---------------------------------------------------------


class Case(NamedTuple):
    id: str
    build: Callable[[], Any]
    kind: str = "zero_copy"


def _pa():
    return pytest.importorskip("pyarrow")


def _mask(values: np.ndarray, every: int = 5) -> np.ndarray:
    return np.arange(len(values)) % every == 1


def _numeric(dtype: str) -> np.ndarray:
    if dtype == "bool":
        return np.arange(N) % 3 == 0
    values = np.arange(N) - (0 if np.dtype(dtype).kind == "u" else N // 2)
    values = values.astype(dtype)
    if values.dtype.kind in "fc":
        values = values / 3
        values[_mask(values)] = np.nan
    return values


def _datetimes(unit: str, tz: Any = None) -> Any:
    values = (np.arange(N) * 86_400_123_456_789 // 7).astype("M8[ns]").astype(f"M8[{unit}]")
    values[_mask(values)] = np.datetime64("NaT")
    return values if tz is None else pd.DatetimeIndex(values).tz_localize("UTC").tz_convert(tz).array


def _timedeltas(unit: str) -> np.ndarray:
    values = (np.arange(N) * 3_600_123_456_789 - 10**13).astype("m8[ns]").astype(f"m8[{unit}]")
    values[_mask(values)] = np.timedelta64("NaT")
    return values


def _with_missing(values: list) -> list:
    return [None if i % 5 == 1 else v for i, v in enumerate(values)]


def _objects(values: list) -> np.ndarray:
    """A 1-D object array of exactly these items (np.array would nest tuples)."""
    arr = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        arr[i] = value
    return arr


def _arrow(typ: Callable | str, values: list) -> Any:
    """An Arrow-backed array of ``values``: ``typ`` is a pandas dtype name or
    a function of the pyarrow module giving the Arrow type."""
    pa = _pa()
    return pd.array(values, dtype=typ if isinstance(typ, str) else pd.ArrowDtype(typ(pa)))


def _arrow_dictionary() -> Any:
    pa = _pa()
    chunks = [pa.array(["x", "y", None, "x"] * 3).dictionary_encode() for _ in range(2)]
    return pd.arrays.ArrowExtensionArray(pa.chunked_array(chunks))


def _categorical(n_categories: int, ordered: bool = False, strings: bool = False) -> pd.Categorical:
    codes = (np.arange(N * 4) * 7919) % (n_categories + 1) - 1  # -1 is a missing value
    categories = [f"c{i}" for i in range(n_categories)] if strings else np.arange(n_categories) * 10
    return pd.Categorical.from_codes(codes, categories=categories, ordered=ordered)


NUMPY_DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "longdouble", "complex64", "complex128", "clongdouble",
]
NULLABLE_DTYPES = ["Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float32", "Float64"]
TIMEZONES = {"utc": "UTC", "paris": "Europe/Paris", "offset": dt.timezone(dt.timedelta(hours=-3, minutes=-30))}
WORDS = ["alpha", "β", "", "gamma delta", "x" * 40, "a\x00b"]

COLUMN_CASES = [
    *(Case(dtype, lambda dtype=dtype: _numeric(dtype)) for dtype in NUMPY_DTYPES),
    *(Case(f"{dtype}-bigendian", lambda dtype=dtype: _numeric(dtype).astype(f">{dtype[0]}8"))
      for dtype in ["int64", "float64"]),
    *(Case(f"datetime64[{u}]", lambda u=u: _datetimes(u)) for u in ["s", "ms", "us", "ns"]),
    *(Case(f"datetime64[{u}]-tz-{name}", lambda u=u, tz=tz: _datetimes(u, tz))
      for u, (name, tz) in zip(["ns", "us", "s"], TIMEZONES.items())),
    *(Case(f"timedelta64[{u}]", lambda u=u: _timedeltas(u)) for u in ["s", "ms", "us", "ns"]),
    Case("category-small-int", lambda: _categorical(3)),
    Case("category-small-ordered", lambda: _categorical(4, ordered=True)),
    Case("category-large", lambda: _categorical(5000)),
    Case("category-str", lambda: _categorical(5, strings=True), STR_KIND),
    *(Case(dtype, lambda dtype=dtype: pd.array(_with_missing(list(range(N))), dtype=dtype)) for dtype in NULLABLE_DTYPES),
    Case("boolean", lambda: pd.array(_with_missing([i % 3 == 0 for i in range(N)]), dtype="boolean")),
    Case("str-default", lambda: pd.Series(_with_missing(WORDS * 4)).array, STR_KIND),
    Case("string[pyarrow]", lambda: _arrow("string[pyarrow]", _with_missing(WORDS * 4))),
    Case("string[python]", lambda: pd.array(_with_missing(WORDS * 4), dtype="string[python]"), "once_per_worker"),
    Case("object-strings", lambda: np.array(_with_missing(WORDS * 4), dtype=object), "once_per_worker"),
    Case("object-mixed", lambda: _objects([1, "a", None, 2.5, (1, 2), {"k": [1]}, b"by", dt.date(2020, 1, 1)] * 3),
         "once_per_worker"),
    Case("arrow-int64", lambda: _arrow(lambda pa: pa.int64(), _with_missing(list(range(N))))),
    Case("arrow-bool", lambda: _arrow(lambda pa: pa.bool_(), _with_missing([i % 2 == 0 for i in range(N)]))),
    Case("arrow-string", lambda: _arrow(lambda pa: pa.string(), _with_missing(WORDS * 4))),
    Case("arrow-large_string", lambda: _arrow(lambda pa: pa.large_string(), _with_missing(WORDS * 4))),
    Case("arrow-list", lambda: _arrow(lambda pa: pa.list_(pa.int32()), _with_missing([[i, i + 1][: i % 3] for i in range(N)]))),
    Case("arrow-struct", lambda: _arrow(lambda pa: pa.struct([("a", pa.int64()), ("b", pa.string())]),
                                        _with_missing([{"a": i, "b": str(i)} for i in range(N)]))),
    Case("arrow-dictionary", _arrow_dictionary),
    Case("arrow-timestamp-tz", lambda: _arrow(lambda pa: pa.timestamp("us", tz="UTC"),
                                              _with_missing([dt.datetime(2020, 1, 1 + i % 28) for i in range(N)]))),
    Case("arrow-decimal", lambda: _arrow(lambda pa: pa.decimal128(10, 3),
                                         _with_missing([decimal.Decimal(i) / 8 for i in range(N)]))),
    Case("period-M", lambda: pd.period_range("2000-01", periods=N, freq="M").array),
    Case("period-D-NaT", lambda: pd.array(_with_missing(list(pd.period_range("2000-01-01", periods=N, freq="D"))),
                                          dtype="period[D]")),
    Case("interval-int", lambda: pd.arrays.IntervalArray.from_breaks(np.arange(N + 1))),
    Case("interval-float-left-nan", lambda: pd.arrays.IntervalArray.from_arrays(
        _numeric("float64"), _numeric("float64") + 1, closed="left")),
    Case("interval-datetime", lambda: pd.interval_range(pd.Timestamp("2020-01-01", tz="UTC"), periods=N).array),
    Case("sparse-float", lambda: pd.arrays.SparseArray(np.where(np.arange(N) % 4 == 0, _numeric("float64"), np.nan))),
    Case("sparse-int-block", lambda: pd.arrays.SparseArray(np.repeat([0, 3, 0, 5], N // 4), fill_value=0, kind="block")),
]


def _as_container(values: Any, container: str) -> Any:
    # dtype= stops pandas 3 from inferring `str` for object arrays of strings.
    series = lambda v, name=None: pd.Series(v, dtype=v.dtype, name=name)  # noqa: E731
    if container == "series":
        return series(values, "x")
    # Two columns of the same dtype (numpy dtypes share one 2-D block) and a
    # third of another; integer labels keep the axes free of Python objects.
    other = np.arange(len(values), dtype="int64")
    if isinstance(values, np.ndarray) and values.dtype == other.dtype:
        other = other.astype("float32")
    return pd.DataFrame({0: series(values), 1: series(values[::-1]), 2: other})


@pytest.mark.parametrize("container", ["series", "frame"])
@pytest.mark.parametrize("case", COLUMN_CASES, ids=lambda c: f"{c.id}-{c.kind}")
def test_columns_roundtrip_exactly_and_in_place(case: Case, container: str):
    obj = _as_container(case.build(), container)
    got, mapping = roundtrip(obj)
    assert_identical(got, obj)
    check_placement(got, mapping, case.kind)


def _multiindex():
    arrays = [np.repeat([10, 20, 30], 4), ["a", "b", None, "d"] * 3, pd.date_range("2020", periods=12, freq="h")]
    return pd.MultiIndex.from_arrays(arrays, names=["num", None, "time"])


INDEX_CASES = [
    Case("range", lambda: pd.RangeIndex(5, 100, 7, name="r")),
    Case("range-empty", lambda: pd.RangeIndex(0, name="r")),
    *(Case(f"index-{dtype}", lambda dtype=dtype: pd.Index(_numeric(dtype), name=dtype))
      for dtype in ["int8", "int64", "uint64", "float32", "float64", "complex128", "bool"]),
    Case("index-Int64-NA", lambda: pd.Index(pd.array(_with_missing(list(range(N))), dtype="Int64"), name="n")),
    Case("index-str", lambda: pd.Index(WORDS, name="s"), STR_KIND),
    Case("index-string[pyarrow]", lambda: pd.Index(_arrow("string[pyarrow]", WORDS))),
    Case("index-object", lambda: pd.Index([1, "a", None, 2.5], dtype=object, name=("tuple", "name")), "once_per_worker"),
    Case("index-arrow-int", lambda: pd.Index(_arrow(lambda pa: pa.int64(), list(range(N))), name="a")),
    Case("index-empty-int64", lambda: pd.Index([], dtype="int64", name="e")),
    Case("datetimeindex-freq-tz", lambda: pd.date_range("2021-03-27", periods=N, freq="h", tz="Europe/Paris", name="t")),
    Case("datetimeindex-freq-B", lambda: pd.date_range("2021-01-01", periods=N, freq="B", name="t")),
    Case("datetimeindex-nofreq", lambda: pd.DatetimeIndex(_datetimes("ms"), name="t")),
    Case("timedeltaindex-freq", lambda: pd.timedelta_range("1s", periods=N, freq="250ms", name="d")),
    Case("periodindex", lambda: pd.period_range("2000-01", periods=N, freq="Q", name="p")),
    Case("categoricalindex", lambda: pd.CategoricalIndex(_categorical(6, ordered=True), name="c")),
    Case("intervalindex", lambda: pd.interval_range(0.0, 12.0, periods=N, closed="both", name="i")),
    Case("multiindex", _multiindex, STR_KIND),
    Case("multiindex-numeric", lambda: pd.MultiIndex.from_product([[1, 2, 3], [0.5, 1.5]], names=["a", "b"])),
]


@pytest.mark.parametrize("case", INDEX_CASES, ids=lambda c: f"{c.id}-{c.kind}")
def test_index_roundtrips_exactly_and_in_place(case: Case):
    index = case.build()
    got, mapping = roundtrip(index)
    assert_identical(got, index)
    check_placement(got, mapping, case.kind)
    # An index also comes back right as a frame's index.
    frame = pd.DataFrame({0: np.arange(len(index), dtype="float64")}, index=index)
    got, mapping = roundtrip(frame)
    assert_identical(got, frame)
    check_placement(got, mapping, case.kind)


class GeoLikeFrame(pd.DataFrame):
    """A DataFrame subclass with metadata, as geopandas' GeoDataFrame is."""

    _metadata = ["crs", "_geometry_column_name"]

    @property
    def _constructor(self):
        return GeoLikeFrame


class GeoLikeSeries(pd.Series):
    _metadata = ["_name", "crs"]

    @property
    def _constructor(self):
        return GeoLikeSeries


def _geo_like() -> GeoLikeFrame:
    frame = GeoLikeFrame({"x": np.arange(6.0), "y": np.arange(6.0) * 2})
    frame.crs = "EPSG:4326"
    frame._geometry_column_name = "x"
    return frame


def _geo_like_series() -> GeoLikeSeries:
    series = GeoLikeSeries(np.arange(5.0), name="g")
    series.crs = {"epsg": 3857}
    return series


def _mixed_frame(n: int = N) -> pd.DataFrame:
    return pd.DataFrame({
        "f": np.linspace(0, 1, n), "i": np.arange(n, dtype="int32"), "t": pd.date_range("2020", periods=n, freq="min"),
        "tz": pd.date_range("2020", periods=n, freq="D", tz="UTC"), "c": pd.Categorical(np.arange(n) % 3),
        "n": pd.array(_with_missing(list(range(n))), dtype="Int16"), "b": np.arange(n) % 2 == 0,
    })


def _with(obj: Any, **attributes: Any) -> Any:
    for name, value in attributes.items():
        if name == "attrs":
            obj.attrs.update(value)
        elif name == "allows_duplicate_labels":
            obj.flags.allows_duplicate_labels = value
        else:
            setattr(obj, name, value)
    return obj


def _non_consolidated() -> pd.DataFrame:
    frame = pd.DataFrame({"a": np.arange(5.0)})
    frame["b"] = np.arange(5.0)  # a second float block, not merged with the first
    frame.insert(0, "c", np.arange(5))
    return frame


def _numpy_string_dtype() -> np.dtype:
    if not hasattr(np.dtypes, "StringDType"):
        pytest.skip("numpy < 2 has no StringDType")
    return np.dtypes.StringDType()


def _arrow_table(pa) -> Any:
    chunks = [pa.table({"i": pa.array([1, None, 3]), "s": ["a", "b", None]}) for _ in range(3)]
    return pa.concat_tables(chunks).replace_schema_metadata({"origin": "test"})


OBJECT_CASES = [
    # ndarrays: any memory layout; the decoded array keeps C or F order.
    Case("ndarray-C", lambda: np.arange(60.0).reshape(3, 4, 5)),
    Case("ndarray-F", lambda: np.asfortranarray(np.arange(60, dtype="int16").reshape(6, 10))),
    Case("ndarray-strided", lambda: np.arange(200.0).reshape(10, 20)[::3, 1::4]),
    Case("ndarray-reversed", lambda: np.arange(10, dtype="uint32")[::-1]),
    Case("ndarray-0d", lambda: np.array(3.25)),
    Case("ndarray-0d-datetime", lambda: np.array(np.datetime64("2020-01-02T03:04", "m"))),
    Case("ndarray-empty", lambda: np.empty(0, dtype="complex64")),
    Case("ndarray-empty-2d", lambda: np.empty((3, 0), dtype="int8", order="F")),
    Case("ndarray-structured", lambda: np.array([(1, 2.5, b"ab"), (3, -1.0, b"c")], dtype=[("i", "<i4"), ("f", ">f8"), ("s", "S2")])),
    Case("ndarray-bigendian-2d", lambda: np.arange(12, dtype=">f4").reshape(3, 4)),
    Case("ndarray-datetime64[D]", lambda: np.arange(10).astype("M8[D]")),
    Case("ndarray-unicode", lambda: np.array(["a", "bcd", "é"])),
    Case("ndarray-bytes", lambda: np.array([b"a", b"bcd", b""])),
    Case("ndarray-void", lambda: np.frombuffer(b"0123456789abcdef", dtype="V4").copy()),
    Case("ndarray-object", lambda: np.array([1, "a", None], dtype=object), "once_per_worker"),
    Case("ndarray-structured-objects", lambda: np.array([(1, "a")], dtype=[("i", "i8"), ("o", "O")]), "once_per_worker"),
    Case("ndarray-StringDType", lambda: np.array(["a", "b" * 30], dtype=_numpy_string_dtype()), "once_per_worker"),
    Case("ndarray-matrix", lambda: np.matrix([[1, 2], [3, 4]]), "once_per_worker"),
    Case("ndarray-masked", lambda: np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0]), "once_per_worker"),
    # pyarrow objects, chunks kept as they are.
    Case("arrow-array", lambda: _pa().array([1, 2, None, 4])),
    Case("arrow-array-sliced", lambda: _pa().array(["a", None, "ccc", "dd", "e"]).slice(1, 3)),
    Case("arrow-chunked", lambda: _pa().chunked_array([[1, 2], [], [3, None, 5]])),
    Case("arrow-recordbatch", lambda: _pa().record_batch({"a": [1, 2], "b": [[1], None]})),
    Case("arrow-table", lambda: _arrow_table(_pa())),
    # containers of shareable objects
    Case("tuple", lambda: (np.arange(3.0), pd.Series([1, 2], dtype="Int8"), 7, "text")),
    Case("list", lambda: [pd.RangeIndex(3), np.ones((2, 2), order="F")]),
    Case("dict", lambda: {"frame": _mixed_frame(), "nested": {"a": np.arange(4)}, 1: [np.zeros(2)]}, STR_KIND),
    Case("dict-arrow", lambda: {"t": _arrow_table(_pa()), "s": pd.Series(["x", None], dtype="string[pyarrow]")}),
    # frames and series: state, shapes, labels
    Case("frame-mixed", _mixed_frame, STR_KIND),
    Case("frame-attrs", lambda: _with(_mixed_frame(), attrs={"source": "test", "n": 3, "nested": {"a": [1, 2]}}),
         STR_KIND),
    Case("frame-no-duplicate-labels", lambda: _with(_mixed_frame(), allows_duplicate_labels=False), STR_KIND),
    Case("frame-axis-names", lambda: _mixed_frame().rename_axis(index="row", columns="field"), STR_KIND),
    Case("frame-duplicate-columns", lambda: pd.DataFrame(np.arange(12.0).reshape(3, 4), columns=[1, 2, 1, 1])),
    Case("frame-duplicate-columns-mixed", lambda: pd.concat([_mixed_frame(), _mixed_frame()], axis=1), STR_KIND),
    Case("frame-column-order", lambda: _mixed_frame()[["tz", "f", "c", "b", "i", "n", "t"]], STR_KIND),
    Case("frame-empty", lambda: pd.DataFrame()),
    Case("frame-zero-rows", lambda: _mixed_frame().iloc[:0], STR_KIND),
    Case("frame-zero-columns", lambda: pd.DataFrame(index=pd.date_range("2020", periods=4, freq="D"))),
    Case("frame-sliced", lambda: pd.DataFrame(np.arange(600.0).reshape(30, 20)).iloc[::3, ::2]),
    Case("frame-sliced-mixed", lambda: _mixed_frame().iloc[::3, ::2], STR_KIND),
    Case("frame-non-consolidated", _non_consolidated, STR_KIND),
    Case("frame-multiindex-columns", lambda: pd.DataFrame(
        np.arange(12.0).reshape(3, 4), columns=pd.MultiIndex.from_product([[1, 2], [10, 20]], names=["a", "b"]))),
    Case("frame-subclass-metadata", _geo_like, STR_KIND),
    Case("frame-bigendian", lambda: pd.DataFrame({0: np.arange(5, dtype=">i4"), 1: np.arange(5, dtype=">f8")})),
    Case("series-state", lambda: _with(pd.Series([1.5, 2.5], index=pd.Index([3, 4], name="k"), name="v"),
                                       attrs={"unit": "m"}, allows_duplicate_labels=False)),
    Case("series-tuple-name", lambda: pd.Series(np.arange(3), name=("a", 1))),
    Case("series-subclass-metadata", _geo_like_series),
]


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")  # still supported
@pytest.mark.parametrize("case", OBJECT_CASES, ids=lambda c: f"{c.id}-{c.kind}")
def test_objects_roundtrip_exactly_and_in_place(case: Case):
    obj = case.build()
    got, mapping = roundtrip(obj)
    assert_identical(got, obj)
    check_placement(got, mapping, case.kind)


# -- generated frames ---------------------------------------------------------

LABELS = st.one_of(st.none(), st.integers(-3, 3), st.text("abcé", max_size=3))


def _column_strategies() -> list:
    """(n) -> strategy of a column of n values, for each kind of column."""
    floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
    ints = st.integers(-(2**63), 2**63 - 1)
    maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731 - a missing value

    def column(values_of, make):
        return lambda n: st.lists(values_of, min_size=n, max_size=n).map(make)

    kinds = [
        column(floats, lambda v: np.array(v, dtype="float64")),
        column(st.floats(width=32), lambda v: np.array(v, dtype="float32")),
        column(ints, lambda v: np.array(v, dtype="int64")),
        column(st.integers(0, 255), lambda v: np.array(v, dtype="uint8")),
        column(st.booleans(), lambda v: np.array(v, dtype="bool")),
        column(maybe(st.integers(-(2**40), 2**40)),
               lambda v: np.array([np.iinfo("int64").min if x is None else x for x in v]).view("M8[s]")),
        column(maybe(st.integers(-(2**50), 2**50)),
               lambda v: pd.DatetimeIndex(np.array([np.iinfo("int64").min if x is None else x for x in v])
                                          .view("M8[us]")).tz_localize("Asia/Kolkata").array),
        column(maybe(st.integers(-(2**60), 2**60)),
               lambda v: np.array([np.iinfo("int64").min if x is None else x for x in v]).view("m8[ns]")),
        column(maybe(st.sampled_from(["a", "b", "zz"])), lambda v: pd.Categorical(v, ordered=bool(len(v) % 2))),
        column(maybe(st.integers(-(2**31), 2**31 - 1)), lambda v: pd.array(v, dtype="Int32")),
        column(maybe(st.floats(allow_nan=False)), lambda v: pd.array(v, dtype="Float64")),
        column(maybe(st.booleans()), lambda v: pd.array(v, dtype="boolean")),
        column(maybe(st.text(max_size=4)), lambda v: pd.Series(v).array),  # the default string dtype
        column(maybe(st.text(max_size=4)), _objects),
        column(st.one_of(st.none(), st.integers(), st.text(max_size=2), floats, st.tuples(st.integers())), _objects),
        column(maybe(st.text(max_size=4)), lambda v: pd.array(v, dtype="string[python]")),
        column(maybe(st.integers(0, 10**4)), lambda v: pd.array([None if x is None else pd.Period(ordinal=x, freq="D")
                                                                 for x in v], dtype="period[D]")),
        column(st.integers(-100, 100), lambda v: pd.arrays.IntervalArray.from_arrays(v, [x + 1 for x in v])),
    ]
    if HAS_PYARROW:
        import pyarrow as pa

        kinds += [
            column(maybe(st.text(max_size=4)), lambda v: pd.array(v, dtype="string[pyarrow]")),
            column(maybe(ints), lambda v: pd.array(v, dtype=pd.ArrowDtype(pa.int64()))),
            column(maybe(st.lists(st.integers(-5, 5), max_size=3)),
                   lambda v: pd.array(v, dtype=pd.ArrowDtype(pa.list_(pa.int8())))),
        ]
    return kinds


COLUMN_KINDS = _column_strategies()


@st.composite
def indexes(draw, n: int) -> pd.Index:
    name = draw(LABELS)
    kind = draw(st.sampled_from(["range", "int", "str", "datetime", "multi", "category"]))
    if kind == "range":
        start, step = draw(st.integers(-5, 5)), draw(st.integers(1, 3))
        return pd.RangeIndex(start, start + n * step, step, name=name)
    if kind == "int":
        return pd.Index(draw(st.lists(st.integers(-9, 9), min_size=n, max_size=n)), dtype="int64", name=name)
    if kind == "str":
        return pd.Index(draw(st.lists(st.text("xyz", max_size=2), min_size=n, max_size=n)), name=name)
    if kind == "datetime":
        freq = draw(st.sampled_from(["s", "D", "h", None]))
        tz = draw(st.sampled_from([None, "UTC", "America/New_York"]))
        index = pd.date_range("2024-03-09", periods=n, freq=freq or "min", tz=tz, name=name)
        return index if freq else pd.DatetimeIndex(index[::-1], freq=None)
    if kind == "multi":
        first = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        second = draw(st.lists(st.one_of(st.none(), st.text("ab", max_size=2)), min_size=n, max_size=n))
        return pd.MultiIndex.from_arrays([first, second], names=[name, draw(LABELS)])
    return pd.CategoricalIndex(draw(st.lists(st.sampled_from(["p", "q"]), min_size=n, max_size=n)), name=name)


@st.composite
def frames(draw) -> pd.DataFrame:
    n = draw(st.integers(0, 12))
    kinds = draw(st.lists(st.sampled_from(COLUMN_KINDS), max_size=6))
    columns = {i: draw(kind(n)) for i, kind in enumerate(kinds)}
    frame = pd.DataFrame(columns, index=draw(indexes(n)))
    frame.columns = pd.Index(draw(st.lists(LABELS, min_size=len(kinds), max_size=len(kinds))), dtype=object)
    frame.columns.name = draw(LABELS)
    if draw(st.booleans()):
        frame.attrs = {"k": draw(LABELS)}
    if draw(st.booleans()):
        frame = frame.iloc[:: draw(st.integers(1, 3))]
    if len(kinds) and draw(st.booleans()):
        # A column over another's memory (pandas 3's lazy copy): stored once,
        # decoded as two columns a task can write independently.
        column = frame.iloc[:, draw(st.integers(0, len(kinds) - 1))]
        frame.insert(len(kinds), draw(LABELS), column, allow_duplicates=True)
    return frame


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_generated_frames_roundtrip_exactly(frame: pd.DataFrame):
    got, _ = roundtrip(frame)
    assert_identical(got, frame)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_generated_frames_are_written_independently(frame: pd.DataFrame):
    """Issue 12 review, findings 1-2: columns over one memory come back, where
    a task can write, as independent as pickle makes them."""
    with published(frame) as name:
        got, _ = decode(name, copy_on_write=True)
        expected = pickle.loads(pickle.dumps(frame, protocol=5))
        for got_arr, expected_arr in zip(_plain_arrays(got), _plain_arrays(expected), strict=True):
            _first_byte(got_arr)[0] ^= 1
            _first_byte(expected_arr)[0] ^= 1
        assert_identical(got, expected)


def _plain_arrays(frame: pd.DataFrame) -> list[np.ndarray]:
    # The non-empty numeric arrays a byte can be flipped in (not object
    # pointers, Categorical codes or Arrow buffers).
    arrays = []
    for blk in frame._mgr.blocks:
        values = blk.values
        values = values._data if isinstance(values, BaseMaskedArray) else values
        if isinstance(values, np.ndarray) and values.dtype.kind in "fiucb" and values.size:
            arrays.append(values)
    return arrays


def _aliased_ndarrays() -> np.ndarray:
    arr = np.arange(float(N))
    return np.array([arr, arr.view(), arr.reshape(2, -1), None], dtype=object)


ALIASED_CASES = {
    "setitem": lambda: pd.DataFrame({"a": np.arange(float(N))}).pipe(lambda d: d.__setitem__("b", d["a"]) or d),
    "assign": lambda: pd.DataFrame({"a": np.arange(float(N))}).pipe(lambda d: d.assign(b=d["a"])),
    "copy-false": lambda: pd.DataFrame({"a": np.arange(float(N)), "b": np.arange(float(N))}).pipe(
        lambda d: pd.DataFrame({"a": d["a"].to_numpy(), "b": d["a"].to_numpy()}, copy=False)),
    "series-view": lambda: pd.DataFrame({"a": np.arange(float(N))}).pipe(lambda d: d.__setitem__("c", d["a"][:]) or d),
    "masked": lambda: pd.DataFrame({"x": pd.array(range(N), dtype="Int64")}).pipe(lambda d: d.assign(y=d["x"])),
    "object-array": _aliased_ndarrays,
}


def _memories(obj: Any) -> set[int]:
    arrays = _plain_arrays(obj) if isinstance(obj, pd.DataFrame) else list(obj[:3])
    return {a.ctypes.data for a in arrays}


@pytest.mark.parametrize("build", ALIASED_CASES.values(), ids=ALIASED_CASES.keys())
def test_objects_over_one_memory_are_written_independently(build):
    """Issue 12 review, findings 1-2: distinct objects over one memory (stored
    once) decode, from a writable mapping (``mmap_mode="c"``, a result), over
    memory of their own, as pickle's are; from a read-only one they share it
    as the original does (pandas without Copy-on-Write copies on ``df["b"] =
    df["a"]`` and ``assign``: two memories there)."""
    obj = build()
    with published(obj) as name:
        got, _ = decode(name, copy_on_write=True)
        if isinstance(got, pd.DataFrame):
            got.iloc[0, 0] = -1  # (no copy-on-write reference: in place)
            assert got.iloc[0, 1] == obj.iloc[0, 1]
        else:
            got[0][0] = -1.0
            assert got[1][0] == 0.0 and got[2][0, 0] == 0.0
        shared, _ = decode(name)
        assert len(_memories(shared)) == len(_memories(obj))


# -- writes -------------------------------------------------------------------


def _arrays_of(obj: Any) -> list[np.ndarray]:
    """The numpy arrays behind a decoded object's data."""
    if isinstance(obj, pd.DataFrame):
        return [arr for blk in obj._mgr.blocks for arr in _arrays_of(blk.values)]
    if isinstance(obj, pd.Series):
        return _arrays_of(obj._values)
    if hasattr(obj, "_ndarray"):
        return [obj._ndarray]
    if hasattr(obj, "_mask"):
        return [obj._data, obj._mask]
    return [obj]


WRITE_CASES = [
    Case("ndarray", lambda: np.arange(10.0)),
    Case("ndarray-readonly-source", lambda: _readonly(np.arange(10.0))),
    Case("frame", lambda: _mixed_frame()[["f", "i", "t", "tz", "n"]]),
    Case("series-values-readonly-source", lambda: pd.Series(_readonly(np.arange(4, dtype="int8")), copy=False)),
]


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False  # as pandas 3 hands out Series.values under copy-on-write
    return arr


def _first_byte(arr: np.ndarray) -> np.ndarray:
    return arr.ravel(order="K").view(np.uint8)[:1]  # a view: the arrays are contiguous


@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: c.id)
def test_read_only_mapping_refuses_writes(case: Case):
    got, _ = roundtrip(case.build())
    for arr in _arrays_of(got):
        assert not arr.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            arr[...] = arr  # what `df.values[...] = ...` would do


@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: c.id)
def test_copy_on_write_mapping_takes_private_writes(case: Case):
    obj = case.build()
    with published(obj) as name:
        private, _ = decode(name, copy_on_write=True)
        for arr in _arrays_of(private):
            assert arr.flags.writeable
            _first_byte(arr)[0] = 0x5A
        others, _ = decode(name)  # another mapping of the same segment
    assert_identical(others, obj)
    assert all(_first_byte(arr)[0] == 0x5A for arr in _arrays_of(private))


# -- task_view ----------------------------------------------------------------


def _set(attribute: str, value: Any) -> Callable[[Any], None]:
    def change(obj: Any) -> None:
        target, _, name = attribute.rpartition(".")
        setattr(obj if not target else getattr(obj, target), name, value)

    return change


def _mutate_attrs(obj: Any) -> None:
    obj.attrs["added"] = 1
    obj.attrs["nested"]["a"].append(3)


def _add_column(frame: pd.DataFrame) -> None:
    frame["new"] = 1.0


def _replace_column(frame: pd.DataFrame) -> None:
    frame["f"] = np.zeros(len(frame))


def _drop_column(frame: pd.DataFrame) -> None:
    del frame["i"]


def _write_first(series: pd.Series, value: Any) -> None:
    series.iloc[0] = value


def _task_frame() -> pd.DataFrame:
    index = pd.date_range("2024-01-01", periods=N, freq="D", name="day")
    frame = _mixed_frame().set_index(index).assign(s=pd.Series(list("abcd") * (N // 4), index=index, dtype="str"))
    return _with(frame, attrs={"nested": {"a": [1, 2]}})


TASK_CHANGES = {
    "add-column": _add_column,
    "replace-column": _replace_column,
    "drop-column": _drop_column,
    "drop-inplace": lambda v: v.drop(columns=["t", "tz"], inplace=True),
    "insert-column": lambda v: v.insert(0, "first", 0),
    "rename-inplace": lambda v: v.rename(columns={"f": "F"}, index=lambda x: x.day_name(), inplace=True),
    "set-index-name": _set("index.name", "renamed"),
    "set-index-freq": _set("index.freq", None),
    "set-columns-name": _set("columns.name", "fields"),
    "set-columns": _set("columns", [f"c{i}" for i in range(8)]),
    "set-index": _set("index", pd.RangeIndex(100, 100 + N)),
    "set-attrs": _set("attrs", {"other": True}),
    "mutate-attrs": _mutate_attrs,
    "set-flags": lambda v: setattr(v.flags, "allows_duplicate_labels", False),
    "sort-inplace": lambda v: v.sort_values("f", ascending=False, inplace=True),
    "reset-index-inplace": lambda v: v.reset_index(inplace=True),
    # pandas-level writes: copy-on-write gives the task its own column
    "insert-column-midway": lambda v: v.insert(3, "midway", 0),
    "write-whole-column": lambda v: v.loc.__setitem__((slice(None), "f"), 0.5),
    "write-whole-str-column": lambda v: v.loc.__setitem__((slice(None), "s"), "z"),
    "write-row": lambda v: v.iloc.__setitem__(0, v.iloc[1]),
    "write-cells": lambda v: [v.loc.__setitem__((v.index[0], c), v[c].iloc[1]) for c in ["f", "n", "s", "tz", "c", "t"]],
    "write-through-series": lambda v: _write_first(v["n"], 7),
    "replace-columnwise": lambda v: v.replace({"f": 0.0, "s": "a"}, {"f": -1.0, "s": "b"}, inplace=True),
    "fillna-inplace": lambda v: v.fillna({"n": 0}, inplace=True),
    "pop": lambda v: v.pop("s"),
    "isetitem": lambda v: v.isetitem(0, np.ones(N)),
}


# Tasks written before pandas 3.1 use inplace=True: the view must take it too.
@pytest.mark.filterwarnings("ignore:The inplace keyword")
@pytest.mark.parametrize("change", TASK_CHANGES.values(), ids=TASK_CHANGES.keys())
@pytest.mark.parametrize("frozen", [True, False], ids=["cached", "decoded"])
def test_task_view_changes_never_reach_the_cached_frame(change: Callable[[Any], None], frozen: bool):
    original = _task_frame()
    expected = pickle.loads(pickle.dumps(original))  # a stdlib task's (its columns' Arrow chunks combined)
    with in_worker(original, frozen) as (cached, mapping):
        change(task_view(cached, mapping))
        exact.assert_identical(cached, expected, mmap_mode="r")  # blocks and their placement too
        assert_identical(cached, expected)
        assert_identical(task_view(cached, mapping), expected)  # and the next task sees it whole


@contextlib.contextmanager
def worker_cache(obj: Any):
    """A worker's cache of ``obj``: each call of what it yields is what the
    worker's next task is handed (``WorkerCache.resolve``)."""
    with published(obj) as name:
        cache = _cache.WorkerCache()
        cache._start_sweeper = lambda: None  # (no thread for a cache that lives for one test)
        yield lambda: cache.resolve(_cache.Handle(name, "r", "", -1, 0, _names.HOST, _segment.process_key()))


# Objects holding values that cannot be made read-only are decoded for each
# task (_codec.FrozenDecode.private).
MUTABLE_HOLDERS = {
    "series-list-in-cell": lambda: pd.Series(_objects([[1], 0.0, 2.0, None])),
    "series-list-in-metadata": lambda: _with(GeoLikeSeries(np.arange(4.0)), crs=["EPSG", 4326]),
    "frame-list-in-metadata": lambda: _with(GeoLikeFrame({"a": np.arange(4.0), "s": list("abcd")}), crs=["EPSG", 4326]),
}


@pytest.mark.parametrize("build", MUTABLE_HOLDERS.values(), ids=MUTABLE_HOLDERS.keys())
def test_a_task_writes_into_an_object_decoded_for_it(build):
    """A Series decoded for one task refused ``s.iloc[0] = v`` ("assignment
    destination is read-only", where a stdlib task writes) on pandas 3, and
    frames and Series on pandas 2.2 without Copy-on-Write: found by the
    differential test of task writes (test_exactness)."""
    original = build()
    with worker_cache(original) as next_task:
        for _ in range(2):
            task = next_task()
            assert_identical(task, original)
            cell = (1, 0) if task.ndim == 2 else 1
            task.iloc[cell] = 5.0
            assert task.iloc[cell] == 5.0


def _mapped_by(arr: np.ndarray) -> Any:
    """The object at the root of ``arr``'s memory (a segment's: ``_segment.map_fd``'s)."""
    while isinstance(arr, np.ndarray):
        arr = arr.base
    return arr.obj if isinstance(arr, memoryview) else arr


@pytest.mark.parametrize("private", [True, False], ids=["private-mapping", "no-private-mapping"])
def test_task_memory_is_the_tasks_own(monkeypatch, private: bool):
    """``TaskMemory.own``: an array's bytes in a private mapping of its
    segment or, where the store has none (XNU: macOS' shm objects), a copy;
    writable, seen by no other task, and over memory of its own for every
    array of one task, even two over the same bytes (as pickle gives them)."""
    if not private:
        monkeypatch.setattr(_segment, "private_view", lambda mapping: None)
    with in_worker(pd.DataFrame({"a": np.arange(float(N)), "b": np.ones(N)})) as (cached, mapping):
        arr = cached._mgr.blocks[0].values
        memory = _cache.TaskMemory([mapping])
        mine, again = memory.own(arr), memory.own(arr[1:])
        mapped = private and _segment.current_store().private_maps
        assert mine.flags.writeable and hasattr(_mapped_by(mine), "sharedexec_read_only") == mapped  # (_segment.map_fd)
        assert not np.shares_memory(mine, again) and not np.shares_memory(mine, arr)
        mine[...] = -1.0
        exact.assert_identical(_cache.TaskMemory([mapping]).own(arr), arr.copy(order="K"))


def test_task_view_of_a_cached_frame_copies_no_bytes():
    """Issue 15: a task's frame used to be ``copy(deep=False)``, a Block
    object (and an array view) per block: 5 ms per task for 2 500 blocks.
    Under pandas 3 it shares the cache's Block objects. Where pandas writes
    in place (2.2 without Copy-on-Write) its blocks are its own, over a
    private mapping of the segment (one per task), not a copy of the bytes;
    only object columns' pointers are copied."""
    with in_worker(_task_frame()) as (cached, mapping):
        view = task_view(cached, mapping)
    assert len(view._mgr.blocks) == len(cached._mgr.blocks) > 5
    assert view._mgr is not cached._mgr and view.index is not cached.index
    if _codec._FAST_VIEWS:
        assert all(mine is theirs for mine, theirs in zip(view._mgr.blocks, cached._mgr.blocks))
    if not _codec.writes_in_place(pd.DataFrame):
        return
    assert all(arr.flags.writeable for arr in _arrays_of(view))
    assert not any(np.shares_memory(mine, theirs) for mine in _arrays_of(view) for theirs in _arrays_of(cached))
    if _segment.current_store().private_maps:  # (else copies: POSIX shared memory, to XNU's rules)
        # (by id: a ctypes array, what _segment.map_fd maps into, has no hash)
        private = {id(_mapped_by(arr)): _mapped_by(arr) for arr in _arrays_of(view) if arr.dtype != object}
        assert len(private) == 1 and hasattr(*private.values(), "sharedexec_read_only")  # one mapping


@pytest.mark.skipif(not PANDAS_3, reason="extension arrays have no read-only flag before pandas 3")
@pytest.mark.parametrize("column", ["n", "s", "tz", "c"])
def test_writes_that_bypass_copy_on_write_meet_read_only_arrays(column: str):
    # ``Series.array`` is the extension array of the block itself, shared by
    # every task: Arrow arrays would replace their data in place.
    original = _task_frame()
    view = _codec.task_view(cached_roundtrip(original))
    with pytest.raises(ValueError, match="read-only"):
        view[column].array[0] = view[column].iloc[1]
    assert_identical(_codec.task_view(view), original)


SERIES_CHANGES = {
    "set-name": _set("name", "other"),
    "set-index-name": _set("index.name", "other"),
    "set-index-freq": _set("index.freq", None),
    "set-index": _set("index", pd.RangeIndex(7, 7 + N)),
    "mutate-attrs": _mutate_attrs,
    "rename-inplace": lambda v: v.rename("r", inplace=True),
}


@pytest.mark.filterwarnings("ignore:The inplace keyword")
@pytest.mark.parametrize("change", SERIES_CHANGES.values(), ids=SERIES_CHANGES.keys())
def test_task_view_changes_never_reach_the_cached_series(change: Callable[[Any], None]):
    original = _task_frame()["f"]
    cached, _ = roundtrip(original)
    change(_codec.task_view(cached))
    assert_identical(cached, original)
    assert_identical(_codec.task_view(cached), original)


def test_task_view_of_an_index_and_an_array():
    index, _ = roundtrip(pd.date_range("2020", periods=5, freq="h", name="i"))
    view = _codec.task_view(index)
    view.name, view.freq = "changed", None
    assert (index.name, index.freq) == ("i", pd.tseries.frequencies.to_offset("h"))
    array, _ = roundtrip(np.arange(6.0))
    _codec.task_view(array).shape = (2, 3)
    assert array.shape == (6,)


@pytest.mark.parametrize("dtype", [object, "float64", "U2"])
def test_task_view_of_a_masked_array_keeps_its_fill_value(dtype):
    """Issue 12 review, finding 5: an object array's fill value ('?', '<U1')
    reached the second task as a str in an object array."""
    original = np.ma.array(np.array(["a", "b"] * 3 if dtype != "float64" else range(6), dtype=dtype), mask=[0, 1] * 3)
    expected = pickle.loads(pickle.dumps(original)).fill_value
    cached = cached_roundtrip(original)
    for _ in range(2):  # the first task's read sets the fill value of the cached array
        exact.assert_identical(_codec.task_view(cached).fill_value, expected)


# -- fingerprints: what the publisher checks before reusing a publication -----

FRAME_CHANGES = {
    **{k: TASK_CHANGES[k] for k in ["add-column", "replace-column", "drop-column", "set-index-name", "set-index-freq",
                                    "set-columns-name", "set-columns", "set-index", "set-attrs", "mutate-attrs",
                                    "set-flags"]},
    "set-columns-names": _set("columns.names", ["fields"]),
    "set-metadata": _set("crs", "EPSG:3857"),
    "write-whole-column-referenced": lambda v: _write_referenced(v, "f"),
    "write-whole-ext-column-referenced": lambda v: _write_referenced(v, "n"),
    "write-cell-referenced": lambda v: _write_referenced(v, "f", row=0),
}


_references: list[Any] = []


def _write_referenced(frame: pd.DataFrame, column: str, row: Any = slice(None)) -> None:
    # Another object references the column (what a publisher may hold to see
    # writes): pandas' copy-on-write gives the frame a new array, perhaps in
    # the same Block object.
    _references.append(frame[column])
    frame.loc[frame.index[row], column] = frame[column].iloc[1]


# pandas without Copy-on-Write writes a referenced column in place: nothing
# tells the publisher (the snapshot rule, docs/semantics.md).
_SNAPSHOT_RULE = pytest.mark.skipif(
    not _codec._pandas_copies_on_write(), reason="pandas without Copy-on-Write: in-place writes keep the snapshot"
)


@pytest.mark.parametrize(
    "change",
    [pytest.param(c, marks=_SNAPSHOT_RULE if k.endswith("-referenced") else ()) for k, c in FRAME_CHANGES.items()],
    ids=FRAME_CHANGES.keys(),
)
def test_fingerprint_sees_in_place_changes_of_a_frame(change: Callable[[Any], None]):
    frame = _with(GeoLikeFrame(_task_frame()), attrs={"nested": {"a": [1, 2]}}, crs="EPSG:4326")
    before = _codec.fingerprint(frame)
    assert _codec.same_fingerprint(before, _codec.fingerprint(frame)) and _codec.unchanged(frame, before)
    change(frame)
    assert not _codec.same_fingerprint(before, _codec.fingerprint(frame))
    assert not _codec.unchanged(frame, before)  # the registry's per-task check


@pytest.mark.parametrize("change", SERIES_CHANGES.values(), ids=SERIES_CHANGES.keys())
@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_fingerprint_sees_in_place_changes_of_a_series(change: Callable[[Any], None]):
    series = _task_frame()["f"]
    before = _codec.fingerprint(series)
    change(series)
    assert not _codec.same_fingerprint(before, _codec.fingerprint(series))


@pytest.mark.parametrize(
    "obj, change",
    [
        (pd.date_range("2020", periods=3, freq="D"), _set("freq", None)),
        (pd.Index([1, 2], name="a"), _set("name", "b")),
        (np.arange(6.0), _set("shape", (2, 3))),
        (np.arange(6.0), lambda a: a.resize(12, refcheck=False)),
    ],
    ids=["index-freq", "index-name", "ndarray-shape", "ndarray-resize"],
)
def test_fingerprint_sees_in_place_changes_of_an_index_or_array(obj: Any, change: Callable[[Any], None]):
    before = _codec.fingerprint(obj)
    change(obj)
    assert not _codec.same_fingerprint(before, _codec.fingerprint(obj))


def test_fingerprint_ignores_written_values():
    # Documented semantics: values written in place are not tracked (that would
    # mean hashing the data on every submission).
    frame = _task_frame()
    before = _codec.fingerprint(frame)
    frame._mgr.blocks[0].values[..., 0] = 42
    assert _codec.same_fingerprint(before, _codec.fingerprint(frame))


# -- layouts ------------------------------------------------------------------


def test_memmap_comes_back_as_a_memmap_without_a_file(tmp_path):
    """Issue 12 review, finding 6: it came back a plain ndarray; a pickle
    gives a memmap with no file."""
    mapped = np.memmap(tmp_path / "data.bin", dtype="int32", mode="w+", shape=(5,))
    mapped[:] = np.arange(5)
    got, _ = roundtrip(mapped)
    expected = pickle.loads(pickle.dumps(mapped))
    assert type(got) is np.memmap and vars(got) == vars(expected) == {"_mmap": None, "filename": None, "offset": None,
                                                                       "mode": None}
    exact.assert_identical(got, expected, mmap_mode="r")


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("build", [
    lambda: np.arange(6, dtype=">i4"),
    lambda: np.asfortranarray(np.arange(6, dtype=">f8").reshape(2, 3)),
    lambda: np.array(["ab", "c"], dtype=">U2"),
    lambda: np.zeros(2, dtype=[("a", ">f8"), ("b", "<i2")]),
    lambda: np.ma.array(np.arange(4, dtype=">i4"), mask=[0, 1, 0, 0]),
    lambda: pd.DataFrame({"a": np.arange(3, dtype=">f8"), "b": np.arange(3, dtype=">i2")}),
], ids=["int", "fortran", "unicode", "structured", "masked", "frame"])
def test_big_endian_arrays_come_back_as_the_pools_pickle_gives_them(build, protocol):
    """Issue 12 review, finding 6: multiprocessing pickles with protocol 4
    before Python 3.14, under which numpy sends them in native byte order."""
    obj = build()
    with published(obj) as name, _codec.pickled_with(protocol):
        got, _ = decode(name)
    exact.assert_identical(got, pickle.loads(pickle.dumps(obj, protocol=protocol)), mmap_mode="r")


def test_layout_holds_no_column_data():
    frame = pd.DataFrame({i: np.arange(10_000, dtype="float64") + i for i in range(20)})
    layout, buffers = _codec.encode(frame)
    assert len(layout) < 4096
    labels = 0 if isinstance(frame.columns, pd.RangeIndex) else frame.columns.nbytes
    data = sum(blk.values.nbytes for blk in frame._mgr.blocks) + labels
    assert sum(b.raw().nbytes for b in buffers) == data


def test_layout_cannot_be_loaded_without_its_buffers():
    layout, _ = _codec.encode(np.arange(3))
    with pytest.raises(RuntimeError, match="_codec.decode"):
        pickle.loads(layout)


def _shared_dictionary_chunks() -> Any:
    pa = _pa()
    dictionary = pa.array(["x" * 100, "y" * 100])
    chunks = [pa.DictionaryArray.from_arrays(pa.array([0, 1, i % 2]), dictionary) for i in range(4)]
    return pa.chunked_array(chunks)


@pytest.mark.parametrize(
    "build, n_buffers",
    [
        (lambda: (lambda a: (a, a[:], a.reshape(2, 6)))(np.arange(12.0)), 1),
        (lambda: (lambda s: (s, s[:]))(pd.Series(np.arange(5), dtype="Int64")), 2),  # data and mask, once
        (_shared_dictionary_chunks, 4 + 2),  # each chunk's indices, the dictionary's offsets and data once
    ],
    ids=["ndarray-views", "series-and-its-slice", "arrow-shared-dictionary"],
)
def test_memory_met_twice_is_published_once_and_stays_shared(build: Callable[[], Any], n_buffers: int):
    obj = build()
    _, buffers = _codec.encode(obj)
    assert len([b for b in buffers if b.raw().nbytes]) == n_buffers
    got, _ = roundtrip(obj)
    assert_identical(got, obj)
    addresses = {b.address for b in data_buffers(got)}
    assert len(addresses) == n_buffers


def test_repeated_objects_are_stored_once():
    """An object column of few distinct values decodes to one object per
    value, not one per row (what each worker would otherwise hold)."""
    words = np.array(["alpha", "beta", "gamma"] * 10_000, dtype=object)
    words[5] = 1
    words[6] = True  # equal to 1, but another type: kept apart
    words[7] = None
    df = pd.DataFrame({"s": [w if i % 3 else w + "" for i, w in enumerate(["alpha", "beta", "gamma"] * 10_000)], "w": words})
    layout, buffers = _codec.encode(df)
    back = _codec.decode(layout, [memoryview(b.raw()).toreadonly() for b in buffers])
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    column = back["w"].to_numpy()
    assert type(column[5]) is int and type(column[6]) is bool and column[7] is None
    assert len({id(v) for v in column}) <= 6
    assert len(layout) < 200_000  # 30 000 pointers' worth, not 30 000 strings


# -- issue 12: every object arrives exactly as sent ---------------------------


def _stdlib(obj: Any) -> Any:
    """What a stdlib worker receives."""
    return pickle.loads(pickle.dumps(obj, protocol=5))


def _equal_but_different() -> list:
    paris = pd.Timestamp("2024-01-01 13:00", tz="Europe/Paris")
    return [pd.Timestamp("2024-01-01 12:00", tz="UTC"), paris, paris.tz_convert("America/New_York"),
            decimal.Decimal("1.1"), decimal.Decimal("1.10"), 0.0, -0.0, (1, 2), (1.0, 2), (True, 2),
            1, 1.0, True, "a", np.str_("a"), b"b", dt.datetime(2024, 1, 1, 12), None]


@pytest.mark.parametrize("repeat", [1, 200], ids=["few", "many-repeats"])
def test_equal_but_different_values_are_not_merged(repeat: int):
    """Issue 12, defect 1: storing equal values once keyed them on (type, value)."""
    values = _objects(_equal_but_different() * repeat)
    frame = pd.DataFrame({"o": pd.Series(values, dtype=object)})
    for obj in (values, frame):
        got, _ = roundtrip(obj)
        exact.assert_identical(got, _stdlib(obj), mmap_mode="r")


def _strided(rows: int, cols: int) -> np.ndarray:
    # Few distinct values: the store-once path, where the order was lost.
    values = np.empty((rows, cols), dtype=object)
    for i in range(rows):
        for j in range(cols):
            values[i, j] = f"{i % 7},{j}"
    return values


OBJECT_LAYOUTS = {
    "transposed-slice": lambda: _strided(2000, 6).T[:3],  # shape (3, 2000), strides (8, 48)
    "frame-transposed-rows": lambda: pd.DataFrame(_strided(2000, 3)).T.iloc[::2],
    "F": lambda: np.asfortranarray(_strided(700, 3)),
    "negative-strides": lambda: _strided(700, 4)[::-1, ::-2],
    "offset-step": lambda: _strided(3000, 2)[5::3, 1],
    "0-d": lambda: _strided(1, 1)[0, 0:1].reshape(()),
    "empty": lambda: _strided(4, 3)[:0],
    "3-d": lambda: _strided(1200, 6).reshape(100, 12, 6).transpose(2, 0, 1)[:, ::2],
}


@pytest.mark.parametrize("build", OBJECT_LAYOUTS.values(), ids=OBJECT_LAYOUTS.keys())
def test_object_arrays_keep_their_order_for_every_layout(build: Callable[[], Any]):
    """Issue 12, defect 2: flattened in memory order, rebuilt in C order."""
    obj = build()
    got, _ = roundtrip(obj)
    exact.assert_identical(got, _stdlib(obj), mmap_mode="r")


def _frozen_roundtrip(obj: Any) -> tuple[Any, bool]:
    with published(obj) as name, _codec.frozen_decode() as report:
        got, _ = decode(name)
    return got, report.private


FROZEN_CASES = {
    "object-ndarray": (lambda: _objects(["a", 1, None, 2.5] * 300), False),
    "object-column": (lambda: pd.DataFrame({"o": pd.Series(_objects(["x", (1, "y")] * 10), dtype=object)}), False),
    "masked": (lambda: np.ma.array([1.0, 2.0, 3.0], mask=[0, 1, 0], fill_value=-1.0), False),
    "matrix": (lambda: np.matrix([[1, 2], [3, 4]]), False),
    "lists-in-object-column": (lambda: _objects([[1], [2], None]), True),
    "mutable-metadata": (lambda: _with(MetaFrame({"a": [1.0]}), info=["n"], weights=None), True),
    "array-metadata": (lambda: _with(MetaFrame({"a": [1.0]}), info="n", weights=np.arange(3.0)), False),
}


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("build, private", FROZEN_CASES.values(), ids=FROZEN_CASES.keys())
def test_frozen_decode_is_read_only_or_private(build: Callable[[], Any], private: bool):
    """Issue 12, defect 3: what the worker cache keeps for mmap_mode="r" is
    read-only, or reported as needing a decode per task."""
    obj = build()
    got, got_private = _frozen_roundtrip(obj)
    exact.assert_identical(got, _stdlib(obj), mmap_mode="r")
    assert got_private is private
    for arr in _arrays_of(got) if not isinstance(got, np.ndarray) else [got, getattr(got, "_mask", got)]:
        assert not arr.flags.writeable
    unfrozen, _ = roundtrip(obj)  # outside a frozen decode, as the stdlib gives them
    if isinstance(obj, np.ndarray):
        assert unfrozen.flags.writeable == (obj.dtype == object or type(obj) is not np.ndarray)


def test_task_view_of_a_masked_array_has_its_own_fill_value():
    got, _ = _frozen_roundtrip(np.ma.array([1.0, 2.0], mask=[0, 1], fill_value=-1.0))
    _codec.task_view(got).fill_value = 5.0
    assert got.fill_value == -1.0


def test_fingerprint_compares_attrs_by_value_and_arrays_by_content():
    """Issue 12, defect 4: attrs holding an array compared as changed each time."""
    frame = pd.DataFrame({"a": [1.0]})
    frame.attrs = {"weights": np.arange(3.0), "unit": decimal.Decimal("1.1")}
    before = _codec.fingerprint(frame)
    assert _codec.same_fingerprint(before, _codec.fingerprint(frame))
    frame.attrs["weights"][0] = -0.0  # 0.0 == -0.0, but a worker tells them apart
    assert not _codec.same_fingerprint(before, _codec.fingerprint(frame))
    before = _codec.fingerprint(frame)
    frame.attrs["unit"] = decimal.Decimal("1.10")
    assert not _codec.same_fingerprint(before, _codec.fingerprint(frame))


def test_fingerprint_of_attrs_that_cannot_be_compared_holds_until_they_are_replaced():
    frame = pd.DataFrame({"a": [1.0]})
    frame.attrs["lock"] = threading.Lock()  # pickle refuses it
    before = _codec.fingerprint(frame)
    assert _codec.same_fingerprint(before, _codec.fingerprint(frame))
    frame.attrs = {"lock": frame.attrs["lock"]}  # another dict
    assert not _codec.same_fingerprint(before, _codec.fingerprint(frame))


def test_names_are_compared_exactly():
    series = pd.Series([1.0], name=1)
    before = _codec.fingerprint(series)
    series.name = True  # == 1
    assert not _codec.same_fingerprint(before, _codec.fingerprint(series))


def test_a_layout_plain_pickle_refuses_is_written_with_cloudpickle_if_the_pool_can():
    """Issue 12, defect 6 (the codec's part): loky's pickler sends lambdas."""
    frame = pd.DataFrame({"a": [1.0, 2.0]})
    frame.attrs["scale"] = lambda x: 2 * x
    with pytest.raises(_codec.UnencodableError, match="cannot share this DataFrame"):
        _codec.encode(frame)
    layout, buffers = _codec.encode(frame, cloudpickle_fallback=True)
    got = _codec.decode(layout, [memoryview(b.raw()).toreadonly() for b in buffers])
    assert got.attrs["scale"](3) == 6
    pd.testing.assert_frame_equal(got, frame)


@pytest.mark.compat
@pytest.mark.parametrize("pieces", [1, 2, 3])
@pytest.mark.parametrize("as_", ["frame", "series", "index"])
def test_arrow_backed_chunks_are_combined_as_pandas_pickles_them(pieces, as_):
    # pd.concat gives an Arrow-backed column the chunks of its pieces; pandas'
    # pickle (ArrowExtensionArray.__getstate__) sends them combined: a stdlib
    # task sees one chunk, so must ours.
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame({"s": pd.array(list("abcdef"), dtype="string[pyarrow]"), "n": np.arange(6.0)})
    cuts = np.linspace(0, 6, pieces + 1, dtype=int)
    obj = pd.concat([frame.iloc[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
    obj = {"frame": obj, "series": obj["s"], "index": pd.Index(obj["s"].array)}[as_]
    chunks = {"frame": lambda o: o["s"].array, "series": lambda o: o.array, "index": lambda o: o.array}[as_]
    assert chunks(obj)._pa_array.num_chunks == pieces
    expected = pickle.loads(pickle.dumps(obj))
    got = roundtrip(obj)[0]
    assert chunks(got)._pa_array.num_chunks == chunks(expected)._pa_array.num_chunks == 1
    exact.assert_identical(got, expected, mmap_mode="r")
