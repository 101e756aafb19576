"""Security (issue 14): a segment is used only if it is ours, and another
user can never run code through one.

Two parts. The unit tests, in this process: what ``_segment.attach`` refuses
(a tampered layout byte, a wrong key, a truncated file, a FIFO, a symlink,
another mode) and that it refuses before unpickling anything -- each segment
holds a layout whose unpickling would create a marker file -- and that the
sweeps skip what is not ours. The two-uid tests run a victim and an attacker
as throwaway uids (numeric, no account needed: ``setresuid`` in the child)
over a world-writable sticky directory, like ``/dev/shm``; they need root and
skip with the reason where they cannot run.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import pickle
import secrets
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import sharedexec
from sharedexec import _names, _publication, _segment, cli
from sharedexec._errors import SegmentCorruptError, SegmentNotFoundError, SegmentNotOursError

from . import _reliability_scripts as scripts
from . import _security_scripts as sec

VICTIM, ATTACKER = 54321, 54322


# -- unit tests: what attach refuses, before unpickling anything ---------------------


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "unpickled"
    yield str(path)
    assert not path.exists(), "bytes that were not authenticated were unpickled"


@pytest.fixture
def evil(marker):
    """A segment of ours whose layout would create ``marker`` if unpickled,
    with one spare byte after the pickle's STOP (changing it keeps the pickle
    valid)."""
    layout = pickle.dumps(sec.Payload(marker), protocol=2) + b"\0"
    mapping = _segment.create([memoryview(bytes(100))], layout, os.getpid())
    yield mapping
    _segment.retire(mapping.name)


def _seg_path(name: str) -> str:
    return os.path.join(_names.shm_dir(), name)


def _read(name: str, key: bytes | None = None):
    mapping = _segment.attach(name, key=key)
    return _publication.read(mapping, lambda other: _segment.attach(other, key=key))


def test_the_evil_layout_runs_when_it_is_unpickled(evil, tmp_path):
    """The harness is sound: unpickling the layout creates the marker."""
    mapping = _segment.attach(evil.name)  # our own key: it verifies
    pickle.loads(mapping.layout())
    assert os.path.exists(tmp_path / "unpickled")
    os.unlink(tmp_path / "unpickled")


def test_a_tampered_layout_byte_is_refused(evil):
    with open(_seg_path(evil.name), "r+b") as f:
        f.seek(evil.size - 1)
        f.write(b"\1")
    with pytest.raises(SegmentCorruptError, match=f"{evil.name} does not authenticate"):
        _read(evil.name)


def test_a_tampered_header_field_is_refused(evil):
    with open(_seg_path(evil.name), "r+b") as f:
        f.seek(44)  # the owner pid
        f.write(b"\1")
    with pytest.raises(SegmentCorruptError, match="does not authenticate"):
        _read(evil.name)


def test_a_wrong_key_is_refused(evil):
    with pytest.raises(SegmentCorruptError, match="does not authenticate"):
        _read(evil.name, key=secrets.token_bytes(_segment.KEY_BYTES))


def test_a_segment_copied_under_another_name_is_refused(evil):
    copy = f"sx_{os.getpid()}_{secrets.token_hex(8)}"
    shutil.copyfile(_seg_path(evil.name), _seg_path(copy))
    os.chmod(_seg_path(copy), 0o600)
    try:
        with pytest.raises(SegmentCorruptError, match="does not authenticate"):
            _read(copy)
    finally:
        os.unlink(_seg_path(copy))


@pytest.mark.parametrize("keep", [32, 100, -1])
def test_a_truncated_file_is_refused(evil, keep):
    os.truncate(_seg_path(evil.name), evil.size + keep if keep < 0 else keep)
    with pytest.raises(SegmentCorruptError, match="truncated"):
        _read(evil.name)


def test_a_fifo_at_a_segment_name_is_refused_without_blocking(marker):
    name = f"sx_{os.getpid()}_{secrets.token_hex(8)}"
    os.mkfifo(_seg_path(name), 0o600)
    try:
        start = time.monotonic()
        for writable in (False, True):
            with pytest.raises(SegmentNotOursError, match="a FIFO") as info:
                _segment.attach(name, writable=writable)
            assert name in str(info.value)
        assert _segment.creator_of(name) is None
        assert _segment.retire(name) is False and os.path.exists(_seg_path(name))
        assert time.monotonic() - start < 5
    finally:
        os.unlink(_seg_path(name))


def test_a_symlink_at_a_segment_name_is_refused(evil):
    """Even to a valid segment of ours: a name is ours only as a regular file."""
    name = f"sx_{os.getpid()}_{secrets.token_hex(8)}"
    os.symlink(_seg_path(evil.name), _seg_path(name))
    try:
        with pytest.raises(SegmentNotOursError, match="a symbolic link owned by uid") as info:
            _read(name)
        assert isinstance(info.value, SegmentNotFoundError) and isinstance(info.value, sharedexec.SharedExecError)
    finally:
        os.unlink(_seg_path(name))


def test_a_segment_with_another_mode_is_refused(evil):
    os.chmod(_seg_path(evil.name), 0o644)
    with pytest.raises(SegmentNotOursError, match="mode 0644.*with mode 0600"):
        _read(evil.name)


def test_retire_never_writes_through_a_symlink(tmp_path):
    precious = tmp_path / "precious"
    precious.write_bytes(bytes(64))
    name = f"sx_{os.getpid()}_{secrets.token_hex(8)}"
    os.symlink(precious, _seg_path(name))
    try:
        assert _segment.retire(name) is False
        assert precious.read_bytes() == bytes(64) and os.path.islink(_seg_path(name))
    finally:
        os.unlink(_seg_path(name))


def test_sweeps_skip_what_is_not_ours_and_go_on(tmp_path):
    """remove_owned_by (the reaper, release at exit): a symlink, a FIFO and a
    directory named for us stay, and do not stop the sweep."""
    directory = str(tmp_path)
    pid = os.getpid()
    odd = {f"sx_{pid}_{'a' * 16}": "symlink", f"sx_{pid}_{'b' * 16}": "fifo", f"sx_{pid}_{'c' * 16}": "dir"}
    for name, kind in odd.items():
        path = os.path.join(directory, name)
        {"symlink": lambda p: os.symlink("/etc/hostname", p), "fifo": os.mkfifo, "dir": os.mkdir}[kind](path)
    ours = [_segment.create([], b"", pid, directory=directory).name for _ in range(3)]
    assert sorted(_names.remove_owned_by(pid, directory)) == sorted(ours)
    assert sorted(os.listdir(directory)) == sorted(odd)


def test_handle_carries_the_key_and_stays_small():
    import multiprocessing.reduction

    shared = sharedexec.share(scripts.make_frame(43, 50_000))
    payload = bytes(multiprocessing.reduction.ForkingPickler.dumps(shared))
    assert _segment.process_key() in payload
    assert len(payload) < 400, len(payload)
    del shared


# -- two uids ------------------------------------------------------------------------


@functools.cache
def _python_for_others() -> tuple[str, str] | str:
    """(interpreter, PYTHONPATH) that a throwaway uid can run sharedexec with,
    or why there is none. This interpreter may live where other users cannot
    read (a pyenv under /root): then a system one of the same version, with
    this environment's site-packages."""
    if os.geteuid() != 0:
        return "needs root to run processes as throwaway uids"
    path = os.pathsep.join([scripts.ROOT, *site.getsitepackages()])
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"]
    errors = []
    for exe in candidates:
        try:
            result = subprocess.run(
                [exe, "-c", "import sharedexec, pandas, tests._security_scripts"],
                preexec_fn=_as(VICTIM), env=_env(path, "/tmp", "/tmp"), capture_output=True, text=True, timeout=60,
            )
        except OSError as exc:
            errors.append(f"{exe}: {exc}")
            continue
        if result.returncode == 0:
            return exe, path
        errors.append(f"{exe}: {result.stderr.strip().splitlines()[-1:]}")
    return f"no Python that uid {VICTIM} can run sharedexec with: {errors}"


