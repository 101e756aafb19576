"""``python -m sharedexec doctor`` and ``cleanup`` (sharedexec/cli.py).

Most tests call ``main_doctor`` / ``main_cleanup`` in-process on a private
directory (``--dir``) holding segments named for a live process (this one)
and for a process that has exited; a few run the real command line, one
against the segments a SIGKILLed process left with its reaper killed first,
and one against a 16 MB tmpfs mounted in a private mount namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys

import pytest

from sharedexec import _names, _segment, cli

from . import _reliability_scripts as scripts


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_segment(directory, owner: int, size: int = 4096) -> str:
    """A file of ours with a segment's name and header."""
    name = f"sx_{owner}_{secrets.token_hex(8)}"
    with open(os.path.join(directory, name), "wb") as f:
        f.write(_segment.MAGIC + b"\0" * (size - len(_segment.MAGIC)))
    return name


@pytest.fixture
def segdir(tmp_path):
    """A directory with: two segments of an exited process, one of this
    process, and files cleanup must never touch."""
    directory = tmp_path / "shm"
    directory.mkdir()
    gone = dead_pid()
    names = {
        "dead": sorted([fake_segment(directory, gone, 10_000), fake_segment(directory, gone, 20_000)]),
        "live": [fake_segment(directory, os.getpid())],
        "other": ["sx_123_not-a-segment", "joblib_memmapping_folder_1", f"sx_{gone}_{'0' * 15}"],
    }
    for name in names["other"]:
        (directory / name).write_bytes(b"x")
    return directory, gone, names


def listing(directory) -> set[str]:
    return set(os.listdir(directory))


# -- cleanup -------------------------------------------------------------------------


