"""``python -m sharedexec doctor`` and ``python -m sharedexec cleanup``.

``doctor`` answers "will sharing work here, and how well?" before a long job
finds out the hard way: how large and how full the shared-memory directory is
(Docker gives containers 64 MB by default), whether sharedexec will accept it
(another user could not rename segments out of it, see :mod:`sharedexec._segment`)
and a segment can really be created there, the start method, the versions that matter, the effective
configuration, and segments left behind by processes that are gone.

``cleanup`` removes those leftovers. A segment's name carries the pid of the
process that owns it (``sx_<pid>_<random>``, see :mod:`sharedexec._names`), so
"its owner is gone" is a question about a pid, not about any registration.
Each owner's reaper normally removes its segments within seconds of its death
(:mod:`sharedexec._reaper`); leftovers mean the reaper was killed too, the
machine or container stopped mid-run, or ``SHAREDEXEC_DIR`` pointed at a
directory the reaper was not told about. ``cleanup`` only *lists* unless given
``--yes``, and never removes the segment of a live process: it asks again
whether the owner is alive right before each removal.

A name proves nothing: ``/dev/shm`` is world-writable, and anyone may create
``sx_<pid>_...`` there. Each candidate is looked at with ``lstat`` (a symlink
is never followed) and is a segment of the caller only if it is a regular
file, owned by the caller's effective uid, starting with the sharedexec
header. Other users' files are listed as "not yours" and left alone -- root
included, unless given ``--all-users`` -- and files that merely look like
segments (symlinks, FIFOs, no header) are listed and never touched.

Pids are per pid namespace. When one ``/dev/shm`` is shared between
containers (``docker run --ipc=host`` or ``--ipc=container:...``), a process of
another container looks dead from here: run ``cleanup`` where the processes
run. (A pid reused by an unrelated process makes a dead owner look alive: its
segments are kept, the safe mistake.)

Both commands print to stdout and return an exit code: 0 when all is well (for
``cleanup``: whatever it was asked to do is done), 1 when there is something
to act on (``doctor``: a problem listed under "Problems"; ``cleanup``: a
removal of the caller's segments failed or the directory cannot be read), 2
for bad arguments. Other users' files never make ``cleanup`` fail.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import platform
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import _names, _segment, _store
from ._segment import MAGIC, describe_uid, file_kind, format_bytes

# One user-database lookup per uid, not per candidate: a directory may hold
# thousands of another user's files.
_describe_uid = functools.lru_cache(maxsize=None)(describe_uid)

#: Below this much free space, doctor warns: a typical DataFrame job wants more.
LOW_SPACE_BYTES = 1 << 30
_PROBE_BYTES = 1 << 20

DOCKER_HINT = (
    "Docker gives containers a 64 MB /dev/shm by default: start the container with a larger "
    "one (`docker run --shm-size=8g`, `shm_size: 8gb` in docker-compose; on Kubernetes mount an "
    f"emptyDir with `medium: Memory` at /dev/shm), or set {_names.DIR_ENV} to a directory on a "
    "larger file system (a tmpfs is fastest; a disk directory works, through the page cache)."
)


# -- segments by owner -----------------------------------------------------------


@dataclass
class Leftovers:
    """The sharedexec segments of one directory that are the caller's (all
    users' with ``all_users``), split by whether their owner lives; and what
    only looks like one."""

    directory: str
    dead: list[tuple[str, int, int]] = field(default_factory=list)  # (name, owner pid, size)
    live: list[tuple[str, int, int]] = field(default_factory=list)
    not_yours: list[tuple[str, str]] = field(default_factory=list)  # (name, what it is)
    not_segments: list[tuple[str, str]] = field(default_factory=list)

    @property
    def dead_bytes(self) -> int:
        return sum(size for _, _, size in self.dead)

    @property
    def live_bytes(self) -> int:
        return sum(size for _, _, size in self.live)


def _has_header(path: str, st: os.stat_result) -> bool:
    """Whether the file ``lstat`` saw at ``path`` starts with the sharedexec
    magic. Opened without following a link or blocking on a FIFO, and only if
    it is still that file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return False
    try:
        now = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and os.pread(fd, len(MAGIC), 0) == MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _classify(path: str, all_users: bool) -> tuple[os.stat_result | None, str | None]:
    """(its lstat, None) for a segment cleanup may handle; (its lstat,
    "not yours" reason) or (.., "not a segment" reason) otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return None, "gone"
    what = f"{file_kind(st.st_mode)} of {_describe_uid(st.st_uid)}"
    if not stat.S_ISREG(st.st_mode):
        return st, f"not a segment: {what}"
    if st.st_uid != os.geteuid() and not all_users:
        return st, f"not yours: {what}"
    if not _has_header(path, st):
        return st, f"not a segment: {what} without the sharedexec header"
    return st, None


def find_leftovers(directory: str, only_pids: Sequence[int] = (), all_users: bool = False) -> Leftovers:
    """Every ``sx_`` segment of the caller (of every user if ``all_users``)
    in ``directory`` (of the owners ``only_pids``, if given), split by whether
    its owner lives; the rest under ``not_yours`` / ``not_segments``."""
    found = Leftovers(directory)
    for name, owner, size in sorted(_names.list_segments(directory)):
        if only_pids and owner not in only_pids:
            continue
        _, problem = _classify(os.path.join(directory, name), all_users)
        if problem == "gone":
            continue
        if problem is not None:
            (found.not_yours if problem.startswith("not yours") else found.not_segments).append((name, problem))
            continue
        (found.live if _names.pid_alive(owner) else found.dead).append((name, owner, size))
    return found


def _describe_owners(entries: list[tuple[str, int, int]]) -> str:
    owners = sorted({owner for _, owner, _ in entries})
    shown = ", ".join(map(str, owners[:8])) + (", ..." if len(owners) > 8 else "")
    return f"{len(entries)} segment(s), {format_bytes(sum(s for _, _, s in entries))}, of {len(owners)} process(es): {shown}"


# -- doctor --------------------------------------------------------------------------


def _mount_of(path: str) -> tuple[str, str] | None:
    """(mount point, file system type) of the mount holding ``path`` (Linux)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in lines:
        parts = line.split(" - ", 1)
        if len(parts) != 2:
            continue
        fields, after = parts[0].split(), parts[1].split()
        if len(fields) < 5 or not after:
            continue
        point = fields[4].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        # The last matching mount of the longest point wins (mounts stack).
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, after[0])
    return best