def _as(uid: int):
    def drop() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    return drop


def _env(pythonpath: str, directory: str, home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SHAREDEXEC"))}
    env.update(PYTHONPATH=pythonpath, SHAREDEXEC_DIR=directory, HOME=home)
    return env


@pytest.fixture
def two_uids():
    """A world-writable sticky segment directory under /dev/shm and a state
    directory, and ``run(uid, scenario, *args)`` starting a script as ``uid``."""
    found = _python_for_others()
    if isinstance(found, str):
        pytest.skip(found)
    exe, path = found
    token = secrets.token_hex(4)
    directory, state = f"/dev/shm/sx-sec-{token}", f"/dev/shm/sx-sec-state-{token}"
    for d in (directory, state):
        os.mkdir(d)
        os.chmod(d, 0o1777)
    procs: list[subprocess.Popen] = []

    def run(uid: int, scenario: str, *args: str) -> subprocess.Popen:
        argv = [exe, "-c", "from tests import _security_scripts as s; s.main()", scenario, state, *map(str, args)]
        proc = subprocess.Popen(
            argv, preexec_fn=_as(uid), env=_env(path, directory, state), cwd=state,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        return proc

    def command(uid: int | None, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [exe, *argv], preexec_fn=_as(uid) if uid is not None else None, env=_env(path, directory, state),
            cwd=state, capture_output=True, text=True, timeout=120,
        )

    yield directory, state, run, command
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    # Give killed victims' reapers their last sweep before removing everything.
    time.sleep(0.5)
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)


def _state(state: str, what: str, timeout: float = 120) -> dict:
    return sec._read(state, what, timeout)


def _files(directory: str, uid: int) -> dict[str, tuple]:
    """name -> (kind, uid, content) of every entry of ``uid``."""
    out = {}
    for name in os.listdir(directory):
        st = os.lstat(os.path.join(directory, name))
        if st.st_uid != uid:
            continue
        content = open(os.path.join(directory, name), "rb").read() if stat.S_ISREG(st.st_mode) else None
        out[name] = (stat.S_IFMT(st.st_mode), st.st_uid, content)
    return out


def _owned_by(directory: str, uid: int) -> list[str]:
    return sorted(n for n in os.listdir(directory) if os.lstat(os.path.join(directory, n)).st_uid == uid)


def test_hijack_of_a_dead_publisher_segment_runs_no_code(two_uids):
    """User A shares a frame and queues it for a spawned consumer; A's parent
    is SIGKILLed and its reaper unlinks the segments; user B recreates the
    names, 0644, headers that pass every size check and a crafted pickle. The
    consumer gets a clear error naming the file, its owner and what was
    expected, and B's pickle never runs."""
    directory, state, run, _ = two_uids
    marker = os.path.join(state, "attacker-code-ran")
    victim = run(VICTIM, "victim_share")
    ready = _state(state, "ready")
    assert len(ready["segments"]) == 2  # the frame and the lease board
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    scripts.wait_for(lambda: not _owned_by(directory, VICTIM), 5, what="the reaper's sweep")
    attacker = run(ATTACKER, "attacker_recreate", directory, marker, ready["pid"], _segment.VERSION, *ready["segments"])
    assert attacker.wait(60) == 0, attacker.stderr.read()
    assert _owned_by(directory, ATTACKER) == sorted(ready["segments"])
    sec._write(state, "go", {})
    consumed = _state(state, "consumed")
    assert not os.path.exists(marker), "the attacker's pickle ran as the victim"
    assert consumed["kind"] == "SegmentNotOursError", consumed
    message = consumed["message"]
    name = sorted(ready["segments"])[0]
    assert f"uid {ATTACKER}" in message and f"owned by uid {VICTIM}" in message and "mode 0600" in message
    assert "publishing process has exited" in message and "rm /dev/shm" not in message
    assert any(name in message for name in ready["segments"])


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
@pytest.mark.parametrize("victim_uid", [VICTIM, 0], ids=["user", "root"])
def test_foreign_files_named_for_the_victim_change_nothing(two_uids, ending, victim_uid):
    """B plants files named ``sx_<victim pid>_...``: with a header (0644 and
    0600), without one, a symlink to a file of the victim's, a FIFO. The
    victim's pool, shutdown, exit (or SIGKILL and its reaper) run as if they
    were not there: no error, nothing on stderr, all its own segments gone
    within 5 s, and B's files (and the symlink's target) untouched -- also
    when the victim is root, who could remove them."""
    directory, state, run, _ = two_uids
    precious = os.path.join(state, "precious")
    with open(precious, "wb") as f:
        f.write(b"the victim's own file" + bytes(100))
    os.chown(precious, victim_uid, victim_uid)
    victim = run(victim_uid, "victim_pool", "sigkill" if ending == "sigkill" else "shutdown")
    attacker = run(ATTACKER, "attacker_plant", directory, precious)
    assert attacker.wait(60) == 0, attacker.stderr.read()
    planted_files = _files(directory, ATTACKER)
    ready = _state(state, "ready")
    assert ready["sums"] == [50_000.0 * 100_000 + i * 100_000 for i in range(4)]
    assert ready["segments"] and not set(ready["segments"]) & set(planted_files)
    if ending == "sigkill":
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    else:
        out, err = victim.communicate(timeout=120)
        assert victim.returncode == 0 and err == "", err
    scripts.wait_for(lambda: not _owned_by(directory, victim_uid), 5, what="all the victim's segments gone")
    assert _files(directory, ATTACKER) == planted_files
    assert open(precious, "rb").read() == b"the victim's own file" + bytes(100)
    assert not os.path.exists(os.path.join(state, "marker"))


def _plant_for_cleanup(directory: str, state: str) -> dict[str, str]:
    """Segments of two dead owners (one of each user) and look-alikes."""
    gone = scripts.wait_for(lambda: _dead_pid(), 10)
    files = {}

    def make(label: str, uid: int, data: bytes | None, mode: int = 0o600, kind: str = "file") -> None:
        name = f"sx_{gone}_{secrets.token_hex(8)}"
        path = os.path.join(directory, name)
        if kind == "symlink":
            target = os.path.join(state, f"target-{label}")
            with open(target, "wb") as f:
                f.write(_segment.MAGIC + bytes(100))
            os.chown(target, uid, uid)
            os.symlink(target, path)
        elif kind == "fifo":
            os.mkfifo(path, mode)
        else:
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, mode)
        os.lchown(path, uid, uid)
        files[label] = name

    header = _segment.MAGIC + bytes(4000)
    make("victim-segment", VICTIM, header)
    make("attacker-segment", ATTACKER, header, 0o644)
    make("victim-no-header", VICTIM, b"x" * 4000)
    make("attacker-no-header", ATTACKER, b"x" * 4000)
    make("victim-symlink", VICTIM, None, kind="symlink")
    make("attacker-symlink", ATTACKER, None, kind="symlink")
    make("attacker-fifo", ATTACKER, None, 0o666, kind="fifo")
    make("root-no-header", 0, b"x" * 4000)
    return files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "who, flags, removed",
    [
        ("user", [], {"victim-segment"}),
        ("root", [], set()),
        ("root", ["--all-users"], {"victim-segment", "attacker-segment"}),
    ],
)
def test_cleanup_removes_only_the_callers_segments(two_uids, who, flags, removed):
    directory, state, _, command = two_uids
    files = _plant_for_cleanup(directory, state)
    result = command(VICTIM if who == "user" else None, ["-m", "sharedexec", "cleanup", "--dir", directory, "--yes", *flags])
    assert result.returncode == 0 and result.stderr == "", result.stdout + result.stderr
    left = set(os.listdir(directory))
    assert {label for label, name in files.items() if name not in left} == removed, result.stdout
    out = result.stdout
    assert "Not yours, left alone" in out or flags
    for label, name in files.items():
        if label not in removed:
            assert name in out, f"{label} is not listed:\n{out}"
    for target in os.listdir(state):
        if target.startswith("target-"):
            assert open(os.path.join(state, target), "rb").read() == _segment.MAGIC + bytes(100)


