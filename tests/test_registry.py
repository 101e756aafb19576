"""The publishing side: publish once, republish on change, share storage, leases."""

from __future__ import annotations

import gc
import os
import pickle

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharedexec
from sharedexec import _publication, _registry, _segment

from .conftest import owned_segments, write_while_copying

# Derived frames reuse their parent's blocks through pandas' copy-on-write.
needs_copy_on_write = pytest.mark.skipif(int(pd.__version__.split(".")[0]) < 3, reason="pandas < 3: no copy-on-write")


@pytest.fixture
def registry():
    """A private registry, so counts don't depend on other tests; whatever a
    test leaves in it is unlinked afterwards."""
    reg = _registry.Registry()
    yield reg
    for name in [*reg._by_name, *([reg._board.name] if reg._board else [])]:
        _segment.retire(name)


def frame(rows=50_000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.random(rows), "b": rng.integers(0, 9, rows), "s": rng.choice(["x", "y"], rows)})


def test_same_object_is_published_once(registry):
    df = frame()
    first = registry.publish(df)
    assert all(registry.publish(df) is first for _ in range(100))
    assert registry.counters["publications"] == 1 and registry.counters["reuse_hits"] == 100


@pytest.mark.parametrize(
    "change",
    [
        lambda df: df.__setitem__("a", df["a"] + 1),  # replaced column
        lambda df: df.__setitem__("new", 1),  # added column
        lambda df: setattr(df, "index", pd.RangeIndex(len(df)) + 5),  # reassigned index
        lambda df: df.attrs.__setitem__("k", "v"),  # attrs
        lambda df: df.pop("b"),  # in-place structural change
    ],
    ids=["replace-column", "add-column", "reassign-index", "attrs", "pop-column"],
)
def test_structural_change_republishes(registry, change):
    df = frame()
    first = registry.publish(df)
    change(df)
    second = registry.publish(df)
    assert second is not first and registry.counters["publications"] == 2


@needs_copy_on_write
def test_a_write_during_the_first_copy_is_seen_by_the_next_task(registry, monkeypatch):
    """Another thread's write while a frame is copied for the first time: the
    next publication sends it, as a stdlib worker gets it (the write guard
    and the identities are taken before the copy)."""
    df = frame()
    write_while_copying(monkeypatch, lambda: df.loc.__setitem__((0, "a"), 7.0), adopt=False)
    first = registry.publish(df)
    monkeypatch.undo()
    second = registry.publish(df)
    assert second is not first and _decoded(registry, second).loc[0, "a"] == 7.0


@pytest.mark.parametrize(
    "rename",
    [
        lambda a: setattr(a.dtype, "names", ("lon", "lat")),
        lambda a: setattr(a.dtype["lat"], "names", ("deg", "min")),  # a nested field's dtype
    ],
    ids=["fields", "nested-fields"],
)
def test_renaming_the_fields_of_a_structured_array_republishes(registry, rename):
    """``dtype.names = ...`` changes the dtype object in place: the next task
    gets the new names, as a stdlib worker does."""
    arr = np.zeros(1000, dtype=[("x", "f8"), ("lat", [("d", "i4"), ("m", "i4")])])
    first = registry.publish(arr)
    rename(arr)
    second = registry.publish(arr)
    assert second is not first
    assert _decoded(registry, second).dtype == pickle.loads(pickle.dumps(arr)).dtype


@needs_copy_on_write
@needs_copy_on_write
def test_an_unchanged_frame_is_found_again_without_looking_at_its_blocks(registry, monkeypatch):
    """Issue 15: the per-task check of a wide frame is O(1). Its blocks'
    arrays are looked at again only after pandas gave an existing Block a new
    array (``replace(inplace=True)`` column by column: the one write that
    keeps the manager and the block tuple), which is then seen."""
    from sharedexec import _codec

    df = pd.DataFrame({f"s{i}": pd.array(["x", "y"] * 1000, dtype="str") for i in range(200)})
    first = registry.publish(df)
    assert registry.find(df) is first  # (the first check looks at every block)
    looked = []
    monkeypatch.setattr(_codec, "_BLOCK_VALUES", lambda blk: looked.append(blk) or blk.values)
    assert all(registry.find(df) is first for _ in range(10)) and looked == []
    blocks = df._mgr.blocks
    df.replace({"s7": {"x": "z"}}, inplace=True)
    assert df._mgr.blocks is blocks  # (the case the block tuple does not show)
    assert registry.find(df) is None and looked
    assert registry.publish(df) is not first


