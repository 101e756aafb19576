"""Differential test: every entry point delivers exactly what the stdlib does.

Hypothesis generates objects -- DataFrames and Series (subclasses with
``_metadata`` too) over every kind of column and Index, MultiIndex included;
ndarrays of every dtype kind in every memory layout (C, F, strided, negative
strides, offsets, 0-d, empty, byteswapped, structured); object arrays of mixed
Python values (timestamps naive and in several zones, Decimal, -0.0, NaN,
tuples, nested lists, None); masked arrays, np.matrix, an ndarray subclass;
Arrow arrays, chunked arrays and tables with slices and nulls; polars
DataFrames and Series of every dtype (not to forked workers: polars hangs
there); attrs of every kind -- and sends each through every entry point:

* ``sharedexec.ProcessPoolExecutor`` (``mmap_mode="r"`` and ``"c"``),
* joblib with ``backend="sharedexec"``,
* ``@sharedexec.shared`` under an unchanged ``multiprocessing.Pool``,
* ``sharedexec.share()`` through a ``Process``'s queue.

Each task receives the object shared (``min_bytes=0``: everything is) and the
bytes the stdlib's pickler makes of it -- exactly what a stdlib worker would
unpickle (loky's pickler for joblib) -- and compares the two in the worker with
``tests._exact.assert_identical``: values, element types, tz, sign of zero,
order, dtype, flags (``writeable`` may differ only as the sharing mode says:
read-only with ``mmap_mode="r"``, writable with ``"c"``), attrs, metadata.
Then it writes into its object every way it can; the same object goes to the
same worker again (one worker; joblib sends three tasks to its two), which
must see it unchanged.

The stdlib's bytes are pickled as multiprocessing pickles them, with its
default protocol (4 on Python 3.11 to 3.13, 5 from 3.14), loky's with 5: under
protocol 4 numpy sends big-endian arrays in native byte order and read-only
arrays writable, and sharedexec gives each pool what its protocol gives.

One warm pool per entry point and start method; 1 to 6 objects per example.
The CI profile (``tests/conftest.py``: 12 examples per pool, derandomized,
no shrinking) takes about 30 s; ``pytest tests/test_exactness.py
--hypothesis-profile=long`` (600 per pool: 7,800 examples in about 6 minutes
here) explores.
"""

from __future__ import annotations

import datetime as dt
import decimal
import importlib.util
import multiprocessing
import pickle
import zoneinfo
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

import joblib
import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst
from joblib.externals.loky.backend import reduction as loky_reduction

import sharedexec
from sharedexec import _codec

from . import _exact_tasks as tasks
from ._exact import assert_identical
from .conftest import START_METHODS

pa = pytest.importorskip("pyarrow")
HAS_POLARS = importlib.util.find_spec("polars") is not None

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

# -- Python values (object columns, attrs, names) ------------------------------

ZONES = [
    dt.timezone.utc,
    zoneinfo.ZoneInfo("Europe/Paris"),
    zoneinfo.ZoneInfo("America/New_York"),
    zoneinfo.ZoneInfo("Asia/Kolkata"),
    dt.timezone(dt.timedelta(hours=-3, minutes=-30)),
    "UTC",  # pandas' own spelling of zones: a string
    "Europe/Paris",
]
INSTANTS = st.integers(-(2**33), 2**33)  # seconds: years 1698 to 2242, DST changes included
FLOATS = st.floats(width=64)  # NaN, +-inf, -0.0, subnormals


def timestamps() -> st.SearchStrategy:
    naive = st.builds(lambda s, unit: pd.Timestamp(s, unit="s").as_unit(unit), INSTANTS, st.sampled_from(["s", "ms", "ns"]))
    aware = st.builds(lambda s, tz: pd.Timestamp(s, unit="s", tz="UTC").tz_convert(tz), INSTANTS, st.sampled_from(ZONES))
    stdlib = st.datetimes(timezones=st.sampled_from([None, *ZONES[:5]]), allow_imaginary=False)
    return st.one_of(naive, aware, stdlib, st.dates(), st.builds(pd.Timedelta, st.integers(-(2**50), 2**50)))


