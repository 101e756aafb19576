"""Decoding in another process, started by fork, spawn and forkserver.

The parent publishes a frame with one column of each family of dtypes; a child
that shares nothing with it but the segment's name attaches the segment,
decodes it and answers with a digest of what it sees (values hash, dtypes,
labels, index freq) and whether every data buffer lies in its own mapping.
Under spawn and forkserver the child imports everything afresh, so this also
proves the rebuild functions are importable module-level functions.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os

import numpy as np
import pandas as pd
import pytest

from sharedexec import _codec, _publication, _segment

pytestmark = pytest.mark.compat


def mixed_frame(n: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(
        {
            "f8": rng.standard_normal(n),
            "f4": rng.standard_normal(n).astype("float32"),
            "i8": rng.integers(-(10**12), 10**12, n),
            "u1": rng.integers(0, 255, n, dtype="uint8"),
            "b": rng.integers(0, 2, n).astype(bool),
            "t": pd.date_range("2020-01-01", periods=n, freq="37s"),
            "tz": pd.date_range("2020-01-01", periods=n, freq="h", tz="Europe/Paris"),
            "td": pd.to_timedelta(rng.integers(0, 10**6, n), unit="ms"),
            "cat": pd.Categorical.from_codes(rng.integers(-1, 3, n), ["lo", "mid", "hi"], ordered=True),
            "Int32": pd.array(np.where(rng.random(n) < 0.1, None, rng.integers(0, 99, n)), dtype="Int32"),
            "boolean": pd.array(np.where(rng.random(n) < 0.1, None, rng.random(n) < 0.5), dtype="boolean"),
            "period": pd.period_range("2000-01", periods=n, freq="M"),
            "object": pd.Series([f"s{i}" if i % 7 else None for i in range(n)], dtype=object),
            "str": pd.Series([f"w{i % 13}" for i in range(n)]),  # pandas 3: Arrow-backed with pyarrow
        },
        index=pd.date_range("2024-01-01", periods=n, freq="min", tz="UTC", name="when"),
    )
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa

        frame["arrow"] = pd.array([i if i % 5 else None for i in range(n)], dtype=pd.ArrowDtype(pa.int64()))
        frame["string[pyarrow]"] = pd.array([f"p{i % 11}" for i in range(n)], dtype="string[pyarrow]")
    frame.columns.name = "field"
    frame.attrs = {"source": "parent"}
    return frame


def digest(frame: pd.DataFrame) -> dict:
    return {
        "hash": int(pd.util.hash_pandas_object(frame, index=True).sum()),
        "dtypes": [str(d) for d in frame.dtypes],
        "columns": list(frame.columns),
        "names": (frame.index.name, frame.columns.name),
        "freq": str(frame.index.freq),
        "attrs": frame.attrs,
        "shape": frame.shape,
    }


def _outside(frame: pd.DataFrame, mapping: _segment.Mapping) -> list[str]:
    """Columns with a numeric (non-object) buffer outside the mapping."""
    start = np.frombuffer(mapping.view, np.uint8).ctypes.data
    outside = []
    for name, column in frame.items():
        values = column.array
        parts = [getattr(values, attr, None) for attr in ("_ndarray", "_data", "_mask", "_codes")]
        if hasattr(values, "_pa_array"):
            parts = [b for chunk in values._pa_array.chunks for b in chunk.buffers() if b is not None and b.size]
        for part in parts:
            if part is None or getattr(part, "dtype", None) == object:
                continue
            address = part.address if hasattr(part, "address") else part.__array_interface__["data"][0]
            if not start <= address < start + mapping.size:
                outside.append(name)
    return outside


def decode_in_child(name: str, key: bytes) -> tuple[dict, list[str], int]:
    """Runs in the child: attach by name (with the publisher's key), decode, describe."""
    mapping = _segment.attach(name, key=key)
    frame = _publication.read(mapping, lambda other: _segment.attach(other, key=key))
    return digest(frame), _outside(frame, mapping), os.getpid()


def test_child_decodes_what_the_parent_published(mp_context):
    frame = mixed_frame()
    layout, buffers = _codec.encode(frame)
    raws = list(map(_codec.raw_view, buffers))
    mapping, _ = _publication.write(layout, raws, list(range(len(raws))), os.getpid())
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp_context) as pool:
            seen, outside, child = pool.submit(decode_in_child, mapping.name, mapping.key).result(timeout=120)
    finally:
        _segment.retire(mapping.name)
    assert child != os.getpid()
    assert seen == digest(frame)
    assert outside == []
