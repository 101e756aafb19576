"""Where pickling meets sharing: the reducer, the task wrapper, the results.

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
                                          fn(df, cfg) -> result, as it is
    future result <- claim_result      <- worker's next message, in result mode:
                                          large result -> segment for the caller

The hook is installed into the picklers the pools use: multiprocessing's
``ForkingPickler`` (``Pool``, ``concurrent.futures``, ``Process`` under spawn
and forkserver, ``mp.Queue``) and loky's (joblib). Unarmed, it changes nothing
but for objects returned by :func:`sharedexec.share`, which are always sent as
handles; picklers are per message, so arming never leaks into other messages.

A runner returns its function's value itself, whoever calls it (a Dask
worker passes it straight to the next task). What sends a large result
through shared memory is the pickling of the message that carries it: a pool
worker sends the result from the thread that ran the task, in the very next
message it pickles there (``Pool``'s ``put((job, i, result))``,
``concurrent.futures``' and loky's ``_sendback_result``), so the runner marks
its thread and the hooked ``dump`` pickles that one message in *result mode*.
"""

from __future__ import annotations

import concurrent.futures.process
import functools
import inspect
import multiprocessing
import multiprocessing.pool
import os
import pickle
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

from . import _cache, _codec, _leases, _names, _reaper, _registry, _segment, _worker
from ._errors import SharedExecWarning, SharedMemoryFullError

MMAP_MODES = ("r", "c")
ON_FULL = ("fallback", "raise")
STRINGS = ("exact", "arrow")


@dataclass(frozen=True)
class Options:
    """How one entry point shares: the same knobs everywhere."""

    min_bytes: int = 1 << 20
    mmap_mode: str = "r"
    on_full: str = "fallback"
    strings: str = "exact"
    share_results: bool = True
    adopt: bool = False

    def __post_init__(self) -> None:
        if self.mmap_mode not in MMAP_MODES:
            raise ValueError(f"mmap_mode must be 'r' (read-only) or 'c' (copy-on-write), not {self.mmap_mode!r}")
        if self.on_full not in ON_FULL:
            raise ValueError(f"on_full must be 'fallback' or 'raise', not {self.on_full!r}")
        if self.strings not in STRINGS:
            raise ValueError(
                f"strings must be 'exact' (object columns of strings arrive as they are) or 'arrow' "
                f"(as pandas' Arrow-backed str dtype, shared), not {self.strings!r}"
            )
        if self.strings == "arrow" and _codec.pa is None:
            raise ValueError("strings='arrow' needs pyarrow, which is not installed: pip install pyarrow")
        if not isinstance(self.adopt, bool):
            raise ValueError(f"adopt must be True or False, not {self.adopt!r}")
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
    if _segment.unshared_reason() is None:
        _segment.prepare_owner()


_warned_full = False
_warned_unshared = False


def unshared() -> bool:
    """Whether sharing is unavailable here (tasks then go by plain pickling,
    as with the standard library); says why, once per process."""
    global _warned_unshared
    reason = _segment.unshared_reason()
    if reason is None:
        return False
    if not _warned_unshared:
        _warned_unshared = True
        warnings.warn(
            f"sharedexec cannot share memory here: {reason} Until then every task gets its own "
            "copy of its arguments by plain pickling, as with the standard library "
            "(`python -m sharedexec doctor` checks this machine).",
            SharedExecWarning,
            stacklevel=3,
        )
    return True


def _reduce_shared(pickler, obj: Any):
    registry = _registry.REGISTRY
    task: SharedTask | None = getattr(pickler, "_sharedexec_task", None)
    if task is None:
        pub = registry.shared_publication(obj)
        if pub is None:
            return NotImplemented
        mmap_mode, strings, leases = "r", "exact", None
        board, lease, token = registry.lease(pub)
    else:
        if not _codec.is_shareable(obj) or id(obj) in pickler.__dict__.get("_sharedexec_plain", ()):
            return NotImplemented
        if unshared():
            return NotImplemented
        options, leases = task.options, task.leases
        mmap_mode, strings = options.mmap_mode, options.strings
        try:
            leased = registry.lease_for(obj, options.min_bytes, _pickles_functions(pickler), options.adopt)
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
    return _cache._resolve, (
        pub.name, mmap_mode, board, lease, registry.pid, _names.HOST, pub.mapping.key, strings, _protocol(pickler)
    )


def _pickle_plainly(pickler, obj: Any):
    # Its arrays follow in this message: pickle them as they are too.
    pickler.__dict__.setdefault("_sharedexec_plain", set()).update(map(id, _codec.parts(obj)))
    return NotImplemented