def _twin(value: Any) -> Any:
    """A value equal to ``value`` that a worker must tell apart (trap 13)."""
    if isinstance(value, float):
        return -value if value == 0 else value
    if isinstance(value, decimal.Decimal) and value.is_finite():
        return value.quantize(decimal.Decimal(1).scaleb(value.as_tuple().exponent - 1))
    if isinstance(value, pd.Timestamp) and value.tz is not None:
        return value.tz_convert("Asia/Kolkata")
    if isinstance(value, tuple):
        return tuple(float(v) if type(v) is int else v for v in value)
    return value


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    FLOATS,
    st.complex_numbers(allow_nan=True),
    st.text(max_size=4),
    st.binary(max_size=3),
    st.decimals(allow_nan=False),
    timestamps(),
    st.sampled_from([np.float64(-0.0), np.int32(-7), np.str_("np"), np.datetime64("NaT"), pd.NaT, pd.NA]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner, inner), st.dictionaries(st.text(max_size=2), inner, max_size=2)
    ),
    max_leaves=5,
)
NAMES = st.one_of(st.none(), st.text(max_size=3), st.integers(-2, 2), st.sampled_from([0.0, -0.0, True, ("a", 1)]))


def _objects(values: list) -> np.ndarray:
    """A 1-D object array of exactly these items (np.array would nest lists)."""
    arr = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        arr[i] = value
    return arr


@st.composite
def object_values(draw, min_size: int = 0, max_size: int = 12) -> list:
    """Python values, sometimes with their equal twins, sometimes repeated
    enough (>= 1024) for the codec's store-once path."""
    values = draw(st.lists(VALUES, min_size=min_size, max_size=max_size))
    if values and draw(st.booleans()):
        values += [_twin(v) for v in values]
    if values and draw(st.booleans()):
        pattern = draw(st.lists(st.integers(0, len(values) - 1), min_size=1, max_size=8))
        values = [values[pattern[i % len(pattern)]] for i in range(1024 + len(pattern))]
    return values


# -- ndarrays in every layout --------------------------------------------------

DTYPES = st.one_of(
    npst.boolean_dtypes(),
    npst.integer_dtypes(endianness="?"),
    npst.unsigned_integer_dtypes(endianness="?"),
    npst.floating_dtypes(endianness="?"),
    npst.complex_number_dtypes(endianness="?"),
    npst.datetime64_dtypes(endianness="?"),
    npst.timedelta64_dtypes(endianness="?"),
    npst.byte_string_dtypes(endianness="?", max_len=3),
    npst.unicode_string_dtypes(endianness="?", max_len=3),
    npst.array_dtypes(npst.scalar_dtypes(), max_size=3),  # structured, nested subarrays
)


@st.composite
def layouts(draw, arr: np.ndarray) -> np.ndarray:
    """``arr`` as one of the layouts an array can have: F order, transposed,
    strided with positive or negative steps, at an offset, byteswapped."""
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["F", "T", "step", "offset", "swap", "0-d"]))
        if how == "F":
            arr = np.asfortranarray(arr)
        elif how == "T":
            arr = arr.T
        elif how == "swap" and arr.dtype != object:
            arr = arr.astype(arr.dtype.newbyteorder())
        elif how == "0-d" and arr.size:
            at = draw(st.integers(0, arr.size - 1))
            arr = arr.reshape(-1)[at : at + 1].reshape(())
        elif arr.ndim:
            axis = draw(st.integers(0, arr.ndim - 1))
            index = [slice(None)] * arr.ndim
            if how == "step":
                index[axis] = slice(None, None, draw(st.sampled_from([-3, -2, -1, 2, 3])))
            else:
                index[axis] = slice(draw(st.integers(1, 3)), None)
            arr = arr[tuple(index)]
    return arr


