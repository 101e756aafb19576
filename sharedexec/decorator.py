"""``@sharedexec.shared`` and ``sharedexec.share()``: sharing through unchanged pools.

A decorated function is a :class:`~sharedexec._sharing.SharedTask` that pickles
by reference, like the function it wraps: a worker looks it up by module and
qualified name and gets its task-mode twin. Because every pool pickles the
callable before its arguments, the pickler is armed by the time it meets the
frames of *that* call, and only of that call (see ``_sharing``).
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
from typing import Any, Callable, TypeVar, overload

import cloudpickle

from . import _names, _registry
from ._sharing import Options, SharedTask, TaskRunner, _prepare_owner, install_hooks

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class SharedFunction(SharedTask):
    def __init__(self, fn: Callable, options: Options):
        super().__init__(fn, options, leases=None)
        functools.update_wrapper(self, fn)

    def __reduce__(self):
        # By reference, like any function -- and, like pickle, refuse in the
        # parent what the worker could not look up (a lambda, a nested
        # function, `fast = shared(f)` under another name).
        if _lookup(self.__module__, self.__qualname__) is not self:
            raise pickle.PicklingError(
                f"Can't pickle {self!r}: it is not found as {self.__module__}.{self.__qualname__}. "
                "Decorate a function defined at the top level of a module, under its own name."
            )
        _prepare_owner()
        return _load_function, (self.__module__, self.__qualname__, os.getpid(), _names.HOST)

    def _reduce_for(self, pickler):
        # cloudpickle (joblib's loky) sends functions of the main script by
        # value, since its workers may not have that script as __main__: so
        # must we, for the same reason.
        if self.__module__ == "__main__" and isinstance(pickler, cloudpickle.Pickler):
            _prepare_owner()
            return TaskRunner, (self.fn, self.options, os.getpid(), _names.HOST)
        return NotImplemented

    def __repr__(self) -> str:
        return f"<sharedexec.shared {self.__module__}.{self.__qualname__}>"


def _lookup(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _load_function(module: str, qualname: str, owner_pid: int, owner_host: str) -> TaskRunner:
    obj = _lookup(module, qualname)
    if not isinstance(obj, SharedFunction):
        raise TypeError(f"{module}.{qualname} is not a @sharedexec.shared function in this process")
    return TaskRunner(obj.fn, obj.options, owner_pid, owner_host)


@overload
def shared(fn: F, /) -> F: ...
@overload
def shared(*, min_bytes: int = ..., mmap_mode: str = ..., on_full: str = ...) -> Callable[[F], F]: ...


def shared(fn=None, /, *, min_bytes=1 << 20, mmap_mode="r", on_full="fallback"):
    """Make the large DataFrames / arrays passed to `fn` travel through
    shared memory in any process pool: an unchanged `multiprocessing.Pool`
    (`map`, `imap`, `starmap`, `apply_async`...), the stdlib
    `ProcessPoolExecutor`, or `joblib.Parallel`'s default backend:

    ```python
    @sharedexec.shared
    def func(args):
        df, config = args
        ...

    with multiprocessing.Pool(15) as pool:
        results = pool.map_async(func, [(df, c) for c in configs]).get()
    ```

    `fn` must be importable by its module and name (defined at module top
    level), as for any pool. Called directly, it is `fn`. Options as for
    [`ProcessPoolExecutor`][sharedexec.ProcessPoolExecutor]. Pickling anything
    else (a queue of frames, another function's arguments) is not changed.
    """
    options = Options(min_bytes=min_bytes, mmap_mode=mmap_mode, on_full=on_full)
    install_hooks()
    if fn is None:
        return lambda f: SharedFunction(f, options)
    return SharedFunction(fn, options)


def share(obj: T) -> T:
    """Publish `obj` (a DataFrame, Series, Index, ndarray or Arrow object)
    in shared memory now, and return an equal object of the same type backed
    by that memory. Drop the original to keep a single copy.

    Pickled by multiprocessing or joblib -- `Process(args=...)`, an
    `mp.Queue`, any pool -- the returned object travels as a small handle.
    Its data is read-only. The segment lives as long as the returned object
    (and the tasks that carry it).
    """
    install_hooks()
    return _registry.REGISTRY.share(obj)
