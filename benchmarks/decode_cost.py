"""Decode cost: a 100-column frame of 10^7 rows vs the same frame of 10^5 rows.

What a worker pays the first time it meets a published frame is mapping the
segment and running ``_codec.decode`` over its layout. Neither should touch
the data: numpy arrays, masks and Arrow buffers are views of the mapping, so
the cost follows the number of columns (blocks) and not the number of rows.
Issue 2's target: the 10^7-row frame decodes within 1.5x of the 10^5-row one.

The frame is numeric-heavy and mixed -- int8, float32, category (int8 codes),
datetime64[s] and a few nullable Int8 columns -- so that 10^7 rows x 100
columns fits this 2-core / 24 GB machine with the frame and its segment both
in memory (~2.7 GB each). If less memory is available the row count is
lowered, and the output says so. Each size is published once, then attached
and decoded ``--repeat`` times; the medians are compared. Nothing is
hard-coded: every figure printed is measured in this run.

    python benchmarks/decode_cost.py [--rows 10000000] [--small-rows 100000] [--repeat 9]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import numpy as np
import pandas as pd

from sharedexec import _codec, _publication, _segment

# (dtype, columns): 100 columns, numeric-heavy.
MIX = [("int8", 30), ("float32", 30), ("category", 20), ("datetime64[s]", 12), ("Int8", 8)]


def build(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    columns = {}
    for dtype, count in MIX:
        for i in range(count):
            name = f"{dtype}_{i}"
            if dtype == "int8":
                columns[name] = rng.integers(-128, 127, rows, dtype=np.int8)
            elif dtype == "float32":
                columns[name] = rng.random(rows, dtype=np.float32)
            elif dtype == "category":
                codes = rng.integers(0, 40, rows, dtype=np.int8)
                columns[name] = pd.Categorical.from_codes(codes, categories=[f"level{j}" for j in range(40)])
            elif dtype == "datetime64[s]":
                start = 1_600_000_000 + i * 86_400
                columns[name] = (start + rng.integers(0, 10**7, rows)).astype("M8[s]")
            else:
                mask = rng.random(rows) < 0.05
                columns[name] = pd.arrays.IntegerArray(rng.integers(-128, 127, rows, dtype=np.int8), mask)
    frame = pd.DataFrame(columns)
    del columns
    return frame


def frame_bytes(frame: pd.DataFrame) -> int:
    return int(frame.memory_usage(index=True, deep=False).sum())


def publish(frame: pd.DataFrame) -> str:
    layout, buffers = _codec.encode(frame)
    raws = list(map(_codec.raw_view, buffers))
    mapping, _ = _publication.write(layout, raws, list(range(len(raws))), os.getpid())
    return mapping.name


def time_decode(name: str, repeat: int) -> tuple[float, list[float]]:
    """Median seconds to attach ``name`` and decode it, over ``repeat`` runs."""
    times = []
    for _ in range(repeat + 1):  # the first run warms imports and caches
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        mapping = _segment.attach(name)
        frame = _publication.read(mapping, _segment.attach)
        elapsed = time.perf_counter() - start
        gc.enable()
        times.append(elapsed)
        del frame, mapping
    return statistics.median(times[1:]), times[1:]


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    shm_free, _ = _segment.free_bytes()
    return min(info["MemAvailable"], shm_free + info["MemAvailable"] // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10**7)
    parser.add_argument("--small-rows", type=int, default=10**5)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()

    rows = args.rows
    per_row = frame_bytes(build(1000)) / 1000
    # The frame is built column by column, then consolidated (a second copy),
    # then published (a third, in the segment): keep all three in memory.
    fits = int(available_bytes() * 0.8 / (3 * per_row))
    if fits < rows:
        print(f"note: {rows:,} rows would need {3 * per_row * rows / 1e9:.1f} GB; "
              f"{available_bytes() / 1e9:.1f} GB available, using {fits:,} rows instead")
        rows = fits

    mix = ", ".join(f"{count} x {dtype}" for dtype, count in MIX)
    print(f"frame: {sum(c for _, c in MIX)} columns ({mix})")
    results = {}
    for label, n in (("large", rows), ("small", args.small_rows)):
        start = time.perf_counter()
        frame = build(n)
        nbytes, blocks = frame_bytes(frame), len(frame._mgr.blocks)
        name = publish(frame)
        del frame
        gc.collect()
        setup = time.perf_counter() - start
        try:
            median, times = time_decode(name, args.repeat)
        finally:
            _segment.retire(name)
        results[label] = median
        spread = f"min {min(times) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms"
        print(f"{label}: {n:>12,} rows, {nbytes / 1e9:7.3f} GB in {blocks} blocks "
              f"(built and published in {setup:.1f} s): attach + decode median "
              f"{median * 1e3:.2f} ms over {len(times)} runs ({spread})")
    ratio = results["large"] / results["small"]
    verdict = "within" if ratio <= 1.5 else "OVER"
    print(f"ratio large/small: {ratio:.2f}x ({verdict} the 1.5x target; "
          f"{rows // args.small_rows}x the rows)")


if __name__ == "__main__":
    main()