@st.composite
def ndarrays(draw) -> np.ndarray:
    shape = draw(npst.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    arr = draw(npst.arrays(draw(DTYPES), shape))
    return draw(layouts(arr))


@st.composite
def object_arrays(draw) -> np.ndarray:
    values = draw(object_values())
    arr = _objects(values)
    if len(values) % 6 == 0 and values and draw(st.booleans()):
        arr = arr.reshape(-1, 6 if draw(st.booleans()) else 3)
    return draw(layouts(arr))


@st.composite
def ndarray_subclasses(draw) -> np.ndarray:
    numbers = draw(npst.arrays(draw(st.sampled_from(["f8", "i4", ">f4", "M8[s]"])), draw(st.integers(1, 6))))
    kind = draw(st.sampled_from(["masked", "matrix", "tagged"]))
    if kind == "masked":
        mask = draw(st.one_of(st.booleans(), st.lists(st.booleans(), min_size=len(numbers), max_size=len(numbers))))
        fill = draw(st.sampled_from([None, "zero"]))
        arr = np.ma.array(numbers, mask=mask, hard_mask=draw(st.booleans()))
        if fill == "zero":
            arr.fill_value = np.zeros((), numbers.dtype)
        return arr
    if kind == "matrix" and numbers.dtype.kind in "fi":
        return np.matrix(numbers.reshape(1, -1) if draw(st.booleans()) else numbers.reshape(-1, 1))
    tagged = numbers.view(tasks.Tagged)
    tagged.tag = draw(VALUES)
    return tagged


# -- pandas --------------------------------------------------------------------


def _column_kinds() -> list[Callable[[int], st.SearchStrategy]]:
    def column(elements: st.SearchStrategy, build: Callable[[list], Any]) -> Callable[[int], st.SearchStrategy]:
        return lambda n: st.lists(elements, min_size=n, max_size=n).map(build)

    maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731
    ints = st.integers(-(2**62), 2**62)
    datetimes = st.integers(-(2**60), 2**60)
    return [
        column(FLOATS, lambda v: np.array(v, dtype="f8")),
        column(st.floats(width=32), lambda v: np.array(v, dtype="f4")),
        column(ints, lambda v: np.array(v, dtype="i8")),
        column(st.integers(0, 255), lambda v: np.array(v, dtype="u1")),
        column(st.booleans(), lambda v: np.array(v, dtype=bool)),
        column(st.complex_numbers(allow_nan=True), lambda v: np.array(v, dtype="c16")),
        column(datetimes, lambda v: np.array(v, dtype="i8").view("M8[ns]")),
        column(datetimes, lambda v: np.array(v, dtype="i8").view("m8[us]")),
        column(INSTANTS, lambda v: pd.array(np.array(v, dtype="i8").view("M8[s]")).tz_localize("UTC")),
        column(st.tuples(INSTANTS, st.sampled_from(ZONES)),
               lambda v: pd.Series([pd.Timestamp(s, unit="s", tz="UTC").tz_convert(tz) for s, tz in v], dtype=object).array),
        column(maybe(st.sampled_from(["a", "b", "zz"])), lambda v: pd.Categorical(v, ordered=bool(len(v) % 2))),
        column(maybe(ints), lambda v: pd.array(v, dtype="Int64")),
        column(maybe(FLOATS.filter(lambda x: x == x)), lambda v: pd.array(v, dtype="Float64")),
        column(maybe(st.booleans()), lambda v: pd.array(v, dtype="boolean")),
        column(maybe(st.text(max_size=4)), lambda v: pd.Series(v).array),  # the default string dtype
        column(maybe(st.text(max_size=4)), lambda v: pd.array(v, dtype="string[python]")),
        column(maybe(st.text(max_size=4)), lambda v: pd.array(v, dtype="string[pyarrow]")),
        column(VALUES, _objects),
        # Strings only, with None or np.nan: the Arrow string layout (_codec_strings).
        column(maybe(st.text(max_size=4)), _objects),
        column(st.one_of(st.just(np.nan), st.text(max_size=4)), _objects),
        column(maybe(ints), lambda v: pd.array(v, dtype=pd.ArrowDtype(pa.int64()))),
        column(maybe(FLOATS), lambda v: pd.array(pa.array(v, pa.float64()), dtype=pd.ArrowDtype(pa.float64()))),
        column(maybe(st.lists(st.integers(-5, 5), max_size=3)), lambda v: pd.array(v, dtype=pd.ArrowDtype(pa.list_(pa.int8())))),
        column(maybe(st.integers(0, 10**4)), lambda v: pd.array([None if x is None else pd.Period(ordinal=x, freq="D") for x in v],
                                                               dtype="period[D]")),
        column(st.integers(-100, 100), lambda v: pd.arrays.IntervalArray.from_arrays(v, [x + 1 for x in v], closed="left")),
        column(st.sampled_from([0.0, 0.0, 1.5, -0.0]), lambda v: pd.arrays.SparseArray(v, fill_value=0.0)),
    ]


COLUMN_KINDS = _column_kinds()


@st.composite
def indexes(draw, n: int) -> pd.Index:
    name = draw(NAMES)
    kind = draw(st.sampled_from(["range", "int", "uint", "float", "bool", "str", "object", "datetime", "timedelta",
                                 "period", "category", "interval", "multi", "arrow"]))
    if kind == "range":
        start, step = draw(st.integers(-5, 5)), draw(st.sampled_from([1, 2, -1]))
        return pd.RangeIndex(start, start + n * step, step, name=name)
    if kind in ("int", "uint", "float", "bool"):
        dtype = {"int": "i8", "uint": "u4", "float": "f8", "bool": "?"}[kind]
        return pd.Index(draw(npst.arrays(dtype, n)), name=name)
    if kind == "str":
        return pd.Index(draw(st.lists(st.text("xyz", max_size=2), min_size=n, max_size=n)), name=name)
    if kind == "object":
        return pd.Index(_objects(draw(st.lists(SCALARS, min_size=n, max_size=n))), dtype=object, name=name)
    if kind == "datetime":
        freq = draw(st.sampled_from(["s", "D", "h", "B", None]))
        tz = draw(st.sampled_from([None, "UTC", "America/New_York", ZONES[4]]))
        index = pd.date_range("2024-03-09", periods=n, freq=freq or "min", tz=tz, name=name, unit=draw(st.sampled_from(["s", "ns"])))
        return index if freq else pd.DatetimeIndex(index[::-1], freq=None)
    if kind == "timedelta":
        return pd.timedelta_range("1s", periods=n, freq="250ms", name=name)
    if kind == "period":
        return pd.period_range("2000-01", periods=n, freq=draw(st.sampled_from(["M", "Q", "D"])), name=name)
    if kind == "category":
        return pd.CategoricalIndex(draw(st.lists(st.sampled_from(["p", "q"]), min_size=n, max_size=n)), name=name)
    if kind == "interval":
        return pd.interval_range(0.0, float(n + 1), periods=n, closed=draw(st.sampled_from(["left", "both"])), name=name)
    if kind == "arrow":
        values = pd.array(draw(st.lists(st.none() | st.integers(0, 9), min_size=n, max_size=n)), dtype=pd.ArrowDtype(pa.int32()))
        cut = draw(st.integers(0, n))
        if draw(st.booleans()):  # in two chunks, as pandas' concatenation makes them
            values = type(values)._concat_same_type([values[:cut], values[cut:]])
        return pd.Index(values, name=name)
    first = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    second = draw(st.lists(st.one_of(st.none(), st.text("ab", max_size=2)), min_size=n, max_size=n))
    return pd.MultiIndex.from_arrays([first, second], names=[name, draw(NAMES)])


ATTR_VALUES = st.one_of(VALUES, npst.arrays(st.sampled_from(["f8", "i2", "M8[s]", "U2"]), st.integers(0, 4)),
                        st.builds(_objects, st.lists(SCALARS, max_size=3)))


def attrs(functions: bool) -> st.SearchStrategy:
    values = st.one_of(ATTR_VALUES, st.just(lambda x: 2 * x)) if functions else ATTR_VALUES
    return st.dictionaries(st.text(max_size=3), values, max_size=3)


@st.composite
def frames(draw, functions: bool = False) -> pd.DataFrame:
    n = draw(st.integers(0, 8))
    kinds = draw(st.lists(st.sampled_from(COLUMN_KINDS), max_size=5))
    columns = {i: draw(kind(n)) for i, kind in enumerate(kinds)}
    cls = draw(st.sampled_from([pd.DataFrame, tasks.MetaFrame]))
    frame = cls(columns, index=draw(indexes(n)))
    if draw(st.booleans()):
        # pd.concat gives each Arrow-backed column the chunks of its pieces
        # (1 to 3 here), which pandas' pickle combines into one.
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=2)))
        frame = pd.concat([frame.iloc[a:b] for a, b in zip([0, *cuts], [*cuts, n])])
    if draw(st.booleans()):
        frame.columns = draw(indexes(len(kinds)))
    frame.attrs = draw(attrs(functions))
    if cls is tasks.MetaFrame:
        frame.info, frame.weights = draw(ATTR_VALUES), draw(ATTR_VALUES)
    how = draw(st.sampled_from(["as-is", "rows", "columns", "T", "offset"]))
    if how == "rows":
        frame = frame.iloc[:: draw(st.sampled_from([2, -1, -2]))]
    elif how == "columns":
        frame = frame.iloc[:, ::-1]
    elif how == "T" and len(frame.columns) and n:
        frame = frame.T
    elif how == "offset":
        frame = frame.iloc[1:]
    if frame.index.is_unique and frame.columns.is_unique and draw(st.booleans()):
        frame = frame.set_flags(allows_duplicate_labels=False)
    return frame


