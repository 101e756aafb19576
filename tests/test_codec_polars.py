"""polars objects through the codec (``sharedexec._codec_polars``).

The reference is what a pool sends without sharedexec: ``pickle.loads(
pickle.dumps(obj))`` (polars' own IPC pickling). A decoded object must match it
exactly -- class, dtypes (Enum categories, named Categories, time zones,
decimal scale), values, names, flags, chunk count -- for every dtype, listed
and generated. Arrow columns must lie in the segment (zero-copy); a column
Arrow cannot carry goes by pickling with a DEBUG line. Decoding never uses
polars' thread pool, so it cannot hang in a forked worker; the worker warns.
"""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

pl = pytest.importorskip("polars")
pa = pytest.importorskip("pyarrow")
from polars.testing.parametric import dataframes  # noqa: E402

import sharedexec  # noqa: E402
from sharedexec import _codec  # noqa: E402

from .test_codec import decode, published, roundtrip  # noqa: E402

N = 7


def _column_cases() -> dict[str, pl.Series]:
    paris = pl.Series([dt.datetime(2020, 3, 29, 1, 30) + dt.timedelta(hours=i) for i in range(N)])
    cases = {
        "Int8": pl.Series([1, -2, None, 4, 5, 6, -128], dtype=pl.Int8),
        "UInt64": pl.Series([0, 2**64 - 1, 3, None, 5, 6, 7], dtype=pl.UInt64),
        "Float16": pl.Series([1.5, -0.0, None, 4, 5, 6, 7], dtype=pl.Float16),
        "Float32": pl.Series([1.0, -0.0, float("nan"), None, float("inf"), 6, 7], dtype=pl.Float32),
        "Float64": pl.Series([1e300, -0.0, float("nan"), None, -float("inf"), 6, 7]),
        "Boolean": pl.Series([True, False, None, True, False, True, True]),
        "String": pl.Series(["a", "", None, "d" * 40, "é", "\0", "long string " * 3]),
        "Binary": pl.Series([b"a", b"", None, b"x" * 30, b"\0", b"\xff", b"g"]),
        "Categorical": pl.Series(["a", "b", "a", None, "c", "b", "z"], dtype=pl.Categorical),
        "Categorical-named": pl.Series(["u", "v", None, "u", "w", "v", "u"], dtype=pl.Categorical(pl.Categories("sx", "tests"))),
        "Enum": pl.Series(["b", "a", "a", None, "c", "c", "b"], dtype=pl.Enum(["c", "b", "a", "z"])),
        "Decimal": pl.Series([decimal.Decimal("1.10"), None, decimal.Decimal("-2.00"), *map(decimal.Decimal, "0 3.5 4 5".split())], dtype=pl.Decimal(10, 2)),
        "Date": pl.Series([dt.date(2020, 1, i + 1) for i in range(N)]),
        "Datetime-us": pl.Series([dt.datetime(2020, 1, 1, 12, i) for i in range(N)]),
        "Datetime-ns-Paris": paris.dt.replace_time_zone("Europe/Paris", ambiguous="earliest", non_existent="null").dt.cast_time_unit("ns"),
        "Datetime-ms-UTC": paris.dt.replace_time_zone("UTC").dt.cast_time_unit("ms"),
        "Duration": pl.Series([dt.timedelta(days=i, microseconds=-i) for i in range(N)]),
        "Time": pl.Series([dt.time(1, 2, i) for i in range(N)]),
        "Null": pl.Series([None] * N, dtype=pl.Null),
        "List": pl.Series([[1, 2], [], None, [3], [None], [4, 5, 6], [7]]),
        "List-String": pl.Series([["a"], [], None, ["b", "c"], [None], ["d"], ["e" * 20]]),
        "List-Categorical": pl.Series([["a"], ["b"], None, [], ["a"], ["c"], ["b"]], dtype=pl.List(pl.Categorical)),
        "Array": pl.Series([[1, 2], [3, 4], None, [5, 6], [7, 8], [9, 0], [1, 1]], dtype=pl.Array(pl.Int32, 2)),
        "Struct": pl.Series([{"a": i, "b": None if i % 3 else str(i)} for i in range(N)]),
        "Struct-Enum": pl.Series([{"e": "a"}, {"e": "b"}, None, {"e": None}, {"e": "a"}, {"e": "b"}, {"e": "a"}],
                                 dtype=pl.Struct({"e": pl.Enum(["a", "b"])})),
        "sorted-asc": pl.Series([1, 2, 3, 4, 5, 6, 7]).set_sorted(),
        "sorted-desc": pl.Series(["g", "f", "e", "d", "c", "b", "a"]).set_sorted(descending=True),
        "Int128-by-pickling": pl.Series([1, 2, None, 4, 5, 6, 2**100], dtype=pl.Int128),
    }
    return {name: series.alias(name) for name, series in cases.items()}


