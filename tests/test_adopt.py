"""Issue 18: ``adopt=True`` re-points a published frame at its shared copy.

The parent's frame must then behave exactly as its twin that was published
without adoption (the differential cases below), while its memory is the
segment's: checked by where each array's bytes are mapped (/proc/self/maps).
"""

from __future__ import annotations

import gc
import os
import pickle
import weakref

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sharedexec
from sharedexec import _adopt, _codec, _publication, _registry, _segment

from . import _lifetime_tasks as tasks
from ._exact import assert_identical
from ._tasks import wait_until
from .conftest import BACKEND, leaked_segments, write_while_copying

pytestmark = [
    pytest.mark.skipif(not _codec._pandas_copies_on_write(), reason="needs pandas Copy-on-Write"),
    pytest.mark.skipif(not _adopt.SUPPORTED, reason="adoption is Linux only"),
    pytest.mark.skipif(BACKEND == "posix", reason="adoption needs a private mapping of a segment: POSIX shared "
                       "memory (XNU) has none, nothing is adopted there (test_store checks that)"),
]


@pytest.fixture
def registry():
    reg = _registry.Registry()
    yield reg
    for name in [*reg._by_name, *([reg._board.name] if reg._board else [])]:
        _segment.retire(name)


def mapped_file(arr) -> tuple[str, str]:
    """(permissions, path) of the mapping holding ``arr``'s first byte."""
    address = np.asarray(arr).__array_interface__["data"][0] if not hasattr(arr, "address") else arr.address
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[1], fields[5] if len(fields) > 5 else ""
    raise AssertionError(f"{address:#x} is not mapped")


def memory_of(values) -> list:
    """The arrays (numpy) or buffers (Arrow) a block's values are made of."""
    if isinstance(values, np.ndarray):
        return [values]
    if hasattr(values, "_pa_array"):
        return [buf for chunk in values._pa_array.chunks for buf in chunk.buffers() if buf is not None and buf.size]
    return [getattr(values, name) for name in ("_ndarray", "_data", "_mask") if hasattr(values, name)]


def in_segment(values, name: str) -> bool:
    places = {mapped_file(part) for part in memory_of(values)}
    return places == {("rw-p", os.path.join(_segment.current_store().directory or "/dev/shm", name))}