def test_cleanup_all_users_is_for_root_only(two_uids):
    directory, _, _, command = two_uids
    result = command(VICTIM, ["-m", "sharedexec", "cleanup", "--dir", directory, "--all-users"])
    assert result.returncode == 2 and "--all-users is for root" in result.stderr


def test_cleanup_lists_other_users_files_as_not_yours(tmp_path, capsys):
    """In-process, any uid: a file of another uid (here: a symlink, which is
    never followed) is listed and left alone; the exit status is 0."""
    os.symlink("/etc/hostname", tmp_path / f"sx_{_dead_pid()}_{'f' * 16}")
    assert cli.main_cleanup(["--dir", str(tmp_path), "--yes"]) == 0
    assert "not a segment: a symbolic link" in capsys.readouterr().out
    assert len(os.listdir(tmp_path)) == 1


# -- the security review of issue 14 (branch attack-14) --------------------------------


def _foreign(path: str) -> None:
    """Make ``path`` another user's (root only: chown)."""
    os.lchown(path, ATTACKER, ATTACKER)


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make files of another uid (chown)")


@pytest.mark.tmpfs_only  # a tmpfs directory's own mechanics
def test_sweeps_never_open_or_describe_other_users_files(tmp_path, monkeypatch):
    """Thousands of files of another user named ``sx_<our pid>_...`` cost a
    sweep one lstat each: never an open, never a user-name lookup (the
    shutdown of a victim took 28 s with 60 000 of them)."""
    _needs_root()
    import pwd

    directory, pid = str(tmp_path), os.getpid()
    for i in range(300):
        path = os.path.join(directory, f"sx_{pid}_{i:016x}")
        open(path, "w").close()
        _foreign(path)
    ours = _segment.create([], b"", pid, directory=directory).name
    opened, looked_up = [], []
    real_open, real_getpwuid = os.open, pwd.getpwuid
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: looked_up.append(uid) or real_getpwuid(uid))
    monkeypatch.setenv(_names.DIR_ENV, directory)
    from sharedexec import _cache

    assert _cache.remove_orphan_results(pid, {pid}) == []  # ours was created by us: not an orphan
    assert opened == [os.path.join(directory, ours)]
    assert _names.remove_owned_by(pid, directory) == [ours]
    assert _segment.retire(f"sx_{pid}_{0:016x}", directory) is False
    assert looked_up == [] and len(os.listdir(directory)) == 300
    assert not isinstance(_names.iter_segments(directory), list)  # read lazily


