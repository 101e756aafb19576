"""``python -I -S xnu_reaper.py .../sharedexec/_reaper.py PID``: the reaper,
under the XNU emulation (``xnu_emulation`` starts reapers through this)."""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xnu_emulation  # noqa: E402

xnu_emulation.install()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
