"""The benchmark harness and the demo: ``python -m sharedexec bench`` / ``demo``.

Measures what it costs to give one large pandas DataFrame to the workers of a
process pool, for sharedexec's three entry points and for everything users are
told to try instead, with the same frame, tasks and workers in one run.

Memory is the extra PSS of the whole process tree (shared pages counted once)
plus /dev/shm, sampled every 20 ms -- never RSS, which counts a shared page in
every process and makes sharing look like copying (design brief, trap 10).

Modules, one job each:

* :mod:`~sharedexec.bench.memory` -- the memory meter;
* :mod:`~sharedexec.bench.frames` -- the frames (the brief's 400 MB frame, the demo's mixed one);
* :mod:`~sharedexec.bench.tasks` -- what runs in the workers (``_shared_tasks``: the
  same tasks decorated with ``@sharedexec.shared``);
* :mod:`~sharedexec.bench.approaches` -- one small class per way of sharing;
* :mod:`~sharedexec.bench.runner` -- the one runner they all plug into;
* :mod:`~sharedexec.bench.report` -- tables, targets, JSON, plots, progress bar;
* :mod:`~sharedexec.bench.cli` and :mod:`~sharedexec.bench.demo` -- the two commands
  (also ``python -m sharedexec.bench``, and ``python -m sharedexec.bench.demo``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["demo_main", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sharedexec bench [options]``; returns the exit status."""
    from sharedexec.bench.cli import main as bench_main

    return bench_main(argv)


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``python -m sharedexec demo [options]``; returns the exit status."""
    from sharedexec.bench.demo import main as run_demo

    return run_demo(argv)
