"""Routes: how one request for one step reaches the model and its answer comes back.

The engine prepares the request body (a :class:`Request`), holds the gate, retries, notes the request in the
journal and builds the record; a :class:`Route` only carries the body there and brings an :class:`Answer` back
(or raises :class:`~nanobatch.errors.ApiError`). The synchronous ``generateContent`` call is the first route;
Gemini's Batch API is the second (:class:`~nanobatch.run.batch.route.BatchRoute`), for items in the batch tier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import orjson

from ..errors import ApiError

if TYPE_CHECKING:  # not at run time: status reads batch keys (Step) without loading the HTTP client
    from ..api.client import GeminiClient
    from ..api.gemini import Reply

__all__ = ["Answer", "Bounded", "GenerateContent", "Request", "Route", "Step"]


@dataclass(slots=True, eq=False)
class Request:
    """One step's request body, handed to a route for each attempt (retries send the same body again).

    An online route reads it; the batch route takes it (:meth:`take`), so that while the step waits for its
    job the body lives only on disk (a line of its chunk), and puts it back with an answer the step may be
    sent again for (an error, or an answer without an image)."""

    body: dict[str, Any] | None
    images: int = 0  # how many images it carries (for the cost estimate; the body may be on disk)
    again: int = 0  # the n-th new request for the step after answers its output checks refused (0: its own)
    # In a sealed batch chunk when its step stopped waiting: it goes out, and is paid, whatever becomes of this run.
    committed: bool = False

    def json(self) -> dict[str, Any]:
        if self.body is None:  # taken, and not put back: the route could not read it back from its chunk
            raise ApiError("the request was not kept to be sent again", kind="request_lost")
        return self.body

    def take(self) -> dict[str, Any]:
        """The body, kept here no longer."""
        body, self.body = self.json(), None
        return body


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """Which step of which item a request is for (the batch route knows a request it took by its key)."""

    item: str  # the item's id
    work_key: str | None
    number: int
    again: int = 0  # a new request for an answer the output checks refused (see Request.again): a key of its own

    @property
    def key(self) -> str:
        """The same in every run for this item, inputs and step: the batch route finds a request it took. A
        request sent again for the output checks has its own, so that the refused answer is never the one found."""
        if self.again:
            return orjson.dumps([self.item, self.work_key, self.number, "qa", self.again]).decode()
        return orjson.dumps([self.item, self.work_key, self.number]).decode()

    @classmethod
    def from_key(cls, key: str) -> Step:
        """The step a :attr:`key` was made for."""
        item, work_key, number, *again = orjson.loads(key)
        return cls(item=item, work_key=work_key, number=number, again=again[1] if again else 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """What a route brings back for the record."""

    reply: Reply
    job: str | None = None  # the batch job that answered (the record's ``batch``)
    # False: read again from a batch results file an earlier run collected; that run counted it as spent.
    spent_now: bool = True
    paid_by: str | None = None  # the run whose record counted this answer's cost already (its write had failed)


class Route(Protocol):
    """Sends one step's request for *model* and returns the answer, whatever way it travels."""

    @property
    def waits_on_disk(self) -> bool:
        """True when a request waits for its answer on disk (the batch route's): the step lets its pictures go
        once the request is built."""
        ...

    async def send(
        self, model: str, request: Request, *, timeout_s: float, step: Step, on_send: Callable[[], None]
    ) -> Answer:
        """The answer to *request*; *on_send* is called when this run sends it, just before it goes out (after
        any wait for a slot), and not at all for a request an earlier run sent whose answer is collected."""
        ...

    def release(self, item: str) -> None:
        """*item*'s answer is handed on (to the writer, or into its next request): what the route kept for it
        is free."""
        ...

    def fallback_tier(self, exc: ApiError) -> str | None:
        """The tier a step is sent in after *exc* from this route (None: the route has no say)."""
        ...


class GenerateContent:
    """The synchronous route: one ``generateContent`` call per request."""

    waits_on_disk = False

    def __init__(self, client: GeminiClient) -> None:
        self.client = client

    async def send(
        self, model: str, request: Request, *, timeout_s: float, step: Step, on_send: Callable[[], None]
    ) -> Answer:
        body = request.json()
        on_send()
        return Answer(reply=await self.client.generate(model, body, timeout_s=timeout_s))

    def release(self, item: str) -> None:
        pass  # nothing is kept once the answer is back

    def fallback_tier(self, exc: ApiError) -> str | None:
        return None


class Bounded:
    """*route* with at most *limit* requests in flight. A batch run's gate lets thousands of steps wait in
    chunks at once; what the batch deadline sends online goes through this, within ``limits.concurrency``."""

    def __init__(self, route: Route, limit: int) -> None:
        self.route = route
        self.slots = anyio.CapacityLimiter(limit)

    @property
    def waits_on_disk(self) -> bool:
        return self.route.waits_on_disk

    async def send(
        self, model: str, request: Request, *, timeout_s: float, step: Step, on_send: Callable[[], None]
    ) -> Answer:
        async with self.slots:  # a request waiting here is not sent yet: *on_send* comes once it has a slot
            return await self.route.send(model, request, timeout_s=timeout_s, step=step, on_send=on_send)

    def release(self, item: str) -> None:
        self.route.release(item)

    def fallback_tier(self, exc: ApiError) -> str | None:
        return self.route.fallback_tier(exc)