CASES = _column_cases()


def reference(obj):
    """What a pool without sharedexec hands a worker."""
    return pickle.loads(pickle.dumps(obj))


def assert_exact(got, original) -> None:
    """``got`` is what pickling ``original`` gives, exactly. Sorted flags are
    the sender's: polars' IPC reader marks some all-null struct columns sorted
    that were not (a hint it derives), and no task can rely on that."""
    expected = reference(original)
    assert type(got) is type(expected)
    if isinstance(expected, pl.DataFrame):
        assert got.schema == expected.schema
        assert got.equals(expected, null_equal=True)
        assert got.n_chunks("all") == expected.n_chunks("all")
        assert [s.flags for s in got.iter_columns()] == [s.flags for s in original.iter_columns()]
    else:
        assert got.name == expected.name
        assert got.dtype == expected.dtype
        assert got.equals(expected, check_dtypes=True, check_names=True, null_equal=True)
        assert got.n_chunks() == expected.n_chunks()
        assert got.flags == original.flags


def _segment_range(mapping) -> tuple[int, int]:
    start = np.frombuffer(mapping.view, np.uint8).ctypes.data
    return start, start + mapping.size


def assert_in_segment(series: pl.Series, mapping) -> None:
    """Every data buffer of ``series`` lies inside ``mapping`` (zero-copy)."""
    start, end = _segment_range(mapping)
    chunks = pa.table(series.to_frame()).column(0).chunks
    addresses = [buf.address for chunk in chunks for buf in chunk.buffers() if buf is not None and buf.size]
    assert addresses and all(start <= a < end for a in addresses), series.name


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("container", ["series", "frame"])
def test_every_dtype_roundtrips_exactly(name, container):
    obj = CASES[name] if container == "series" else pl.DataFrame([CASES[name], pl.Series("n", range(N))])
    got, _ = roundtrip(obj)
    assert_exact(got, obj)


def test_all_dtypes_in_one_frame_roundtrip_exactly_and_zero_copy():
    frame = pl.DataFrame(list(CASES.values()))
    with published(frame) as name:
        got, mapping = decode(name)
        assert_exact(got, frame)
        for column in ("Int8", "Float64", "String", "Binary", "Decimal", "Datetime-ns-Paris", "List", "Struct"):
            assert_in_segment(got[column], mapping)


@pytest.mark.parametrize("name", CASES)
def test_empty_columns_roundtrip_exactly(name):
    frame = pl.DataFrame([CASES[name]]).clear()
    got, _ = roundtrip(frame)
    assert_exact(got, frame)


def test_chunked_input_comes_back_in_one_chunk_like_pickling():
    frame = pl.concat([pl.DataFrame([CASES["Int8"], CASES["String"], CASES["Enum"]])] * 3, rechunk=False)
    assert frame.n_chunks() == 3
    got, _ = roundtrip(frame)
    assert_exact(got, frame)
    series = pl.concat([CASES["Struct"]] * 3, rechunk=False)
    assert_exact(roundtrip(series)[0], series)


class MyFrame(pl.DataFrame):
    pass


class MySeries(pl.Series):
    pass


def test_subclasses_come_back_as_themselves():
    frame = MyFrame({"a": np.arange(10), "s": [str(i) for i in range(10)]})
    series = MySeries("x", np.arange(10))
    assert_exact(roundtrip(frame)[0], frame)
    assert_exact(roundtrip(series)[0], series)


