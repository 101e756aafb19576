"""The benchmark's tasks decorated with ``@sharedexec.shared``.

A module of their own because the decorator must run at import time, in the
parent and in every worker that unpickles the task by reference; importing this
module fails while ``sharedexec.shared`` does not exist, and the approaches that
need it are then reported as unavailable instead of breaking the benchmark.
The names match those in :mod:`sharedexec.bench.tasks`, so the runner finds the
decorated twin of a task by its name.
"""

from __future__ import annotations

import pandas as pd

from sharedexec import shared
from sharedexec.bench import tasks


@shared
def task_len(df: pd.DataFrame, i: int) -> int:
    """:func:`sharedexec.bench.tasks.task_len`, sharing its frame."""
    return tasks.task_len(df, i)


@shared
def task_touch(df: pd.DataFrame, i: int) -> int:
    """:func:`sharedexec.bench.tasks.task_touch`, sharing its frame."""
    return tasks.task_touch(df, i)


@shared
def task_hold(df: pd.DataFrame, i: int) -> int:
    """:func:`sharedexec.bench.tasks.task_hold`, sharing its frame."""
    return tasks.task_hold(df, i)
