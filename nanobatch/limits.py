"""What must agree before a request goes out, in one :class:`Gate`.

In order: the run is not stopping; no server-requested pause is running; a
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

from .errors import ApiError, RunAborted

__all__ = ["Budget", "Breaker", "FirstContact", "Gate", "RateLimiter", "Stopped", "Ticket"]

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
    """The run is stopping: the request was not sent and its item stays unrecorded."""


_MAX_OVERSHOOT_S = 0.005  # a busier loop wakes later still; waking early costs a short spin, so cap it
_ARRIVAL_MARGIN = 1 / 60  # of a window, with bursts: see RateLimiter


class RateLimiter:
    """At most ``per_minute`` requests in any 60 s, and at most ``burst`` in any ``burst`` intervals of
    ``60 / per_minute`` s. ``burst=1`` (the default) spaces requests evenly; ``burst=per_minute`` lets a
    sliding-window quota be used fully (a whole minute's share at once, then as each send leaves the window,
    plus a second a minute for the requests' time on the way).

    >>> limiter = RateLimiter(per_minute=120)  # one request every 0.5 s
    >>> limiter = RateLimiter(per_minute=600, burst=600)  # 600 at once, then the 601st 61 s after the 1st
    """

    def __init__(self, per_minute: float, burst: int = 1) -> None:
        self.interval = 60.0 / per_minute
        # (how many, within how long): each send is checked against the send that many sends back.
        self._windows = [(burst, burst * self.interval)]
        if per_minute >= 1 and burst > 1:
            self._windows.append((int(per_minute), 60.0))  # a burst that does not divide the rate: still the minute
        if burst > 1:
            # The server counts arrivals, not sends: a send a window after another may arrive a little sooner
            # than that after it (the first was slower on the way). A 1/60 margin (1 s a minute) absorbs that.
            self._windows = [(count, span * (1 + _ARRIVAL_MARGIN)) for count, span in self._windows]
        self._sent: deque[float] = deque(maxlen=max(count for count, _ in self._windows))
        self._not_before = -math.inf  # a pause the server asked for
        self._lock = anyio.Lock()  # FIFO: waiters leave in arrival order
        # How late a sleep usually wakes (the event loop's timer granularity, ~1 ms), learnt as we go:
        # sleeping that much less keeps each request from leaving ~2% late at 1,200 rpm.
        self._overshoot = 0.0

    @property
    def _next(self) -> float:
        """The earliest time the next request may leave."""
        sent = self._sent
        ready = self._not_before
        for count, span in self._windows:
            if len(sent) >= count:
                ready = max(ready, sent[-count] + span)
        return ready

    async def acquire(self) -> None:
        async with self._lock:
            # A loop, not one sleep: defer() may move the next slot while we wait for it.
            while (delay := self._next - anyio.current_time()) > 0:  # noqa: ASYNC110 - waiting for a time
                nap = delay - self._overshoot
                if nap <= 0:
                    # Closer than a sleep's usual lateness: let the loop go round instead. A clock that did
                    # not move meanwhile moves only while every task sleeps (a test's virtual clock): sleep.
                    before = anyio.current_time()
                    await anyio.lowlevel.checkpoint()
                    if anyio.current_time() == before:
                        await anyio.sleep(delay)
                    continue
                wake_at = anyio.current_time() + nap
                await anyio.sleep(nap)
                late = min(max(0.0, anyio.current_time() - wake_at), _MAX_OVERSHOOT_S)
                self._overshoot += 0.2 * (late - self._overshoot)
            # Counted from when this request really leaves, never from when it should have: no window
            # of the limit's length ever holds more than its share.
            self._sent.append(anyio.current_time())

    def try_acquire(self) -> bool:
        """Let a request out now if it is time and nobody waits ahead of it; False (nothing taken) if not."""
        now = anyio.current_time()
        if self._lock.locked() or self._next > now:
            return False
        self._sent.append(now)
        return True

    def defer(self, until: float) -> None:
        """Let no request out before *until* (the server asked for a pause)."""
        self._not_before = max(self._not_before, until)


class Breaker:
    """Opens after ``threshold`` outage errors in a row; lets one probe through per ``cooldown_s``."""

    def __init__(
        self, *, threshold: int, cooldown_s: float, max_down_s: float, first_contact: FirstContact | None = None
    ) -> None:
        self.first_contact = first_contact  # while no request has ever reached the API, its deadline ends the wait
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.max_down_s = max_down_s
        self.failures = 0
        self.opened_at: float | None = None  # when the current outage began
        self._retry_at = 0.0
        self._probing = False
        self._changed = anyio.Event()
        self.last_error: str | None = None  # what the latest failure said, for the message that ends the run

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    async def wait(self) -> bool:
        """Wait until a request may go out; True if the caller is the probe."""
        while self.opened_at is not None:
            now = anyio.current_time()
            if now - self.opened_at >= self.max_down_s:
                last = f" (last: {self.last_error})" if self.last_error else ""
                raise RunAborted(
                    f"the API has failed every request for {now - self.opened_at:.0f} s{last} "
                    f"(limits.breaker_max_down_s = {self.max_down_s:g}); "
                    "stopping, unsent items are left for the next run"
                )
            if self.first_contact is not None and (never := self.first_contact.expired()) is not None:
                raise never
            if not self._probing and now >= self._retry_at:
                self._probing = True
                return True
            # Wake for the next probe slot, or, while a probe hangs, at the latest when the outage grows too long.
            give_up_at = self.opened_at + self.max_down_s
            if self.first_contact is not None:
                give_up_at = min(give_up_at, self.first_contact.deadline)
            wake_at = give_up_at if self._probing else min(self._retry_at, give_up_at)
            with anyio.move_on_after(max(0.0, wake_at - now)):
                await self._changed.wait()
        return False

    def record(self, *, outage: bool, probe: bool) -> None:
        if not outage and not probe and self.failures == 0 and self.opened_at is None:
            return  # closed and staying closed: nothing changes, nobody to wake (the usual answer)
        now = anyio.current_time()
        if probe:
            self._probing = False
        if not outage:
            self.failures = 0
            self.opened_at = None
        else:
            self.failures += 1
            if self.opened_at is None and self.failures >= self.threshold:
                self.opened_at = now
            if self.opened_at is not None:
                self._retry_at = now + self.cooldown_s
        self._changed.set()
        self._changed = anyio.Event()


class FirstContact:
    """Ends a run that has never once reached the API (a wrong base URL, no network, a firewall) after
    ``limit_s``, long before the breaker's outage limit: a server that never answered is not having an outage.

    A request reaches the API when it gets an answer or at least a connection (a read timeout counts).
    The gate asks at each failure; the breaker, while it holds requests back, wakes for :attr:`deadline`.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.reached = False
        self._since: float | None = None  # when the first request that found no connection was sent
        self._last_error = ""

    @property
    def deadline(self) -> float:
        """When the run gives up unless a request connects first (infinity once one has)."""
        return math.inf if self.reached or self._since is None else self._since + self.limit_s

    def record(self, error: ApiError | None, started_at: float) -> RunAborted | None:
        """Note how a request sent at *started_at* ended; the reason to stop once none has connected in time."""
        if self.reached:
            return None
        if error is None or error.sent:
            self.reached = True
            return None
        if self._since is None:
            self._since = started_at
        self._last_error = error.message
        return self.expired()

    def expired(self) -> RunAborted | None:
        """The reason to stop if the deadline has passed with no request reaching the API, else None."""
        now = anyio.current_time()
        if now < self.deadline:
            return None
        assert self._since is not None
        return RunAborted(
            f"no request has reached the API in {now - self._since:.0f} s: {self._last_error} "
            f"(retry.first_contact_s = {self.limit_s:g}); check --base-url (api.base_url) and the network; "
            "unsent items are left for the next run"
        )


class Budget:
    """Spend caps: money and request count. Each request reserves its worst case, then settles the real cost.

    The worst case comes from the model table, scaled up to the dearest answer seen so far against its own
    estimate (long text or thinking can cost more than the table's allowance): once one answer has cost
    more than its reservation, every later request reserves that much more. So the cap can be passed only
    by requests already in flight when answers first turn out dearer: at most one request per slot.
    """

    def __init__(self, *, max_cost_usd: float | None, max_requests: int | None) -> None:
        self.max_cost_usd = max_cost_usd
        self.max_requests = max_requests
        self.spent_usd = 0.0
        self.requests = 0
        self._reserved_usd = 0.0
        self._outstanding = 0
        self._settled: anyio.Event | None = None  # made by a reservation that has to wait
        self._scale = 1.0  # the dearest answer so far over its estimate, never below 1

    def reservation(self, worst_case_usd: float) -> float:
        """What a request estimated at *worst_case_usd* reserves, given the answers seen so far."""
        return worst_case_usd * self._scale

    async def reserve(self, worst_case_usd: float) -> float:
        """Wait until the request fits and return what it reserved; raise :class:`RunAborted` when it never can."""
        while not self.try_reserve(amount := self.reservation(worst_case_usd)):
            if self._outstanding == 0 or self._out_of_requests:
                raise RunAborted(self._exhausted_message(amount))
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()  # in-flight requests usually cost less than reserved
        return amount

    def try_reserve(self, worst_case_usd: float) -> bool:
        """Reserve the request's worst case if it fits now; False (nothing reserved) if not."""
        fits_cost = self.max_cost_usd is None or (
            self.spent_usd + self._reserved_usd + worst_case_usd <= self.max_cost_usd
        )
        if not fits_cost or self._out_of_requests:
            return False
        self.requests += 1
        self._reserved_usd += worst_case_usd
        self._outstanding += 1
        return True

    @property
    def _out_of_requests(self) -> bool:
        return self.max_requests is not None and self.requests >= self.max_requests

    def settle(self, reserved_usd: float, actual_usd: float, *, estimate_usd: float | None = None) -> None:
        """Give back *reserved_usd*, count *actual_usd*; an answer dearer than *estimate_usd* raises the scale."""
        self._reserved_usd -= reserved_usd
        self._outstanding -= 1
        self.spent_usd += actual_usd
        if estimate_usd and actual_usd > estimate_usd * self._scale:
            self._scale = actual_usd / estimate_usd
        if self._settled is not None:  # wake whoever waits for room
            self._settled.set()
            self._settled = None

    def unreserve(self, reserved_usd: float) -> None:
        """Give back a reservation whose request was never sent: its money and its place in the request count."""
        self.settle(reserved_usd, 0.0)
        self.requests -= 1

    def _exhausted_message(self, worst_case_usd: float) -> str:
        if self._out_of_requests:
            return f"request budget reached: {self.requests} requests sent (--max-requests {self.max_requests})"
        return (
            f"cost budget reached: ${self.spent_usd:.4f} spent, the next request could cost up to "
            f"${worst_case_usd:.4f} (--max-cost {self.max_cost_usd:g})"
        )


@dataclass(slots=True)
class Ticket:
    """One admitted request. The caller sets ``cost_usd`` once it knows what the answer cost."""

    reserved_usd: float
    started_at: float
    probe: bool
    cost_usd: float = 0.0
    estimate_usd: float = 0.0  # the model table's worst case, before the budget scaled it


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
        reserve = self.budget.reservation(ticket.estimate_usd)
        if not self.budget.try_reserve(reserve):
            return False
        ticket.reserved_usd = reserve
        return True

    async def acquire(self, ticket: Ticket) -> None:
        ticket.reserved_usd = await self.budget.reserve(ticket.estimate_usd)

    def release(self, ticket: Ticket) -> None:
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
    async def request(self, worst_case_usd: float = 0.0) -> AsyncIterator[Ticket]:
        """Wait for admission, then hold a slot while the body of the ``async with`` sends the request."""
        ticket = await self._admit(worst_case_usd)
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

    async def _admit(self, worst_case_usd: float) -> Ticket:
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled worker writes no journal line
        ticket = Ticket(reserved_usd=0.0, started_at=anyio.current_time(), probe=False, estimate_usd=worst_case_usd)
        if self._admit_now(ticket):
            return ticket
        await self._admit_waiting(ticket)
        ticket.started_at = anyio.current_time()
        return ticket

    def _admit_now(self, ticket: Ticket) -> bool:
        """Take every limit without waiting (the usual case), or none of them and return False."""
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