def _protocol(pickler: pickle.Pickler) -> int:
    # cloudpickle's pickler (loky's) says; multiprocessing's is the C one, which
    # does not, and multiprocessing pickles with the default protocol.
    return getattr(pickler, "proto", pickle.DEFAULT_PROTOCOL)


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
        if getattr(self, "sharedexec_result", None) is not None:
            reduced = _reduce_result(self, obj)
            if reduced is not NotImplemented:
                return reduced
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


class _ResultMessage:
    """A message carrying results, as a worker sends it: its claims' errors
    are collected while it is unpickled (``_cache.defer_claims``), then put
    where the pool reports a task's failure."""

    def __init__(self, message: Any):
        self.message = message

    def __reduce__(self):
        return _settle, (_ClaimsStart(), self.message)


class _ClaimsStart:
    # Unpickled before the message (the first argument of _settle).
    def __reduce__(self):
        return _start_claims, ()


def _start_claims() -> list[Exception]:
    errors: list[Exception] = []
    _cache.defer_claims(errors)
    return errors


def _settle(errors: list[Exception], message: Any) -> Any:
    """``message`` as the pool reads it, with the first result that could not
    be claimed as its task's failure: ``(job, i, (False, error))`` for a
    ``Pool``, the ``_ResultItem``'s exception for concurrent.futures and loky."""
    _cache.defer_claims(None)
    if not errors:
        return message
    if isinstance(message, tuple) and len(message) == 3 and isinstance(message[2], tuple) and len(message[2]) == 2:
        return (*message[:2], (False, errors[0]))
    if hasattr(message, "exception") and hasattr(message, "result"):
        message.exception, message.result = errors[0], None
        return message
    raise errors[0]


def _chain_dump(previous: Callable) -> Callable:
    def dump(self, obj):
        pending = getattr(_results, "pending", None)
        if pending is not None:  # the results of the tasks this thread just ran
            _results.pending = None
            self.sharedexec_result = pending = (*pending, [])
            obj = _ResultMessage(obj)
        try:
            return previous(self, obj)
        except BaseException:
            # The message will never reach a worker, which would have ended
            # the leases its handles took: end them now; and a half-pickled
            # result leaks nothing.
            _registry.REGISTRY.end_leases(self.__dict__.pop("_sharedexec_tokens", []))
            for name in pending[2] if pending is not None else ():
                _segment.retire(name)
            raise

    dump.__sharedexec__ = True
    return dump


_install_lock = threading.Lock()
_installed = False


