"""Loaded by every Python process started with this directory on PYTHONPATH
(see ``xnu_emulation``): XNU's rules for POSIX shared-memory descriptors."""

import os

if os.environ.get("SX_EMULATE_XNU") == "1":
    import xnu_emulation

    xnu_emulation.install()
