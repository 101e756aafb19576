"""The OS layer: names, creation, capacity, attach modes, retirement."""

from __future__ import annotations

import errno
import os
import stat
from collections import namedtuple

import numpy as np
import pytest

from sharedexec import SharedMemoryFullError, _names, _segment, _store
from sharedexec._errors import SegmentCorruptError, SegmentNotFoundError, SharedMemoryError

from .conftest import WRITABLE


@pytest.fixture
def segment():
    mapping = _segment.create([memoryview(bytes(1000))], b"0123456789", os.getpid())
    yield mapping
    _segment.retire(mapping.name)


def test_names_fit_macos_and_carry_the_owner():
    name = _names.new_name(4_194_304)  # the largest default pid_max
    assert len("/" + name) <= 31
    assert _names.owner_of(name) == 4_194_304
    assert _names.owner_of("psm_123") is None
    assert _names.new_name(1) != _names.new_name(1)


def test_create_is_private_exclusive_and_aligned(segment):
    path = os.path.join(_names.shm_dir(), segment.name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert segment.size == 64 + _segment.align(1000) + 10
    # XNU rounds an object's size up to a page (the POSIX run emulates it).
    assert os.stat(path).st_size == (segment.size if _segment.current_store().exact_size else -(-segment.size // 4096) * 4096)
    assert segment.layout_offset % _segment.ALIGN == 0
    assert np.frombuffer(segment.view, np.uint8).ctypes.data % _segment.ALIGN == 0
    with pytest.raises(FileExistsError):
        os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


def test_attach_modes(segment):
    segment.view[64:68] = b"abcd"
    readonly = _segment.attach(segment.name)
    assert readonly.view.readonly and bytes(readonly.view[64:68]) == b"abcd"
    private = _segment.attach(segment.name, copy_on_write=True)
    private.view[64:68] = b"WXYZ"
    assert bytes(readonly.view[64:68]) == b"abcd"  # a private write is seen by nobody else
    segment.view[64:68] = b"efgh"
    assert bytes(readonly.view[64:68]) == b"efgh"  # shared mappings see the owner's writes


def test_retire_marks_then_unlinks(segment):
    attached = _segment.attach(segment.name)
    assert attached.state() == _segment.STATE_LIVE
    _segment.retire(segment.name)
    assert attached.state() == _segment.STATE_RETIRED
    assert not os.path.exists(os.path.join(_names.shm_dir(), segment.name))
    with pytest.raises(SegmentNotFoundError):
        _segment.attach(segment.name)
    _segment.retire(segment.name)  # idempotent


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: open(path, "r+b").write(b"XXXXXXXX"), "bad magic"),
        (lambda path: os.truncate(path, 32), "truncated"),
        (lambda path: os.truncate(path, 200), "truncated or corrupt"),
        (lambda path: (f := open(path, "r+b"), f.seek(8), f.write(b"\x63\x00"), f.close()), "version 99"),
    ],
)
def test_damaged_segments_are_refused(segment, damage, message):
    damage(os.path.join(_names.shm_dir(), segment.name))
    with pytest.raises(SegmentCorruptError, match=message):
        _segment.attach(segment.name)


def test_foreign_names_are_refused():
    with pytest.raises(SegmentCorruptError, match="not a sharedexec segment name"):
        _segment.attach("../etc/passwd")


def test_full_directory_is_a_clear_error(monkeypatch, tmp_path):
    statvfs = namedtuple("statvfs", "f_bavail f_frsize f_blocks f_files f_favail")
    monkeypatch.setattr(os, "statvfs", lambda _: statvfs(1000, 4096, 16384, 1000, 900))  # 4 MB free of 64 MB
    with pytest.raises(SharedMemoryFullError) as info:
        _segment.create([memoryview(bytes(100 << 20))], b"", os.getpid(), directory=str(tmp_path))
    message = str(info.value)
    assert "104.9 MB" in message and "4.1 MB free of 67.1 MB" in message
    assert "Docker's default" in message and "--shm-size" in message and "SHAREDEXEC_DIR" in message
    assert isinstance(info.value, OSError) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writable", [True, False], ids=["pwrite", "fallocate"])
