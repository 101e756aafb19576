"""``python -m sharedexec demo | bench | doctor | cleanup``."""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help); imported only when run, so
# that `doctor` and `cleanup` work without the bench extra installed.
COMMANDS = {
    "demo": ("sharedexec.bench", "demo_main", "the original problem, solved: stdlib vs sharedexec in about a minute"),
    "bench": ("sharedexec.bench", "main", "every approach side by side: time, memory, correctness"),
    "doctor": ("sharedexec.cli", "main_doctor", "check /dev/shm, versions and configuration; list leftover segments"),
    "cleanup": ("sharedexec.cli", "main_cleanup", "remove segments left by processes that are gone"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m sharedexec {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, _, help_text) in COMMANDS.items():
            print(f"  {name:<8} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, function, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
