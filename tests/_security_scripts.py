"""Child-process programs for tests/test_security.py, each run as a throwaway uid.

    python -c "from tests import _security_scripts as s; s.main()" <scenario> <state dir> <args...>

The victim programs use sharedexec as a user would; the attacker programs use
nothing but the standard library and what anyone can read in /dev/shm. They
talk to the test through files in the state directory (world-writable,
sticky), one JSON document each, written atomically.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import struct
import sys
import time

import numpy as np

from tests._reliability_scripts import make_frame, touch, wait_for

# What a sharedexec header looks like to someone who reads the source: magic,
# version, flags, state, total, layout offset, layout size, creator, owner.
_FRONT = struct.Struct("<8sHHIQQQII")
_MAGIC = b"SHAREDX\0"


def own_segments() -> list[str]:
    from sharedexec import _names

    return sorted(name for name, owner, _ in _names.list_segments(mine_only=True) if owner == os.getpid())


def _read(state: str, what: str, timeout: float = 120) -> dict:
    path = os.path.join(state, what)
    wait_for(lambda: os.path.exists(path), timeout, what=what)
    with open(path) as f:
        return json.load(f)


def _write(state: str, what: str, doc: dict) -> None:
    touch(os.path.join(state, what), json.dumps(doc))


class Payload:
    """Unpickling this creates ``marker``: proof that attacker bytes were unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_segment(marker: str, owner: int, version: int) -> bytes:
    """A file that passes every check sharedexec made before issue 14 -- magic,
    version, sizes -- and whose layout runs code when unpickled."""
    layout = pickle.dumps(Payload(marker), protocol=2)
    front = _FRONT.pack(_MAGIC, version, 0, 0, 64 + len(layout), 64, len(layout), os.getpid(), owner)
    return front + bytes(64 - len(front)) + layout


# -- the hijack: a consumer resolves a handle after its publisher died ---------------


def consume(queue, state: str) -> None:
    _write(state, "consumer-started", {"pid": os.getpid()})
    _read(state, "go", timeout=300)
    try:
        queue.get(timeout=60)
        result = {"kind": "resolved", "message": ""}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result = {"kind": type(exc).__name__, "message": str(exc)}
    _write(state, "consumed", result)


def victim_share(state: str) -> None:
    import sharedexec

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    consumer = ctx.Process(target=consume, args=(queue, state))
    consumer.start()
    _read(state, "consumer-started")
    shared = sharedexec.share(make_frame(41, 50_000))
    queue.put(shared)
    queue.close()
    queue.join_thread()  # the handle is in the pipe now
    _write(state, "ready", {"pid": os.getpid(), "segments": own_segments()})
    time.sleep(600)  # until SIGKILLed


def attacker_recreate(state: str, directory: str, marker: str, owner: str, version: str, *names: str) -> None:
    """Recreate each name, world-readable (0644), with a crafted layout and
    the header ``version`` of the code under test."""
    created = []
    for name in names:
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.fchmod(fd, 0o644)
        os.write(fd, crafted_segment(marker, int(owner), int(version)))
        os.close(fd)
        created.append(name)
    _write(state, "recreated", {"names": created})


# -- a foreign file named for the victim's pid ---------------------------------------


def victim_pool(state: str, mode: str) -> None:
    """Share a frame with a pool and get large results back (so there are
    segments, results and their clean-up), with foreign files around."""
    _write(state, "victim-pid", {"pid": os.getpid()})
    _read(state, "planted")
    import sharedexec

    df = make_frame(42, 50_000)
    with sharedexec.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"), min_bytes=64 << 10) as ex:
        sums = [float(a.sum()) for a in ex.map(big_result, [df] * 4, range(4))]
        if mode == "sigkill":
            kept = sharedexec.share(df)
            _write(state, "ready", {"pid": os.getpid(), "segments": own_segments(), "sums": sums})
            time.sleep(600)  # until SIGKILLed
            del kept
    _write(state, "ready", {"pid": os.getpid(), "segments": own_segments(), "sums": sums})


def big_result(df, i: int) -> np.ndarray:
    return np.full(100_000, float(len(df) + i))


def attacker_plant(state: str, directory: str, precious: str) -> None:
    """Files named for the victim's pid: ours (the attacker's) with a header,
    0644 and 0600; without a header; a symlink to a file of the victim's; a
    FIFO. None of them may make the victim fail, hang or write anywhere."""
    pid = _read(state, "victim-pid")["pid"]
    planted = {}
    for kind, suffix in (("header-0644", "a1"), ("header-0600", "a2"), ("no-header", "a3"), ("symlink", "a4"), ("fifo", "a5")):
        name = f"sx_{pid}_{suffix * 8}"
        path = os.path.join(directory, name)
        if kind == "symlink":
            os.symlink(precious, path)
        elif kind == "fifo":
            os.mkfifo(path, 0o666)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if kind == "header-0600" else 0o644)
            os.write(fd, crafted_segment(os.path.join(state, "marker"), pid, 2) if kind.startswith("header") else b"x" * 100)
            os.close(fd)
        planted[kind] = name
    _write(state, "planted", planted)


SCENARIOS = {f.__name__: f for f in (victim_share, attacker_recreate, victim_pool, attacker_plant)}


def main() -> None:
    scenario, *args = sys.argv[1:]
    SCENARIOS[scenario](*args)
