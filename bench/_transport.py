"""The split connection pool, as the package ships it (``nanobatch/_transport.py``).

The benchmark first found httpcore 1.0's pool cost growing with the square of its
size here, as an experiment; the package now does this by default (on httpcore2
it still saves CPU, less). The plain
``asyncio.gather`` script uses it for its "pool split" row.
"""

from __future__ import annotations

from nanobatch.api.transport import ShardedTransport as SplitPoolTransport

__all__ = ["SplitPoolTransport"]
