"""The limits a request passes on its way out, each on its own: the rate limiter, the circuit breaker, the
first-contact deadline and the budget. :class:`~nanobatch.run.limits.Gate` takes them in order (and re-exports them).

Time comes from :func:`anyio.current_time` and waiting from :func:`anyio.sleep`, so tests run all of this on
trio's virtual clock.
"""

from __future__ import annotations

import math
from collections import deque

import anyio

from ..errors import ApiError, RunAborted

__all__ = ["Breaker", "Budget", "FirstContact", "RateLimiter"]

_MAX_OVERSHOOT_S = 0.005  # a busier loop wakes later still; waking early costs a short spin, so cap it
_ARRIVAL_MARGIN = 1 / 60  # of a window, with bursts: see RateLimiter


class _Alarm:
    """Sleeps until a moment, learning as it goes how late the event loop's timers fire and sleeping that
    much less, so that evenly spaced requests do not each leave a timer's lateness late. Kept for bench row
    "2 rate" (bench/RESULTS.md, "Why the code is shaped this way")."""

    def __init__(self) -> None:
        self.overshoot = 0.0

    async def sleep_until(self, when: float) -> None:
        delay = when - anyio.current_time()
        nap = delay - self.overshoot
        if nap <= 0:
            # Closer than a sleep's usual lateness: let the loop go round instead. A clock that did
            # not move meanwhile moves only while every task sleeps (a test's virtual clock): sleep.
            before = anyio.current_time()
            await anyio.lowlevel.checkpoint()
            if anyio.current_time() == before:
                await anyio.sleep(delay)
            return
        wake_at = anyio.current_time() + nap
        await anyio.sleep(nap)
        late = min(max(0.0, anyio.current_time() - wake_at), _MAX_OVERSHOOT_S)
        self.overshoot += 0.2 * (late - self.overshoot)


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
        self._alarm = _Alarm()

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
            while (ready := self._next) > anyio.current_time():
                await self._alarm.sleep_until(ready)
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
                raise RunAborted(self.exhausted_message(amount))
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

    def exhausted_message(self, worst_case_usd: float) -> str:
        if self._out_of_requests:
            return f"request budget reached: {self.requests} requests sent (budget.max_requests = {self.max_requests})"
        return (
            f"cost budget reached: ${self.spent_usd:.4f} spent, the next request could cost up to "
            f"${worst_case_usd:.4f} (budget.max_cost_usd = {self.max_cost_usd:g})"
        )
