"""The frames the benchmark and the demo share with their workers.

Built in memory from a seeded generator, so a run needs no network and no data
file, and two runs (or two string kinds) hold the same numbers.

* :func:`make_frame` is the frame of the design brief's measurements: by default
  500,000 rows x (60 float64 + 30 int64 + 1 string column), ~400 MB. Its strings
  are either Python objects (``object`` dtype: what older code and many readers
  produce, and what joblib re-pickles on every dispatch) or pandas 3's Arrow-backed
  ``str`` (never memmapped by joblib). The numeric columns are built as two 2-D
  blocks handed to pandas without a copy, so building the frame costs its size
  once and the frame has the consolidated layout that ``read_csv`` gives.
* :func:`make_mixed_frame` is the demo's frame: numeric, time-zone aware datetime,
  categorical and both kinds of string columns, each with its own layout to share.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

STRING_KINDS = ("object", "arrow")


def _arrow_str_dtype() -> pd.StringDtype:
    # pandas 3's default "str" falls back to Python storage without pyarrow; ask for
    # Arrow storage explicitly so that "arrow" means what it says, or fails clearly.
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "string kind 'arrow' needs pyarrow, which is not installed: "
            "pip install pyarrow, or pass --string-kind object"
        ) from exc
    return pd.StringDtype("pyarrow", na_value=np.nan)


def _strings(rng: np.random.Generator, rows: int, kind: str, prefix: str) -> pd.Series:
    if kind not in STRING_KINDS:
        raise ValueError(f"string kind must be one of {STRING_KINDS}, not {kind!r}")
    # Distinct values, so no codec can get away with a dictionary of a few strings.
    values = [f"{prefix}-{v:09d}" for v in rng.integers(0, 10**9, rows)]
    # The dtype is explicit both ways: pandas 3 infers "str" from Python strings.
    return pd.Series(values, dtype=object if kind == "object" else _arrow_str_dtype())


def _block(values: np.ndarray, prefix: str) -> pd.DataFrame:
    # values has shape (columns, rows), pandas' own block layout: the transposed view
    # becomes the block as it is, without a copy (pandas 3 copies unless told not to).
    return pd.DataFrame(values.T, columns=[f"{prefix}{k}" for k in range(len(values))], copy=False)


def make_frame(
    rows: int = 500_000,
    float_cols: int = 60,
    int_cols: int = 30,
    string_columns: int = 1,
    string_kind: str = "object",
    seed: int = 0,
) -> pd.DataFrame:
    """The brief's frame: float64 and int64 blocks plus string columns.

    ``string_kind`` is ``"object"`` (Python ``str`` objects) or ``"arrow"``
    (pandas' Arrow-backed ``str`` dtype; needs pyarrow). The same ``seed`` gives
    the same numbers whatever the string kind.
    """
    rng = np.random.default_rng(seed)
    parts = [
        _block(rng.standard_normal((float_cols, rows)), "f"),
        _block(rng.integers(0, 10**6, (int_cols, rows), dtype=np.int64), "i"),
    ]
    parts += [pd.DataFrame({f"s{k}": _strings(rng, rows, string_kind, f"user{k}")}) for k in range(string_columns)]
    # Under copy-on-write, concat along columns keeps the blocks instead of copying them.
    return pd.concat([p for p in parts if p.shape[1]], axis=1)


def make_mixed_frame(rows: int = 1_000_000, seed: int = 0) -> pd.DataFrame:
    """The demo's frame: ~300 bytes a row of numeric, datetime, categorical and string data."""
    rng = np.random.default_rng(seed)
    seconds = rng.integers(1_500_000_000, 1_800_000_000, (2, rows))
    cities = [f"city-{k:03d}" for k in range(300)]
    extra = pd.DataFrame(
        {
            "opened": pd.to_datetime(seconds[0], unit="s", utc=True).tz_convert("Europe/Paris"),
            "closed": pd.to_datetime(seconds[1], unit="s", utc=True).tz_convert("America/New_York"),
            "city": pd.Categorical.from_codes(rng.integers(0, len(cities), rows), categories=cities),
            "grade": pd.Categorical.from_codes(rng.integers(0, 5, rows), categories=list("ABCDE"), ordered=True),
            "name": _strings(rng, rows, "arrow", "name"),
            "comment": _strings(rng, rows, "object", "note"),
        }
    )
    return pd.concat(
        [
            _block(rng.standard_normal((16, rows)), "x"),
            _block(rng.integers(-(10**9), 10**9, (8, rows), dtype=np.int64), "n"),
            extra,
        ],
        axis=1,
    )


def frame_nbytes(df: pd.DataFrame) -> int:
    """Bytes the frame holds, Python string objects included (``deep=True``)."""
    return int(df.memory_usage(deep=True, index=True).sum())


def describe(df: pd.DataFrame) -> str:
    """One line: rows, columns per dtype, size."""
    counts = df.dtypes.astype(str).value_counts()
    dtypes = ", ".join(f"{n} {d}" for d, n in counts.items())
    return f"{len(df):,} rows x {df.shape[1]} columns ({dtypes}), {frame_nbytes(df) / 1e6:,.0f} MB"
