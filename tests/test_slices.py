"""Slices travel as views (issue 15).

A slice -- rows, columns or both; ``iloc``, ``loc`` on a sorted index,
``head``/``tail``, a Series slice, an Arrow slice -- of anything already in a
segment (an object returned by ``share()``, or one published for an earlier
task) names the bytes it needs in that segment: nothing is copied. A slice of
a frame never published copies its own bytes only (for Arrow strings: its part
of the value buffer, not the whole column), so a partition copies at most the
frame once. What the worker rebuilds is exactly the slice.
"""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharedexec
from sharedexec import _codec, _registry, _segment, _store
from sharedexec._sharing import Options, SharedTask, install_hooks

from . import _exact as exact
from . import _sharing_tasks as tasks
from .conftest import WRITABLE

pa = pytest.importorskip("pyarrow")
install_hooks()

ROWS = 40_000
ALIGNMENT = 64 * 8  # a segment aligns each buffer to 64 bytes


@pytest.fixture
def registry(monkeypatch):
    """A private registry, as the reducer's (whatever a test leaves is unlinked)."""
    reg = _registry.Registry()
    monkeypatch.setattr(_registry, "REGISTRY", reg)
    yield reg
    for name in [*reg._by_name, *([reg._board.name] if reg._board else [])]:
        _segment.retire(name)


def numpy_frame(rows: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {"f": rng.random(rows), "g": rng.random(rows), "i": rng.integers(0, 9, rows), "t": pd.date_range("2020", periods=rows, freq="s")},
        index=pd.RangeIndex(0, 2 * rows, 2),
    )


