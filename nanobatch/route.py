"""Routes: how one request for one step reaches the model and its answer comes back.

The engine prepares the request body, holds the gate, retries, notes the request in the journal and builds the
record; a :class:`Route` only carries the body there and brings a :class:`~nanobatch.gemini.Reply` back (or raises
:class:`~nanobatch.errors.ApiError`). The synchronous ``generateContent`` call is the first route; Gemini's Batch
API is the second (:class:`~nanobatch.batch.BatchRoute`), for items in the batch tier.
"""

from __future__ import annotations

from typing import Any, Protocol

import anyio

from .client import GeminiClient
from .gemini import Reply

__all__ = ["Bounded", "GenerateContent", "Route"]


class Route(Protocol):
    """Sends one step's request body for *model* and returns the answer, whatever way it travels."""

    async def send(self, model: str, body: dict[str, Any], *, timeout_s: float, key: str = "") -> Reply:
        """*key* names the request (item, work key, step) the same way in every run: a route that answers
        later (:class:`~nanobatch.batch.BatchRoute`) finds a request it already took by it."""
        ...


class GenerateContent:
    """The synchronous route: one ``generateContent`` call per request."""

    def __init__(self, client: GeminiClient) -> None:
        self.client = client

    async def send(self, model: str, body: dict[str, Any], *, timeout_s: float, key: str = "") -> Reply:
        return await self.client.generate(model, body, timeout_s=timeout_s)


class Bounded:
    """*route* with at most *limit* requests in flight. A batch run's gate lets thousands of steps wait in
    chunks at once; what the batch deadline sends online goes through this, within ``limits.concurrency``."""

    def __init__(self, route: Route, limit: int) -> None:
        self.route = route
        self.slots = anyio.CapacityLimiter(limit)

    async def send(self, model: str, body: dict[str, Any], *, timeout_s: float, key: str = "") -> Reply:
        async with self.slots:
            return await self.route.send(model, body, timeout_s=timeout_s, key=key)