def test_equal_new_object_is_a_new_publication_sharing_storage(registry):
    df = frame()
    first = registry.publish(df)
    derived = df.assign(c=1.5)
    second = registry.publish(derived)
    assert second is not first
    # only the new column was copied; the rest points at the first segment
    assert second.depends == [first]
    assert registry.counters["bytes_reused"] >= df["a"].nbytes + df["b"].nbytes
    assert registry.counters["bytes_copied"] < 2 * df.memory_usage().sum()


def test_id_reuse_never_serves_stale_data(registry):
    for seed in range(20):
        df = frame(1000, seed)
        pub = registry.publish(df)
        assert registry.find(df) is pub
        del df
        gc.collect()
    # new objects at recycled addresses are never found as published
    for seed in range(20):
        df = frame(1000, 100 + seed)
        assert registry.find(df) is None


def test_segment_freed_when_object_dies_and_no_lease(registry):
    df = frame()
    name = registry.publish(df).name
    del df
    gc.collect()
    registry.collect()
    assert name not in owned_segments()


def test_lease_keeps_segment_until_ended(registry):
    df = frame()
    pub = registry.publish(df)
    _, _, token = registry.lease(pub)
    del df
    gc.collect()
    registry.collect()
    assert pub.name in owned_segments()  # a task still carries the handle
    registry.end_leases([token])
    registry.collect()
    assert pub.name not in owned_segments()


def test_worker_clearing_the_slot_ends_the_lease(registry):
    df = frame()
    pub = registry.publish(df)
    _, lease, _ = registry.lease(pub)
    del df
    gc.collect()
    registry.collect()
    assert pub.name in owned_segments()
    registry._board.mapping.view[64 + (lease >> 8)] = 0  # what a worker does once it has mapped the segment
    registry.collect()
    assert pub.name not in owned_segments()


@needs_copy_on_write
def test_dependency_outlives_its_source(registry):
    df = frame()
    first = registry.publish(df)
    derived = df.assign(c=2.0)
    second = registry.publish(derived)
    del df
    gc.collect()
    registry.collect()
    assert first.name in owned_segments()  # `derived`'s segment points into it
    del derived
    gc.collect()
    registry.collect()
    assert first.name not in owned_segments() and second.name not in owned_segments()


def test_share_returns_equal_readonly_object_backed_by_the_segment():
    df = frame()
    shared = sharedexec.share(df)
    pd.testing.assert_frame_equal(shared, df, check_exact=True)
    pub = _registry.REGISTRY.shared_publication(shared)
    assert pub is not None
    start = np.frombuffer(pub.mapping.view, np.uint8).ctypes.data
    values = shared._mgr.blocks[0].values
    assert start <= values.ctypes.data < start + pub.mapping.size
    assert not values.flags.writeable
    name = pub.name
    del df
    gc.collect()
    assert name in owned_segments()  # lives with `shared`, not with the original
    del shared, values
    gc.collect()
    _registry.REGISTRY.collect()
    assert name not in owned_segments()


def test_derived_from_shared_copies_only_new_columns():
    shared = sharedexec.share(frame())
    before = sharedexec.stats()
    pub = _registry.REGISTRY.publish(shared.assign(extra=1))
    after = sharedexec.stats()
    assert after["bytes_copied"] - before["bytes_copied"] < 10 * len(shared)  # the int64 column, ~8 B/row
    assert after["bytes_reused"] - before["bytes_reused"] >= shared["a"].nbytes
    assert pub.depends


def test_stats_keys():
    assert set(sharedexec.stats()) >= {"segments", "bytes_shared", "publications", "reuse_hits", "bytes_pickled"}


def test_sharing_a_shared_object_returns_it():
    shared = sharedexec.share(frame())
    assert sharedexec.share(shared) is shared
    assert _registry.REGISTRY.shared_publication(shared) is not None


def test_ending_a_lease_never_ends_the_next_holder_of_its_slot(registry):
    df = frame()
    pub = registry.publish(df)
    _, lease, token = registry.lease(pub)
    slot = lease >> 8
    registry._board.mapping.view[64 + slot] = 0  # the worker mapped it...
    registry._board._cursor = slot  # ...and the board came round to the slot again
    _, again, _ = registry.lease(pub)
    assert again >> 8 == slot
    registry.end_leases([token])  # the first task ends late
    assert registry._board.held(slot)  # the second lease stands