def _end_pool_after(
    cls: type,
    name: str,
    pickling_thread: Callable[[inspect.BoundArguments], Any],
    workers: Callable[[inspect.BoundArguments], Any],
) -> None:
    """Make ``cls.name`` -- a pool's termination -- end the leases of the
    messages its pickling thread sent, which no worker will read now, and
    remove the results its workers wrote that nobody will claim now."""
    original = cls.__dict__[name]
    function = original.__func__ if isinstance(original, classmethod) else original
    if getattr(function, "__sharedexec__", False):
        return
    signature = inspect.signature(function)

    @functools.wraps(function)
    def terminate(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        # Before too: loky's termination forgets the workers it kills.
        processes = list(workers(bound) or ())
        try:
            return function(*args, **kwargs)
        finally:
            _leases.end_pickled_by(pickling_thread(bound))
            # Results in flight when the pool went (``with Pool()`` left
            # while imap results were being sent): the result handler that
            # would have claimed them is gone with it.
            remove_results_of([*processes, *(workers(bound) or ())])

    terminate.__sharedexec__ = True
    setattr(cls, name, classmethod(terminate) if isinstance(original, classmethod) else terminate)


def remove_results_of(processes: Any, unfinished_only: bool = False) -> set[int]:
    """Remove the results written for us by those of a pool's worker
    ``processes`` that have ended, and that nobody can claim any more: all
    of them once the pool has ended, else (``unfinished_only``) those their
    writer died filling -- then return the pids of those whose finished
    results are left. Never another pool's: their results may be in flight
    from a worker that already exited (max_tasks_per_child)."""
    left: set[int] = set()
    if not _reaper.watching():
        return left  # no task of ours went out: no worker wrote a result for us
    ended = set()
    for process in processes:
        if hasattr(process, "pid"):  # a ThreadPool's workers are threads
            if process.exitcode is None:
                # Reaped here: loky's kill leaves them unjoined, and a
                # zombie's pid still answers.
                process.join(_REAP_SECONDS)
            if process.exitcode is not None:
                ended.add(process.pid)
    _cache.remove_orphan_results(os.getpid(), ended, unfinished_only, left)
    return left


_REAP_SECONDS = 1.0  # a SIGKILLed worker is gone in milliseconds

# The workers a Pool replaced (``_maintain_pool``) whose results were still
# there, by its result queue: they may wait there until the pool ends. (Only
# those: a pool with maxtasksperchild=1 replaces a worker per task.)
_replaced: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _maintain_pool_watching(original: Callable) -> Callable:
    """``Pool._maintain_pool``, which joins exited workers and replaces
    them, removing the results each of them died writing (a worker SIGKILLed
    by the OOM killer mid-result): Pool lives on, and nothing else would
    remove them before it ends."""
    if getattr(original, "__sharedexec__", False):
        return original

    @functools.wraps(original)
    def maintain(ctx, Process, processes, pool, inqueue, outqueue, *args, **kwargs):
        before = list(pool)
        try:
            return original(ctx, Process, processes, pool, inqueue, outqueue, *args, **kwargs)
        finally:
            gone = [worker for worker in before if worker not in pool and hasattr(worker, "pid")]
            if gone:
                left = remove_results_of(gone, unfinished_only=True)
                _replaced.setdefault(outqueue, []).extend(w for w in gone if w.pid in left)

    maintain.__sharedexec__ = True
    return maintain


def _pool_workers(bound: inspect.BoundArguments) -> list:
    return [*bound.arguments["pool"], *_replaced.pop(bound.arguments["outqueue"], ())]


def _call_queue_feeder(bound: inspect.BoundArguments) -> Any:
    return getattr(bound.arguments["self"].call_queue, "_thread", None)


def _executor_workers(bound: inspect.BoundArguments) -> Any:
    return list((getattr(bound.arguments["self"], "processes", None) or {}).values())


def install_hooks() -> None:
    """Hook the picklers of multiprocessing and of joblib's loky, and their
    pools' terminations. Idempotent."""
    global _installed
    from multiprocessing.reduction import ForkingPickler

    from joblib.externals.loky import process_executor as loky_executor
    from joblib.externals.loky.backend import reduction as loky_reduction

    with _install_lock:
        _installed = True
        # Messages pickled but never delivered (see _leases): a Pool's task
        # handler pickles its tasks, an executor's queue feeder its call items.
        _end_pool_after(multiprocessing.pool.Pool, "_terminate_pool", lambda b: b.arguments["task_handler"], _pool_workers)
        maintain = multiprocessing.pool.Pool.__dict__["_maintain_pool"].__func__
        multiprocessing.pool.Pool._maintain_pool = staticmethod(_maintain_pool_watching(maintain))
        for manager in (concurrent.futures.process._ExecutorManagerThread, loky_executor._ExecutorManagerThread):
            _end_pool_after(manager, "terminate_broken", _call_queue_feeder, _executor_workers)
        for cls in (ForkingPickler, loky_reduction.get_loky_pickler()):
            current = getattr(cls, "reducer_override", None)
            if not getattr(current, "__sharedexec__", False):
                cls.reducer_override = _chain(current)
            if not getattr(cls.dump, "__sharedexec__", False):
                cls.dump = _chain_dump(cls.dump)


# -- the worker side: running a task and sending its result --------------------


# What the next message pickled in this thread carries: results of shared
# tasks, to send through shared memory -- (options, owner pid), or None.
_results = threading.local()


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
        # machine (not to a dask/ray client) and in another process; and only
        # if a hooked pickler sends them (see the module docstring).
        if (
            self.options.share_results
            and self.owner_host == _names.HOST
            and self.owner_pid != os.getpid()
            and _segment.unshared_reason() is None  # the caller has said why, once
        ):
            if not _installed:
                install_hooks()
            _results.pending = (self.options, self.owner_pid)
        return value

    def __reduce__(self):
        return TaskRunner, (self.fn, self.options, self.owner_pid, self.owner_host)


def _reduce_result(pickler, obj: Any):
    options, owner_pid, created = pickler.sharedexec_result
    if not _codec.is_shareable(obj) or _codec.nbytes(obj) < options.min_bytes:
        return _codec.reduce_writable(obj)
    try:
        mapping, read_only = _cache.write_result(obj, owner_pid, _pickles_functions(pickler))
    except _codec.UnencodableError:
        return NotImplemented
    except SharedMemoryFullError as exc:
        if options.on_full == "raise":
            raise
        _warn_full_once(exc)
        return NotImplemented
    created.append(mapping.name)
    protocol = _protocol(pickler)
    # Under protocol 5 numpy keeps a read-only array read-only (loky's
    # results); under 4 (multiprocessing's default before 3.14) it copies.
    return _cache.claim_result, (mapping.name, mapping.key, protocol, read_only if protocol >= 5 else ())
