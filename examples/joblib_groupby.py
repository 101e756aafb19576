"""A grouped computation with joblib and the ``"sharedexec"`` backend.

One task per store: each task gets the whole sales frame and the row numbers
of its store, and summarises them. The frame has a text column. joblib's
default backend memory-maps the numeric columns but pickles the text column
again for every batch of tasks; the ``"sharedexec"`` backend copies the whole
frame, text included, into shared memory once.

    python examples/joblib_groupby.py                    # 1M rows, 40 stores
    python examples/joblib_groupby.py --rows 5000000 --stores 200

The only change from a plain joblib program is the ``parallel_config`` block
(and ``import sharedexec``, which registers the backend).
"""

from __future__ import annotations

import argparse
import time

import joblib
import numpy as np
import pandas as pd

import sharedexec  # registers the "sharedexec" joblib backend


def make_sales(rows: int, stores: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    products = np.array([f"product-{i:04d}" for i in range(500)])
    return pd.DataFrame(
        {
            "store": rng.integers(0, stores, rows),
            "day": rng.integers(0, 365, rows),
            "quantity": rng.integers(1, 10, rows),
            "price": rng.uniform(1, 100, rows).round(2),
            "product": products[rng.integers(0, len(products), rows)],
        }
    )


def summarise(df: pd.DataFrame, store: int, rows: np.ndarray) -> dict:
    sales = df.iloc[rows]
    revenue = sales["quantity"] * sales["price"]
    return {
        "store": store,
        "revenue": round(float(revenue.sum()), 2),
        "best_day": int(revenue.groupby(sales["day"]).sum().idxmax()),
        "top_product": revenue.groupby(sales["product"]).sum().idxmax(),
    }


def by_store(df: pd.DataFrame, n_jobs: int) -> pd.DataFrame:
    groups = df.groupby("store").indices  # store -> row numbers (small arrays)
    results = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(summarise)(df, store, rows) for store, rows in groups.items()
    )
    return pd.DataFrame(results).set_index("store")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of sales (default 1,000,000)")
    parser.add_argument("--stores", type=int, default=40, help="stores, one task each (default 40)")
    parser.add_argument("--n-jobs", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()

    df = make_sales(args.rows, args.stores)
    print(f"sales: {len(df):,} rows, {df.memory_usage(deep=True).sum() / 1e6:.0f} MB, "
          f"'product' column of dtype {df['product'].dtype}")

    timings = {}
    for backend in ("loky", "sharedexec"):
        with joblib.parallel_config(backend=backend):
            by_store(df.head(1000), args.n_jobs)  # start the workers: not timed
            start = time.perf_counter()
            summary = by_store(df, args.n_jobs)
            timings[backend] = time.perf_counter() - start
        print(f"backend={backend!r:<13} {timings[backend]:5.1f} s for {len(summary)} stores")
        if backend == "loky":
            expected = summary

    print(f"same results: {summary.equals(expected)}")
    print(summary.sort_values("revenue", ascending=False).head(3).to_string())


if __name__ == "__main__":
    main()