@needs_copy_on_write
def test_derived_frame_reuses_arrow_columns_too(registry):
    pytest.importorskip("pyarrow")
    df = pd.DataFrame({"a": np.arange(100_000.0), "s": pd.array([f"x{i}" for i in range(100_000)], dtype="string[pyarrow]")})
    first = registry.publish(df)
    copied = registry.counters["bytes_copied"]
    second = registry.publish(df.assign(b=1))
    assert second.depends == [first]
    assert registry.counters["bytes_copied"] - copied < 10 * len(df)  # the new int64 column only


def test_attrs_holding_an_array_are_published_once(registry):
    """Issue 12, defect 4: comparing the arrays raised, read as "changed"."""
    df = frame()
    df.attrs["weights"] = np.arange(10.0)
    first = registry.publish(df)
    assert all(registry.publish(df) is first for _ in range(9))
    assert registry.counters["publications"] == 1
    df.attrs["weights"][0] = -1.0  # the content changed: the worker must see it
    assert registry.publish(df) is not first


def test_attrs_that_cannot_be_compared_are_published_once_until_replaced(registry):
    df = frame()
    df.attrs["scale"] = lambda x: x  # neither comparable nor picklable by plain pickle
    first = registry.publish(df, cloudpickle_fallback=True)
    assert all(registry.publish(df, cloudpickle_fallback=True) is first for _ in range(9))
    df.attrs = dict(df.attrs)
    assert registry.publish(df, cloudpickle_fallback=True) is not first
    assert registry.counters["publications"] == 2


# -- a new object over memory already published (issue 12 review, finding 3) ----


def _decoded(registry, pub):
    return _publication.read(pub.mapping, lambda name: registry._by_name[name].mapping)


def _first_value(obj) -> float:
    return float(np.asarray(obj).ravel()[0])


VIEWS = {
    "slice": lambda a: a[:],
    "view": lambda a: a.view(),
    "reshape": lambda a: a.reshape(2, -1),
    "series-copy-false": lambda a: pd.Series(a, copy=False),
    "frame-copy-false": lambda a: pd.DataFrame({"x": a}, copy=False),
}


@pytest.mark.parametrize("derive", VIEWS.values(), ids=VIEWS.keys())
def test_a_new_object_over_written_memory_sends_its_values(registry, derive):
    """The registry reused the first publication's bytes for any buffer at
    the same address while its array lived: a write in place since was lost."""
    arr = np.zeros(100_000)
    registry.publish(arr)
    arr[0] = 7.0
    new = derive(arr)
    assert _first_value(_decoded(registry, registry.publish(new))) == 7.0


WRITES = {
    "loc": lambda df: df.loc.__setitem__((0, "a"), 7.0),
    "iloc": lambda df: df.iloc.__setitem__((0, 0), 7.0),
    "column-view": lambda df: df["a"].__setitem__(0, 7.0),  # pandas 3: the Series copies, df unchanged
}


@needs_copy_on_write
@given(st.sampled_from(list(WRITES)), st.sampled_from(["assign", "subset", "same", "series"]))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_objects_derived_after_a_pandas_write_send_its_values(registry, write, derive):
    """What a frame and the objects derived from it after a write through
    pandas hold is what the stdlib sends: pandas copies a published block
    before writing (the registry holds a copy-on-write reference to it)."""
    df = pd.DataFrame({"a": np.zeros(20_000), "b": np.arange(20_000)})
    registry.publish(df)
    WRITES[write](df)
    new = {"assign": lambda: df.assign(c=1), "subset": lambda: df[["a"]], "same": lambda: df, "series": lambda: df["a"]}[derive]()
    got = _decoded(registry, registry.publish(new))
    (pd.testing.assert_frame_equal if isinstance(new, pd.DataFrame) else pd.testing.assert_series_equal)(
        got, pickle.loads(pickle.dumps(new)), check_exact=True
    )


@needs_copy_on_write
def test_derived_frames_still_reuse_the_columns_they_share(registry):
    """The copy-on-write reference keeps them reusable: only new columns copied."""
    df = pd.DataFrame({"a": np.zeros(100_000), "b": np.ones(100_000)})
    registry.publish(df)
    copied = registry.counters["bytes_copied"]
    registry.publish(df.assign(c=2.0))
    assert registry.counters["bytes_copied"] - copied < 9 * len(df)  # the new column only
    df.loc[0, "a"] = 7.0  # pandas copies the referenced block first
    assert _first_value(_decoded(registry, registry.publish(df))["a"]) == 7.0