def _probe(directory: str | None) -> str | None:
    """Create, map back and retire a small segment the way sharedexec does
    (in ``directory``, or the POSIX store if None); the error, or None."""
    try:
        mapping = _segment.create([memoryview(bytes(_PROBE_BYTES))], b"probe", os.getpid(), directory=directory)
    except OSError as exc:
        return f"cannot create a {format_bytes(_PROBE_BYTES)} segment there: {exc.strerror or exc}"
    try:
        _segment.attach(mapping.name, directory=directory)
        return None
    except OSError as exc:
        return f"cannot map a segment there: {exc.strerror or exc}"
    finally:
        _segment.retire(mapping.name, directory=directory)


def _probe_row(row, problems: list[str], directory: str | None, where: str) -> None:
    if _segment.unshared_reason() is not None:
        row("test segment", "not tried: sharing is unavailable (see above)")
        return
    error = _probe(directory)
    row("test segment", "created, mapped and removed" if error is None else f"FAILED: {error}")
    if error is not None:
        problems.append(f"sharedexec cannot create segments in {where}: {error}.")


def _unsafe_dir(directory: str) -> str | None:
    """What issue 14's check at the first segment would refuse ``directory``
    for (another user could rename our segments there), said before a job
    fails on it; None for a directory it accepts or that is missing (reported
    apart)."""
    try:
        return _segment.unsafe_dir_reason(directory)
    except OSError:
        return None