def extension_frame(rows: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({
        "n": pd.array(rng.integers(0, 9, rows), dtype="Int64"),
        "tz": pd.date_range("2020", periods=rows, freq="min", tz="Europe/Paris"),
        "c": pd.Categorical(rng.integers(0, 5, rows)),
        "b": pd.array(rng.integers(0, 2, rows) == 1, dtype="boolean"),
    })


def arrow_frame(rows: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    words = [f"word-{v:07d}" for v in rng.integers(0, 10**7, rows)]
    return pd.DataFrame({
        "s": pd.array(words, dtype=pd.StringDtype("pyarrow", na_value=np.nan)),
        "l": pd.array([[int(v), 1] for v in rng.integers(0, 9, rows)], dtype=pd.ArrowDtype(pa.list_(pa.int64()))),
        "x": rng.random(rows),
    })


FRAMES = {"numpy": numpy_frame, "extension": extension_frame, "arrow": arrow_frame}

SLICES: dict[str, Callable[[pd.DataFrame], Any]] = {
    "iloc-rows": lambda df: df.iloc[1000:13000],
    "loc-sorted-index": lambda df: df.loc[df.index[2000] : df.index[9000]],
    "head-view": lambda df: df[:5000],
    "tail-view": lambda df: df.iloc[-7000:],
    "columns": lambda df: df[[df.columns[0], df.columns[2]]],
    "rows-and-columns": lambda df: df.iloc[3000:20000, [1, 2]],
    "series-slice": lambda df: df[df.columns[0]].iloc[500:30000],
}
# pandas >= 3.1's head() and tail() return copies (``self.iloc[:n].copy()``):
# new frames, sent like any other, copying their own bytes once.
COPIES: dict[str, Callable[[pd.DataFrame], Any]] = {"head": lambda df: df.head(5000), "tail": lambda df: df.tail(7000)}


def send(obj: Any) -> Any:
    """``obj`` pickled into a task and rebuilt, as a worker would."""
    payload = ForkingPickler.dumps((SharedTask(tasks.describe, Options(min_bytes=0)), obj))
    return pickle.loads(payload)[1]


def copied(registry: _registry.Registry, obj: Any) -> tuple[int, Any]:
    """The bytes sending ``obj`` copies into shared memory, and what arrives."""
    before = registry.counters["bytes_copied"]
    got = send(obj)
    return registry.counters["bytes_copied"] - before, got


@pytest.mark.parametrize("cut", SLICES.values(), ids=SLICES.keys())
@pytest.mark.parametrize("make", FRAMES.values(), ids=FRAMES.keys())
@pytest.mark.parametrize("source", ["shared", "published"])
def test_a_slice_of_data_already_in_shared_memory_copies_nothing(registry, make, cut, source):
    frame = make()
    if source == "shared":
        frame = registry.share(frame)
    else:
        send(frame)  # published for an earlier task; the caller keeps the frame
    piece = cut(frame)
    nbytes, got = copied(registry, piece)
    if source == "published" and make is extension_frame:
        # The numpy arrays inside extension arrays may have been written in
        # place since (no copy-on-write reference sees it): only memory that
        # provably kept its bytes is reused (issue 12 review, finding 3).
        assert nbytes <= _codec.nbytes(piece) + ALIGNMENT
    else:
        # A column subset has new labels (pandas takes them): a few bytes, copied.
        new_labels = piece.columns if piece.ndim == 2 and not piece.columns.equals(frame.columns) else None
        assert nbytes == 0 or nbytes <= new_labels.nbytes + 3 * 64
    exact.assert_identical(got, piece, mmap_mode="r")


def stdlib(obj: Any) -> Any:
    """What a stdlib worker receives: a compact copy of a slice (strides and
    Arrow offsets are how the caller holds it, not what it holds)."""
    return pickle.loads(ForkingPickler.dumps(obj))


@pytest.mark.parametrize("cut", [*SLICES.values(), *COPIES.values()], ids=[*SLICES, *COPIES])
@pytest.mark.parametrize("make", FRAMES.values(), ids=FRAMES.keys())
def test_a_slice_of_a_frame_never_published_copies_its_own_bytes(registry, make, cut):
    piece = cut(make())
    nbytes, got = copied(registry, piece)
    assert 0 < nbytes <= _codec.nbytes(piece) + ALIGNMENT  # its data, not the whole columns
    exact.assert_identical(got, stdlib(piece), mmap_mode="r")


@pytest.mark.parametrize("writable", WRITABLE)
def test_rows_of_a_block_go_into_the_segment_without_a_compact_copy(registry, monkeypatch, writable):
    """The rows of a 2-D block slice (``df.iloc[a:b]`` of a frame never
    published) are one buffer whose rows are written one after another
    (``pwritev``): no compact copy is made first, whose fresh pages cost as
    much as the segment's own. Where the store cannot be written to (macOS),
    the copy through the mapping compacts them first."""
    monkeypatch.setattr(_store.TmpfsStore, "writable", writable)
    monkeypatch.setattr(_store.PosixStore, "writable", writable)
    frame = numpy_frame()
    block = frame._mgr.blocks[0].values
    assert block.ndim == 2 and block.flags.c_contiguous  # (pandas' consolidated layout)
    # (reversed rows are not contiguous: compacted, as before)
    for piece, viewed in [(frame.iloc[1000:13000], True), (frame.iloc[3:4], True), (frame.iloc[::-1].iloc[5:7000], False)]:
        _, buffers = _codec.encode(piece)
        views = [np.asarray(_codec.raw_view(buf)) for buf in buffers]
        assert any(np.shares_memory(view, block) for view in views) is viewed
        nbytes, got = copied(registry, piece)
        assert 0 < nbytes <= _codec.nbytes(piece) + ALIGNMENT
        exact.assert_identical(got, stdlib(piece), mmap_mode="r")


def test_short_rows_are_written_in_chunks_not_one_by_one(registry, monkeypatch):
    """``X[:, :2]`` of a tall (N, 4) array: N rows of 16 bytes. An iovec a
    row cost 70x the time of a compact copy and an ndarray a row 1 GB for
    2M rows; they are compacted a chunk at a time (a bounded scratch) and
    written in a few calls."""
    monkeypatch.setattr(_segment, "_SCRATCH_BYTES", 64 << 10)  # several chunks, one part-filled
    calls = []
    real = _segment.os.pwritev
    monkeypatch.setattr(_segment.os, "pwritev", lambda fd, iov, offset: calls.append(len(iov)) or real(fd, iov, offset))
    part = np.random.default_rng(0).random((20_001, 4))[:, :2]
    _, got = copied(registry, part)
    exact.assert_identical(got, stdlib(part), mmap_mode="r")
    if _segment.current_store().writable:
        assert 0 < sum(calls) < 100, calls  # (an iovec a row: 20 001)


ROW_DTYPES = ["float64", "int8", "uint16", "complex128", "bool", "datetime64[ns]", "timedelta64[s]", ">i4", "S3", "V5",
              np.dtype([("a", "i2"), ("b", "f8")])]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(ROW_DTYPES),
    shape=st.tuples(st.integers(1, 5), st.integers(1, 300)),
    bounds=st.tuples(st.integers(0, 300), st.integers(0, 300)),
    step=st.sampled_from([1, 1, 2]),
    memmap=st.booleans(),
)
def test_row_slices_of_2d_arrays_arrive_exactly(registry, dtype, shape, bounds, step, memmap):
    """Rows of a 2-D array (contiguous rows: written row by row; other
    strides: compacted) arrive as the stdlib sends them, whatever the dtype."""
    whole = np.frombuffer(np.random.default_rng(0).bytes(shape[0] * shape[1] * np.dtype(dtype).itemsize), dtype=dtype)
    whole = whole.reshape(shape).copy()
    if memmap:
        whole = whole.view(np.memmap)
    piece = whole[:, min(bounds) : max(bounds) : step]
    _, got = copied(registry, piece)
    exact.assert_identical(got, stdlib(piece), mmap_mode="r")


def test_rows_of_a_block_are_not_mistaken_for_a_flat_buffer_at_the_same_address(registry):
    """The rows of a block slice and a flat array starting at the same
    address with as many bytes are different bytes: each gets its own."""
    base = np.arange(2 * 40_000, dtype=np.float64).reshape(2, 40_000)
    piece = pd.DataFrame(base.T, copy=False).iloc[:20_000]
    assert piece._mgr.blocks[0].values.__array_interface__["data"][0] == base.__array_interface__["data"][0]
    piece.attrs["flat"] = base.ravel()[:40_000]  # same start, same size
    nbytes, got = copied(registry, piece)
    exact.assert_identical(got, stdlib(piece), mmap_mode="r")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(["float64", "int8", ">i4", "datetime64[ns]"]),
    rows=st.integers(1, 50),
    start=st.integers(0, 3),
    width=st.integers(1, 3),
    steps=st.lists(st.integers(1, 3), min_size=2, max_size=4),
    row_slice=st.booleans(),
)
def test_blocks_over_the_same_memory_with_other_strides_arrive_exactly(
    registry, dtype, rows, start, width, steps, row_slice
):
    """Blocks of one frame that are views of one block with other column
    steps (``concat([df.iloc[:, 0:2], df.iloc[:, 0:4:2]], axis=1)``) start at
    the same address with as many bytes, and hold other bytes: each arrives
    with its own values, in the frame and in a row slice of it."""
    values = np.frombuffer(np.random.default_rng(0).bytes(rows * 10 * np.dtype(dtype).itemsize), dtype=dtype)
    base = pd.DataFrame(values.reshape(rows, 10))
    frame = pd.concat([base.iloc[:, start : start + width * step : step] for step in steps], axis=1)
    piece = frame.iloc[rows // 3 :] if row_slice else frame
    _, got = copied(registry, piece)
    exact.assert_identical(got, stdlib(piece), mmap_mode="r")


@pytest.mark.parametrize("cut", COPIES.values(), ids=COPIES.keys())
def test_head_and_tail_of_a_shared_frame_copy_their_own_bytes(registry, cut):
    piece = cut(registry.share(arrow_frame()))
    nbytes, got = copied(registry, piece)
    assert 0 < nbytes <= _codec.nbytes(piece) + ALIGNMENT
    pd.testing.assert_frame_equal(got, piece, check_exact=True)


@pytest.mark.parametrize("make", FRAMES.values(), ids=FRAMES.keys())
def test_a_partition_copies_the_frame_at_most_once(registry, make):
    frame = make()
    edges = np.linspace(0, len(frame), 9, dtype=int)
    total = 0
    for a, b in zip(edges, edges[1:]):
        nbytes, got = copied(registry, frame.iloc[a:b])
        exact.assert_identical(got, stdlib(frame.iloc[a:b]), mmap_mode="r")
        total += nbytes
    assert total <= _codec.nbytes(frame) + 8 * ALIGNMENT


@pytest.mark.parametrize("make", [pa.array, pa.chunked_array, lambda v: pa.table({"v": v}), lambda v: pa.record_batch({"v": v})],
                         ids=["array", "chunked", "table", "batch"])
def test_arrow_slices_share_buffers_or_copy_their_part(registry, make):
    values = [f"value-{i:08d}" for i in range(ROWS)]
    whole = make([values[: ROWS // 2], values[ROWS // 2 :]] if make is pa.chunked_array else values)
    piece = whole.slice(1000, 5000)
    nbytes, got = copied(registry, piece)
    assert 0 < nbytes <= piece.nbytes + ALIGNMENT
    assert got.equals(piece)  # (a compact copy: offset 0)
    shared = registry.share(whole)
    nbytes, got = copied(registry, shared.slice(1000, 5000))
    assert nbytes == 0 and got.equals(piece)


def test_stats_show_no_copy_for_chunks_of_a_shared_frame():
    shared = sharedexec.share(arrow_frame())
    before = sharedexec.stats()
    with sharedexec.ProcessPoolExecutor(2, min_bytes=0) as ex:
        pieces = [shared.iloc[a : a + 10_000] for a in range(0, ROWS, 10_000)]
        got = list(ex.map(tasks.columns_of, pieces, [list(shared.columns)] * len(pieces)))
    after = sharedexec.stats()
    assert after["bytes_copied"] == before["bytes_copied"]
    assert after["publications"] - before["publications"] == len(pieces)
    for result, piece in zip(got, pieces):
        exact.assert_identical(result, stdlib(piece))


def test_workers_receive_slices_exactly(mp_context):
    index = numpy_frame().index
    frame = pd.DataFrame({**numpy_frame(), **extension_frame().set_index(index), **arrow_frame().set_index(index)}, index=index)
    shared = sharedexec.share(frame)
    pieces = [frame.iloc[5000:17000, ::2], shared.iloc[100:20000], shared.tail(3000), shared["s"].iloc[7:9000]]
    with sharedexec.ProcessPoolExecutor(1, mp_context=mp_context, min_bytes=0) as ex:
        for piece in pieces:
            exact.assert_identical(ex.submit(tasks.itself, piece).result(), stdlib(piece))


def test_compact_copies_of_slices_are_not_kept_by_the_publisher(registry):
    frame = arrow_frame()
    piece = frame.iloc[1000:30000]
    before = pa.total_allocated_bytes()
    copied(registry, piece)
    assert pa.total_allocated_bytes() - before < 64 << 10  # the Arrow copies went once in the segment


def test_a_slice_under_copy_on_write_mapping_is_private_to_its_task():
    shared = sharedexec.share(numpy_frame())
    piece = shared.iloc[100:20000]
    with sharedexec.ProcessPoolExecutor(1, mmap_mode="c", min_bytes=0) as ex:
        seen = [ex.submit(tasks.write_first_block, piece).result() for _ in range(3)]
    assert seen == [float(piece._mgr.blocks[0].values[0, 0])] * 3
