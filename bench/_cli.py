"""``python bench/_cli.py ARGS...``: ``nanobatch ARGS...``, then the CPU of this process alone (not its worker
processes') as one JSON line on stderr: how much of a run the event loop's process does itself."""

from __future__ import annotations

import json
import resource
import sys

from nanobatch.cli.main import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    own = resource.getrusage(resource.RUSAGE_SELF)
    sys.stderr.write(json.dumps({"main_cpu_s": own.ru_utime + own.ru_stime}) + "\n")
    sys.exit(code)