def _owner_row(row, directory: str, unsafe: str | None) -> None:
    st = os.stat(directory)
    what = f"{_describe_uid(st.st_uid)}, {stat.S_IMODE(st.st_mode):04o}"
    if os.path.islink(directory):
        link = _describe_uid(os.lstat(directory).st_uid)
        what = f"a symbolic link of {link} to {os.path.realpath(directory)} ({what})"
    row("owner and mode", f"{what}: {'UNSAFE (see Problems)' if unsafe else 'safe'}")


def _versions() -> list[tuple[str, str]]:
    import importlib

    from . import __version__

    rows = [
        ("python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
        ("sharedexec", __version__),
    ]
    for module in ("pandas", "numpy", "pyarrow", "joblib", "cloudpickle"):
        try:
            version = getattr(importlib.import_module(module), "__version__", "installed")
        except ImportError:
            version = "not installed"
        rows.append((module, version))
    return rows


def _cache_budget() -> tuple[str, str | None]:
    """The effective worker cache budget, and a problem with the variable if any."""
    from . import _cache

    raw = os.environ.get(_cache.CACHE_ENV)
    default = _cache._PHYS_BYTES // 2
    if raw is None:
        return f"(not set) -> {format_bytes(default)} per worker (half of physical memory)", None
    value = _cache.parse_size(raw)
    if value is None:
        return f"{raw!r} (invalid)", (
            f"{_cache.CACHE_ENV}={raw!r} is not a size: write e.g. {_cache.CACHE_ENV}=2GiB "
            f"(or 2GB, 2147483648)."
        )
    return f"{raw} -> {format_bytes(value)} per worker", None


def build_doctor_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sharedexec doctor",
        description="Check that sharedexec can share memory here: the shared-memory directory's "
        "size and free space, a test segment, the start method, versions, configuration, and "
        "segments left by processes that are gone.",
        epilog="Exit code: 0 when no problem was found, 1 when a problem is listed.",
    )
    p.add_argument(
        "--dir",
        metavar="DIR",
        help=f"the directory to check (default: ${_names.DIR_ENV}, else {_names.DEFAULT_DIR})",
    )
    return p