def test_cleanup_looks_up_each_user_name_once(tmp_path, monkeypatch):
    _needs_root()
    import pwd

    for i in range(50):
        path = tmp_path / f"sx_{_dead_pid() if i == 0 else 4_000_000 + i}_{i:016x}"
        path.write_bytes(_segment.MAGIC + bytes(56))
        _foreign(str(path))
    looked_up = []
    real_getpwuid = pwd.getpwuid
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: looked_up.append(uid) or real_getpwuid(uid))
    cli._describe_uid.cache_clear()
    assert len(cli.find_leftovers(str(tmp_path)).not_yours) == 50
    assert looked_up == [ATTACKER]


@pytest.mark.parametrize(
    "name",
    [
        "sx_99999999999_" + "a" * 16,  # no pid_t holds it (OverflowError in os.kill)
        "sx_2147483648_" + "a" * 16,
        "sx_\u0663\u0664_" + "a" * 16,  # Arabic-Indic digits: \d took them
        "sx_123_" + "a" * 16 + "\n",  # $ took a trailing newline
        "sx_0123_" + "a" * 16,
        "sx_0_" + "a" * 16,
    ],
)
def test_only_ascii_pid_t_names_are_segment_names(name):
    assert _names.owner_of(name) is None
    with pytest.raises(SegmentCorruptError, match="is not a sharedexec segment name"):
        _segment.attach(name)


