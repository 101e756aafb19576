"""The memory meter: extra memory of the whole process tree, every page counted once.

What it measures, and why not RSS (design brief, trap 10):

* RSS counts a shared page in every process that maps it, so a frame shared by 8
  workers looks 8 times as large as it is; users then conclude memory "exploded"
  when nothing was copied.
* The kernel's aggregate counters (``MemAvailable``, cgroup ``memory.stat``) lag by
  seconds and drift by hundreds of MB on this kind of machine: useless for a run
  that lasts one second.

PSS splits each page evenly among the processes that map it, so summing PSS over
the tree counts every private or copy-on-write page once. Pages of shared-memory
files (``/dev/shm``, where ``multiprocessing.shared_memory``, joblib's memmaps,
``multiprocessing.Array`` and sharedexec's segments live) are counted instead by
the file system's used bytes, so that a segment nobody maps yet (published, not
attached) still counts, and counts once. Hence one sample is::

    sum over the tree of (Pss - Pss_Shmem) from /proc/PID/smaps_rollup
    + (f_blocks - f_bfree) * f_frsize of /dev/shm

and the meter reports the peak and final of that sum minus a baseline taken after
``gc.collect()`` when the block starts (garbage freed inside the block would
otherwise hide growth).

Limits, said here so that nobody reads more into the figures than they hold:

* Linux only (``smaps_rollup`` appeared in 4.14). Elsewhere the meter refuses to
  start with a message, and the benchmark reports no memory figure.
* On kernels without ``Pss_Shmem`` (before 5.x) the meter uses ``Pss`` and says so
  (:attr:`MemoryMeter.pss_shmem`): mapped ``/dev/shm`` pages then count twice.
* ``/dev/shm`` is system-wide: files another program writes there meanwhile count.
  Shared memory outside ``/dev/shm`` (``memfd_create``, anonymous ``MAP_SHARED``) is
  left out with the rest of ``Pss_Shmem``, except that ``$SHAREDEXEC_DIR``, where
  sharedexec then puts its segments, is counted too when it is another tmpfs.
* A sample every ~20 ms misses peaks shorter than that. Reading ``smaps_rollup``
  walks the page tables of each process (about 3 ms per GB mapped here), CPU taken
  from the run being measured; so the meter waits at least ``MAX_DUTY`` times as
  long as its last sample took (sampling less often, e.g. with 16 workers holding
  copies of a large frame) and never takes more than a fifth of a core.
  :attr:`MemoryMeter.sample_seconds` says how much it took.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType

import psutil

SHM_DIR = "/dev/shm"
MAX_DUTY = 4  # wait >= 4x the last sample's duration: the meter uses <= 1/5 of a core


class MeterUnavailableError(RuntimeError):
    """The platform lacks what the meter reads (Linux ``/proc/PID/smaps_rollup``)."""


def _check_platform() -> None:
    if not os.path.exists(f"/proc/{os.getpid()}/smaps_rollup"):
        raise MeterUnavailableError(
            f"cannot measure memory on {sys.platform}: the meter reads "
            "/proc/PID/smaps_rollup (Linux 4.14 or later) to count shared pages once. "
            "Run the benchmark on Linux for memory figures; timings still work."
        )


def _private_kb(pid: int) -> tuple[int, bool] | None:
    """``Pss - Pss_Shmem`` of one process in kB, and whether Pss_Shmem was there.

    None when the process vanished (or became unreadable) between listing and
    reading: a worker that exits mid-sample simply no longer holds memory.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    pss = shmem = None
    for line in text.splitlines():
        if line.startswith(b"Pss:"):
            pss = int(line.split()[1])
        elif line.startswith(b"Pss_Shmem:"):
            shmem = int(line.split()[1])
    if pss is None:  # a zombie's smaps_rollup is empty: it holds no memory
        return None
    return pss - (shmem or 0), shmem is not None