def main_doctor(argv: Sequence[str] | None = None) -> int:
    """``python -m sharedexec doctor``: print a health report; 1 if it lists a problem."""
    args = build_doctor_parser().parse_args(argv)
    out = sys.stdout
    problems: list[str] = []
    notes: list[str] = []

    def row(label: str, value: str) -> None:
        print(f"  {label:<30} {value}", file=out)

    env_dir = os.environ.get(_names.DIR_ENV)
    asked = os.environ.get(_store.BACKEND_ENV)
    kind = asked or _store.default_backend()
    print("Shared memory", file=out)
    label = {"tmpfs": "a tmpfs directory", "posix": "POSIX shared memory (shm_open)", "unshared": "none"}.get(kind, kind)
    row("implementation", f"{label} ({f'${_store.BACKEND_ENV}={asked}' if asked else 'the default on ' + sys.platform})")
    reason = _segment.unshared_reason()
    directory = args.dir or (_segment._POSIX.directory if kind == "posix" else _names.shm_dir())
    unsafe = _unsafe_dir(directory) if kind == "tmpfs" and not reason else None
    row("sharing", "unavailable: every task gets a pickled copy" if reason else
        "refused: creating a segment raises an error (see Problems)" if unsafe else "available")
    if reason:
        problems.append(f"sharedexec cannot share memory here: {reason}")
    source = "--dir" if args.dir else f"${_names.DIR_ENV}" if env_dir and kind != "posix" else "default"
    if directory is None:  # macOS: POSIX shared memory is the VM system's, with nothing to list
        row("directory", "none (POSIX shared memory lives in the VM system here)")
        leftovers = Leftovers("")
    else:
        row("directory", f"{directory} ({source})")
    if directory is None:  # nothing to measure or list: each process's reaper removes its objects
        _probe_row(row, problems, None, "POSIX shared memory")
    elif not os.path.isdir(directory):
        problems.append(
            f"{directory} does not exist or is not a directory: sharedexec cannot create segments. "
            f"Create it, or set {_names.DIR_ENV} to an existing directory."
        )
        leftovers = Leftovers(directory)
    else:
        st = os.statvfs(directory)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        leftovers = find_leftovers(directory)
        ours = leftovers.dead_bytes + leftovers.live_bytes
        mount = _mount_of(directory)
        if mount is not None:
            row("file system", f"{mount[1]} mounted at {mount[0]}")
            if mount[1] not in ("tmpfs", "shm", "ramfs"):
                notes.append(
                    f"{directory} is on a {mount[1]} file system, not a tmpfs: sharing works, but "
                    "segments go through the page cache and may be written to disk."
                )
        row("size", format_bytes(total))
        row("free", f"{format_bytes(free)} ({format_bytes(ours)} used by sharedexec segments)")
        if total < LOW_SPACE_BYTES:
            problems.append(
                f"{directory} holds only {format_bytes(total)} in all: a DataFrame larger than that "
                f"cannot be shared (sharedexec falls back to pickling it, once per task). " + DOCKER_HINT
            )
        elif free < LOW_SPACE_BYTES:
            problems.append(
                f"{directory} has only {format_bytes(free)} free of {format_bytes(total)}: large DataFrames will "
                "not fit (sharedexec falls back to pickling them, once per task). Free space there "
                "(see the leftover segments below), or: " + DOCKER_HINT
            )
        if kind == "tmpfs":
            _owner_row(row, directory, unsafe)
        if unsafe:  # the probe would only fail with the same error
            problems.append(f"sharedexec refuses to create segments in {directory}: {unsafe}")
        else:
            _probe_row(row, problems, None if kind == "posix" else directory, directory)

    print("Leftover segments", file=out)
    if leftovers.dead:
        row("of processes that are gone", _describe_owners(leftovers.dead))
        problems.append(
            f"{len(leftovers.dead)} segment(s) ({format_bytes(leftovers.dead_bytes)}) in {directory} belong to "
            "processes that are gone. Remove them with `python -m sharedexec cleanup --yes`"
            + (f" (with {_names.DIR_ENV}={directory})" if env_dir else "")
            + "."
        )
    else:
        row("of processes that are gone", "none")
    row("of live processes", _describe_owners(leftovers.live) if leftovers.live else "none")
    if leftovers.not_yours:
        row("of other users", f"{len(leftovers.not_yours)} file(s): not yours, left alone")
    if leftovers.not_segments:
        row("look-alikes", f"{len(leftovers.not_segments)} file(s) named sx_... that are not segments")

    print("Processes", file=out)
    methods = multiprocessing.get_all_start_methods()
    chosen = multiprocessing.get_start_method(allow_none=True)
    row("default start method", f"{chosen or methods[0]} (available: {', '.join(methods)})")
    row("CPUs", str(os.cpu_count()))

    print("Versions", file=out)
    versions = _versions()
    for name, version in versions:
        row(name, version)
    if dict(versions).get("pyarrow") == "not installed":
        notes.append(
            "pyarrow is not installed: pandas' Arrow-backed string columns are unavailable, and "
            "string columns stored as Python objects are unpickled once per worker instead of "
            "being shared zero-copy. `pip install pyarrow` to share them."
        )

    print("Configuration", file=out)
    row(_names.DIR_ENV, f"{env_dir} -> {_names.shm_dir()}" if env_dir else f"(not set) -> {_names.DEFAULT_DIR}")
    budget, problem = _cache_budget()
    from . import _cache

    row(_cache.CACHE_ENV, budget)
    if problem:
        problems.append(problem)

    for title, items in (("Notes", notes), ("Problems", problems)):
        if items:
            print(title, file=out)
            for item in items:
                print(f"  - {item}", file=out)
    print("Result: " + (f"{len(problems)} problem(s) found." if problems else "no problem found."), file=out)
    return 1 if problems else 0


# -- cleanup -------------------------------------------------------------------------


