"""The examples run, print what they promise, and print nothing on stderr;
the docs build strict, and the API page shows every public name.

Each example runs in a subprocess, as a user would run it, with small
arguments so that the module takes well under a minute on 2 cores. stderr
must be empty (no warning, no traceback), except for ``small_shm.py``, whose
point is the one SharedExecWarning it prints.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SHAREDEXEC_DIR"}
    env["PYTHONWARNINGS"] = "default"  # show every warning once: stderr must still be empty
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def lines(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stdout.splitlines()


def assert_clean_stderr(proc: subprocess.CompletedProcess) -> None:
    assert proc.stderr == "", f"unexpected stderr:\n{proc.stderr}"


PROGRESS_BAR = re.compile(r"(Pool\.imap|executor\.map|as_completed|joblib generator): +\d+%\|")


def test_seed_pool_with_progress_bars():
    proc = run_example("seed_pool.py", "--rows", "20000", "--configs", "6", "--workers", "3", "--progress")
    # stderr: tqdm's bars and nothing else (no warning, no traceback)
    fragments = [f for f in re.split(r"[\r\n]+", proc.stderr) if f.strip()]
    assert fragments and all(PROGRESS_BAR.match(f) for f in fragments), proc.stderr
    for way in ("Pool.imap", "executor.map", "as_completed", "joblib generator"):
        assert any(f.startswith(f"{way}: 100%|") for f in fragments), way
    out = lines(proc)
    assert out[0].startswith("frame: 20,000 rows x 32 columns")
    assert any(line.startswith("plain Pool ") for line in out)
    assert any(line.startswith("@sharedexec.shared ") and line.endswith(" MB") for line in out)
    assert "same results: True" in out
    assert "sharedexec copied the frame into shared memory 1 time(s); the other 5 tasks reused that copy" in out
    for way in ("Pool.imap", "executor.map", "as_completed", "joblib generator"):
        assert f"with a progress bar, {way}: same results: True" in out
    assert "the frame is still in shared memory once: 1 publication(s) in all" in out


def test_parameter_sweep():
    proc = run_example("parameter_sweep.py", "--rows", "20000", "--alphas", "2", "--compare-stdlib")
    assert_clean_stderr(proc)
    out = lines(proc)
    assert out[1] == "8 fits on 2 workers"
    assert any(line.startswith("sharedexec.ProcessPoolExecutor: ") for line in out)
    assert any(line.startswith("concurrent.futures.ProcessPoolExecutor: ") for line in out)
    assert "same results: True" in out
    assert any(line.startswith("best: ") and "held-out R^2=" in line for line in out)
    assert "frame copied into shared memory 1 time(s), sent as a handle to the other 7 tasks" in out


def test_joblib_groupby():
    proc = run_example("joblib_groupby.py", "--rows", "60000", "--stores", "6")
    assert_clean_stderr(proc)
    out = lines(proc)
    assert any(line.startswith("backend='loky' ") and line.endswith("for 6 stores") for line in out)
    assert any(line.startswith("backend='sharedexec' ") and line.endswith("for 6 stores") for line in out)
    assert "same results: True" in out


def test_large_results():
    proc = run_example("large_results.py", "--chunks", "3", "--rows", "50000")
    assert_clean_stderr(proc)
    out = lines(proc)
    assert out[0] == "3 results of 50,000 rows x 10 columns (4 MB each)"
    assert "same values as computed here: True" in out
    assert "result is writable: True" in out


def _can_mount_tmpfs() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a 64 MB tmpfs (or a Docker-sized /dev/shm)")
@pytest.mark.tmpfs_only  # the example sets SHAREDEXEC_DIR
def test_small_shm_falls_back_and_warns_once():
    proc = run_example("small_shm.py", "--megabytes", "80", "--tasks", "3")
    out = lines(proc)
    assert out[0].startswith("SHAREDEXEC_DIR=")
    assert "on_full='fallback': did not fit, pickled into every task instead" in proc.stdout
    assert "on_full='raise': SharedMemoryFullError: cannot create a 80.0 MB shared-memory segment" in proc.stdout
    # The one thing on stderr: the SharedExecWarning, once (with the source line
    # Python prints under a warning), and no traceback.
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert sum("SharedExecWarning" in line for line in err) == 1, proc.stderr
    assert len(err) <= 2, proc.stderr


def test_small_shm_shares_through_a_directory_on_disk(tmp_path):
    proc = run_example("small_shm.py", "--dir", str(tmp_path), "--megabytes", "20", "--tasks", "3")
    assert_clean_stderr(proc)
    assert f"on_full='fallback': shared once through {tmp_path}" in proc.stdout
    assert f"on_full='raise': shared once through {tmp_path}" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("mkdocstrings_handlers") is None, reason="needs the docs extra")
def test_docs_build_strict_and_the_api_page_shows_every_public_name(tmp_path):
    import sharedexec

    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)]
    proc = subprocess.run(mkdocs, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "api" / "index.html").read_text()
    missing = [name for name in sharedexec.__all__ if f'id="sharedexec.{name}"' not in page]
    assert missing == []
    # Docstrings are Markdown (mkdocstrings): a reStructuredText role shows raw.
    assert not re.findall(r":(?:class|func|meth|exc|mod|attr):", page)