def test_pid_alive_never_raises_for_numbers_that_are_no_pid():
    assert _names.owner_of(f"sx_{2**31 - 1}_{'a' * 16}") == 2**31 - 1
    for number in (2**31, 2**32 - 1, 2**40, 0, -1):
        assert _names.pid_alive(number) is False
    assert _names.pid_alive(os.getpid()) is True


def test_cleanup_all_users_goes_past_a_name_with_a_huge_pid(tmp_path, capsys):
    """Root's ``cleanup --yes --all-users`` died of OverflowError on one
    file named ``sx_99999999999_...``; now the name is not a segment's, and
    the dead segment next to it is removed."""
    _needs_root()
    huge = tmp_path / f"sx_99999999999_{'a' * 16}"
    dead = tmp_path / f"sx_{_dead_pid()}_{'1' * 16}"
    for path in (huge, dead):
        path.write_bytes(_segment.MAGIC + bytes(56))
        _foreign(str(path))
    assert cli.main_cleanup(["--dir", str(tmp_path), "--yes", "--all-users"]) == 0
    assert os.listdir(tmp_path) == [huge.name]


@pytest.mark.tmpfs_only  # a tmpfs directory's own mechanics
def test_an_orphan_result_with_a_huge_creator_pid_is_removed(tmp_path, monkeypatch):
    """The creator pid comes from a header (unsigned 32 bits): no pid, gone."""
    monkeypatch.setenv(_names.DIR_ENV, str(tmp_path))
    mapping = _segment.create([], b"", os.getpid(), directory=str(tmp_path))
    with open(tmp_path / mapping.name, "r+b") as f:
        f.seek(40)  # the creator pid
        f.write((2**32 - 1).to_bytes(4, "little"))
    from sharedexec import _cache

    assert _cache.remove_orphan_results(os.getpid(), {2**32 - 1}) == [mapping.name]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT], ids=errno.errorcode.get)
