"""A budget of bytes: how much of the answers may be in memory at once, being read and decoded.

Concurrency bounds the requests in flight, not their answers' size: sixteen 4K answers (32 MB of JSON each,
then their 24 MB images) arriving together would all be read at once. :class:`ByteBudget` lets an answer's
body be read only once its size fits beside what the others hold; the rest wait in the kernel's socket
buffers (and the server's), which cost this process nothing.

>>> budget = ByteBudget(128 * 2**20)
>>> async with budget.hold(len_of_body) as held:
...     ...  # read the body (held.grow(n) for bytes beyond what was announced), then decode it
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

__all__ = ["ByteBudget", "Held"]


@dataclass(slots=True)
class Held:
    """Bytes one reader holds of a :class:`ByteBudget`."""

    budget: ByteBudget
    size: int

    def grow(self, more: int) -> None:
        """Hold *more* bytes, without waiting: a body half read is never stopped (two bodies half read, each
        waiting for the other's bytes, would wait for ever); new bodies wait until the total is back within
        the budget."""
        self.size += more
        self.budget.held += more
        self.budget.peak = max(self.budget.peak, self.budget.held)


class ByteBudget:
    """At most *limit* bytes held at once, handed out in the order asked; one body bigger than the whole
    budget is let through alone (nothing else held), so that no answer waits for ever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most held at once (for tests and the bench)
        self._waiting: deque[tuple[int, anyio.Event]] = deque()

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[Held]:
        """Hold *size* bytes (at least 1: a body of unknown length waits while the budget is spent) while
        the block runs, waiting for them first if the budget is spent."""
        size = max(1, size)
        if not self._waiting and self._fits(size):
            self.held += size
        else:
            await self._wait(size)
        held = Held(self, size)
        try:
            self.peak = max(self.peak, self.held)
            yield held
        finally:
            self.held -= held.size
            self._wake()

    async def _wait(self, size: int) -> None:
        entry = (size, anyio.Event())
        self._waiting.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry in self._waiting:
                self._waiting.remove(entry)
            else:  # handed its bytes just as it was cancelled: give them back
                self.held -= size
                self._wake()
            raise

    def _wake(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            size, event = self._waiting.popleft()
            self.held += size
            event.set()
