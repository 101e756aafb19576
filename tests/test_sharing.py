"""The reducer and the handle: what is shared, what is not, how small a
handle is, and how the worker side resolves it."""

from __future__ import annotations

import dataclasses
import gc
import io
import os
import pickle
import socket
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pandas as pd
import pytest

import sharedexec
from sharedexec import _cache, _registry
from sharedexec._sharing import Options, SharedTask, install_hooks

from . import _exact as exact
from . import _sharing_tasks as tasks
from .conftest import owned_segments

install_hooks()


def armed_dumps(obj, **options) -> bytes:
    """Pickle ``(SharedTask, obj)`` as multiprocessing would."""
    return bytes(ForkingPickler.dumps((SharedTask(tasks.describe, Options(**options)), obj)))


def big_frame(rows=300_000):
    rng = np.random.default_rng(1)
    return pd.DataFrame({"a": rng.random(rows), "b": rng.integers(0, 5, rows), "s": rng.choice(["u", "v"], rows)})


@dataclasses.dataclass
class Holder:
    frame: pd.DataFrame
    note: str


class GeoLike(pd.DataFrame):
    _metadata = ["crs"]

    @property
    def _constructor(self):
        return GeoLike


def test_handle_is_small_whatever_the_size():
    for rows in (100_000, 3_000_000):
        df = big_frame(rows)
        assert len(armed_dumps(df)) < 400


def test_nested_objects_are_all_replaced():
    df, arr = big_frame(), np.arange(1_000_000, dtype="f8")
    payload = {"t": (df,), "l": [arr], "d": Holder(df, "x"), "o": [{"deep": arr}]}
    assert len(armed_dumps(payload)) < 1500


def test_small_and_other_objects_pickle_as_before():
    small = pd.DataFrame({"a": [1, 2, 3]})
    before = sharedexec.stats()["publications"]
    _, (received, other) = pickle.loads(armed_dumps((small, {"k": 1})))
    pd.testing.assert_frame_equal(received, small)
    assert other == {"k": 1} and sharedexec.stats()["publications"] == before


def test_unarmed_pickling_is_unchanged():
    df = big_frame()
    assert bytes(ForkingPickler.dumps((df, {"k": 1}))) == pickle.dumps((df, {"k": 1}))


def test_min_bytes_threshold():
    df = big_frame(10_000)  # ~240 kB
    assert len(armed_dumps(df)) > 100_000
    assert len(armed_dumps(df, min_bytes=1000)) < 400


@pytest.mark.compat
def test_round_trip_in_workers(mp_context):
    df, arr = big_frame(), np.arange(1_000_000, dtype="f8")
    geo = GeoLike(big_frame())
    geo.crs = "EPSG:4326"
    payload = {"t": (df,), "d": Holder(df, "x"), "a": arr}
    with sharedexec.ProcessPoolExecutor(1, mp_context=mp_context) as ex:
        received, _ = ex.submit(tasks.plain_describe, payload).result()
        assert received == {
            "t": [("DataFrame", int(pd.util.hash_pandas_object(df).sum()), True)],
            "d": {"attrs": {"frame": ("DataFrame", int(pd.util.hash_pandas_object(df).sum()), True), "note": "x"}},
            "a": ("ndarray", float(arr.sum()), True),
        }
        back = ex.submit(tasks.make_frame, 10).result()
        assert list(back.columns) == ["x", "y"]
        geo_back = ex.submit(_identity, geo).result()
    assert type(geo_back) is GeoLike and geo_back.crs == "EPSG:4326"
    pd.testing.assert_frame_equal(geo_back, geo, check_exact=True)


def _identity(obj):
    return obj


def test_unresolvable_handle_says_why():
    with pytest.raises(sharedexec.SegmentNotFoundError) as info:
        _cache._resolve("sx_1_0123456789abcdef", "r", "", -1, 1, "gpu-node-7", bytes(16))
    message = str(info.value)
    assert "sx_1_0123456789abcdef" in message and "gpu-node-7" in message
    assert socket.gethostname() in message and "does not cross machines" in message