@pytest.mark.parametrize("call", ["open", "ftruncate"])
def test_no_inode_left_is_shared_memory_full(tmp_path, monkeypatch, err, call):
    """ENOSPC or EDQUOT creating the file (no inode left: another user's empty
    files) is SharedMemoryFullError, which on_full="fallback" falls back on,
    saying that inodes ran out; nothing is left behind."""
    from collections import namedtuple

    from sharedexec._errors import SharedMemoryFullError

    real = getattr(os, call)

    def full(*args, **kwargs):
        if call == "open" and not str(args[0]).startswith(str(tmp_path)):
            return real(*args, **kwargs)
        raise OSError(err, os.strerror(err))

    statvfs = namedtuple("statvfs", "f_bavail f_frsize f_blocks f_files f_favail")
    monkeypatch.setattr(os, "statvfs", lambda _: statvfs(16384, 4096, 16384, 32, 0))
    monkeypatch.setattr(os, call, full)
    with pytest.raises(SharedMemoryFullError) as info:
        _segment.create([memoryview(bytes(100))], b"", os.getpid(), directory=str(tmp_path))
    monkeypatch.undo()
    assert "no free inodes" in str(info.value) and "all 32 files" in str(info.value)
    assert "SHAREDEXEC_DIR" in str(info.value) and os.listdir(tmp_path) == []


@pytest.mark.tmpfs_only  # a tmpfs directory's own mechanics
def test_a_tmpfs_out_of_inodes_falls_back_to_pickling(tmp_path):
    """The reproduction: a tmpfs whose inodes are all taken by empty files
    (its bytes free); a pool task with a shared argument still gets it."""
    code = (
        "import os, warnings, numpy as np, sharedexec\n"
        "d = os.environ['SHAREDEXEC_DIR']\n"
        "i = 0\n"
        "while True:\n"
        "    try: open(os.path.join(d, f'junk{i}'), 'x').close()\n"
        "    except OSError: break\n"
        "    i += 1\n"
        "arr = np.arange(1 << 19)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    with sharedexec.ProcessPoolExecutor(1) as ex:\n"
        "        assert ex.submit(np.sum, arr).result() == arr.sum()\n"
        "print([str(x.message) for x in w])\n"
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = scripts.run_in_private_tmpfs(mnt, "64m,nr_inodes=16", [sys.executable, "-c", code], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no free inodes" in result.stdout, result.stdout


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757], ids=oct)
def test_a_directory_others_may_rename_in_is_refused(tmp_path, mode):
    """Without the sticky bit, whoever may write a directory may rename our
    segments out of every clean-up's sight."""
    directory = tmp_path / f"open-{mode:o}"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(sharedexec.SharedExecError, match="could rename or remove") as info:
        _segment.create([], b"", os.getpid(), directory=str(directory))
    assert "SHAREDEXEC_DIR" in str(info.value) and f"{mode:04o}" in str(info.value)
    assert os.listdir(directory) == []


