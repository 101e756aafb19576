"""What happens when shared memory is too small: Docker's 64 MB /dev/shm.

Docker gives a container 64 MB of /dev/shm unless it is started with
``--shm-size``. A frame larger than that cannot be copied there. sharedexec
then does not crash: it warns once (``SharedExecWarning``) and pickles that
frame into each task, as the standard library would. Slower, but the program
runs. With ``on_full="raise"`` it raises ``SharedMemoryFullError`` instead,
with the numbers and the fixes.

The script needs a small directory to share through, and picks the first of:

1. ``--dir DIR``, any directory you choose, e.g. a small tmpfs
   (``sudo mount -t tmpfs -o size=64m tmpfs /mnt/small``) or, to see the fix,
   a directory on disk (``--dir /var/tmp``);
2. ``/dev/shm`` itself when the frame does not fit there (inside
   ``docker run`` without ``--shm-size``);
3. a 64 MB tmpfs it mounts in a temporary directory (needs root; removed at
   the end).

It points ``SHAREDEXEC_DIR`` at that directory before sharing anything, as
you would in a shell (``export SHAREDEXEC_DIR=/var/tmp``).

    python examples/small_shm.py                  # 100 MB frame, 64 MB directory
    python examples/small_shm.py --dir /var/tmp   # the fix: a directory on disk
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

import sharedexec


def column_means(df: pd.DataFrame, column: str) -> float:
    return float(df[column].mean())


def make_frame(megabytes: int) -> pd.DataFrame:
    rows = megabytes * 1_000_000 // (8 * 10)
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.random((rows, 10)), columns=[f"c{i}" for i in range(10)])


@contextlib.contextmanager
def small_directory(requested: str | None, frame_bytes: int):
    """Yield the directory to share through (see the module docstring)."""
    if requested:
        yield requested
        return
    if shutil.disk_usage("/dev/shm").free < frame_bytes:
        yield "/dev/shm"
        return
    mountpoint = tempfile.mkdtemp(prefix="sharedexec-small-")
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mountpoint], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            sys.exit(
                "This machine's /dev/shm is large enough for the frame, and mounting a 64 MB tmpfs\n"
                f"failed ({mounted.stderr.strip() or 'mount returned ' + str(mounted.returncode)}).\n"
                "Run the script as root, inside `docker run` without --shm-size, or with\n"
                "--dir pointing at a small directory you mounted."
            )
        try:
            yield mountpoint
        finally:
            # Lazy: this process still maps sharedexec's lease board there.
            subprocess.run(["umount", "--lazy", mountpoint], check=True)
    finally:
        os.rmdir(mountpoint)


def run(df: pd.DataFrame, tasks: int, **options) -> float:
    with sharedexec.ProcessPoolExecutor(2, **options) as executor:
        start = time.perf_counter()
        list(executor.map(column_means, [df] * tasks, [f"c{i % 10}" for i in range(tasks)]))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="directory to share through (default: a 64 MB one, see above)")
    parser.add_argument("--megabytes", type=int, default=100, help="size of the frame (default 100)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks, each given the frame (default 8)")
    args = parser.parse_args()

    df = make_frame(args.megabytes)
    frame_bytes = int(df.memory_usage().sum())
    with small_directory(args.dir, frame_bytes) as directory:
        os.environ["SHAREDEXEC_DIR"] = directory  # before anything is shared
        free, total = shutil.disk_usage(directory).free, shutil.disk_usage(directory).total
        print(f"SHAREDEXEC_DIR={directory}: {free / 1e6:,.0f} MB free of {total / 1e6:,.0f} MB")
        print(f"frame: {frame_bytes / 1e6:,.0f} MB, {args.tasks} tasks")

        seconds = run(df, args.tasks)  # on_full="fallback", the default
        stats = sharedexec.stats()
        if stats["publications"]:
            print(f"on_full='fallback': shared once through {directory}, {seconds:.1f} s")
        else:
            print(f"on_full='fallback': did not fit, pickled into every task instead, {seconds:.1f} s")

        try:
            seconds = run(df, args.tasks, on_full="raise")
            print(f"on_full='raise': shared once through {directory}, {seconds:.1f} s")
        except sharedexec.SharedMemoryFullError as exc:
            print(f"on_full='raise': {type(exc).__name__}: {exc.strerror}")
            print("To share it: give /dev/shm more room (docker run --shm-size=1g ...), or share")
            print("through a directory on disk: python examples/small_shm.py --dir /var/tmp")


if __name__ == "__main__":
    main()
