"""polars DataFrame and Series <-> their Arrow columns: the polars part of _codec.

Imported only once polars is (``_codec`` loads it when it first meets polars
in ``sys.modules``, a worker when it unpickles a layout naming it): sharedexec
never imports polars itself.

polars holds its data in Arrow arrays. A frame is reduced to one Arrow column
per polars column, taken with ``to_arrow`` at the newest compat level: no copy,
strings and binaries stay views, and the field's metadata carries what Arrow
types alone cannot say (an ``Enum``'s categories, a ``Categorical``'s named
``Categories``). pyarrow pickles those arrays down to ``pa.Buffer`` objects,
which ``_codec``'s encoder puts out of band like any other. A worker imports
each column back through the Arrow C data interface, on top of the segment.

Exactly what a pool sends by pickling a polars object (its ``__getstate__``,
IPC): the same dtypes, values, names and sorted flags, and one chunk per
column (pickling rechunks; we rechunk before copying). A column whose dtype
would not come back identical from Arrow (``Object``; ``Int128``/``UInt128``,
whose Arrow format pyarrow cannot read; anything a future polars adds) is
checked on an empty slice when encoding, and pickled by polars itself into
the layout instead, with a DEBUG line: once per worker, like an object column.

Fork: polars' thread pool does not survive ``fork()`` (pola-rs/polars#8032:
a child forked while the pool ran waits forever on any polars call that uses
it; ``pl.from_arrow`` of a frame is one, since it converts columns in
parallel). Importing a column as a Series through the C data interface and
building a frame from Series do not use the pool, so decoding never hangs
there; a worker forked while its parent's pool ran warns, once, that the
task's own polars calls may (``_codec.forked_with_polars_pool``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Union

import polars as pl
import pyarrow as pa

from . import _codec
from ._errors import SharedExecWarning

log = logging.getLogger("sharedexec")

_NEWEST = pl.CompatLevel.newest()

#: A column in a layout: Arrow (field, chunks, sorted flag), or the state
#: polars' own pickling gives the Series (``__getstate__``: IPC bytes).
Column = Union[tuple[pa.Field, list, str], bytes]


class _ArrowChunk:
    """One Arrow chunk exported with its field (name, type and the metadata
    polars reads its Enum and Categories from): ``pl.Series`` accepts any
    object with ``__arrow_c_array__``, a pyarrow array alone has no field."""

    __slots__ = ("field", "chunk")

    def __init__(self, field: pa.Field, chunk: pa.Array):
        self.field = field
        self.chunk = chunk

    def __arrow_c_array__(self, requested_schema: Any = None) -> tuple:
        return self.field.__arrow_c_schema__(), self.chunk.__arrow_c_array__()[1]


def _import(field: pa.Field, chunks: list) -> pl.Series:
    series = pl.Series(_ArrowChunk(field, chunks[0]))
    for chunk in chunks[1:]:
        series.append(pl.Series(_ArrowChunk(field, chunk)))
    return series


def _sorted_flag(series: pl.Series) -> str:
    flags = series.flags
    return "asc" if flags["SORTED_ASC"] else "desc" if flags["SORTED_DESC"] else ""


def _column(series: pl.Series) -> Column:
    try:
        table = series.to_frame().to_arrow(compat_level=_NEWEST)
        field, chunks = table.schema.field(0), table.column(0).chunks
        if not chunks:  # an empty frame exports no batch at all
            chunks = [pa.array([], type=field.type)]
        exact = _import(field, [chunks[0].slice(0, 0)]).dtype == series.dtype
    except Exception as exc:  # pyarrow cannot read polars' 128-bit integers, ...
        exact, reason = False, f"{type(exc).__name__}: {exc}"
    else:
        reason = "its dtype does not come back identical from Arrow"
    if not exact:
        log.debug(
            "polars column %r (%s) goes into the layout by pickling, unpickled once per worker: %s",
            series.name, series.dtype, reason,
        )
        return series.__getstate__()
    return field, chunks, _sorted_flag(series)


def _series(column: Column) -> pl.Series:
    if isinstance(column, bytes):
        series = pl.Series.__new__(pl.Series)
        series.__setstate__(column)
        return series
    field, chunks, flag = column
    series = _import(field, chunks)
    return series.set_sorted(descending=flag == "desc") if flag else series


def reduce_frame(df: pl.DataFrame, enc: Any):
    if df.width == 0:
        return NotImplemented  # a height and no data: pickles small already
    try:
        columns = [_column(s) for s in df.rechunk().iter_columns()]
    except pl.exceptions.PolarsError:
        return NotImplemented  # polars cannot pickle it either (Object): let it say so
    return _rebuild_frame, (type(df), columns)


def reduce_series(series: pl.Series, enc: Any):
    column = _column(series.rechunk())
    if isinstance(column, bytes):
        return NotImplemented  # polars pickles it, as itself
    return _rebuild_series, (type(series), column)


def _warn_if_forked_with_pool() -> None:
    global _warned
    if _codec.forked_with_polars_pool and not _warned:
        _warned = True
        warnings.warn(
            "this worker was forked while polars' thread pool was running in its parent, and that "
            "pool does not survive fork(): polars operations that use it wait forever here "
            "(pola-rs/polars#8032). sharedexec rebuilt the polars data without it, but the task's "
            "own polars calls may hang. Start the pool with the 'spawn' or 'forkserver' method "
            "(mp_context=multiprocessing.get_context('forkserver'), or joblib's default backend).",
            SharedExecWarning,
            stacklevel=2,
        )


_warned = False


def _rebuild_frame(cls: type, columns: list[Column]) -> pl.DataFrame:
    _warn_if_forked_with_pool()
    # By name: a list of Series renames one named "" to "column_0".
    frame = pl.DataFrame({series.name: series for series in map(_series, columns)})
    return frame if cls is pl.DataFrame else cls._from_pydf(frame._df)


def _rebuild_series(cls: type, column: Column) -> pl.Series:
    _warn_if_forked_with_pool()
    series = _series(column)
    return series if cls is pl.Series else cls._from_pyseries(series._s)


def nbytes(obj: pl.DataFrame | pl.Series) -> int:
    return int(obj.estimated_size())


def fingerprint(obj: pl.DataFrame | pl.Series) -> tuple[tuple, tuple]:
    """polars objects are replaced rather than changed (``with_columns``
    returns a new frame), but a few methods change one in place: renaming
    (``df.columns = ...``), ``insert_column``, ``drop_in_place``, ``extend``,
    ``vstack(in_place=True)``, ``Series.append``, an in-place sort. Those
    change the shape, names, dtypes or flags. Values written in place
    (``df[0, "a"] = 1``, ``replace_column`` with a column of the same dtype)
    are not noticed, as in pandas (docs: semantics)."""
    if isinstance(obj, pl.DataFrame):
        return (obj._df,), (obj.shape, obj.columns, obj.dtypes)
    return (obj._s,), (obj.name, obj.len(), obj.dtype, obj.flags)


def task_view(obj: pl.DataFrame | pl.Series) -> pl.DataFrame | pl.Series:
    # A shallow clone: renaming or adding columns in one task stays there.
    return obj.clone()
