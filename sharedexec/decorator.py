"""``@sharedexec.shared`` and ``sharedexec.share()``: sharing through unchanged pools.

A shared function is a :class:`~sharedexec._sharing.SharedTask`: because every
pool pickles the callable before its arguments, the pickler is armed by the
time it meets the frames of *that* call, and only of that call (see
``_sharing``). In the worker it becomes a task-mode twin, a ``TaskRunner``
holding the wrapped callable and the options. How the wrapper travels:

* decorated in place (``@shared`` over ``def f``, so that ``module.f`` is the
  wrapper): by module and qualified name, like the function itself, options
  included (the worker's import applies the same decorator);
* any other form (``fast = shared(f)``, ``pool.map(shared(f), ...)``,
  ``shared(obj.method)``, a callable object): as the wrapped callable plus the
  options, the callable pickled exactly as the pool would pickle it unwrapped.
  So what the pool's pickler cannot send (a lambda or nested function under
  multiprocessing's pickler) is refused in the parent with a PicklingError,
  and what it can (cloudpickle, joblib's loky, sends those by value) goes.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import types
from typing import Any, Callable, TypeVar, overload

import cloudpickle

from . import _codec, _names, _registry
from ._errors import NotShareableError
from ._sharing import Options, SharedTask, TaskRunner, _prepare_owner, install_hooks, unshared

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class SharedFunction(SharedTask):
    def __init__(self, fn: Callable, options: Options):
        super().__init__(fn, options, leases=None)
        # A callable object's attributes are its own, not the wrapper's.
        functools.update_wrapper(self, fn, updated=functools.WRAPPER_UPDATES if isinstance(fn, types.FunctionType) else ())

    def __reduce__(self):
        _prepare_owner()
        if self._in_place():
            return _load_function, (self.__module__, self.__qualname__, os.getpid(), _names.HOST)
        if isinstance(self.fn, types.FunctionType) and _lookup(self.fn.__module__, self.fn.__qualname__) is not self.fn:
            # pickle would fail on it too, with a message that names neither
            # the fix nor the pools that can send it.
            raise pickle.PicklingError(
                f"Can't pickle {self!r}: {self.fn.__qualname__} is not found as "
                f"{self.fn.__module__}.{self.fn.__qualname__} (a lambda, or a function defined inside "
                "another function), so a process pool cannot send it. Define it at the top level of "
                "a module; or use joblib's default backend, whose cloudpickle sends such functions by value."
            )
        return TaskRunner, (self.fn, self.options, os.getpid(), _names.HOST)

    def _reduce_for(self, pickler):
        # cloudpickle (joblib's loky) sends functions of the main script,
        # lambdas and nested functions by value, since its workers may not
        # have that script as __main__: so must we, for the same reason.
        if isinstance(pickler, cloudpickle.Pickler) and (self.__module__ == "__main__" or not self._in_place()):
            _prepare_owner()
            return TaskRunner, (self.fn, self.options, os.getpid(), _names.HOST)
        return NotImplemented

    def _in_place(self) -> bool:
        """Whether this wrapper is what its module holds under the wrapped
        function's name (the decorator syntax)."""
        qualname = getattr(self, "__qualname__", None)  # a partial or callable object has none
        return qualname is not None and _lookup(self.__module__, qualname) is self

    def __repr__(self) -> str:
        qualname = getattr(self, "__qualname__", None)
        return f"<sharedexec.shared {self.__module__}.{qualname}>" if qualname else f"<sharedexec.shared {self.fn!r}>"


def _lookup(module: str | None, qualname: str) -> Any:
    try:
        obj: Any = importlib.import_module(module)
    except (ImportError, TypeError, ValueError):  # no module (None) or one that cannot be imported here
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _load_function(module: str, qualname: str, owner_pid: int, owner_host: str) -> TaskRunner:
    obj = _lookup(module, qualname)
    if not isinstance(obj, SharedFunction):
        raise TypeError(f"{module}.{qualname} is not a @sharedexec.shared function in this process")
    return TaskRunner(obj.fn, obj.options, owner_pid, owner_host)


@overload
def shared(
    fn: F, /, *, min_bytes: int = ..., mmap_mode: str = ..., on_full: str = ..., strings: str = ..., adopt: bool = ...
) -> F: ...
@overload
def shared(
    *, min_bytes: int = ..., mmap_mode: str = ..., on_full: str = ..., strings: str = ..., adopt: bool = ...
) -> Callable[[F], F]: ...


def shared(fn=None, /, *, min_bytes=1 << 20, mmap_mode="r", on_full="fallback", strings="exact", adopt=False):
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

    Or wrap a function at the call site, or once under another name, e.g. one
    you do not own: `pool.map_async(sharedexec.shared(func), args)`,
    `fast = sharedexec.shared(func, min_bytes=10_000_000)`.

    `fn` must be something the pool could send unwrapped (for `multiprocessing`,
    a function defined at the top level of a module, a method of an object it
    can pickle, a `functools.partial`...); a lambda or nested function is
    refused in the parent with a `pickle.PicklingError`. Called directly, it
    is `fn`. Options as for [`ProcessPoolExecutor`][sharedexec.ProcessPoolExecutor].
    Pickling anything else (a queue of frames, another function's arguments)
    is not changed.
    """
    options = Options(min_bytes=min_bytes, mmap_mode=mmap_mode, on_full=on_full, strings=strings, adopt=adopt)
    install_hooks()
    if fn is None:
        return lambda f: SharedFunction(f, options)
    return SharedFunction(fn, options)


def share(obj: T, *, adopt: bool = False) -> T:
    """Publish `obj` (a DataFrame, Series, Index, ndarray or Arrow object)
    in shared memory now, and return an equal object of the same type backed
    by that memory. Drop the original to keep a single copy.

    Pickled by multiprocessing or joblib -- `Process(args=...)`, an
    `mp.Queue`, any pool -- the returned object travels as a small handle.
    Its data is read-only. The segment lives as long as the returned object
    (and the tasks that carry it). Any other type raises `TypeError`
    (a [`SharedExecError`][sharedexec.SharedExecError]) before anything is written.

    With `adopt=True`, a DataFrame or Series is re-pointed at the shared
    copy as it is made, and `obj` itself is returned: one copy in total,
    still writable through pandas (see
    [Semantics](semantics.md#one-copy-in-total-adopttrue)).
    """
    # Checked first: a list or dict would otherwise be published, then fail
    # to be tracked (no weak reference), its segment kept till exit.
    if not _codec.is_shareable(obj):
        raise NotShareableError(
            f"cannot share a {type(obj).__module__}.{type(obj).__qualname__}: share() takes one "
            f"{_codec.SHAREABLE_NAMES} (or a subclass). Share each large object on its own, "
            "e.g. [sharedexec.share(df) for df in frames], and send the container as usual."
        )
    install_hooks()
    if unshared():
        return obj  # it travels by plain pickling, as with the standard library
    return _registry.REGISTRY.share(obj, adopt)