def test_a_directory_of_another_user_is_refused_even_sticky(tmp_path):
    """The attack: another user pre-creates the SHAREDEXEC_DIR (1777, theirs);
    as its owner they may rename anything in it."""
    _needs_root()
    directory = tmp_path / "theirs"
    directory.mkdir()
    directory.chmod(0o1777)
    os.chown(directory, ATTACKER, ATTACKER)
    with pytest.raises(sharedexec.SharedExecError, match=f"owned by uid {ATTACKER}.*its owner could rename"):
        _segment.create([], b"", os.getpid(), directory=str(directory))
    assert os.listdir(directory) == []


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o1777, 0o1770], ids=oct)
def test_a_directory_of_ours_or_a_sticky_one_is_used(tmp_path, mode):
    directory = tmp_path / f"ok-{mode:o}"
    directory.mkdir()
    directory.chmod(mode)
    mapping = _segment.create([], b"", os.getpid(), directory=str(directory))
    assert _segment.retire(mapping.name, str(directory))


def test_a_precreated_shared_memory_directory_hides_nothing(two_uids):
    """The reproduction, two uids: B makes the victim's SHAREDEXEC_DIR
    first (theirs, 1777). The victim's share() refuses it with a clear
    error, so B has no segment of the victim to hide."""
    _, state, _, _ = two_uids
    exe, path = _python_for_others()
    theirs = os.path.join(state, "sx-victim")
    os.mkdir(theirs)
    os.chown(theirs, ATTACKER, ATTACKER)
    os.chmod(theirs, 0o1777)
    result = subprocess.run(
        [exe, "-c", "import numpy as np, sharedexec\nsharedexec.share(np.arange(1 << 20))"],
        preexec_fn=_as(VICTIM), env=_env(path, theirs, state), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "could rename or remove" in result.stderr, result.stderr
    assert f"uid {ATTACKER}" in result.stderr and "SHAREDEXEC_DIR" in result.stderr
    assert os.listdir(theirs) == []


def test_the_bench_barrier_is_private_and_cannot_be_taken(tmp_path, monkeypatch):
    """Another user's ``<tmp>/sharedexec-bench-barrier`` stopped the
    benchmark (FileExistsError): the barrier is a fresh mkdtemp directory,
    named to workers in the environment, and gone afterwards."""
    from sharedexec.bench import tasks

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(tasks.BARRIER_ENV, raising=False)
    (tmp_path / "sharedexec-bench-barrier").mkdir()
    with tasks.barrier(1):
        path = os.environ[tasks.BARRIER_ENV]
        assert os.path.dirname(path) == str(tmp_path) and stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert open(os.path.join(path, "parties")).read() == f"1 {os.getpid()}"
    assert tasks.BARRIER_ENV not in os.environ and not os.path.exists(path)


def test_keys_are_never_shown(evil):
    from sharedexec import _cache

    handle = _cache.Handle(evil.name, "r", "", -1, os.getpid(), _names.HOST, evil.key)
    for text in (repr(evil), repr(handle), str(evil), str(handle)):
        assert evil.key.hex() not in text and repr(evil.key) not in text


@pytest.mark.tmpfs_only  # a tmpfs directory's own mechanics
@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE, errno.EINTR], ids=errno.errorcode.get)
def test_running_out_of_descriptors_is_not_not_ours(evil, monkeypatch, err):
    """EMFILE and the like say nothing about the file: attach raises them as
    themselves, and retire still removes our segment."""
    real = os.open

    def failing(path, *args, **kwargs):
        if os.path.basename(str(path)) == evil.name:
            raise OSError(err, os.strerror(err))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing)
    with pytest.raises(OSError) as info:
        _segment.attach(evil.name)
    assert info.value.errno == err and not isinstance(info.value, sharedexec.SharedExecError)
    assert _segment.retire(evil.name) is True
    assert not os.path.exists(_seg_path(evil.name))
