"""``python bench/_cli.py ARGS...``: ``nanobatch ARGS...``, then the CPU of this process alone (not its worker
processes') and of its event loop's thread, and its peak RSS, as one JSON line on stderr: how much of a run the
event loop's process does itself."""

from __future__ import annotations

import json
import resource
import sys
import time

if __name__ == "__main__":  # worker processes load this file as __mp_main__: they import nothing of the CLI
    from nanobatch.cli.main import main

    code = main(sys.argv[1:])
    from _peer import peak_rss_mb  # after the run: nothing of the bench's is loaded before it

    own = resource.getrusage(resource.RUSAGE_SELF)
    # The event loop runs in the main thread: what the process's other threads (file I/O, hashing) took is the rest.
    loop = time.thread_time()
    numbers = {"main_cpu_s": own.ru_utime + own.ru_stime, "loop_cpu_s": loop, "maxrss_mb": peak_rss_mb()}
    sys.stderr.write(json.dumps(numbers) + "\n")
    sys.exit(code)