def build_cleanup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sharedexec cleanup",
        description="List the sharedexec segments (sx_<pid>_<random>) whose owning process is "
        "gone, and remove them with --yes. Segments of live processes are never removed.",
        epilog="Pids are per pid namespace: if this /dev/shm is shared with other containers "
        "(--ipc=host), run cleanup where the owning processes run. Exit code: 0 when done, "
        "1 when a segment could not be removed or the directory cannot be read.",
    )
    p.add_argument("--yes", "-y", action="store_true", help="remove them (default: only list what would go)")
    p.add_argument(
        "--dir",
        metavar="DIR",
        help=f"the directory to clean (default: ${_names.DIR_ENV}, else {_names.DEFAULT_DIR})",
    )
    p.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="only the segments of this owner pid (repeatable); still only if it is gone",
    )
    p.add_argument(
        "--all-users",
        action="store_true",
        help="root only: also handle other users' segments (regular files with the sharedexec "
        "header); without it, they are listed as not yours and left alone",
    )
    return p


def main_cleanup(argv: Sequence[str] | None = None) -> int:
    """``python -m sharedexec cleanup [--yes]``: list, or remove, segments of processes that are gone."""
    parser = build_cleanup_parser()
    args = parser.parse_args(argv)
    if args.all_users and os.geteuid() != 0:
        parser.error("--all-users is for root: other users' files can only be removed by their owner or root")
    out = sys.stdout
    directory = args.dir or _names.shm_dir()
    posix = not args.dir and (os.environ.get(_store.BACKEND_ENV) or _store.default_backend()) == "posix"
    if posix:
        directory = _segment._POSIX.directory
        if directory is None:
            print(
                "POSIX shared memory cannot be listed on this platform (macOS): each process's reaper "
                f"removes its segments, found by their lock files in {_store.lock_dir()}, when it exits.",
                file=out,
            )
            return 0
    if not os.path.isdir(directory):
        print(f"{directory} does not exist or is not a directory: nothing to clean.", file=out)
        return 1
    if not os.access(directory, os.R_OK | os.X_OK):
        print(f"cannot read {directory}: permission denied.", file=out)
        return 1
    found = find_leftovers(directory, args.pid, args.all_users)
    for title, entries in (("Not yours, left alone", found.not_yours), ("Not sharedexec segments, left alone", found.not_segments)):
        if entries:
            print(f"{title}:", file=out)
            for name, what in entries:
                print(f"  {os.path.join(directory, name)}  ({what})", file=out)
    if found.not_yours and os.geteuid() == 0:
        print("  (as root, pass --all-users to handle other users' segments too)", file=out)
    if found.live:
        print(f"Keeping {_describe_owners(found.live)} (alive).", file=out)
    if not found.dead:
        print(f"No segment of a process that is gone in {directory}.", file=out)
        return 0
    verb = "Removing" if args.yes else "Would remove"
    print(f"{verb} {_describe_owners(found.dead)} (gone):", file=out)
    failed = removed = 0
    freed = 0
    for name, owner, size in found.dead:
        path = os.path.join(directory, name)
        print(f"  {path}  {format_bytes(size)}  (process {owner})", file=out)
        if not args.yes:
            continue
        # Ask again right before removing: never a live process's segment,
        # never a file that took the segment's name meanwhile.
        if _names.pid_alive(owner):
            print(f"    kept: process {owner} is alive now", file=out)
            continue
        if _classify(path, args.all_users)[1] is not None:
            print("    kept: it changed and is no longer a segment of yours", file=out)
            continue
        try:
            os.unlink(path)
            if posix:  # Linux shows POSIX objects in /dev/shm; each has a lock file (see _store)
                _names.unlink_path(os.path.join(_store.lock_dir(), name))
        except FileNotFoundError:
            continue  # its reaper (or another cleanup) was faster
        except OSError as exc:
            print(f"    FAILED: {exc.strerror}", file=out)
            failed += 1
            continue
        removed += 1
        freed += size
    if not args.yes:
        again = " ".join(["python -m sharedexec cleanup --yes", *(["--dir", args.dir] if args.dir else [])]
                         + [f"--pid {pid}" for pid in args.pid])
        print(f"Nothing removed. Run `{again}` to remove them.", file=out)
        return 0
    print(f"Removed {removed} segment(s), {format_bytes(freed)}." + (f" {failed} could not be removed." if failed else ""), file=out)
    return 1 if failed else 0