def mixed_frame(rows: int = 20_000, seed: int = 0) -> pd.DataFrame:
    """One block of each kind adoption moves, and an object column it leaves."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"f": rng.random(rows), "g": rng.random(rows), "i": rng.integers(0, 9, rows)})
    df["ts"] = pd.date_range("2020-01-01", periods=rows, freq="s", tz="Europe/Paris")
    df["naive"] = pd.date_range("2021-01-01", periods=rows, freq="min")
    df["cat"] = pd.Categorical.from_codes(rng.integers(0, 3, rows), ["x", "y", "z"])
    df["n"] = pd.array(rng.integers(0, 5, rows), dtype="Int64")
    df.loc[3, "n"] = pd.NA
    df["s"] = pd.array([f"v{k}" for k in range(rows)], dtype="str")
    df["o"] = pd.Series([("t", k % 3) for k in range(rows)], dtype=object)
    df.attrs["unit"] = "m"
    return df


def test_every_kind_of_block_moves_and_the_frame_is_the_same(registry):
    df, twin = mixed_frame(), mixed_frame()
    pub = registry.publish(df, adopt=True)
    assert pub.adopted
    for blk in df._mgr.blocks:
        assert in_segment(blk.values, pub.name) is (blk.dtype != object), blk
    assert_identical(df, twin)  # dtypes, strides, flags (writeable), values, attrs


def test_without_adopt_nothing_moves(registry):
    df = mixed_frame()
    pub = registry.publish(df)
    assert not pub.adopted
    assert not any(in_segment(blk.values, pub.name) for blk in df._mgr.blocks)


def _series_view(df):
    return df["i"]


def _numpy_view(df):
    return df["i"].to_numpy()


def _extension_array(df):
    return df["i"].array


def _shallow_copy(df):
    return df.copy(deep=False)


@pytest.mark.parametrize(
    "holder, f_moves", [(_series_view, True), (_numpy_view, True), (_extension_array, True), (_shallow_copy, False)]
)
def test_memory_held_elsewhere_stays_where_it_is(registry, holder, f_moves):
    df = pd.DataFrame({"i": np.arange(300_000), "f": np.arange(300_000, dtype=float)})
    held = holder(df)  # noqa: F841 - alive while publishing
    pub = registry.publish(df, adopt=True)
    moved = {blk.dtype.kind: in_segment(blk.values, pub.name) for blk in df._mgr.blocks}
    assert moved == {"i": False, "f": f_moves}


def test_a_frame_over_a_users_array_stays_over_it(registry):
    arr = np.zeros((2, 300_000))
    df = pd.DataFrame(arr.T, copy=False)
    registry.publish(df, adopt=True)
    arr[0, 0] = 7.0  # the user's array and the frame are still one memory
    assert df.iloc[0, 0] == 7.0


def test_without_copy_on_write_nothing_moves(registry, monkeypatch):
    monkeypatch.setattr(_codec, "_pandas_copies_on_write", lambda: False)
    df = mixed_frame()
    pub = registry.publish(df, adopt=True)
    assert not pub.adopted


def test_the_originals_go_block_by_block(registry, monkeypatch):
    # The peak while publishing is the frame plus the block being copied:
    # when a buffer is reported copied, every earlier block's original is gone.
    df = pd.DataFrame({"a": np.arange(200_000, dtype=float)})
    for name in "bcd":
        df[name] = np.arange(200_000, dtype=float)  # a block each
    originals = [weakref.ref(blk.values) for blk in df._mgr.blocks]
    alive_at_copy = []
    copied = _adopt.Adoption.copied

    def spy(self, key, view):
        alive_at_copy.append(sum(ref() is not None for ref in originals))
        copied(self, key, view)

    monkeypatch.setattr(_adopt.Adoption, "copied", spy)
    registry.publish(df, adopt=True)
    assert alive_at_copy[:4] == [4, 3, 2, 1]  # (then the column labels' buffers)
    assert all(ref() is None for ref in originals)


# -- the parent's frame behaves as before: differential against a twin ---------


def op_loc_write(df):
    df.loc[5, "f"] = -1.5
    return df


def op_iloc_write(df):
    df.iloc[2, 2] = 4
    return df


def op_set_column(df):
    df["f"] = df["f"] * 2
    return df


def op_write_around_copy_on_write(df):
    df["f"].array[0] = 42.0  # goes into the parent's block (private pages)
    return df


def op_fillna_inplace(df):
    df.fillna({"n": 0}, inplace=True)
    return df


def op_view_write(df):
    s = df["f"]
    s.iloc[0] = 9.0  # Copy-on-Write: df unchanged
    return df, s


def op_copy(df):
    return df.copy()


def op_concat(df):
    return pd.concat([df, df.iloc[:10]])


def op_groupby(df):
    return df.groupby("cat", observed=True)[["f", "i", "n"]].sum()


def op_to_numpy(df):
    return df["f"].to_numpy(), df["i"].values, df[["f", "g"]].to_numpy()


def op_pickle(df):
    return pickle.loads(pickle.dumps(df, protocol=5))


def op_arrow_write(df):
    df.loc[1, "s"] = "written"
    return df


OPS = [op_loc_write, op_iloc_write, op_set_column, op_write_around_copy_on_write, op_fillna_inplace,
       op_view_write, op_copy, op_concat, op_groupby, op_to_numpy, op_pickle, op_arrow_write]


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__[3:])
def test_pandas_behaves_as_without_adoption(registry, op):
    df, twin = mixed_frame(), mixed_frame()
    assert registry.publish(df, adopt=True).adopted
    registry.publish(twin)
    assert_identical(op(df), op(twin))
    assert_identical(df, twin)


@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=4))
def test_any_sequence_of_operations_and_publications_behaves_as_without(ops):
    registry = _registry.Registry()
    try:
        df, twin = mixed_frame(2_000), mixed_frame(2_000)
        for op in ops:
            registry.publish(df, adopt=True)
            registry.publish(twin)
            assert_identical(op(df), op(twin))
            assert_identical(df, twin)
    finally:
        for name in list(registry._by_name):
            _segment.retire(name)


def test_a_written_block_alone_is_published_again_and_moves(registry):
    df = mixed_frame()
    first = registry.publish(df, adopt=True)
    copied = registry.counters["bytes_copied"]
    df.loc[0, "g"] = 3.0  # Copy-on-Write copies the float block (f, g) first
    second = registry.publish(df, adopt=True)
    assert second is not first and second.adopted and first in second.depends
    floats = next(blk for blk in df._mgr.blocks if blk.dtype == np.float64)
    # And the column labels, in 8 Arrow chunks (one per insertion): sent
    # combined, as pandas' pickle sends them -- a copy of 96 bytes.
    labels = df.columns.array._pa_array
    assert labels.num_chunks > 1
    combined = sum(buf.size for buf in labels.combine_chunks().buffers() if buf is not None)
    assert registry.counters["bytes_copied"] - copied == floats.values.nbytes + combined
    assert in_segment(floats.values, second.name)


def test_the_segment_lives_as_long_as_the_frame(registry):
    df = mixed_frame()
    name = registry.publish(df, adopt=True).name
    registry.collect()
    assert name in registry._by_name  # no lease, nobody maps it: still the frame's memory
    del df
    gc.collect()
    registry.collect()
    assert name not in registry._by_name
    wait_until(lambda: not mapped(name), limit=5)  # unmapped: the memory is back
    # (the collector thread may hold the publication, and its mapping, for a moment)


def mapped(name: str) -> list[str]:
    gc.collect()
    with open("/proc/self/maps") as f:
        return [line for line in f if name in line]


# -- through the entry points ------------------------------------------------------


def test_executor_tasks_see_the_frame_and_later_writes(mp_context, no_leaks):
    df, twin = mixed_frame(50_000), mixed_frame(50_000)
    with (
        sharedexec.ProcessPoolExecutor(1, mp_context=mp_context, adopt=True) as ex,
        sharedexec.ProcessPoolExecutor(1, mp_context=mp_context) as without,
    ):
        assert_identical(ex.submit(tasks.head, df).result(), without.submit(tasks.head, twin).result())
        df.loc[0, "f"] = twin.loc[0, "f"] = -2.0
        assert_identical(ex.submit(tasks.head, df).result(), without.submit(tasks.head, twin).result())
    assert_identical(df, twin)
    pub = _registry.REGISTRY.find(df)
    assert pub is not None and pub.adopted and in_segment(df._mgr.blocks[0].values, pub.name)
    assert pub.name in _registry.REGISTRY._by_name  # the pool is gone, the frame lives
    del df
    assert leaked_segments() == []


def test_joblib_and_the_decorator_adopt_too():
    import joblib

    df = mixed_frame(50_000)
    backend = sharedexec.JoblibBackend(adopt=True)
    assert joblib.Parallel(n_jobs=1 + 1, backend=backend)(joblib.delayed(len)(df) for _ in range(2)) == [len(df)] * 2
    assert _registry.REGISTRY.find(df).adopted
    other = mixed_frame(50_000)
    with mp_pool() as pool:
        assert pool.map(tasks.shared_len_adopting, [other] * 2) == [len(other)] * 2
    assert _registry.REGISTRY.find(other).adopted


def mp_pool():
    import multiprocessing

    return multiprocessing.get_context("forkserver").Pool(1)


def test_sent_elsewhere_the_frame_goes_by_value():
    import multiprocessing

    df, twin = mixed_frame(50_000), mixed_frame(50_000)
    with sharedexec.ProcessPoolExecutor(1, adopt=True) as ex:
        ex.submit(len, df).result()
    assert _registry.REGISTRY.find(df).adopted
    with multiprocessing.get_context("forkserver").Pool(1) as pool:  # not a sharedexec task
        assert_identical(pool.apply(tasks.identity, (df,)), pool.apply(tasks.identity, (twin,)))
    assert len(pickle.dumps(df)) > _codec.nbytes(df)


def test_adopt_must_be_a_bool():
    with pytest.raises(ValueError, match="adopt must be True or False"):
        sharedexec.ProcessPoolExecutor(1, adopt="yes")


def test_share_adopting_returns_the_frame_itself_now_in_shared_memory(mp_context):
    df, twin = mixed_frame(50_000), mixed_frame(50_000)
    assert sharedexec.share(df, adopt=True) is df
    twin = sharedexec.share(twin)
    pub = _registry.REGISTRY.shared_publication(df)
    assert pub.adopted and in_segment(df._mgr.blocks[0].values, pub.name)
    df.loc[0, "f"] = twin.loc[0, "f"] = 5.0  # writable through pandas, published again (and adopted)
    queue = mp_context.Queue()
    queue.put(df)  # travels as a handle, as any share()d object
    queue.put(twin)
    assert_identical(queue.get(timeout=60).head(3), queue.get(timeout=60).head(3))
    assert _registry.REGISTRY.shared_publication(df).adopted


def test_a_write_during_the_copy_stays_in_the_frame(registry, monkeypatch):
    """Another thread's write into a block already copied, before it moves:
    the block is not the guarded one any more; the frame keeps the write, and
    the next publication sends it."""
    df = mixed_frame()
    write_while_copying(monkeypatch, lambda: df.loc.__setitem__((0, "f"), 7.0), adopt=True)
    first = registry.publish(df, adopt=True)
    monkeypatch.undo()
    assert df.loc[0, "f"] == 7.0
    second = registry.publish(df, adopt=True)
    assert second is not first and _publication.read(second.mapping, lambda name: registry._by_name[name].mapping).loc[0, "f"] == 7.0
