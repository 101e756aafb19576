"""Every way to make a function shared, at module level so that spawn and
forkserver workers can import what the pool sends by reference."""

from __future__ import annotations

import functools

import sharedexec

from ._sharing_tasks import _in_segment


def len_and_shared(df, i):
    """The plain task: what it computed, and whether its frame was shared."""
    return len(df) + i, _in_segment(df._mgr.blocks[0].values)


@sharedexec.shared
def decorated(df, i):
    return len_and_shared(df, i)


@sharedexec.shared(min_bytes=1000)
def decorated_with_options(df, i):
    return len_and_shared(df, i)


renamed = sharedexec.shared(len_and_shared)  # under a name that is not its own


class Offsetter:
    def __init__(self, offset: int):
        self.offset = offset

    def apply(self, df, i):
        n, in_segment = len_and_shared(df, i)
        return n + self.offset, in_segment


OFFSETTER = Offsetter(0)


def forms() -> dict:
    """Each wrapping form, as a callable of (df, i), built as a user would at
    the call site."""
    return {
        "@shared": decorated,
        "@shared(min_bytes=...)": decorated_with_options,
        "x = shared(f)": renamed,
        "shared(f) inline": sharedexec.shared(len_and_shared),
        "shared(obj.method)": sharedexec.shared(OFFSETTER.apply),
        "partial(shared f)": functools.partial(decorated),
    }