@pytest.mark.compat
def test_large_result_comes_back_writable_and_unlinked(mp_context, no_leaks):
    with sharedexec.ProcessPoolExecutor(1, mp_context=mp_context) as ex:
        before = owned_segments()
        result = ex.submit(tasks.make_frame, 500_000).result()
        assert not set(owned_segments()) - set(before)  # claimed and unlinked at once
    assert all(blk.values.flags.writeable for blk in result._mgr.blocks)
    result.iloc[0, 0] = -1.0
    assert result.iloc[0, 0] == -1.0 and result["x"].iloc[1] == 1.0


def test_a_runner_called_outside_a_pool_returns_the_value_itself(mp_context, no_leaks):
    """The Dask pattern: a shared function's task, unpickled and called in
    another process, its result used by the next task and pickled plainly."""
    message = pickle.dumps((tasks.shared_make_frame, (300_000,)))
    reader, writer = mp_context.Pipe(duplex=False)
    process = mp_context.Process(target=tasks.run_like_dask, args=(message, writer))
    process.start()
    writer.close()  # EOF, not a hang, if the task fails
    kind, length, frame = pickle.loads(reader.recv_bytes())
    process.join(60)
    assert (kind, length, process.exitcode) == ("DataFrame", 300_000, 0)
    pd.testing.assert_frame_equal(frame, tasks.make_frame(300_000), check_exact=True)


def test_a_shared_function_as_a_dask_task_hands_its_value_to_the_next(no_leaks):
    pytest.importorskip("distributed")
    import dask
    from distributed import Client, LocalCluster

    df = big_frame()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            assert dask.delayed(len)(dask.delayed(tasks.shared_make_frame)(300_000)).compute() == 300_000
            assert client.submit(tasks.shared_len, (df, 2)).result() == len(df) + 2
            frame = client.submit(tasks.shared_make_frame, 300_000).result()
    pd.testing.assert_frame_equal(frame, tasks.make_frame(300_000), check_exact=True)


def test_worker_cache_drops_retired_segments(no_leaks):
    with sharedexec.ProcessPoolExecutor(1) as ex:
        df = big_frame()
        ex.submit(tasks.len_plus, df, 0).result()
        name = _registry.REGISTRY.find(df).name
        assert ex.submit(tasks.cache_names).result() == [name]
        del df
        gc.collect()
        _registry.REGISTRY.collect()
        assert ex.submit(tasks.cache_names).result() == []


def test_worker_cache_is_bounded():
    with sharedexec.ProcessPoolExecutor(1) as ex:
        ex.submit(tasks.set_cache_budget, 1).result()
        frames = [big_frame() for _ in range(3)]
        for df in frames:
            ex.submit(tasks.len_plus, df, 0).result()
        assert len(ex.submit(tasks.cache_names).result()) == 1  # the newest one only


def test_copy_on_write_tasks_see_their_writes_only():
    df = big_frame()
    with sharedexec.ProcessPoolExecutor(1, mmap_mode="c") as ex:
        assert ex.submit(_write_and_read, df).result() == 42.0
        assert ex.submit(_write_and_read, df).result() == 42.0  # the previous write is gone
    assert df["a"].iloc[0] != 42.0


def _write_and_read(df):
    before = df._mgr.blocks[0].values[0, 0]
    df._mgr.blocks[0].values[0, 0] = 42.0
    assert before != 42.0
    return float(df._mgr.blocks[0].values[0, 0])


def test_read_only_write_names_the_fix():
    df = big_frame()
    with sharedexec.ProcessPoolExecutor(1) as ex:
        with pytest.raises(sharedexec.SharedReadOnlyError, match="mmap_mode='c'") as info:
            ex.submit(_write_numpy, df).result()
    assert isinstance(info.value, ValueError)


