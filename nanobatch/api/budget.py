"""A budget of bytes: how much of the answers may be in memory at once, being read and decoded.

Concurrency bounds the requests in flight, not their answers' size: sixteen 4K answers (32 MB of JSON each,
then their 24 MB images) arriving together would all be read at once. :class:`ByteBudget` lets an answer's
body be read only once its size fits beside what the others hold; the rest wait in the kernel's socket
buffers (and the server's), which cost this process nothing. Big bodies are also bounded in number (*most_big*):
no more are read ahead than can be decoded at once, plus one, whatever their size.

>>> budget = ByteBudget(128 * 2**20)
>>> async with budget.hold(len_of_body) as held:
...     ...  # read the body (await held.grow(n) for bytes beyond what was announced), then decode it
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

__all__ = ["ByteBudget", "Held"]


@dataclass(slots=True, eq=False)
class Held:
    """Bytes one reader holds of a :class:`ByteBudget`."""

    budget: ByteBudget
    size: int
    big: bool = False  # counted among the big bodies (by the size it was held for)

    async def grow(self, more: int) -> None:
        """Hold *more* bytes (a body longer than announced, or of unknown length, as it arrives): waits while
        they do not fit, unless this is the oldest holder. The oldest never waits, so some body is always
        being read to its end and gives its bytes back: bodies half read never wait for each other for ever."""
        await self.budget._grow(self, more)


class ByteBudget:
    """At most *limit* bytes held at once (a body of unknown length, the oldest, may go past it by what is
    left of it), and at most *most_big()* holders of *big_from* bytes or more, handed out in the order asked;
    one body bigger than the whole budget is let through alone (nothing else held), so that no answer waits
    for ever."""

    def __init__(self, limit: int, *, big_from: int = 1 << 62, most_big: Callable[[], int] | None = None) -> None:
        self.limit = limit
        self.big_from = big_from
        self.most_big = most_big
        self.big = 0  # holders of big bodies now
        self.held = 0
        self.peak = 0  # the most held at once (for tests and the bench)
        self._waiting: deque[tuple[int, anyio.Event]] = deque()
        self._holders: dict[Held, None] = {}  # oldest first
        self._growing = 0  # holders waiting to grow: they go before new bodies
        self._changed = anyio.Event()

    def _fits(self, size: int) -> bool:
        if self.held == 0:
            return True
        if self.held + size > self.limit:
            return False
        return size < self.big_from or self.most_big is None or self.big < self.most_big()

    def free_for(self, size: int) -> bool:
        """Whether :meth:`hold` of *size* bytes would hold them at once, without waiting."""
        return not self._waiting and not self._growing and self._fits(max(1, size))

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[Held]:
        """Hold *size* bytes (at least 1) while the block runs, waiting for them first if they do not fit."""
        size = max(1, size)
        if self.free_for(size):
            self._take(size)
        else:
            await self._wait(size)
        held = Held(self, size, big=size >= self.big_from)
        self._holders[held] = None
        try:
            self.peak = max(self.peak, self.held)
            yield held
        finally:
            del self._holders[held]
            self.held -= held.size
            self.big -= held.big
            self._wake()

    def _take(self, size: int) -> None:
        self.held += size
        self.big += size >= self.big_from

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
                self.big -= size >= self.big_from
                self._wake()
            raise

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        while not self._growing and self._waiting and self._fits(self._waiting[0][0]):
            size, event = self._waiting.popleft()
            self._take(size)
            event.set()
