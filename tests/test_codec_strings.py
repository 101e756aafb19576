"""Object arrays of strings in Arrow's layout (``sharedexec._codec_strings``).

The reference is the stdlib: ``pickle.loads(pickle.dumps(obj))``. By default a
decoded object is identical to it (``tests/_exact.py``: element types, missing
values, order, flags), whether or not the codec took the Arrow path; the Arrow
path is taken exactly when every element is ``str`` or one missing value
(``None``, or ``np.nan`` itself), and then the strings are out of band (the
layout is small). With ``strings="arrow"`` a frame's or Series' such columns
come back as pandas' Arrow-backed ``str`` dtype, on top of the segment.
"""

from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("pyarrow")
import sharedexec  # noqa: E402
from sharedexec import _codec  # noqa: E402

from ._exact import assert_identical  # noqa: E402
from .test_codec import decode, published  # noqa: E402

N = 3000  # above the size where values that repeat are stored once


def reference(obj):
    return pickle.loads(pickle.dumps(obj))


def exact_roundtrip(obj, strings: str = "exact"):
    with published(obj) as name, _codec.strings_as(strings):
        return decode(name)


def arrow_path(obj) -> bool:
    """Whether the strings went out of band: in Arrow's layout, and no
    string pickled into the layout."""
    layout, _ = _codec.encode(obj)
    return b"_codec_strings" in layout and b"user-" not in layout and b"city-" not in layout


def _distinct(n: int = N) -> list[str]:
    return [f"user-{i:09d}-é" for i in range(n)]


