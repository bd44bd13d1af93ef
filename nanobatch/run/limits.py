"""What must agree before a request goes out, in one :class:`Gate`.

In order (stated once, in ``Gate._limits``): the run is not stopping; no server-requested pause is running; a
concurrency slot is free (its size adapts: halved when the server pushes back,
grown by one per window of successes); the circuit breaker is closed (or this
is its probe); the budget can cover the request's worst case; and the rate
limiter says it is time (evenly spaced, or in bursts of ``rpm_burst``,
never more than the limit in any minute).

Time comes from :func:`anyio.current_time` and waiting from :func:`anyio.sleep`,
so tests run all of this on trio's virtual clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from ..errors import ApiError, RunAborted
from .meters import Breaker, Budget, FirstContact, RateLimiter

__all__ = ["Budget", "Breaker", "FirstContact", "Gate", "RateLimiter", "Stopped", "Ticket", "spare_workers"]

# Error kinds that may mean "too much traffic". A 429 always shrinks the concurrency window; a server error
# only when the server asks for a pause (RetryInfo, Retry-After) or when server errors become frequent:
# a steady few percent of random 5xx is the service's noise, not congestion, and halving the window on
# each of them kept it near one (bench/RESULTS.md, "Why the code is shaped this way").
_PUSHBACK = frozenset({"rate_limited", "overloaded"})
_SERVER_ERRORS = frozenset({"overloaded", "server_error", "bad_gateway"})
_ERROR_RATE_ANSWERS = 32  # the answers the error rate is taken over
_ERROR_RATE_CUT = 11  # server errors among them (over a third) that mean the service is being overrun
# Error kinds that mean "the service or the path to it is failing": they count towards the breaker.
_OUTAGE = frozenset({"connection", "timeout", "server_error", "bad_gateway", "overloaded", "bad_response"})


class Stopped(Exception):  # noqa: N818 - a signal, not a failure
    """The run is stopping: the request was not sent (or is in a batch job this run leaves for the next to collect)
    and its item stays unrecorded."""


@dataclass(slots=True)
class Ticket:
    """One admitted request. The caller sets ``cost_usd`` once it knows what the answer cost."""

    reserved_usd: float
    started_at: float
    probe: bool
    cost_usd: float = 0.0
    estimate_usd: float = 0.0  # the model table's worst case, before the budget scaled it
    budgeted: bool = True  # False: an answer collected from an earlier run's batch job, sent by none of this run
    sent: bool = False  # the route sent the request (online: it went out; batch: it joined a chunk)


class _Limit:
    """One condition a request waits for before it goes out. The gate takes its limits in order and, when
    admission fails part-way (the run stops, the caller is cancelled), releases those taken, in reverse."""

    def try_acquire(self, ticket: Ticket) -> bool:
        """Take the limit without waiting; False (nothing taken) if that would mean waiting."""
        return True

    async def acquire(self, ticket: Ticket) -> None:
        """Wait until the limit lets the request through, and take it."""

    def release(self, ticket: Ticket) -> None:
        """Give back what :meth:`acquire` took, for a request that was not sent."""


class _NotStopping(_Limit):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def try_acquire(self, ticket: Ticket) -> bool:
        return not self.gate.stopping

    async def acquire(self, ticket: Ticket) -> None:
        if self.gate.stopping:
            raise Stopped


class _NoPause(_Limit):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def try_acquire(self, ticket: Ticket) -> bool:
        return self.gate.paused_until <= anyio.current_time()

    async def acquire(self, ticket: Ticket) -> None:
        # A deadline that later 429s may push back: sleep to it, then look again.
        while (delay := self.gate.paused_until - anyio.current_time()) > 0:  # noqa: ASYNC110
            await anyio.sleep(delay)


class _Slot(_Limit):
    def __init__(self, slots: anyio.CapacityLimiter) -> None:
        self.slots = slots

    def try_acquire(self, ticket: Ticket) -> bool:
        try:
            self.slots.acquire_nowait()  # fails too while others queue for a slot
        except anyio.WouldBlock:
            return False
        return True

    async def acquire(self, ticket: Ticket) -> None:
        await self.slots.acquire()

    def release(self, ticket: Ticket) -> None:
        self.slots.release()


class _BreakerClosed(_Limit):
    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker

    def try_acquire(self, ticket: Ticket) -> bool:
        return not self.breaker.is_open

    async def acquire(self, ticket: Ticket) -> None:
        ticket.probe = await self.breaker.wait()

    def release(self, ticket: Ticket) -> None:
        if ticket.probe:  # a probe that never went out: the breaker may send another
            self.breaker.record(outage=True, probe=True)


class _BudgetRoom(_Limit):
    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def try_acquire(self, ticket: Ticket) -> bool:
        if not ticket.budgeted:
            return True
        reserve = self.budget.reservation(ticket.estimate_usd)
        if not self.budget.try_reserve(reserve):
            return False
        ticket.reserved_usd = reserve
        return True

    async def acquire(self, ticket: Ticket) -> None:
        if ticket.budgeted:
            ticket.reserved_usd = await self.budget.reserve(ticket.estimate_usd)

    def release(self, ticket: Ticket) -> None:
        if ticket.budgeted:
            self.budget.unreserve(ticket.reserved_usd)


class _RateSlot(_Limit):
    def __init__(self, rate: RateLimiter) -> None:
        self.rate = rate

    def try_acquire(self, ticket: Ticket) -> bool:
        return self.rate.try_acquire()

    async def acquire(self, ticket: Ticket) -> None:
        await self.rate.acquire()  # a pause also defers the rate limiter's next slot


class Gate:
    """Admission control for every request of a run (see the module docstring)."""

    def __init__(
        self,
        *,
        concurrency: int,
        requests_per_minute: float | None = None,
        rpm_burst: int = 1,
        adaptive: bool = True,
        breaker: Breaker | None = None,
        budget: Budget | None = None,
        first_contact: FirstContact | None = None,
    ) -> None:
        self.max_concurrency = concurrency
        self.first_contact = first_contact
        self.window = float(concurrency)
        self.adaptive = adaptive
        self.slots = anyio.CapacityLimiter(concurrency)
        self.rate = RateLimiter(requests_per_minute, rpm_burst) if requests_per_minute else None
        self.breaker = breaker
        self.budget = budget or Budget(max_cost_usd=None, max_requests=None)
        self.paused_until = 0.0
        self.stop_reason: BaseException | None = None
        self.in_flight = 0
        self.pushbacks = 0
        self._last_cut = -math.inf
        self._server_errors: deque[bool] = deque(maxlen=_ERROR_RATE_ANSWERS)  # recent answers: a 5xx or not
        self._waiting: set[anyio.CancelScope] = set()
        # The order requests take the limits in. The breaker is asked only once a slot is held: a request
        # that queued for a slot while the breaker was still closed must not slip out after it opened.
        # The pause is looked at again last: one may have begun while the request waited for the others.
        self._limits: tuple[_Limit, ...] = (
            _NotStopping(self),
            _NoPause(self),
            _Slot(self.slots),
            *([_BreakerClosed(breaker)] if breaker is not None else []),
            _BudgetRoom(self.budget),
            _NoPause(self),
            *([_RateSlot(self.rate)] if self.rate is not None else []),
        )

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def stop(self, reason: BaseException) -> None:
        """Let no further request out; requests already sent carry on."""
        if self.stop_reason is None:
            self.stop_reason = reason
        for scope in self._waiting:
            scope.cancel()

    def pause(self, seconds: float) -> None:
        """Hold every new request for *seconds* (the server said when to come back)."""
        self.paused_until = max(self.paused_until, anyio.current_time() + seconds)
        if self.rate is not None:
            self.rate.defer(self.paused_until)

    @asynccontextmanager
    async def request(self, worst_case_usd: float = 0.0, *, collect: bool = False) -> AsyncIterator[Ticket]:
        """Wait for admission, then hold a slot while the body of the ``async with`` sends the request. *collect*:
        it sends nothing, it collects an answer an earlier run's batch job holds: the run that submitted it counted
        it against its own budget (at its worst case, if it left the job to the next run), so this run's budget
        neither holds it back nor counts it, as a request or as spent."""
        ticket = await self._admit(worst_case_usd, budgeted=not collect)
        self.in_flight += 1
        try:
            yield ticket
        except ApiError as exc:
            self._settle(ticket, exc)
            raise
        except BaseException:
            self._settle(ticket, None, cancelled=True)
            raise
        else:
            self._settle(ticket, None)
        finally:
            self.in_flight -= 1
            self.slots.release()

    def budget_late(self, ticket: Ticket) -> None:
        """Reserve the budget now for *ticket*, admitted to collect an earlier run's answer, whose route sends a
        request after all (the job failed meanwhile: its request goes into a new one). Raises :class:`Stopped`
        (the run stopping at its budget) if it does not fit."""
        if ticket.budgeted:
            return
        reserve = self.budget.reservation(ticket.estimate_usd)
        if not self.budget.try_reserve(reserve):
            self.stop(RunAborted(self.budget.exhausted_message(reserve)))
            raise Stopped
        ticket.reserved_usd, ticket.budgeted = reserve, True

    async def _admit(self, worst_case_usd: float, *, budgeted: bool) -> Ticket:
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled worker writes no journal line
        ticket = Ticket(reserved_usd=0.0, started_at=anyio.current_time(), probe=False, estimate_usd=worst_case_usd,
                        budgeted=budgeted)  # fmt: skip
        if self._admit_now(ticket):
            return ticket
        await self._admit_waiting(ticket)
        ticket.started_at = anyio.current_time()
        return ticket

    def _admit_now(self, ticket: Ticket) -> bool:
        """Take every limit without waiting (the usual case), or none of them and return False. It skips the
        waiting path's yields to the loop: kept for bench row "1 dispatch" (bench/RESULTS.md)."""
        for taken, limit in enumerate(self._limits):
            if not limit.try_acquire(ticket):
                self._release(self._limits[:taken], ticket)
                return False
        return True

    async def _admit_waiting(self, ticket: Ticket) -> None:
        taken = 0
        try:
            with anyio.CancelScope() as scope:
                self._waiting.add(scope)
                try:
                    for limit in self._limits:
                        await limit.acquire(ticket)
                        taken += 1
                except RunAborted as exc:
                    self.stop(exc)
                finally:
                    self._waiting.discard(scope)
            if scope.cancel_called or self.stopping:
                raise Stopped
        except BaseException:  # Stopped, or the caller cancelled: give back whatever was taken
            self._release(self._limits[:taken], ticket)
            raise

    @staticmethod
    def _release(limits: tuple[_Limit, ...], ticket: Ticket) -> None:
        for limit in reversed(limits):
            limit.release(ticket)

    def _settle(self, ticket: Ticket, error: ApiError | None, *, cancelled: bool = False) -> None:
        if ticket.budgeted:  # (a collected answer was counted by the run that submitted it)
            self.budget.settle(ticket.reserved_usd, ticket.cost_usd, estimate_usd=ticket.estimate_usd)
        if not cancelled:
            self._note_contact(ticket, error)
        kind = error.kind if error is not None else None
        if self.breaker is not None and not cancelled:
            self.breaker.record(outage=kind in _OUTAGE, probe=ticket.probe)
        elif self.breaker is not None and ticket.probe:
            self.breaker.record(outage=True, probe=True)
        if not cancelled:
            self._server_errors.append(kind in _SERVER_ERRORS)
        if kind in _PUSHBACK:
            self.pushbacks += 1
        if error is not None and kind in _PUSHBACK | _SERVER_ERRORS:
            if error.retry_after is not None:
                self.pause(error.retry_after)
            if kind == "rate_limited" or error.retry_after is not None or self._errors_frequent():
                self._cut(ticket.started_at)
        elif error is None and not cancelled:
            self._grow()

    def _note_contact(self, ticket: Ticket, error: ApiError | None) -> None:
        """Stop a run that has never reached the API; let the breaker name what fails."""
        if self.breaker is not None and error is not None:
            self.breaker.last_error = error.message
        if self.first_contact is not None and (never := self.first_contact.record(error, ticket.started_at)):
            self.stop(never)

    def _errors_frequent(self) -> bool:
        return sum(self._server_errors) >= _ERROR_RATE_CUT

    def _cut(self, started_at: float) -> None:
        """Multiplicative decrease, at most once per round trip: answers to requests sent before
        the last cut were already in flight and say nothing about the new window."""
        if not self.adaptive or started_at < self._last_cut:
            return
        self._last_cut = anyio.current_time()
        self.window = max(1.0, self.window / 2)
        self.slots.total_tokens = max(1, int(self.window))

    def _grow(self) -> None:
        """Additive increase: about one more slot per window's worth of successes."""
        if not self.adaptive or self.window >= self.max_concurrency:
            return
        self.window = min(float(self.max_concurrency), self.window + 1.0 / self.window)
        self.slots.total_tokens = max(1, int(self.window))


def spare_workers(concurrency: int, tier: str) -> int:
    """Workers beyond the concurrency limit. The gate still lets at most ``concurrency`` requests out; the
    spare workers read their next item's inputs while all slots are busy, so a freed slot is taken at once
    instead of after a worker-thread hand-off. Each holds one item's inputs. In the batch tier slots free a
    chunk at a time, when its job answers: spare workers would hold their items' pictures for nothing."""
    return 1 if tier == "batch" else max(1, concurrency // 8)
