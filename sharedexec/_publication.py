"""How an encoded object is laid out in a segment, and read back.

A publication is one segment holding the buffers of one object that were not
already in shared memory, then its *table* and *layout* pickled together::

    table  = [(segment name or "" for this one, offset, nbytes), ...]  one per buffer
    layout = the codec's pickle of the object, buffers out of band

Table entries that name another segment let a derived frame (``df.assign``,
a column subset) point at the buffers an earlier publication already holds
instead of copying them again (vineyard#503). The publisher keeps those
segments alive while this one lives.

The table and layout are unpickled only from a mapping ``_segment.attach``
returned, i.e. after the segment's tag was verified with the key from the
handle (``_segment``, Security): bytes that are not ours are never unpickled.
Sizes in the table are still checked against the real size of each segment
before any view is made: a corrupt table never reads out of bounds.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable

from . import _codec, _segment
from ._errors import SegmentCorruptError

Ref = tuple[str, int, int]


def write(
    layout: bytes,
    new_buffers: list[memoryview | None],
    refs: list[Ref | int],
    owner_pid: int,
    copied: Callable[[int, memoryview], None] | None = None,
) -> tuple[_segment.Mapping, list[Ref]]:
    """Create a segment holding ``new_buffers`` and the object's table.

    ``refs`` has one item per buffer of the object, in order: a ``Ref`` into
    another segment, or the index of the buffer in ``new_buffers``. Returns the
    mapping and, for each new buffer, where it was placed. ``copied``: see
    ``_segment.create`` (it may drop items of ``new_buffers``)."""
    sizes = [buf.nbytes for buf in new_buffers]
    offsets, _ = _segment.offsets_for(sizes)
    table = [ref if isinstance(ref, tuple) else ("", offsets[ref], sizes[ref]) for ref in refs]
    payload = pickle.dumps((table, layout), protocol=pickle.HIGHEST_PROTOCOL)
    mapping = _segment.create(new_buffers, payload, owner_pid, copied=copied)
    placed = [(mapping.name, off, size) for off, size in zip(offsets, sizes)]
    return mapping, placed


def read(
    mapping: _segment.Mapping, attach: Callable[[str], _segment.Mapping], read_only: tuple[int, ...] = ()
) -> Any:
    """Decode the object published in ``mapping``; ``attach(name)`` maps the
    other segments its table names (with the same access). The buffers
    numbered in ``read_only`` are given read-only whatever the access."""
    try:
        table, layout = pickle.loads(mapping.layout())
    except Exception as exc:
        raise SegmentCorruptError(f"segment {mapping.name} has an unreadable layout: {exc}") from exc
    views = []
    for name, offset, nbytes in table:
        target = mapping if name == "" else attach(name)
        if offset < _segment.ALIGN or nbytes < 0 or offset + nbytes > target.layout_offset:
            raise SegmentCorruptError(
                f"segment {mapping.name} names bytes {offset}..{offset + nbytes} of segment "
                f"{target.name}, outside its {target.layout_offset - _segment.ALIGN} bytes of buffers"
            )
        views.append(target.view[offset : offset + nbytes])
    for number in read_only:
        if 0 <= number < len(views):
            views[number] = views[number].toreadonly()
    try:
        return _codec.decode(layout, views)
    except (IndexError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise SegmentCorruptError(f"segment {mapping.name} has a layout that does not match its buffers: {exc}") from exc