def kernel_has_pss_shmem() -> bool:
    """Whether this kernel reports ``Pss_Shmem`` (Linux 5.x and later)."""
    got = _private_kb(os.getpid())
    return bool(got and got[1])


def _is_tmpfs(path: str) -> bool:
    real, best, fstype = os.path.realpath(path), "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, kind = line.split()[:3]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, fstype = mount, kind
    return fstype == "tmpfs"


def default_shm_dirs() -> list[str]:
    """/dev/shm, plus ``$SHAREDEXEC_DIR`` when that is another tmpfs.

    A directory on disk is left out: its files' pages are page cache, counted in
    the PSS of the processes that map them.
    """
    dirs = [SHM_DIR]
    extra = os.environ.get("SHAREDEXEC_DIR")
    if extra and os.path.isdir(extra) and _is_tmpfs(extra) and os.stat(extra).st_dev != os.stat(SHM_DIR).st_dev:
        dirs.append(extra)
    return dirs


def shm_used_bytes(path: str = SHM_DIR) -> int:
    """Bytes in use on the shared-memory file system (0 if there is none)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def shm_total_bytes(dirs: Sequence[str] | None = None) -> int:
    """Bytes in use on all the shared-memory file systems counted (see :func:`default_shm_dirs`)."""
    return sum(shm_used_bytes(d) for d in (default_shm_dirs() if dirs is None else dirs))


class MemoryMeter:
    """Sample the extra memory of this process and all its descendants.

    Use as a context manager::

        with MemoryMeter() as meter:
            run_the_tasks()
        meter.peak_extra, meter.final_extra   # bytes above the baseline

    A background thread samples every ``interval`` seconds (plus once at entry
    for the baseline and once at exit). ``pid`` is the root of the tree,
    this process by default. ``shm_dirs`` are the shared-memory file systems
    counted (:func:`default_shm_dirs` when None); ``()`` counts only the processes'
    private memory, whatever else uses /dev/shm meanwhile.
    """

    def __init__(self, interval: float = 0.02, pid: int | None = None, shm_dirs: Sequence[str] | None = None):
        _check_platform()
        self.interval = interval
        self.shm_dirs = default_shm_dirs() if shm_dirs is None else list(shm_dirs)
        self._root = psutil.Process(pid if pid is not None else os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.baseline = 0
        self.peak = 0
        self.final = 0
        self.last = 0
        self.samples = 0
        self.sample_seconds = 0.0
        self.pss_shmem = True

    def sample(self) -> int:
        """Current absolute total in bytes: private PSS of the tree plus /dev/shm used."""
        try:
            pids = [self._root.pid] + [p.pid for p in self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pids = []
        total_kb = 0
        for pid in pids:
            got = _private_kb(pid)
            if got is None:
                continue
            kb, has_shmem = got
            total_kb += kb
            if not has_shmem:
                self.pss_shmem = False
        return total_kb * 1024 + shm_total_bytes(self.shm_dirs)

    def _record(self) -> float:
        """Take one sample; return how long it took."""
        t0 = time.perf_counter()
        value = self.sample()
        took = time.perf_counter() - t0
        with self._lock:
            self.sample_seconds += took
            self.samples += 1
            self.peak = max(self.peak, value)
            self.last = value
        return took

    def _loop(self) -> None:
        took = 0.0
        while not self._stop.wait(max(self.interval, MAX_DUTY * took)):
            took = self._record()

    def __enter__(self) -> MemoryMeter:
        gc.collect()
        self._record()
        self.baseline = self.peak = self.last
        self._thread = threading.Thread(target=self._loop, name="sharedexec-memory-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._thread is not None, "MemoryMeter.__exit__ without __enter__"
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._record()
        self.final = self.last

    @property
    def peak_extra(self) -> int:
        """Highest sample minus the baseline, in bytes."""
        return self.peak - self.baseline

    @property
    def final_extra(self) -> int:
        """Last sample (taken when the block ended) minus the baseline, in bytes."""
        return self.final - self.baseline