def test_unsupported_column_goes_by_pickling_with_a_debug_line(caplog):
    frame = pl.DataFrame([CASES["Int128-by-pickling"], pl.Series("f", np.arange(N, dtype=float))])
    with caplog.at_level(logging.DEBUG, logger="sharedexec"):
        with published(frame) as name:
            got, mapping = decode(name)
            assert_exact(got, frame)
            assert_in_segment(got["f"], mapping)  # the other columns are still shared
    assert any("'Int128-by-pickling' (Int128) goes into the layout by pickling" in r.getMessage() for r in caplog.records)


def test_object_columns_fail_as_polars_pickling_does():
    frame = pl.DataFrame({"o": pl.Series([object()] * 3, dtype=pl.Object)})
    with pytest.raises(pl.exceptions.ComputeError) as expected:
        pickle.dumps(frame)
    with pytest.raises(_codec.UnencodableError) as got:  # then the pool's own pickling says it
        _codec.encode(frame)
    assert str(got.value.__cause__) == str(expected.value)


def _maybe_unnamed(frame: pl.DataFrame) -> pl.DataFrame:
    # polars' generator never names a column "" (finding 4): the last one is.
    return frame.rename({frame.columns[-1]: ""}) if frame.width % 2 else frame


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(dataframes(max_cols=6, max_size=20, excluded_dtypes=[pl.Object]).map(_maybe_unnamed))
def test_generated_frames_roundtrip_exactly(frame):
    assert_exact(roundtrip(frame)[0], frame)


def test_a_column_named_empty_keeps_its_name():
    """Issue 12 review, finding 4: it came back as "column_0"."""
    frame = pl.DataFrame({"": range(N), "b": range(N)})
    assert roundtrip(frame)[0].columns == ["", "b"]


def test_read_only_memory_is_never_written_through_polars():
    frame = pl.DataFrame({"a": np.arange(100), "s": [str(i) for i in range(100)]})
    with published(frame) as name:
        got, mapping = decode(name)  # a read-only mapping: a write into it would crash
        got[0, "a"] = 99
        series = got["a"]
        series.scatter([1], [77])
        assert (got[0, "a"], series[1]) == (99, 77)
        again, _ = decode(name)
        assert_exact(again, frame)


def test_task_view_isolates_in_place_changes():
    frame = pl.DataFrame({"a": np.arange(10), "b": np.ones(10)})
    cached, _ = roundtrip(frame)
    view = _codec.task_view(cached)
    view.columns = ["x", "y"]
    view.insert_column(0, pl.Series("z", range(10)))
    view.drop_in_place("y")
    assert_exact(cached, frame)


FRAME_CHANGES = {
    "rename": lambda df: setattr(df, "columns", ["x", "b"]),
    "insert_column": lambda df: df.insert_column(0, pl.Series("z", range(len(df)))),
    "drop_in_place": lambda df: df.drop_in_place("b"),
    "extend": lambda df: df.extend(df.clone()),
    "vstack": lambda df: df.vstack(df.clone(), in_place=True),
    "replace_column-other-dtype": lambda df: df.replace_column(0, pl.Series("a", [0.5] * len(df))),
}


@pytest.mark.parametrize("change", FRAME_CHANGES.values(), ids=FRAME_CHANGES.keys())
def test_fingerprint_sees_in_place_changes_of_a_frame(change):
    frame = pl.DataFrame({"a": np.arange(10), "b": np.ones(10)})
    before = _codec.fingerprint(frame)
    change(frame)
    assert not _codec.same_fingerprint(before, _codec.fingerprint(frame))


SERIES_CHANGES = {
    "append": lambda s: s.append(s.clone()),
    "sort": lambda s: s.sort(descending=True, in_place=True),
}


@pytest.mark.parametrize("change", SERIES_CHANGES.values(), ids=SERIES_CHANGES.keys())
def test_fingerprint_sees_in_place_changes_of_a_series(change):
    series = pl.Series("a", np.arange(10))
    before = _codec.fingerprint(series)
    change(series)
    assert not _codec.same_fingerprint(before, _codec.fingerprint(series))


