"""Routes: how one request for one step reaches the model and its answer comes back.

The engine prepares the request body (a :class:`Request`), holds the gate, retries, notes the request in the
journal and builds the record; a :class:`Route` only carries the body there and brings a
:class:`~nanobatch.api.gemini.Reply` back (or raises :class:`~nanobatch.errors.ApiError`). The synchronous
``generateContent`` call is the first route; Gemini's Batch API is the second
(:class:`~nanobatch.run.batch.BatchRoute`), for items in the batch tier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from ..api.client import GeminiClient
from ..api.gemini import Reply
from ..errors import ApiError

__all__ = ["Bounded", "GenerateContent", "Request", "Route"]


@dataclass(slots=True, eq=False)
class Request:
    """One step's request body, handed to a route for each attempt (retries send the same body again).

    An online route reads it; the batch route takes it (:meth:`take`), so that while the step waits for its
    job the body lives only on disk (a line of its chunk), and puts it back with an answer the step may be
    sent again for (an error, or an answer without an image)."""

    body: dict[str, Any] | None
    images: int = 0  # how many images it carries (for the cost estimate; the body may be on disk)

    def json(self) -> dict[str, Any]:
        if self.body is None:  # taken, and not put back: the route could not read it back from its chunk
            raise ApiError("the request was not kept to be sent again", kind="request_lost")
        return self.body

    def take(self) -> dict[str, Any]:
        """The body, kept here no longer."""
        body, self.body = self.json(), None
        return body


class Route(Protocol):
    """Sends one step's request for *model* and returns the answer, whatever way it travels."""

    async def send(self, model: str, request: Request, *, timeout_s: float) -> Reply: ...


class GenerateContent:
    """The synchronous route: one ``generateContent`` call per request."""

    def __init__(self, client: GeminiClient) -> None:
        self.client = client

    async def send(self, model: str, request: Request, *, timeout_s: float) -> Reply:
        return await self.client.generate(model, request.json(), timeout_s=timeout_s)


class Bounded:
    """*route* with at most *limit* requests in flight. A batch run's gate lets thousands of steps wait in
    chunks at once; what the batch deadline sends online goes through this, within ``limits.concurrency``."""

    def __init__(self, route: Route, limit: int) -> None:
        self.route = route
        self.slots = anyio.CapacityLimiter(limit)

    async def send(self, model: str, request: Request, *, timeout_s: float) -> Reply:
        async with self.slots:
            return await self.route.send(model, request, timeout_s=timeout_s)