def test_a_full_file_system_is_a_clear_error_and_leaves_nothing(monkeypatch, tmp_path, writable):
    """The free-space check passed, then the file system filled up: the
    write (``pwritev``) or the reservation before writing through the mapping
    (where the store cannot be written to, macOS) fails with ENOSPC."""

    def no_space(fd, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_store.TmpfsStore, "writable", writable)
    monkeypatch.setattr(os, "pwritev" if writable else "posix_fallocate", no_space)
    with pytest.raises(SharedMemoryFullError, match="cannot create a"):
        _segment.create([memoryview(bytes(1 << 20))], b"", os.getpid(), directory=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path):
    with pytest.raises(SharedMemoryError, match="no such directory"):
        _segment.create([], b"", os.getpid(), directory=str(tmp_path / "absent"))


@pytest.mark.tmpfs_only
def test_file_backed_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(_names.DIR_ENV, str(tmp_path))
    mapping = _segment.create([], b"layout", os.getpid())
    assert (tmp_path / mapping.name).exists()
    assert _names.list_segments() == [(mapping.name, os.getpid(), mapping.size)]
    assert _names.remove_owned_by(os.getpid()) == [mapping.name]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writable", WRITABLE)
@pytest.mark.parametrize("total", [1000, 200 << 20])  # through a mapping: one thread, then two
def test_create_copies_buffers_and_layout(monkeypatch, total, writable):
    monkeypatch.setattr(_store.TmpfsStore, "writable", writable)
    monkeypatch.setattr(_store.PosixStore, "writable", writable)
    sources = [np.random.default_rng(i).integers(0, 255, total // 3 + i, dtype=np.uint8) for i in range(3)]
    mapping = _segment.create([memoryview(src) for src in sources], b"the layout", os.getpid())
    try:
        offsets, layout_offset = _segment.offsets_for([src.nbytes for src in sources])
        assert all(offset % _segment.ALIGN == 0 for offset in offsets)
        assert mapping.layout_offset == layout_offset and bytes(mapping.layout()) == b"the layout"
        view = np.frombuffer(mapping.view, np.uint8)
        for offset, src in zip(offsets, sources):
            np.testing.assert_array_equal(view[offset : offset + src.nbytes], src)
    finally:
        _segment.retire(mapping.name)


@pytest.mark.parametrize("writable", WRITABLE)
@pytest.mark.parametrize("short", [False, True], ids=["whole", "short-writes"])
def test_rows_of_a_strided_buffer_land_in_c_order(monkeypatch, writable, short):
    """A 2-D buffer with contiguous rows (a row slice of a block) is written
    row after row; a short write (a signal, a full file system) goes on where
    it stopped."""
    monkeypatch.setattr(_store.TmpfsStore, "writable", writable)
    monkeypatch.setattr(_store.PosixStore, "writable", writable)
    if short:
        real = os.pwritev
        monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: real(fd, [memoryview(buffers[0])[:1000]], offset))
    whole = np.random.default_rng(0).integers(0, 255, (7, 30_000), dtype=np.uint8)
    sources = [whole[:, 10:-7], whole[::2, 5:3000], whole[:0, :], np.arange(5000, dtype=np.uint8)]
    mapping = _segment.create([memoryview(src) for src in sources], b"layout", os.getpid())
    try:
        offsets, _ = _segment.offsets_for([src.nbytes for src in sources])
        view = np.frombuffer(mapping.view, np.uint8)
        for offset, src in zip(offsets, sources):
            np.testing.assert_array_equal(view[offset : offset + src.nbytes], src.ravel())
    finally:
        _segment.retire(mapping.name)
