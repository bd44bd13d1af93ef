"""The split connection pool, as the package ships it (``nanobatch/api/transport.py``).

The plain ``asyncio.gather`` script uses it for its "pool split" row: the same script through ten pools
of ten instead of one of 100, so that what the split saves is measured apart from the rest of nanobatch.
"""

from __future__ import annotations

from nanobatch.api.transport import ShardedTransport as SplitPoolTransport

__all__ = ["SplitPoolTransport"]