# -- through the pools ------------------------------------------------------------


def big_polars_frame(n: int = 150_000) -> pl.DataFrame:
    rng = np.random.default_rng(3)
    return pl.DataFrame(
        {
            "f": rng.standard_normal(n),
            "i": rng.integers(0, 10**9, n),
            "s": [f"row {i}" for i in range(n)],
            "e": pl.Series(["lo", "hi"] * (n // 2), dtype=pl.Enum(["lo", "mid", "hi"])),
            "t": pl.datetime_range(dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 1) + dt.timedelta(seconds=n - 1),
                                   "1s", time_zone="America/New_York", eager=True),
        }
    )


def identity(obj):
    return obj


def describe(obj):
    return obj.schema if isinstance(obj, pl.DataFrame) else obj.dtype, obj.height if isinstance(obj, pl.DataFrame) else len(obj)


def test_executor_shares_polars_objects_exactly(mp_context, no_leaks):
    frame = big_polars_frame()
    series = frame["f"]
    assert _codec.nbytes(series) > 1 << 20
    before = sharedexec.stats()["publications"]
    with sharedexec.ProcessPoolExecutor(1, mp_context=mp_context) as executor:
        seen = list(executor.map(describe, [frame, frame, series]))
        back = executor.submit(identity, frame).result()  # and home again, through a result segment
    assert seen == [describe(frame), describe(frame), describe(series)]
    assert sharedexec.stats()["publications"] - before == 2  # the frame once, the series once
    assert_exact(back, frame)


_FORK_SCRIPT = """
import multiprocessing, sys, warnings
import numpy as np, polars as pl
import sharedexec

def height(df):
    return df.height

if __name__ == "__main__":
    frame = pl.DataFrame({"a": np.arange(300_000), "e": pl.Series(["x", "y"] * 150_000, dtype=pl.Enum(["x", "y"]))})
    frame.sort("a")  # starts polars' thread pool in this process
    ctx = multiprocessing.get_context(sys.argv[1])
    with sharedexec.ProcessPoolExecutor(1, mp_context=ctx) as executor:
        print(executor.submit(height, frame).result(timeout=60))
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_decoding_never_hangs_and_a_forked_worker_warns(tmp_path, method):
    script = tmp_path / "fork_polars.py"
    script.write_text(textwrap.dedent(_FORK_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "300000"
    warned = "pool does not survive fork()" in done.stderr
    assert warned == (method == "fork"), done.stderr


def test_fork_detection_reads_polars_pool_threads():
    pl.DataFrame({"a": np.arange(200_000)}).sort("a")
    assert _codec._polars_pool_running()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(_forked_flag) is True


def _forked_flag():
    return _codec.forked_with_polars_pool


def test_a_clone_after_a_value_write_copies_only_the_changed_column(no_leaks):
    from sharedexec import _registry

    registry = _registry.REGISTRY
    frame = pl.DataFrame({"a": np.arange(200_000), "b": np.ones(200_000), "s": [f"s{i}" for i in range(200_000)]})
    first = registry.publish(frame)
    frame[0, "a"] = 99
    before = dict(registry.counters)
    clone = frame.clone()
    second = registry.publish(clone)
    assert second is not first
    copied = registry.counters["bytes_copied"] - before["bytes_copied"]
    reused = registry.counters["bytes_reused"] - before["bytes_reused"]
    assert copied == 200_000 * 8 and reused > 200_000 * 8
    got = _publication_read(second)
    assert_exact(got, clone)
    del frame, clone, got, first, second


def _publication_read(pub):
    from sharedexec import _publication, _registry

    return _publication.read(pub.mapping, lambda name: _registry.REGISTRY._by_name[name].mapping)


def test_share_returns_a_polars_frame_backed_by_shared_memory(no_leaks):
    frame = big_polars_frame()
    shared = sharedexec.share(frame)
    assert_exact(shared, frame)
    with sharedexec.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as executor:
        assert executor.submit(describe, shared).result() == describe(frame)
    del shared
