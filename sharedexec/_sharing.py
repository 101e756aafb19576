"""Where pickling meets sharing: the reducer, the task wrapper, the result box.

The three entry points share one mechanism. Each wraps the task's callable in
a :class:`SharedTask` (the decorator *is* one). Pickling a task message puts
the callable before its arguments -- ``(job, i, func, args, kwds)`` in a
``Pool``, ``_CallItem(work_id, fn, args, kwargs)`` in ``concurrent.futures``,
``(func, args, kwargs)`` in joblib's batches -- so when the pickler meets a
``SharedTask`` it is *armed* for the rest of that message, and every large
DataFrame / Series / Index / ndarray / Arrow object that follows becomes a
small handle::

    parent pickler                      worker unpickler
    --------------                      ----------------
    SharedTask  -> arm, pickle by ref   -> TaskRunner (task mode)
    df (400 MB) -> REGISTRY.publish     -> CACHE.resolve(handle)
                   + lease -> Handle        -> cached object's shallow view
    cfg         -> pickled as usual     -> cfg
                                        TaskRunner(df, cfg):
                                          fn(df, cfg) -> ResultBox(result)
    future result <- claim_result      <- large result -> segment for the caller

The hook is installed into the picklers the pools use: multiprocessing's
``ForkingPickler`` (``Pool``, ``concurrent.futures``, ``Process`` under spawn
and forkserver, ``mp.Queue``) and loky's (joblib). Unarmed, it changes nothing
but for objects returned by :func:`sharedexec.share`, which are always sent as
handles; picklers are per message, so arming never leaks into other messages.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import pickle
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

from . import _cache, _codec, _names, _reaper, _registry, _segment, _worker
from ._errors import SharedExecWarning, SharedMemoryFullError

MMAP_MODES = ("r", "c")
ON_FULL = ("fallback", "raise")


@dataclass(frozen=True)
class Options:
    """How one entry point shares: the same knobs everywhere."""

    min_bytes: int = 1 << 20
    mmap_mode: str = "r"
    on_full: str = "fallback"
    share_results: bool = True
    cloudpickle_results: bool = False

    def __post_init__(self) -> None:
        if self.mmap_mode not in MMAP_MODES:
            raise ValueError(f"mmap_mode must be 'r' (read-only) or 'c' (copy-on-write), not {self.mmap_mode!r}")
        if self.on_full not in ON_FULL:
            raise ValueError(f"on_full must be 'fallback' or 'raise', not {self.on_full!r}")
        if not isinstance(self.min_bytes, int) or self.min_bytes < 0:
            raise ValueError(f"min_bytes must be a non-negative int, not {self.min_bytes!r}")


# -- the parent side: tasks and the reducer ------------------------------------


class SharedTask:
    """A callable whose pickled message shares its large arguments.

    ``leases`` collects the lease tokens taken for one submitted task, so an
    executor can end them when the future completes; the decorator, reused for
    every call, passes None and relies on the workers clearing them (and on
    ``_chain_dump`` for a message that fails to pickle)."""

    def __init__(self, fn: Callable, options: Options, leases: list[int] | None = None):
        self.fn = fn
        self.options = options
        self.leases = leases

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)  # run in-process (e.g. joblib n_jobs=1): nothing to share

    def __reduce__(self):
        _prepare_owner()
        return TaskRunner, (self.fn, self.options, os.getpid(), _names.HOST)

    def _reduce_for(self, pickler) -> Any:
        """A reduction that depends on the pickler, or NotImplemented."""
        return NotImplemented


def _prepare_owner() -> None:
    # Workers may write results named for us: our reaper must know where.
    _reaper.watch(_names.shm_dir())


_warned_full = False


def _reduce_shared(pickler, obj: Any):
    registry = _registry.REGISTRY
    task: SharedTask | None = getattr(pickler, "_sharedexec_task", None)
    if task is None:
        pub = registry.shared_publication(obj)
        if pub is None:
            return NotImplemented
        mmap_mode, leases = "r", None
        board, lease, token = registry.lease(pub)
    else:
        if not _codec.is_shareable(obj) or id(obj) in pickler.__dict__.get("_sharedexec_plain", ()):
            return NotImplemented
        options, leases = task.options, task.leases
        mmap_mode = options.mmap_mode
        try:
            leased = registry.lease_for(obj, options.min_bytes, _pickles_functions(pickler))
        except _codec.UnencodableError:
            # The pool's own pickling sends it, or raises what it would raise.
            return _pickle_plainly(pickler, obj)
        except SharedMemoryFullError as exc:
            if options.on_full == "raise":
                raise
            registry.counters["bytes_pickled"] += _codec.nbytes(obj)
            _warn_full_once(exc)
            return _pickle_plainly(pickler, obj)
        if leased is None:
            return NotImplemented  # smaller than min_bytes
        pub, board, lease, token = leased
    if leases is not None:
        leases.append(token)
    pickler.__dict__.setdefault("_sharedexec_tokens", []).append(token)
    return _cache._resolve, (pub.name, mmap_mode, board, lease, registry.pid, _names.HOST, pub.mapping.key)


def _pickle_plainly(pickler, obj: Any):
    # Its arrays follow in this message: pickle them as they are too.
    pickler.__dict__.setdefault("_sharedexec_plain", set()).update(map(id, _codec.parts(obj)))
    return NotImplemented


def _pickles_functions(pickler: pickle.Pickler) -> bool:
    # loky's pickler is cloudpickle's: it sends lambdas and local classes by
    # value, so a layout holding one may be written the same way.
    return isinstance(pickler, cloudpickle.Pickler)


def _warn_full_once(exc: SharedMemoryFullError) -> None:
    global _warned_full
    if not _warned_full:
        _warned_full = True
        warnings.warn(
            f"{exc.strerror} Falling back to plain pickling (one copy per task) for objects that do "
            "not fit; pass on_full='raise' to get this error instead.",
            SharedExecWarning,
            stacklevel=2,
        )


def _chain(previous: Callable | None) -> Callable:
    def reducer_override(self, obj):
        if isinstance(obj, SharedTask):
            self._sharedexec_task = obj  # armed for the rest of this message
            reduced = obj._reduce_for(self)
            if reduced is not NotImplemented:
                return reduced
        else:
            reduced = _reduce_shared(self, obj)
            if reduced is not NotImplemented:
                return reduced
        return NotImplemented if previous is None else previous(self, obj)

    reducer_override.__sharedexec__ = True
    return reducer_override


def _chain_dump(previous: Callable) -> Callable:
    def dump(self, obj):
        try:
            return previous(self, obj)
        except BaseException:
            # The message will never reach a worker, which would have ended
            # the leases its handles took: end them now.
            _registry.REGISTRY.end_leases(self.__dict__.pop("_sharedexec_tokens", []))
            raise

    dump.__sharedexec__ = True
    return dump


_install_lock = threading.Lock()


def install_hooks() -> None:
    """Hook the picklers of multiprocessing and of joblib's loky. Idempotent."""
    from multiprocessing.reduction import ForkingPickler

    from joblib.externals.loky.backend import reduction as loky_reduction

    with _install_lock:
        for cls in (ForkingPickler, loky_reduction.get_loky_pickler()):
            current = getattr(cls, "reducer_override", None)
            if not getattr(current, "__sharedexec__", False):
                cls.reducer_override = _chain(current)
            if not getattr(cls.dump, "__sharedexec__", False):
                cls.dump = _chain_dump(cls.dump)


