"""One step of an item, from its request body to its answer: the tier and route it goes by, the gate, the budget,
retries, the journal, and what it cost (:class:`Steps`, the engine's).

A step whose request already waits in a batch job (sent by an earlier run in the batch tier) is collected from
that job whatever the item's tier is now: while the job may still answer, the request is never sent again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import anyio

from .. import costs, models
from ..api.gemini import FileRef, Image, Reply, build_request, check_reply, set_service_tier
from ..api.retry import RetryPolicy, retrying
from ..config import Settings
from ..errors import ApiError, FatalApiError
from ..item import WorkItem
from ..models import Pricing
from ..output.outdir import Journal
from ..output.tally import Tally
from .batch.route import BatchRoute
from .failures import FailureLog
from .limits import Gate, Ticket
from .observer import Observer
from .route import Answer, Request, Route, Step
from .stats import RunStats

__all__ = ["Steps"]

logger = logging.getLogger("nanobatch")


class Steps:
    """Sends the steps of a run's items: through *route*, or *batch_route* for those in the batch tier (and for
    any step whose request waits in one of its jobs), within *gate*, retried by *retry*."""

    def __init__(
        self,
        *,
        settings: Settings,
        gate: Gate,
        route: Route,
        batch_route: BatchRoute | None,
        retry: RetryPolicy,
        journal: Journal,
        failures: FailureLog,
        stats: RunStats,
        observer: Observer,
    ) -> None:
        self.route = route
        self.observer = observer
        self.batch_route = batch_route
        self.gate = gate
        self.retry = retry
        self.journal = journal
        self.failures = failures
        self.stats = stats
        self.tier = settings.api.tier
        self.timeout_s = settings.api.timeout_s
        overrides = dict(settings.pricing)
        # A model's prices in a tier are the same for every step of the run: looked up once per (model, tier).
        self.prices = functools.cache(lambda model, tier: costs.pricing_for(model, overrides, tier))
        self.flex_fallback = settings.limits.flex_fallback
        # Vertex AI has no "store" field (and refuses one): it is only ever sent to the Gemini API.
        self.store = settings.api.store if settings.api.backend == "gemini" else None

    def request(self, item: WorkItem, instruction: str, images: list[Image | FileRef]) -> Request:
        """The request of one step of *item*: *instruction* on *images* (sent in each tier tried, with the tier set
        by :meth:`_send_in`)."""
        body = build_request(
            instruction, images, response_modalities=item.response_modalities, aspect_ratio=item.aspect_ratio,
            image_size=item.image_size, thinking_level=item.thinking_level, output_format=item.output_format,
            store=self.store,
        )  # fmt: skip
        return Request(body, images=len(images))

    async def send(
        self, item: WorkItem, tally: Tally, instruction: str, images: list[Image | FileRef],
        request: Request | None = None,
    ) -> Reply:  # fmt: skip
        """One step in the item's tier, retried; a flex request still shed after its retries goes out at
        standard price if ``limits.flex_fallback`` allows (``fallback: true`` in the record, counted in the
        summary). Returns the answer with its image, or raises ApiError.

        *images* are handed over: a step whose route waits on disk (the batch route's) empties the list once its
        request is built, so that while it waits for its job the pictures are held nowhere and the request only on
        disk (see :class:`Request`). *request*: the step's, made by :meth:`request` (by the caller that keeps it
        to :meth:`send_again`); made here from *images* if not given."""
        sent_at: float | None = None  # from the step's first request (the gate let it through) to its last answer

        def sending() -> None:
            nonlocal sent_at
            if sent_at is None:
                sent_at = anyio.current_time()

        tier = tally.fallback_tier or item.tier or self.tier
        if request is None:
            request = self.request(item, instruction, images)  # held here alone: a batch route takes its body
        try:
            if (
                tier != "batch"
                and self.batch_route is not None  # (no coroutine per online step when there is none)
                and (reply := await self._collect(item, tally, instruction, request, sending))
            ):
                return reply
            while True:
                route = self.batch_route if tier == "batch" and self.batch_route is not None else self.route
                if route.waits_on_disk:
                    images.clear()
                try:
                    return await self._send_in(tier, route, item, tally, instruction, request, sending)
                except FatalApiError:
                    raise
                except ApiError as exc:
                    tier = self._fallback_tier(item, tier, route, exc)
                    tally.fallback_tier = tier  # the item's later steps go there too
        finally:
            if sent_at is not None:
                tally.api_s.append(anyio.current_time() - sent_at)

    async def send_again(self, item: WorkItem, tally: Tally, instruction: str, request: Request) -> Reply:
        """The item's last step once more, as a new request (paid, and a request of its own in the batch tier:
        never the answer already had): its answer failed the output checks. *request* is the one :meth:`send`
        sent; a batch chunk that took its body gives it back."""
        if request.body is None and self.batch_route is not None:
            request.body = self.batch_route.sent_request(self.step_of(item, tally, request))
        request.again += 1
        return await self.send(item, tally, instruction, [], request)

    @staticmethod
    def step_of(item: WorkItem, tally: Tally, request: Request) -> Step:
        """Which step of which item *request* is (its latest step), for the batch route."""
        return Step(item=item.id, work_key=tally.key, number=len(tally.steps), again=request.again)

    async def _collect(
        self, item: WorkItem, tally: Tally, instruction: str, request: Request, sending: Callable[[], None]
    ) -> Reply | None:
        """The answer of the batch job this step's request waits in, though the item is no longer in the batch
        tier; None if no job holds it, or if its job did not answer it (cancelled, failed, a retryable error):
        then the step goes in the item's own tier. Waits for the job, as a batch run does (``Stopped`` with
        ``--no-wait``: the item is left for the next run)."""
        batch = self.batch_route
        if batch is None or not batch.holds(self.step_of(item, tally, request)):
            return None
        try:
            return await self._send_in("batch", batch, item, tally, instruction, request, sending, once=True)
        except FatalApiError:
            raise
        except ApiError as exc:
            if not exc.retryable and batch.fallback_tier(exc) is None:
                raise  # its answer, final (blocked, refused): the item's outcome, as in the batch tier
            logger.info("%s: its batch job did not answer it (%s); sending it in the %s tier", item.id,
                        exc.message, item.tier or self.tier)  # fmt: skip
            return None

    def _fallback_tier(self, item: WorkItem, tier: str, route: Route, exc: ApiError) -> str:
        """Where a step goes after *exc* in *tier*: where *route* says (the batch route: online, standard or flex
        per config, at --batch-deadline); standard for a flex request still shed after its retries, if
        ``limits.flex_fallback``. Else raises *exc*."""
        if (after := route.fallback_tier(exc)) is not None:
            return after
        if tier == "flex" and self.flex_fallback and exc.shed:
            logger.warning("%s: flex shed it (%s); sending it at standard price", item.id, exc.message)
            return "standard"
        raise exc

    def _charge_unread(
        self, exc: BaseException, request: Request, ticket: Ticket, tally: Tally, worst: float, *, online: bool
    ) -> None:
        """What a request that got no answer to read costs, at its worst case: a 200 whose body broke (made, billed,
        unpriced: the record counts it too); one that went out and got no answer at all (online: it took too long,
        the connection dropped, the run stopped; batch: it is in a sealed chunk, which goes out, now or with the
        next run): the model may have made the image, and billed it; the cap counts it so, the record only what
        is known. (Not an answer collected from an earlier run's job: that run counted it.)"""
        if not ticket.budgeted:
            return
        if isinstance(exc, ApiError) and exc.kind == "bad_response":
            self.failures.unpriced(f"an answer could not be read ({exc.message})", worst)
            ticket.cost_usd = worst
            tally.cost_usd += worst
            return
        if isinstance(exc, ApiError):  # an error answer is definite; no answer at all is not
            unanswered = online and ticket.sent and exc.sent and exc.status_code is None
        else:  # stopped or cancelled
            unanswered = request.committed or online and ticket.sent
        if unanswered:
            ticket.cost_usd = max(worst, ticket.reserved_usd)

    async def _send_in(
        self, tier: str, route: Route, item: WorkItem, tally: Tally, instruction: str, request: Request,
        sending: Callable[[], None], *, once: bool = False,
    ) -> Reply:  # fmt: skip
        """One step in *tier* through *route*, retried by the retry policy (tried *once*: not retried); each
        attempt passes the gate and is journaled."""
        tally.tier = tier
        set_service_tier(request.json(), None if tier == "batch" else tier)
        pricing = self.prices(item.model, tier)
        _, worst = costs.request_cost_range(
            item.model, instruction=instruction, n_images=request.images, image_size=item.image_size, pricing=pricing
        )
        timeout = max(self.timeout_s, 600.0) if item.image_size == "4K" else self.timeout_s
        if tier == "flex":
            timeout = max(timeout, models.FLEX_TIMEOUT_S)  # flex answers take 1-15 minutes

        async def attempt() -> Reply:
            collect = False  # an answer an earlier run's job holds: paid for, not sent again (see Gate.request)
            if self.batch_route is not None:
                # An earlier answer of this item is in this request now; and a place held while waiting at the
                # gate could wait for ever on steps that hold the gate's slots and wait for a place to land.
                self.batch_route.release(item.id)
                collect = route is self.batch_route and self.batch_route.holds(self.step_of(item, tally, request))
            async with self.gate.request(worst, collect=collect) as ticket:
                sending()
                try:
                    answer = await self._attempt(item, tally, request, timeout, route, ticket)
                except BaseException as exc:  # an error answer, none, or the run stopping
                    self._charge_unread(exc, request, ticket, tally, worst, online=route is not self.batch_route)
                    raise
                reply, cost = answer.reply, self._price(item, tally, answer.reply, tier, pricing, worst)
                ticket.cost_usd = cost if answer.spent_now else 0.0  # the run that collected it spent it
                if tally.kept is not None and answer.paid_by is not None and answer.paid_by == tally.kept.run:
                    # Counted by the very record the item goes on from: its cost and tokens are in the tally already.
                    cost, reply = 0.0, dataclasses.replace(reply, usage={})
                tally.counted_before(answer.paid_by, cost)
            tally.cost_usd += cost
            tally.answered(reply)
            check_reply(reply)
            return reply

        def on_retry(exc: ApiError, wait: float, attempt_number: int) -> None:
            self.stats.retries[exc.kind] += 1
            self.failures.failed(exc)
            logger.info("%s: attempt %d: %s; retrying in %.1f s", item.id, attempt_number, exc.message, wait)

        return await (attempt() if once else retrying(attempt, self.retry, on_retry=on_retry))

    def _price(self, item: WorkItem, tally: Tally, reply: Reply, tier: str, pricing: Pricing, worst: float) -> float:
        """*reply*'s usage priced in the tier it ran in; *worst* (the request's worst case) if the usage cannot
        be priced (a proxy that strips it), so that a budget still holds."""
        served = costs.reported_tier(reply.usage, reply.served_tier)
        if served is not None and served != tier:
            tally.tier = served
        if (problem := costs.usage_problem(reply.usage, imaged=bool(reply.images))) is not None:
            self.failures.unpriced(problem, worst)
            return worst
        return costs.usage_cost(reply.usage, pricing if served in (None, tier) else self.prices(item.model, served))

    async def _attempt(
        self, item: WorkItem, tally: Tally, request: Request, timeout_s: float, route: Route, ticket: Ticket
    ) -> Answer:
        """One request through *route*, counted and noted in the journal when the route sends it (not while it
        waits for a slot, nor when it collects an answer an earlier run sent for: then *ticket* takes its budget
        only if the route sends after all). Not a batch request: the batch ledger accounts for each from its
        chunk to its answer, so none is in doubt ("possibly charged")."""
        tally.sending()
        journaled = not route.waits_on_disk
        attempt = tally.attempts

        def on_send() -> None:
            self.gate.budget_late(ticket)  # (nothing, for a ticket admitted to send)
            ticket.sent = True
            self.stats.sent(tally)
            if journaled:
                self.journal.dispatched(item.id, tally.key, attempt)

        self.stats.in_flight = self.gate.in_flight
        self.stats.concurrency = self.gate.window
        step = self.step_of(item, tally, request)
        started = anyio.current_time()
        try:
            answer = await route.send(item.model, request, timeout_s=timeout_s, step=step, on_send=on_send)
        except ApiError as exc:
            self.observer.answered(item.model, started, exc, batch=route.waits_on_disk)
            # An error answer, or no connection at all, is definite: not "possibly charged". Only a
            # request with no answer stays open in the journal (and a 200, until its record is written).
            if journaled and (not exc.sent or exc.status_code not in (None, 200)):
                self.journal.settled(item.id, attempt)
            raise
        finally:
            self.stats.in_flight = self.gate.in_flight - 1
        self.observer.answered(item.model, started, answer.reply, batch=route.waits_on_disk)
        tally.answered_in_batch = answer.job is not None
        if answer.job is not None:
            tally.batch = answer.job  # the batch job that answered; an online answer leaves the last one
        return answer
