"""``python -m sharedexec.bench``: the benchmark, runnable on its own."""

import sys

from sharedexec.bench import main

sys.exit(main())