CASES = {
    "distinct": lambda: np.array(_distinct(), dtype=object),
    "repeated": lambda: np.array([f"city-{i % 7}" for i in range(N)], dtype=object),
    "with-None": lambda: np.array([None if i % 5 == 0 else s for i, s in enumerate(_distinct())], dtype=object),
    "with-np.nan": lambda: np.array([np.nan if i % 5 == 0 else s for i, s in enumerate(_distinct())], dtype=object),
    "repeated-with-None": lambda: np.array([None if i % 3 == 0 else f"c{i % 4}" for i in range(N)], dtype=object),
    "empty-strings-and-nul": lambda: np.array(["", "\0", "a\0b", "😀", "\u00e9"] * (N // 5), dtype=object),
    "2-D-C": lambda: np.array(_distinct(), dtype=object).reshape(3, -1),
    "2-D-F": lambda: np.asfortranarray(np.array(_distinct(), dtype=object).reshape(3, -1)),
    "strided": lambda: np.array(_distinct(), dtype=object)[::3],
    "0-d": lambda: np.array("alone", dtype=object),
}

NOT_TAKEN = {
    "np.str_": lambda: np.array([np.str_(s) for s in _distinct()], dtype=object),
    "a str subclass among str": lambda: np.array(_distinct()[:-1] + [np.str_("x")], dtype=object),
    "None and np.nan": lambda: np.array([None, np.nan] + _distinct()[2:], dtype=object),
    "another NaN": lambda: np.array([float("nan")] + _distinct()[1:], dtype=object),
    "bytes": lambda: np.array([b"x"] + _distinct()[1:], dtype=object),
    "lone surrogate": lambda: np.array(["\ud800"] + _distinct()[1:], dtype=object),
    "no string at all": lambda: np.array([None] * N, dtype=object),
    "empty": lambda: np.empty(0, dtype=object),
}


CONTAINERS = [(case, "ndarray") for case in CASES] + [
    (case, container) for case in CASES if CASES[case]().ndim == 1 for container in ("series", "frame")
]


@pytest.mark.parametrize("case, container", CONTAINERS, ids=[f"{c}-{k}" for c, k in CONTAINERS])
def test_all_string_arrays_take_the_arrow_path_and_come_back_exactly(case, container):
    values = CASES[case]()
    if container != "ndarray":
        values = pd.Series(values, dtype=object, name="s")
        if container == "frame":
            values = pd.DataFrame({"s": values, "t": values.copy(), "n": np.arange(len(values))})
    assert arrow_path(values)
    got, _ = exact_roundtrip(values)
    assert_identical(got, reference(values), mmap_mode="r")


@pytest.mark.parametrize("make", NOT_TAKEN.values(), ids=NOT_TAKEN.keys())
def test_other_object_arrays_are_pickled_and_come_back_exactly(make):
    values = make()
    frame = pd.DataFrame({"o": pd.Series(values, dtype=object)})
    assert not arrow_path(values)
    for obj in (values, frame):
        got, _ = exact_roundtrip(obj)
        assert_identical(got, reference(obj), mmap_mode="r")


def test_values_that_repeat_share_one_object_each():
    frame = pd.DataFrame({"c": pd.Series([f"city-{i % 7}" for i in range(100_000)], dtype=object)})
    assert frame["c"].dtype == object
    got, _ = exact_roundtrip(frame)
    assert len({id(v) for v in got["c"].to_numpy()}) == 7


_elements = st.one_of(
    st.text(max_size=8),
    st.text(max_size=8),
    st.none(),
    st.just(np.nan),
    st.floats(allow_nan=True),
    st.builds(np.str_, st.text(max_size=3)),
    st.binary(max_size=3),
    st.integers(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_elements, min_size=1, max_size=6), min_size=1, max_size=40), st.booleans())
def test_generated_object_columns_roundtrip_exactly(rows, fortran):
    # Columns of strings with now and then something else: a block of several columns.
    width = len(rows[0])
    rows = [(row * width)[:width] for row in rows]
    frame = pd.DataFrame(np.array(rows, dtype=object, order="F" if fortran else "C"), dtype=object)
    got, _ = exact_roundtrip(frame)
    assert_identical(got, reference(frame), mmap_mode="r")
    array = frame.to_numpy()
    assert_identical(exact_roundtrip(array)[0], reference(array), mmap_mode="r")


# -- strings="arrow" ------------------------------------------------------------------


def _arrow_frame(n: int = N) -> pd.DataFrame:
    strings = _distinct(n)
    return pd.DataFrame(
        {
            "s": pd.Series(strings, dtype=object),
            "f": np.arange(n, dtype=float),
            "none": pd.Series([None if i % 4 == 0 else s for i, s in enumerate(strings)], dtype=object),
            "nan": pd.Series([np.nan if i % 4 == 0 else s for i, s in enumerate(strings)], dtype=object),
            "mixed": pd.Series([i if i % 2 else s for i, s in enumerate(strings)], dtype=object),
        }
    ).set_axis(pd.Index([f"r{i}" for i in range(n)], dtype=object))


def _segment_range(mapping) -> tuple[int, int]:
    start = np.frombuffer(mapping.view, np.uint8).ctypes.data
    return start, start + mapping.size


def test_strings_arrow_gives_arrow_backed_str_columns_in_the_segment():
    frame = _arrow_frame()
    with published(frame) as name, _codec.strings_as("arrow"):
        got, mapping = decode(name)
        start, end = _segment_range(mapping)
        expected = frame.astype({"s": "str", "none": "str", "nan": "str"})
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
        assert list(got.columns) == list(frame.columns)
        assert got["mixed"].dtype == object and got.index.dtype == object  # only all-string columns
        for column in ("s", "none", "nan"):
            buffers = [b for c in got[column].array._pa_array.chunks for b in c.buffers() if b is not None]
            assert buffers and all(start <= b.address < end for b in buffers), column
        series, _ = decode(name)  # the same segment, exact again outside the block
    assert got["s"].dtype == pd.Series(["a"], dtype="str").dtype
    series_got, _ = exact_roundtrip(frame["none"], strings="arrow")
    pd.testing.assert_series_equal(series_got, frame["none"].astype("str"), check_exact=True)


def test_strings_arrow_leaves_indexes_and_arrays_exact():
    array = np.array(_distinct(), dtype=object)
    index = pd.Index(_distinct(), dtype=object)
    for obj in (array, index):
        got, _ = exact_roundtrip(obj, strings="arrow")
        assert_identical(got, reference(obj), mmap_mode="r")


def test_strings_option_is_checked():
    with pytest.raises(ValueError, match="strings must be 'exact'.* or 'arrow'"):
        sharedexec.ProcessPoolExecutor(1, strings="pyarrow")


# -- through the pools ----------------------------------------------------------------


def column_kinds(df: pd.DataFrame) -> tuple:
    return [str(d) for d in df.dtypes], [type(v).__name__ for v in df["none"].iloc[:5]], df["s"].iloc[7]


def big_object_frame() -> pd.DataFrame:
    frame = _arrow_frame(60_000)
    assert _codec.nbytes(frame) > 1 << 20
    return frame


def test_executor_strings_option(mp_context, no_leaks):
    frame = big_object_frame()
    exact = column_kinds(reference(frame))
    arrow = column_kinds(frame.astype({"s": "str", "none": "str", "nan": "str"}))
    with sharedexec.ProcessPoolExecutor(1, mp_context=mp_context) as executor:
        assert executor.submit(column_kinds, frame).result() == exact
    with sharedexec.ProcessPoolExecutor(1, mp_context=mp_context, strings="arrow") as executor:
        assert [executor.submit(column_kinds, frame).result() for _ in range(2)] == [arrow, arrow]


def test_one_worker_keeps_both_ways_of_decoding_apart(no_leaks):
    # Two decorated functions, one pool: the same segment, decoded both ways in one worker.
    frame = big_object_frame()
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        arrow = pool.apply(sharedexec.shared(column_kinds, strings="arrow"), (frame,))
        exact = pool.apply(sharedexec.shared(column_kinds), (frame,))
        arrow_again = pool.apply(sharedexec.shared(column_kinds, strings="arrow"), (frame,))
    assert exact == column_kinds(reference(frame))
    assert arrow == arrow_again == column_kinds(frame.astype({"s": "str", "none": "str", "nan": "str"}))


def test_the_parent_keeps_no_copy_of_the_strings(no_leaks):
    # The Arrow layout is built for the copy into the segment only: the
    # registry, which remembers the memory it copied, must not keep it alive.
    import gc

    import pyarrow as pa

    from sharedexec import _registry

    frame = big_object_frame()
    pub = _registry.REGISTRY.publish(frame)
    gc.collect()
    held = [entry.owner() for entry in _registry.REGISTRY._buffers.values() if entry.holder is pub]
    # (the Arrow-backed column labels are the frame's own: a few bytes)
    assert held and sum(h.size for h in held if isinstance(h, pa.Buffer)) < 1000
    del frame, pub
