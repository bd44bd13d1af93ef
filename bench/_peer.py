"""What the peer scripts share: their command line and the measurement around them (not what they do).

``python bench/peer_X.py JSON_PARAMS`` runs ``edit_all(**params)`` of that script in a fresh process
and prints one JSON object: ``wall_s`` and ``cpu_s`` (``time.process_time``: every thread, user +
system) around the run alone, ``maxrss_mb`` (peak resident set, ``peak_rss_mb``), ``rss_before_mb``, plus what the
script returned. Params: ``base_url``, ``n``, ``concurrency``, ``input_path``, ``out_dir``, ``image_size``.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

MODEL = "gemini-3.1-flash-image"  # the one model every bench row uses (still served; sizes down to 512)
INSTRUCTION = "Replace the background with pure white; keep the product unchanged"


def rss_mb() -> float:
    """The current resident set, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set since its exec, in MB (``VmHWM``). Not ``ru_maxrss``: on Linux a
    child's starts at its parent's peak (the bench's own, ~70-90 MB), which hid every smaller client's."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def main(edit_all: Callable[..., Awaitable[dict[str, Any]]]) -> None:
    params = json.loads(sys.argv[1])
    result: dict[str, Any] = {"rss_before_mb": rss_mb()}
    wall, cpu = time.perf_counter(), time.process_time()
    result.update(asyncio.run(edit_all(**params)))
    result.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)
    result["maxrss_mb"] = peak_rss_mb()
    sys.stdout.write(json.dumps(result) + "\n")
