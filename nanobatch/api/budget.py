"""A budget of bytes: how much of the answers may be in memory at once, being read and decoded.

Concurrency bounds the requests in flight, not their answers' size: sixteen 4K answers (32 MB of JSON each,
then their 24 MB images) arriving together would all be read at once. :class:`ByteBudget` lets an answer's
body be read only once its size fits beside what the others hold; the rest wait in the kernel's socket
buffers (and the server's), which cost this process nothing.

>>> budget = ByteBudget(128 * 2**20)
>>> async with budget.hold(len_of_body) as held:
...     ...  # read the body (await held.grow(n) for bytes beyond what was announced), then decode it
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

__all__ = ["ByteBudget", "Held"]


@dataclass(slots=True, eq=False)
class Held:
    """Bytes one reader holds of a :class:`ByteBudget`."""

    budget: ByteBudget
    size: int

    async def grow(self, more: int) -> None:
        """Hold *more* bytes (a body longer than announced, or of unknown length, as it arrives): waits while
        they do not fit, unless this is the oldest holder. The oldest never waits, so some body is always
        being read to its end and gives its bytes back: bodies half read never wait for each other for ever."""
        await self.budget._grow(self, more)


class ByteBudget:
    """At most *limit* bytes held at once (a body of unknown length, the oldest, may go past it by what is
    left of it), handed out in the order asked;
    one body bigger than the whole budget is let through alone (nothing else held), so that no answer waits
    for ever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most held at once (for tests and the bench)
        self._waiting: deque[tuple[int, anyio.Event]] = deque()
        self._holders: dict[Held, None] = {}  # oldest first
        self._growing = 0  # holders waiting to grow: they go before new bodies
        self._changed = anyio.Event()

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit

    def free_for(self, size: int) -> bool:
        """Whether :meth:`hold` of *size* bytes would hold them at once, without waiting."""
        return not self._waiting and not self._growing and self._fits(max(1, size))

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[Held]:
        """Hold *size* bytes (at least 1) while the block runs, waiting for them first if they do not fit."""
        size = max(1, size)
        if self.free_for(size):
            self.held += size
        else:
            await self._wait(size)
        held = Held(self, size)
        self._holders[held] = None
        try:
            self.peak = max(self.peak, self.held)
            yield held
        finally:
            del self._holders[held]
            self.held -= held.size
            self._wake()

    async def _grow(self, held: Held, more: int) -> None:
        while self.held + more > self.limit and next(iter(self._holders)) is not held:
            self._growing += 1
            try:
                await self._changed.wait()
            finally:
                self._growing -= 1
        held.size += more
        self.held += more
        self.peak = max(self.peak, self.held)

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
        self._changed.set()
        self._changed = anyio.Event()
        while not self._growing and self._waiting and self._fits(self._waiting[0][0]):
            size, event = self._waiting.popleft()
            self.held += size
            event.set()