def _write_numpy(df):
    df._mgr.blocks[0].values[0, 0] = 1.0


def test_per_task_isolation_in_one_worker():
    df = big_frame()
    with sharedexec.ProcessPoolExecutor(1) as ex:
        for _ in range(3):
            assert ex.submit(_mutate, df).result() == (["a", "b", "s"], None, {})


def _mutate(df):
    seen = (list(df.columns), df.index.name, dict(df.attrs))
    df["new"] = 1
    df.index.name = "renamed"
    df.attrs["k"] = "v"
    df.drop(columns="a", inplace=False)
    return seen


def _mutable_objects() -> dict:
    lists = np.empty(3, dtype=object)
    lists[:] = [[1], [2], None]
    return {
        "object-ndarray": np.array(["a", "b", "c"], dtype=object),
        "lists-in-object-ndarray": lists,
        "masked": np.ma.array([1.0, 2.0], mask=[0, 1]),
        "matrix": np.matrix([[1, 2], [3, 4]]),
        "metadata": tasks.MetaFrame({"a": [1.0, 2.0]}),
    }


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("mmap_mode", ["r", "c"])
@pytest.mark.parametrize("kind", ["object-ndarray", "lists-in-object-ndarray", "masked", "matrix", "metadata"])
def test_writes_of_one_task_never_reach_the_next(mp_context, kind, mmap_mode):
    """Issue 12, defect 3: the worker cache handed each task the same
    writable object arrays, masked arrays, matrices and metadata values."""
    obj = _mutable_objects()[kind]
    if kind == "metadata":
        obj.info = ["original"]
    expected = tasks.write_into(pickle.loads(pickle.dumps(obj)))
    with sharedexec.ProcessPoolExecutor(1, mp_context=mp_context, min_bytes=0, mmap_mode=mmap_mode) as ex:
        seen = [ex.submit(tasks.write_into, obj).result() for _ in range(4)]
    assert seen == [expected] * 4


def wide_str_frame(rows=150_000):
    rng = np.random.default_rng(2)
    return pd.DataFrame({
        "a": rng.random(rows), "b": rng.integers(0, 5, rows),
        "s": pd.array(rng.choice(["u", "v", "w"], rows), dtype="str"),
        "n": pd.array(rng.integers(0, 9, rows), dtype="Int64"),
    })


def test_pandas_level_writes_of_one_task_never_reach_the_next(mp_context):
    """Issue 15: tasks share the cached frame's Block objects; writes that
    pandas makes in place on a Block (inserting midway, a whole-column or a
    column-wise replace) must land in the task's own copy."""
    df = wide_str_frame()
    expected = tasks.write_everywhere(df.copy())
    with sharedexec.ProcessPoolExecutor(1, mp_context=mp_context) as ex:
        assert [ex.submit(tasks.write_everywhere, df).result() for _ in range(3)] == [expected] * 3


def test_results_made_of_the_tasks_frame_are_writable(mp_context):
    """Extension arrays of a task's frame are read-only in the worker (issue
    15); a result that holds them, small (pickled) or large (shared), is as
    writable as the stdlib's, Arrow strings included (a large one used to
    miss pandas' ``_cache``: AttributeError on the first write)."""
    df = wide_str_frame()
    with sharedexec.ProcessPoolExecutor(1, mp_context=mp_context) as ex:
        small = ex.submit(tasks.columns_of, df, ["s", "n"], 100).result()
        large = ex.submit(tasks.columns_of, df, ["s", "n"]).result()
    for result, rows in ((small, 100), (large, len(df))):
        exact.assert_identical(result, df[["s", "n"]].iloc[:rows])
        result.loc[0, "s"] = "x"
        result["n"].array[1] = 42
        result["s"].array[2] = "y"
        assert result["s"].iloc[:3].tolist() == ["x", df["s"].iloc[1], "y"] and result["n"].iloc[1] == 42