# -- the worker side: running a task and sending its result --------------------


class TaskRunner:
    """A task's callable as a worker unpickles it.

    In a worker it is unpickled before the task's arguments, so it starts
    collecting the errors of their handles (``_cache.defer_errors``) and raises
    the first one when called: a vanished segment fails its task, not the pool.
    (Only in workers: there the next message is always a task, whose runner
    takes over; elsewhere a runner may be unpickled and never called.)"""

    def __init__(self, fn: Callable, options: Options, owner_pid: int, owner_host: str):
        self.fn = fn
        self.options = options
        self.owner_pid = owner_pid
        self.owner_host = owner_host
        self.handle_errors: list[Exception] = []
        if multiprocessing.parent_process() is not None:
            _cache.defer_errors(self.handle_errors)

    def __call__(self, *args, **kwargs):
        _cache.defer_errors(None)
        if self.handle_errors:
            raise self.handle_errors[0]
        _worker.enter_task()
        with _worker.explain_read_only(self.options.mmap_mode):
            value = self.fn(*args, **kwargs)
        # Results go back through shared memory only to a caller on this
        # machine (not to a dask/ray client) and in another process.
        if self.options.share_results and self.owner_host == _names.HOST and self.owner_pid != os.getpid():
            return ResultBox(value, self.options, self.owner_pid)
        return value

    def __reduce__(self):
        return TaskRunner, (self.fn, self.options, self.owner_pid, self.owner_host)


class ResultBox:
    """A task's result on its way back: pickling it writes large objects to
    segments for the caller; the caller unpickles it to the result itself."""

    def __init__(self, value: Any, options: Options, owner_pid: int):
        self.value = value
        self.options = options
        self.owner_pid = owner_pid

    def __reduce__(self):
        created: list[str] = []
        pickler_cls = _result_pickler(self.options.cloudpickle_results)
        stream = io.BytesIO()
        pickler = pickler_cls(stream)  # each base has its own default protocol
        pickler.sharedexec_result = (self.options, self.owner_pid, created)
        try:
            pickler.dump(self.value)
        except BaseException:
            for name in created:  # a half-pickled result leaks nothing
                _segment.retire(name)
            raise
        return _unbox, (stream.getvalue(),)


def _unbox(payload: bytes) -> Any:
    return pickle.loads(payload)


def _reduce_result(pickler, obj: Any):
    options, owner_pid, created = pickler.sharedexec_result
    if not _codec.is_shareable(obj) or _codec.nbytes(obj) < options.min_bytes:
        return NotImplemented
    try:
        mapping = _cache.write_result(obj, owner_pid, _pickles_functions(pickler))
    except _codec.UnencodableError:
        return NotImplemented
    except SharedMemoryFullError as exc:
        if options.on_full == "raise":
            raise
        _warn_full_once(exc)
        return NotImplemented
    created.append(mapping.name)
    return _cache.claim_result, (mapping.name, mapping.key)


@functools.cache
def _result_pickler(cloudpickle_results: bool) -> type:
    # The pool's own pickler underneath, so a result is picklable exactly when
    # the pool could send it (sockets, connections: multiprocessing's extra
    # reducers; lambdas and local classes: loky's cloudpickle).
    if cloudpickle_results:
        from joblib.externals.loky.backend import reduction as loky_reduction

        base = loky_reduction.get_loky_pickler()
    else:
        from multiprocessing.reduction import ForkingPickler as base
    previous = getattr(base, "reducer_override", None)

    def reducer_override(self, obj):
        reduced = _reduce_result(self, obj)
        if reduced is NotImplemented and previous is not None:
            return previous(self, obj)
        return reduced

    return type("ResultPickler", (base,), {"reducer_override": reducer_override})
