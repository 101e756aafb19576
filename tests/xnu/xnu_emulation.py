"""Make POSIX shared-memory descriptors behave as on macOS (XNU), on Linux.

Test-only. ``.ci/run`` runs the suite under ``SHAREDEXEC_BACKEND=posix`` with
``SX_EMULATE_XNU=1``: ``tests/conftest.py`` then puts this directory on
``PYTHONPATH``, so that every process -- pytest, spawned and forkserver
workers, scripts the tests start, and (through ``xnu_reaper.py``) the reaper,
which runs with ``-I -S`` -- imports ``sitecustomize`` from here and runs
:func:`install` before anything else.

What changes, for descriptors of POSIX shared-memory objects only (on Linux:
files directly in /dev/shm named ``sx_...``), each a fact of XNU's
``bsd/kern/posix_shm.c`` (apple/darwin-xnu) that ``sharedexec._store`` also
cites:

* ``os.fstat``: no file type in ``st_mode`` (``pshm_stat`` returns the mode
  ``shm_open`` was given);
* ``os.ftruncate``: once; the size becomes a whole number of pages
  (``pshm_truncate``: EINVAL once allocated, ``round_page_64``);
* ``mmap.mmap``: ``MAP_SHARED`` only, EINVAL for a private or copy-on-write
  mapping (``pshm_mmap``);
* ``os.pread``, ``os.pwrite``/``pwritev``/``write``: ENOTSUP
  (``pshm_read``/``pshm_write``);
* ``fcntl.flock``/``fcntl.lockf``, ``os.fchmod``: ENOTSUP (they take a
  vnode: ``fp_getfvp`` in ``bsd/kern/kern_descrip.c``).

Not emulated: ``posix_fallocate``. macOS has none and the store calls it
only where ``os`` has it (``tests/test_store.py`` runs without it); on Linux
it is what turns a full /dev/shm into ENOSPC instead of SIGBUS, which the
reliability tests check under this emulation too. Nor the flags macOS's
``shm_open`` refuses (``test_store`` checks them): glibc needs O_NONBLOCK to
open a FIFO planted in /dev/shm without blocking.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat

ENV = "SX_EMULATE_XNU"
_SHM = "/dev/shm/"


def is_shm(fd) -> bool:
    """Whether ``fd`` (or an object with ``fileno()``) is a POSIX shm object
    of sharedexec's: a file directly in /dev/shm named ``sx_...``."""
    try:
        fd = fd if isinstance(fd, int) else fd.fileno()
        target = os.readlink(f"/proc/self/fd/{fd}")
    except (OSError, AttributeError, ValueError, TypeError):
        return False
    return target.startswith(_SHM + "sx_") and "/" not in target[len(_SHM):]


def _refuse(code: int, what: str):
    raise OSError(code, f"{os.strerror(code)} (emulated XNU: {what} on a POSIX shm object)")


def patches() -> list[tuple[object, str, object]]:
    """``(module, attribute, replacement)`` for each emulated call: what
    :func:`install` sets for good, and a test may set for its own duration
    (``monkeypatch.setattr``)."""
    import fcntl

    real_fstat, real_ftruncate = os.fstat, os.ftruncate
    real_pread, real_pwrite, real_pwritev, real_write = os.pread, os.pwrite, os.pwritev, os.write
    real_fchmod = os.fchmod
    real_flock, real_lockf = fcntl.flock, fcntl.lockf
    real_mmap, real_spawn = mmap.mmap, os.posix_spawn

    def fstat(fd):
        st = real_fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and is_shm(fd)):  # a FIFO planted in /dev/shm shows what it is
            return st
        fields = list(st)
        fields[stat.ST_MODE] = stat.S_IMODE(st.st_mode)
        extra = {name: getattr(st, name) for name in ("st_atime", "st_mtime", "st_ctime", "st_atime_ns",
                                                      "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks")}
        return os.stat_result(fields, extra)

    def ftruncate(fd, length):
        if not is_shm(fd):
            return real_ftruncate(fd, length)
        if real_fstat(fd).st_size:
            _refuse(errno.EINVAL, "a second ftruncate")
        return real_ftruncate(fd, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)

    def refusing(real, code: int, what: str):
        def call(fd, *args):
            if is_shm(fd):
                _refuse(code, what)
            return real(fd, *args)

        return call

    class XnuMmap(real_mmap):
        def __new__(cls, fileno, length, *args, **kwargs):
            given = dict(zip(("flags", "prot", "access", "offset"), args), **kwargs)
            private = given.get("access") == mmap.ACCESS_COPY or given.get("flags", mmap.MAP_SHARED) & mmap.MAP_PRIVATE
            if fileno != -1 and private and is_shm(fileno):
                _refuse(errno.EINVAL, "a MAP_PRIVATE mapping")
            return real_mmap.__new__(cls, fileno, length, *args, **kwargs)

    XnuMmap.__name__ = XnuMmap.__qualname__ = "mmap"

    # The reaper runs as `python -I -S .../_reaper.py PID`: no PYTHONPATH, no
    # sitecustomize. It is started through xnu_reaper.py, which installs this.
    here = os.path.dirname(os.path.abspath(__file__))

    def posix_spawn(path, argv, *args, **kwargs):
        argv = list(argv)
        if len(argv) >= 2 and str(argv[-2]).endswith("_reaper.py"):
            argv[-2:-2] = [os.path.join(here, "xnu_reaper.py")]
        return real_spawn(path, argv, *args, **kwargs)

    return [
        (os, "fstat", fstat),
        (os, "ftruncate", ftruncate),
        (os, "pread", refusing(real_pread, errno.ENOTSUP, "pread")),
        (os, "pwrite", refusing(real_pwrite, errno.ENOTSUP, "pwrite")),
        (os, "pwritev", refusing(real_pwritev, errno.ENOTSUP, "pwritev")),
        (os, "write", refusing(real_write, errno.ENOTSUP, "write")),
        (os, "fchmod", refusing(real_fchmod, errno.ENOTSUP, "fchmod")),
        (fcntl, "flock", refusing(real_flock, errno.ENOTSUP, "flock")),
        (fcntl, "lockf", refusing(real_lockf, errno.ENOTSUP, "lockf")),
        (mmap, "mmap", XnuMmap),
        (os, "posix_spawn", posix_spawn),
    ]


def install() -> None:
    """Apply :func:`patches` in this process, once however this module was
    imported (as ``tests.xnu.xnu_emulation`` by conftest, top-level by
    sitecustomize)."""
    if getattr(os, "_sx_xnu_emulated", False):
        return
    os._sx_xnu_emulated = True
    for module, name, replacement in patches():
        setattr(module, name, replacement)