@st.composite
def series(draw, functions: bool = False) -> pd.Series:
    frame = draw(frames(functions))
    if len(frame.columns):
        s = frame.iloc[:, draw(st.integers(0, len(frame.columns) - 1))]
    else:
        s = pd.Series(np.arange(len(frame), dtype="f8"), index=frame.index)
    if draw(st.booleans()):
        s = tasks.MetaSeries(s)
        s.info = draw(ATTR_VALUES)
    s.name = draw(NAMES)
    s.attrs = draw(attrs(functions))
    return s


# -- Arrow ---------------------------------------------------------------------

ARROW_TYPES = [
    (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    (pa.float64(), FLOATS),
    (pa.string(), st.text(max_size=4)),
    (pa.large_binary(), st.binary(max_size=3)),
    (pa.timestamp("us", tz="Europe/Paris"), st.integers(-(2**50), 2**50)),
    (pa.decimal128(12, 3), st.decimals(min_value=-(10**8), max_value=10**8, places=3, allow_nan=False)),
    (pa.list_(pa.int16()), st.lists(st.integers(-100, 100), max_size=3)),
    (pa.struct([("a", pa.float32()), ("b", pa.string())]), st.fixed_dictionaries({"a": st.floats(width=32), "b": st.text(max_size=2)})),
    (pa.dictionary(pa.int8(), pa.string()), st.sampled_from(["u", "v", "w"])),
]


@st.composite
def arrow_arrays(draw, kind: int | None = None) -> Any:
    typ, values = ARROW_TYPES[draw(st.integers(0, len(ARROW_TYPES) - 1)) if kind is None else kind]
    items = draw(st.lists(st.one_of(st.none(), values), max_size=10))
    if pa.types.is_dictionary(typ):
        arr = pa.array(items, pa.string()).dictionary_encode()
    elif pa.types.is_timestamp(typ):
        arr = pa.array(items, pa.int64()).cast(typ)
    else:
        arr = pa.array(items, typ)
    if len(arr) and draw(st.booleans()):
        start = draw(st.integers(0, len(arr)))
        arr = arr.slice(start, draw(st.integers(0, len(arr) - start)))
    return arr


@st.composite
def arrow_objects(draw) -> Any:
    kind = draw(st.integers(0, len(ARROW_TYPES) - 1))
    shape = draw(st.sampled_from(["array", "chunked", "table", "batch"]))
    if shape == "array":
        return draw(arrow_arrays(kind))
    chunks = draw(st.lists(arrow_arrays(kind), min_size=1, max_size=3))
    chunked = pa.chunked_array(chunks, type=chunks[0].type)
    if shape == "chunked":
        return chunked
    other = pa.chunked_array([pa.array(range(len(c)), pa.int32()) for c in chunks], type=pa.int32())
    metadata = draw(st.sampled_from([None, {b"k": b"v"}]))
    table = pa.table({"x": chunked, "n": other}, metadata=metadata)
    if shape == "batch":
        return pa.RecordBatch.from_arrays([chunks[0], pa.array(range(len(chunks[0])), pa.int32())], ["x", "n"])
    return table.slice(draw(st.integers(0, table.num_rows)))


def polars_objects() -> st.SearchStrategy:
    """polars DataFrames and Series of every dtype polars can pickle."""
    from polars.testing.parametric import dataframes, series as polars_series

    import polars as pl

    return st.one_of(
        dataframes(max_cols=4, max_size=8, excluded_dtypes=[pl.Object]),
        polars_series(max_size=8, excluded_dtypes=[pl.Object]),
    )


def objects(functions: bool = False, polars: bool = False) -> st.SearchStrategy:
    """Anything sharedexec shares. ``functions``: attrs may hold a lambda
    (only loky's cloudpickle can send it). ``polars``: polars objects too."""
    return st.one_of(
        frames(functions),
        series(functions),
        st.integers(0, 6).flatmap(indexes),
        ndarrays(),
        object_arrays(),
        ndarray_subclasses(),
        arrow_objects(),
        *([polars_objects()] if polars else []),
    )


# -- the entry points ----------------------------------------------------------


def _stdlib_bytes(obj: Any) -> bytes:
    # What multiprocessing sends: its default protocol (4 before Python 3.14,
    # under which numpy turns a big-endian array into a native-order one).
    return bytes(ForkingPickler.dumps(obj))


def _loky_bytes(obj: Any) -> bytes:
    # What joblib's loky backend sends: loky's pickler, cloudpickle underneath.
    return loky_reduction.dumps(obj)


class EntryPoint:
    """One warm pool of one entry point: ``run(objs, write)`` sends each
    object to a worker twice (or more), the task writing into it everywhere
    or the one way named ``write`` (``tasks.WRITES``), and returns every
    task's (pid, difference)."""

    functions = False
    mmap_mode = "r"
    polars = False  # whether polars objects may go to its workers (set per start method)

    def close(self) -> None:
        raise NotImplementedError


class Executor(EntryPoint):
    def __init__(self, context: Any, mmap_mode: str) -> None:
        self.pool = sharedexec.ProcessPoolExecutor(1, mp_context=context, min_bytes=0, mmap_mode=mmap_mode)
        self.mmap_mode = mmap_mode

    def run(self, objs: list, write: str | None = None) -> list:
        futures = [
            self.pool.submit(tasks.check, obj, _stdlib_bytes(obj), self.mmap_mode, write) for obj in objs for _ in range(2)
        ]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class AdoptingExecutor(Executor):
    """``adopt=True`` (issue 18): the parent's objects are re-pointed at the
    shared copy; sent anywhere afterwards, they are what they were before.
    (Not byte for byte: pandas caches derived values, e.g. a dtype, in an
    extension array's ``__dict__`` when it is first asked for.)"""

    def __init__(self, context: Any, mmap_mode: str) -> None:
        self.pool = sharedexec.ProcessPoolExecutor(1, mp_context=context, min_bytes=0, adopt=True)
        self.mmap_mode = mmap_mode

    def run(self, objs: list) -> list:
        before = [_stdlib_bytes(obj) for obj in objs]
        results = super().run(objs)
        for i, (obj, was) in enumerate(zip(objs, before)):
            try:
                assert_identical(pickle.loads(_stdlib_bytes(obj)), pickle.loads(was))
            except AssertionError as exc:
                results[2 * i] = (results[2 * i][0], f"the parent's object changed: {exc}")
        return results


class Joblib(EntryPoint):
    functions = True

    def __init__(self, context: Any, mmap_mode: str) -> None:
        self.backend = sharedexec.JoblibBackend(min_bytes=0)

    def run(self, objs: list, write: str | None = None) -> list:
        # Three tasks on two workers: one worker meets the object twice.
        calls = (joblib.delayed(tasks.check)(obj, _loky_bytes(obj), "r", write) for obj in objs for _ in range(3))
        return joblib.Parallel(n_jobs=2, backend=self.backend, batch_size=1)(calls)

    def close(self) -> None:
        pass


class DecoratedPool(EntryPoint):
    def __init__(self, context: Any, mmap_mode: str) -> None:
        self.pool = context.Pool(1)

    def run(self, objs: list, write: str | None = None) -> list:
        args = [(obj, _stdlib_bytes(obj), "r", write) for obj in objs for _ in range(2)]
        return self.pool.map(tasks.shared_check, args, chunksize=1)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class SharedProcess(EntryPoint):
    def __init__(self, context: Any, mmap_mode: str) -> None:
        self.requests, self.replies = context.Queue(), context.Queue()
        self.process = context.Process(target=tasks.serve, args=(self.requests, self.replies))
        self.process.start()

    def run(self, objs: list, write: str | None = None) -> list:
        shared = [sharedexec.share(obj) for obj in objs]  # alive until the replies are in
        for obj, original in zip(shared, objs):
            for _ in range(2):
                self.requests.put((obj, _stdlib_bytes(original), "r", write))
        return [self.replies.get(timeout=120) for _ in range(2 * len(objs))]

    def close(self) -> None:
        self.requests.put(None)
        self.process.join(60)


ENTRY_POINTS = {
    "executor-r": (Executor, "r"),
    "executor-c": (Executor, "c"),
    "executor-adopt": (AdoptingExecutor, "r"),
    "joblib": (Joblib, "r"),
    "shared-pool": (DecoratedPool, "r"),
    "share-process": (SharedProcess, "r"),
}


# joblib's loky starts its workers its own way: one run covers it.
POOLS = [(e, m) for e in ENTRY_POINTS for m in START_METHODS if e != "joblib" or m == "fork"]


@pytest.fixture(scope="module", params=POOLS, ids="-".join)
def entry_point(request):
    name, method = request.param
    cls, mmap_mode = ENTRY_POINTS[name]
    entry = cls(multiprocessing.get_context(method), mmap_mode)
    # polars in a forked worker can hang (pola-rs/polars#8032; docs: Data
    # types): loky (joblib) never forks its workers.
    entry.polars = HAS_POLARS and (method != "fork" or name == "joblib")
    yield entry
    entry.close()


def _failures(objs: list, results: list) -> list[str]:
    per_object = len(results) // len(objs)
    return [
        f"object {i // per_object} ({type(objs[i // per_object]).__name__}), task {i % per_object}: {error}"
        for i, (_, error) in enumerate(results)
        if error
    ]


@given(data=st.data())
def test_every_entry_point_delivers_what_the_stdlib_does(entry_point, data):
    objs = data.draw(st.lists(objects(entry_point.functions, entry_point.polars), min_size=1, max_size=6), label="objects")
    failures = _failures(objs, entry_point.run(objs))
    assert not failures, "\n".join(failures)


# The pools a task's writes into its frame go through: the worker cache
# ("r") under every start method, the private mapping of each task ("c"),
# a share()d frame in a Process, and joblib.
WRITE_POOLS = [("executor-r", m) for m in START_METHODS] + [("executor-c", "fork"), ("share-process", "fork"), ("joblib", "fork")]


@pytest.mark.compat
@pytest.mark.parametrize("entry_point", WRITE_POOLS, indirect=True, ids="-".join)
@given(data=st.data())
def test_a_task_writes_into_its_own_frame_as_a_stdlib_task_does(entry_point, data):
    """A task writes into the frame or Series it received one of the ways
    tasks do (``tasks.WRITES``): the write does what it does to the stdlib's
    object (values, error, warnings), and the next task on the same worker,
    and the caller, see the original. pandas 2.2 without Copy-on-Write (the
    compat run) writes in place: each task's frame is over memory of its own
    (``_cache.TaskMemory``)."""
    objs = data.draw(st.lists(st.one_of(frames(), series()), min_size=1, max_size=3))
    around_pandas = entry_point.mmap_mode == "c" or _codec.writes_in_place(pd.DataFrame)
    write = data.draw(st.sampled_from([w for w in tasks.WRITES if around_pandas or w not in tasks.AROUND_PANDAS]))
    before = [_stdlib_bytes(obj) for obj in objs]
    failures = _failures(objs, entry_point.run(objs, write))
    assert not failures, "\n".join(failures)
    for obj, sent in zip(objs, before):  # (pickled both: pickling makes a strided block contiguous)
        assert_identical(ForkingPickler.loads(_stdlib_bytes(obj)), ForkingPickler.loads(sent))
