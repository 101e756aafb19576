"""A parameter sweep with ``sharedexec.ProcessPoolExecutor``.

Fits a ridge regression for every (feature count, alpha) pair on one frame
and keeps the best held-out score. Every task gets the whole frame. With the
stdlib executor, each task would pickle it and send it through a pipe; here
it is copied into shared memory once, and every task reads that copy.

    python examples/parameter_sweep.py                     # ~70 MB frame, 40 fits
    python examples/parameter_sweep.py --rows 2000000      # ~340 MB frame
    python examples/parameter_sweep.py --compare-stdlib    # also time the stdlib executor
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import numpy as np
import pandas as pd

import sharedexec


def make_frame(rows: int, n_features: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, n_features))
    coef = rng.standard_normal(n_features) * (np.arange(n_features) < n_features // 2)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(n_features)])
    df["y"] = X @ coef + rng.standard_normal(rows)
    return df


def fit_ridge(df: pd.DataFrame, n_features: int, alpha: float) -> tuple[int, float, float]:
    """Fit on the first 80% of the rows, return the R^2 on the rest."""
    features = [f"f{i}" for i in range(n_features)]
    X = df[features].to_numpy()
    y = df["y"].to_numpy()
    n_train = int(len(df) * 0.8)
    X_train, y_train, X_test, y_test = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    coef = np.linalg.solve(X_train.T @ X_train + alpha * np.eye(n_features), X_train.T @ y_train)
    r2 = 1 - (y_test - X_test @ coef).var() / y_test.var()
    return n_features, alpha, float(r2)


def sweep(executor: concurrent.futures.Executor, df: pd.DataFrame, grid: list[tuple[int, float]]) -> list:
    futures = [executor.submit(fit_ridge, df, n, alpha) for n, alpha in grid]
    return [f.result() for f in futures]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=400_000, help="rows of the frame (default 400,000: ~70 MB)")
    parser.add_argument("--alphas", type=int, default=10, help="alphas per feature count (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--compare-stdlib", action="store_true", help="run the same sweep with the stdlib executor too")
    args = parser.parse_args()

    df = make_frame(args.rows)
    grid = [(n, alpha) for n in (5, 10, 15, 20) for alpha in np.logspace(-2, 4, args.alphas)]
    print(f"frame: {len(df):,} rows x {df.shape[1]} columns, {df.memory_usage().sum() / 1e6:.0f} MB")
    print(f"{len(grid)} fits on {args.workers} workers")

    with sharedexec.ProcessPoolExecutor(args.workers) as executor:
        start = time.perf_counter()
        results = sweep(executor, df, grid)
        print(f"sharedexec.ProcessPoolExecutor: {time.perf_counter() - start:.1f} s")

    if args.compare_stdlib:
        with concurrent.futures.ProcessPoolExecutor(args.workers) as executor:
            start = time.perf_counter()
            stdlib_results = sweep(executor, df, grid)
            print(f"concurrent.futures.ProcessPoolExecutor: {time.perf_counter() - start:.1f} s")
        print(f"same results: {stdlib_results == results}")

    n, alpha, r2 = max(results, key=lambda r: r[2])
    print(f"best: {n} features, alpha={alpha:.3g}, held-out R^2={r2:.4f}")
    stats = sharedexec.stats()
    print(f"frame copied into shared memory {stats['publications']} time(s), "
          f"sent as a handle to the other {stats['reuse_hits']} tasks")


if __name__ == "__main__":
    main()