def test_cleanup_lists_but_removes_nothing_without_yes(segdir, capsys):
    directory, gone, names = segdir
    before = listing(directory)
    assert cli.main_cleanup(["--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert listing(directory) == before
    for name in names["dead"]:
        assert os.path.join(str(directory), name) in out
    assert f"process {gone}" in out and "30.0 KB" in out
    assert "Would remove 2 segment(s)" in out and "cleanup --yes" in out
    assert names["live"][0] not in out and f"{os.getpid()}" in out  # kept, as an owner


def test_cleanup_yes_removes_only_segments_of_exited_processes(segdir, capsys):
    directory, _, names = segdir
    assert cli.main_cleanup(["--dir", str(directory), "--yes"]) == 0
    out = capsys.readouterr().out
    assert listing(directory) == set(names["live"] + names["other"])
    assert "Removed 2 segment(s), 30.0 KB." in out
    # Nothing left to do: says so, still success.
    assert cli.main_cleanup(["--dir", str(directory), "--yes"]) == 0
    assert "No segment of a process that is gone" in capsys.readouterr().out
    assert listing(directory) == set(names["live"] + names["other"])


def test_cleanup_never_removes_a_live_process_segment(segdir, capsys):
    directory, _, names = segdir
    assert cli.main_cleanup(["--dir", str(directory), "--yes", "--pid", str(os.getpid())]) == 0
    assert names["live"][0] in listing(directory)
    assert set(names["dead"]) <= listing(directory)  # --pid limits to that owner


def test_cleanup_asks_again_before_each_removal(segdir, capsys, monkeypatch):
    # An owner that comes back to life between the listing and the removal
    # (pid reuse) keeps its segment.
    directory, gone, names = segdir
    listed = cli.find_leftovers(str(directory))
    monkeypatch.setattr(cli, "find_leftovers", lambda d, pids=(), all_users=False: listed)
    monkeypatch.setattr(_names, "pid_alive", lambda pid: True)
    assert cli.main_cleanup(["--dir", str(directory), "--yes"]) == 0
    assert set(names["dead"]) <= listing(directory)
    assert f"kept: process {gone} is alive now" in capsys.readouterr().out


def test_cleanup_reports_failures(segdir, capsys, monkeypatch):
    directory, _, names = segdir
    real_unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if os.path.basename(path) == names["dead"][0]:
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)
    assert cli.main_cleanup(["--dir", str(directory), "--yes"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: Permission denied" in out and "1 could not be removed" in out
    assert names["dead"][0] in listing(directory) and names["dead"][1] not in listing(directory)


def test_cleanup_missing_directory(tmp_path, capsys):
    assert cli.main_cleanup(["--dir", str(tmp_path / "nope"), "--yes"]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_cleanup_bad_arguments():
    with pytest.raises(SystemExit) as exc:
        cli.main_cleanup(["--frobnicate"])
    assert exc.value.code == 2


# -- doctor --------------------------------------------------------------------------


def test_doctor_reports_everything_it_promises(tmp_path, capsys):
    directory = tmp_path / "shm"
    directory.mkdir()
    assert cli.main_doctor(["--dir", str(directory)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for expected in (
        str(directory),
        "size",
        "free",
        "test segment                   created, mapped and removed",
        "default start method",
        "python",
        "pandas",
        "numpy",
        "pyarrow",
        "joblib",
        "SHAREDEXEC_DIR",
        "SHAREDEXEC_WORKER_CACHE_BYTES",
        "of processes that are gone     none",
        "Result: no problem found.",
    ):
        assert expected in out, expected
    import pandas

    assert pandas.__version__ in out
    # tmp_path is on disk here: the doctor says what that means.
    if "tmpfs" not in out:
        assert "not a tmpfs" in out
    assert os.listdir(directory) == []  # the probe cleaned up after itself


def test_doctor_lists_leftovers(segdir, capsys):
    directory, gone, names = segdir
    assert cli.main_doctor(["--dir", str(directory)]) == 1
    out = capsys.readouterr().out
    assert f"2 segment(s), 30.0 KB, of 1 process(es): {gone}" in out
    assert "python -m sharedexec cleanup --yes" in out
    assert f"of 1 process(es): {os.getpid()}" in out  # the live one, listed apart
    assert listing(directory) == set(names["dead"] + names["live"] + names["other"])  # doctor changes nothing


def test_doctor_warns_when_free_space_is_low(tmp_path, capsys, monkeypatch):
    real = os.statvfs

    def nearly_full(path):
        st = real(path)
        fake = os.statvfs_result((4096, 4096, 4 << 20, 1000, 1000, st.f_files, st.f_ffree, st.f_favail, st.f_flag, st.f_namemax))
        return fake if os.path.realpath(path) == str(tmp_path.resolve()) else st

    monkeypatch.setattr(os, "statvfs", nearly_full)
    assert cli.main_doctor(["--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "has only 4.1 MB free of 17.2 GB" in out and "--shm-size" in out


OTHER_UID = 54323  # no such user needed: chown takes any uid


def _unsafe_dir(tmp_path, case: str) -> str:
    """A SHAREDEXEC_DIR that sharedexec refuses at its first segment."""
    directory = tmp_path / "shm"
    directory.mkdir()
    if case in ("theirs-sticky", "their-symlink") and os.geteuid() != 0:
        pytest.skip("needs root to make files of another uid (chown)")
    directory.chmod({"world-writable": 0o777, "group-writable": 0o770, "theirs-sticky": 0o1777}.get(case, 0o700))
    if case == "theirs-sticky":
        os.chown(directory, OTHER_UID, OTHER_UID)
    if case == "their-symlink":
        link = tmp_path / "link"
        link.symlink_to(directory)
        os.chown(link, OTHER_UID, OTHER_UID, follow_symlinks=False)
        return str(link)
    return str(directory)


@pytest.mark.tmpfs_only  # the check of a tmpfs directory
@pytest.mark.parametrize("case", ["world-writable", "group-writable", "theirs-sticky", "their-symlink"])
def test_doctor_reports_a_directory_sharedexec_would_refuse(tmp_path, capsys, case):
    """Before a job fails on its first segment (issue 14's check), doctor says
    why the directory is unsafe and what to do, and creates nothing there."""
    directory = _unsafe_dir(tmp_path, case)
    assert cli.main_doctor(["--dir", directory]) == 1
    out = capsys.readouterr().out
    assert "refused: creating a segment raises an error" in out and "UNSAFE (see Problems)" in out
    with pytest.raises(OSError) as refused:  # what the job would meet: the same reason
        _segment.create([], b"", os.getpid(), directory=directory)
    reason = str(refused.value).split(": ", 1)[1]
    assert f"sharedexec refuses to create segments in {directory}: {reason}" in out
    assert "Point SHAREDEXEC_DIR at a directory of yours" in out
    assert ("symbolic link owned by uid 54323" if case == "their-symlink" else "could rename or remove") in reason
    assert "test segment" not in out and os.listdir(directory) == []


@pytest.mark.tmpfs_only
def test_doctor_accepts_a_symbolic_link_of_ours(tmp_path, capsys):
    directory = tmp_path / "shm"
    directory.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(directory)
    assert cli.main_doctor(["--dir", str(tmp_path / "link")]) == 0
    out = capsys.readouterr().out
    assert f"a symbolic link of uid {os.geteuid()}" in out and f"to {directory}" in out and ": safe" in out
    assert "created, mapped and removed" in out


def test_doctor_missing_directory(tmp_path, capsys):
    assert cli.main_doctor(["--dir", str(tmp_path / "nope")]) == 1
    out = capsys.readouterr().out
    assert "does not exist" in out and "SHAREDEXEC_DIR" in out


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sharedexec", *args],
        capture_output=True,
        text=True,
        env=scripts.child_env(**(env or {})),
        timeout=timeout,
    )


def test_doctor_reports_an_invalid_cache_budget():
    result = run_cli("doctor", env={"SHAREDEXEC_WORKER_CACHE_BYTES": "lots"})
    assert result.returncode == 1, result.stderr
    assert "SHAREDEXEC_WORKER_CACHE_BYTES='lots' is not a size" in result.stdout


def test_doctor_accepts_sizes_with_units():
    result = run_cli("doctor", env={"SHAREDEXEC_WORKER_CACHE_BYTES": "2GiB"})
    assert "2GiB -> " in result.stdout and "is not a size" not in result.stdout


@pytest.mark.tmpfs_only
def test_command_line_through_the_environment_variable(segdir):
    directory, _, names = segdir
    result = run_cli("doctor", env={"SHAREDEXEC_DIR": str(directory)})
    assert result.returncode == 1 and result.stderr == ""
    assert f"{directory} ($SHAREDEXEC_DIR)" in result.stdout
    result = run_cli("cleanup", env={"SHAREDEXEC_DIR": str(directory)})
    assert result.returncode == 0 and "Would remove 2 segment(s)" in result.stdout
    result = run_cli("cleanup", "--yes", env={"SHAREDEXEC_DIR": str(directory)})
    assert result.returncode == 0 and "Removed 2 segment(s)" in result.stdout
    assert listing(directory) == set(names["live"] + names["other"])


@pytest.mark.tmpfs_only
def test_cleanup_removes_what_a_killed_process_and_its_killed_reaper_left(tmp_path):
    """The real case cleanup exists for: the owner and its reaper both SIGKILLed
    (an OOM kill of the container's processes, `kill -9 -1`)."""
    directory = tmp_path / "shm"
    directory.mkdir()
    env = {"SHAREDEXEC_DIR": str(directory)}
    with open(tmp_path / "stderr", "w") as err:
        child = subprocess.Popen(
            scripts.command("publish-and-wait", tmp_path), env=scripts.child_env(**env), stderr=err
        )
    try:
        def ready():
            if (tmp_path / "ready").exists():
                return json.loads((tmp_path / "ready").read_text())
            assert child.poll() is None, (tmp_path / "stderr").read_text()
            return None

        published = scripts.wait_for(ready, timeout=60, what="child published")
        # Alive: cleanup --yes keeps its segments.
        result = run_cli("cleanup", "--yes", env=env)
        assert result.returncode == 0 and f"{child.pid} (alive)" in result.stdout
        assert set(published) <= listing(directory)
        reaper = scripts.wait_for(lambda: scripts.reaper_of(child.pid), timeout=10, what="reaper started")
        os.kill(reaper, signal.SIGKILL)
        scripts.wait_for(lambda: scripts.exited(reaper), timeout=10, what="reaper gone")
        child.kill()
        child.wait(timeout=10)
    finally:
        scripts.kill_all([child.pid])
    assert published and set(published) <= listing(directory)

    # Now it is gone, and its reaper too:
    result = run_cli("doctor", env=env)
    assert result.returncode == 1
    assert f"of 1 process(es): {child.pid}" in result.stdout
    result = run_cli("cleanup", env=env)
    assert result.returncode == 0 and listing(directory) >= set(published)
    result = run_cli("cleanup", "--yes", env=env)
    assert result.returncode == 0, result.stdout
    assert scripts.segments_of(child.pid, str(directory)) == []
    assert (tmp_path / "stderr").read_text() == ""


def _unshare_available() -> bool:
    return shutil.which("unshare") is not None and shutil.which("mount") is not None


@pytest.mark.skipif(not _unshare_available(), reason="needs unshare and mount")
@pytest.mark.tmpfs_only
def test_doctor_in_a_docker_sized_shm(tmp_path):
    """A real 16 MB tmpfs, as small as Docker's default /dev/shm (64 MB)."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    result = scripts.run_in_private_tmpfs(mnt, "16m", [sys.executable, "-m", "sharedexec", "doctor"], timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "tmpfs mounted at" in result.stdout and "16.8 MB" in result.stdout
    assert "holds only 16.8 MB in all" in result.stdout
    assert "--shm-size=8g" in result.stdout and "64 MB" in result.stdout
    assert "created, mapped and removed" in result.stdout


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-1GB"])
def test_a_cache_budget_that_is_no_size_warns_and_falls_back(value):
    """Issue 12, defect 7: "inf" or "1e400" raised OverflowError at import."""
    env = {"SHAREDEXEC_WORKER_CACHE_BYTES": value}
    imported = subprocess.run(
        [sys.executable, "-c", "import sharedexec._cache as c; print(c.CACHE.budget == c._PHYS_BYTES // 2)"],
        capture_output=True, text=True, env=scripts.child_env(**env), timeout=60,
    )
    assert imported.returncode == 0 and imported.stdout == "True\n", imported.stderr
    assert f"SharedExecWarning: SHAREDEXEC_WORKER_CACHE_BYTES={value!r} is not a size" in imported.stderr
    assert "Traceback" not in imported.stderr
    doctor = run_cli("doctor", env=env)
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr
    assert f"SHAREDEXEC_WORKER_CACHE_BYTES={value!r} is not a size" in doctor.stdout
