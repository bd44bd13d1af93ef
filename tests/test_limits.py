"""Gate, RateLimiter, Breaker and Budget, all on trio's virtual clock (no real waiting, no wall-clock asserts)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import pytest

from nanobatch.errors import ApiError, RunAborted
from nanobatch.run.limits import Gate, Stopped
from nanobatch.run.meters import Breaker, Budget, RateLimiter

from .conftest import run_virtual as _run_virtual

T = TypeVar("T")


def run_virtual(fn: Callable[[], Awaitable[T]]) -> T:
    """On the virtual clock, with a deadline so that a deadlock fails instead of hanging."""

    async def guarded() -> T:
        with anyio.fail_after(100_000):
            return await fn()

    return _run_virtual(guarded)


def rate_limited(retry_after: float | None = None) -> ApiError:
    return ApiError("HTTP 429: slow down", kind="rate_limited", status_code=429, retryable=True,
                    retry_after=retry_after)  # fmt: skip


def overloaded() -> ApiError:
    return ApiError("HTTP 503: overloaded", kind="overloaded", status_code=503, retryable=True)


def server_error() -> ApiError:
    return ApiError("HTTP 500: internal", kind="server_error", status_code=500, retryable=True)


@dataclass
class Log:
    """What a fake server saw: when each request was admitted, how many were in flight at most."""

    admitted: list[float] = field(default_factory=list)
    probes: list[float] = field(default_factory=list)
    stopped: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


async def send(
    gate: Gate,
    log: Log,
    *,
    duration: float = 1.0,
    error: ApiError | None = None,
    worst: float = 0.0,
    cost: float = 0.0,
) -> bool:
    """One request through *gate*: False if the gate stopped it before it was sent."""
    try:
        async with gate.request(worst) as ticket:
            log.admitted.append(anyio.current_time())
            if ticket.probe:
                log.probes.append(anyio.current_time())
            log.in_flight += 1
            log.max_in_flight = max(log.max_in_flight, log.in_flight)
            try:
                await anyio.sleep(duration)
                ticket.cost_usd = cost
                if error is not None:
                    raise error
            finally:
                log.in_flight -= 1
                log.finished.append(anyio.current_time())
    except Stopped:
        log.stopped.append(anyio.current_time())
        return False
    except ApiError:
        pass
    return True


# --- RateLimiter ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpm", [pytest.param(120, id="120rpm"), pytest.param(30, id="30rpm")])
def test_rate_limiter_keeps_every_window_under_the_limit_and_uses_it_fully(rpm: int) -> None:
    times: list[float] = []

    async def main() -> None:
        limiter = RateLimiter(per_minute=rpm)

        async def caller() -> None:
            for _ in range(3):
                await limiter.acquire()
                times.append(anyio.current_time())

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(caller)

    run_virtual(main)
    assert len(times) == 120
    share = rpm / 6  # requests allowed in any 10-second window
    for start in times:
        assert sum(1 for t in times if start <= t < start + 10.0) <= share
    achieved = (len(times) - 1) / (times[-1] - times[0]) * 60
    assert achieved >= 0.98 * rpm


def acquire_with_timer_errors(monkeypatch: pytest.MonkeyPatch, errors: Iterator[float], n: int) -> list[float]:
    """When each of *n* acquisitions at 1,200 rpm got through, with every sleep off by the next of *errors*."""
    real_sleep = anyio.sleep

    async def erring_sleep(seconds: float) -> None:
        await real_sleep(max(0.0, seconds + next(errors)))

    monkeypatch.setattr("nanobatch.run.limits.anyio.sleep", erring_sleep)
    times: list[float] = []

    async def main() -> None:
        limiter = RateLimiter(per_minute=1200)
        for _ in range(n):
            await limiter.acquire()
            times.append(anyio.current_time())

    run_virtual(main)
    return times


def test_rate_limiter_learns_how_late_sleeps_wake_and_still_keeps_the_spacing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loop whose timers fire 1 ms late (as epoll's do) must not cost 2% of the rate at 1,200 rpm."""
    times = acquire_with_timer_errors(monkeypatch, itertools.repeat(0.001), 400)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.05 - 1e-9  # never closer than the limit's spacing
    achieved = (len(times) - 1) / (times[-1] - times[0]) * 60
    assert achieved >= 0.995 * 1200  # a limiter that ignored the lateness gets 98%


def test_rate_limiter_copes_with_sleeps_that_wake_early_or_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timers that fire 2 ms late, then 1 ms late (less than learnt: the slot is still ahead), then early:
    never closer than the spacing, and no endless spin on what is left (on the virtual clock, a task that
    only yields would wait forever for time to move)."""
    errors = itertools.cycle([0.002, 0.002, 0.002, 0.001, -0.0005, 0.0])
    times = acquire_with_timer_errors(monkeypatch, errors, 150)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 150 and min(gaps) >= 0.05 - 1e-9


def test_rate_limiter_lets_the_first_request_out_at_once() -> None:
    async def main() -> float:
        await anyio.sleep(5)
        limiter = RateLimiter(per_minute=1)
        await limiter.acquire()
        return anyio.current_time()

    assert run_virtual(main) == 5.0


def test_rate_limiter_does_not_bank_idle_time() -> None:
    """After a quiet spell the limiter allows one request, not a burst of the ones it could have sent."""
    times: list[float] = []

    async def main() -> None:
        limiter = RateLimiter(per_minute=60)
        await limiter.acquire()
        await anyio.sleep(30)
        for _ in range(3):
            await limiter.acquire()
            times.append(anyio.current_time())

    run_virtual(main)
    assert times == [30.0, 31.0, 32.0]


def acquire_times(limiter: RateLimiter, n: int, callers: int = 100) -> list[float]:
    """When each of *n* acquisitions by *callers* concurrent tasks got through, on the virtual clock."""
    times: list[float] = []

    async def main() -> None:
        async def caller(count: int) -> None:
            for _ in range(count):
                await limiter.acquire()
                times.append(anyio.current_time())

        async with anyio.create_task_group() as tg:
            for k in range(callers):
                tg.start_soon(caller, n // callers + (k < n % callers))

    run_virtual(main)
    return times


def most_in_any_window(times: list[float], span: float) -> int:
    return max(bisect.bisect_left(times, start + span) - i for i, start in enumerate(times))


def test_a_burst_as_big_as_the_rate_uses_a_sliding_window_quota_fully() -> None:
    """600 rpm against a quota of 600 in any 60 s: 1,000 requests by t = 61 s (evenly spaced: 100 s); the extra
    second is the margin for requests that take longer on the way than the ones a window after them."""
    times = acquire_times(RateLimiter(per_minute=600, burst=600), 1000)
    assert len(times) == 1000
    assert most_in_any_window(times, 60.0) == 600  # the whole quota, and never more
    assert most_in_any_window(times, 61.0) == 600  # not even with arrivals up to a second early
    assert times[599] == 0.0 and times[-1] == pytest.approx(61.0)


@pytest.mark.parametrize("burst", [pytest.param(7, id="burst-7"), pytest.param(45, id="burst-45")])
def test_a_burst_that_does_not_divide_the_rate_still_keeps_every_minute_under_it(burst: int) -> None:
    """100 rpm: at most *burst* in any *burst* intervals, at most 100 in any minute, and nearly the whole rate."""
    times = acquire_times(RateLimiter(per_minute=100, burst=burst), 400)
    assert most_in_any_window(times, 60.0) <= 100
    assert most_in_any_window(times, burst * 0.6) <= burst
    assert most_in_any_window(times, 0.0 + 1e-9) == burst  # that many do leave together
    assert (len(times) - 1) / times[-1] * 60 >= 0.97 * 100  # the rate, less the 1/60 margin for arrival jitter


def test_gate_applies_the_rate_limit() -> None:
    log = Log()

    async def main() -> None:
        gate = Gate(concurrency=50, requests_per_minute=60)
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(send, gate, log)

    run_virtual(main)
    gaps = [b - a for a, b in zip(log.admitted, log.admitted[1:], strict=False)]
    assert min(gaps) >= 1.0 - 1e-9
    assert log.admitted[-1] - log.admitted[0] == pytest.approx(19.0)


# --- concurrency and adaptive window -------------------------------------------------------------------------


def test_concurrency_never_exceeds_the_limit_and_is_used() -> None:
    log = Log()

    async def main() -> None:
        gate = Gate(concurrency=5)
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(lambda i=i: send(gate, log, duration=1.0 + (i % 3) * 0.25))
        assert gate.in_flight == 0

    run_virtual(main)
    assert log.max_in_flight == 5
    assert len(log.admitted) == 30


def test_pushback_halves_the_window_once_per_round_trip() -> None:
    async def main() -> None:
        gate = Gate(concurrency=8)
        log = Log()
        # Eight requests in flight together; their 429s arrive one after another.
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(lambda i=i: send(gate, log, duration=1.0 + i * 0.1, error=rate_limited()))
        assert gate.window == 4.0 and gate.slots.total_tokens == 4  # one cut, not eight
        assert gate.pushbacks == 8

        # A request sent after the cut that is pushed back again: that is news, cut again.
        await send(gate, log, error=rate_limited())
        assert gate.window == 2.0 and gate.slots.total_tokens == 2

        for _ in range(5):
            await send(gate, log, error=rate_limited())
        assert gate.window == 1.0 and gate.slots.total_tokens == 1  # never below one

    run_virtual(main)


def test_after_a_cut_fewer_requests_are_in_flight() -> None:
    log = Log()

    async def main() -> None:
        gate = Gate(concurrency=8)
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(lambda: send(gate, log, error=rate_limited()))
        after_cut = Log()
        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(lambda: send(gate, after_cut, duration=10.0))
        # The window grows back during the run, but the first round is held to the halved window.
        assert after_cut.admitted.count(after_cut.admitted[0]) == 4

    run_virtual(main)
    assert log.max_in_flight == 8


def test_successes_grow_the_window_back_gradually_up_to_the_maximum() -> None:
    async def main() -> None:
        gate = Gate(concurrency=8)
        log = Log()
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(lambda: send(gate, log, error=rate_limited()))
        assert gate.slots.total_tokens == 4

        await send(gate, log)
        assert 4.0 < gate.window < 5.0 and gate.slots.total_tokens == 4  # gradual, not a jump

        windows = []
        for _ in range(60):
            await send(gate, log)
            windows.append(gate.window)
        assert windows == sorted(windows)
        assert windows[-1] == 8.0 and gate.slots.total_tokens == 8
        # About one more slot per window's worth of successes: 4 -> 8 takes roughly 4+5+6+7 = 22.
        assert 15 <= windows.index(8.0) <= 30

    run_virtual(main)


def test_isolated_server_errors_do_not_shrink_the_window() -> None:
    async def main() -> None:
        gate = Gate(concurrency=50)
        for n in range(200):  # one answer in eight is a 503 or a 500: the service's noise, not congestion
            error = (overloaded() if n % 16 == 0 else server_error()) if n % 8 == 0 else None
            await send(gate, Log(), error=error)
        assert gate.window == 50.0

    run_virtual(main)


@pytest.mark.parametrize("fault", [overloaded, server_error], ids=["503", "500"])
def test_a_rising_server_error_rate_shrinks_the_window(fault: Callable[[], ApiError]) -> None:
    async def main() -> None:
        gate = Gate(concurrency=50)
        for n in range(32):
            await send(gate, Log(), error=fault() if n % 2 else None)  # half the answers fail
        assert gate.window < 50.0

    run_virtual(main)


def test_a_server_error_that_asks_for_a_pause_shrinks_the_window() -> None:
    async def main() -> None:
        gate = Gate(concurrency=8)
        error = ApiError("HTTP 503", kind="overloaded", status_code=503, retryable=True, retry_after=2.0)
        await send(gate, Log(), error=error)
        assert gate.window == 4.0

    run_virtual(main)


def test_non_adaptive_gate_keeps_its_window() -> None:
    async def main() -> None:
        gate = Gate(concurrency=8, adaptive=False)
        for _ in range(3):
            await send(gate, Log(), error=rate_limited())
        assert gate.window == 8.0 and gate.slots.total_tokens == 8

    run_virtual(main)


def test_other_errors_do_not_shrink_the_window() -> None:
    async def main() -> None:
        gate = Gate(concurrency=8)
        for kind in ("bad_request", "blocked", "no_image", "timeout", "server_error"):
            await send(gate, Log(), error=ApiError("x", kind=kind))
        assert gate.window == 8.0

    run_virtual(main)


# --- pause (server-requested wait) -------------------------------------------------------------------------


def test_retry_after_on_pushback_pauses_every_new_request() -> None:
    log = Log()

    async def main() -> None:
        gate = Gate(concurrency=4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: send(gate, Log(), duration=1.0, error=rate_limited(retry_after=30.0)))
            await anyio.sleep(2.0)
            assert gate.paused_until == 31.0
            for _ in range(6):
                tg.start_soon(send, gate, log)

    run_virtual(main)
    assert len(log.admitted) == 6
    assert min(log.admitted) >= 31.0


def test_pause_holds_requests_already_waiting_for_a_slot() -> None:
    log = Log()

    async def main() -> None:
        gate = Gate(concurrency=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: send(gate, Log(), duration=1.0, error=rate_limited(retry_after=45.837906927)))
            await anyio.sleep(0.5)
            for _ in range(3):
                tg.start_soon(send, gate, log)  # queued behind the slot before the 429 arrives

    run_virtual(main)
    assert min(log.admitted) >= 1.0 + 45.837906927


def test_pause_holds_requests_already_waiting_for_the_rate_limiter() -> None:
    log = Log()

    async def main() -> None:
        gate = Gate(concurrency=4, requests_per_minute=6)  # one request every 10 s
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: send(gate, Log(), duration=1.0, error=rate_limited(retry_after=30.0)))
            await anyio.sleep(0.5)
            for _ in range(3):
                tg.start_soon(send, gate, log)  # holding slots, waiting for their turn at t = 10, 20, 30

    run_virtual(main)
    assert min(log.admitted) >= 31.0
    gaps = [b - a for a, b in zip(log.admitted, log.admitted[1:], strict=False)]
    assert min(gaps) >= 10.0 - 1e-9  # and the rate still holds after the pause


def test_pause_without_retry_after_does_not_hold_requests() -> None:
    log = Log()

    async def main() -> None:
        gate = Gate(concurrency=4)
        await send(gate, Log(), error=rate_limited())
        await send(gate, log, duration=0.0)

    run_virtual(main)
    assert log.admitted == [1.0]


# --- Breaker ----------------------------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_outage_errors_in_a_row() -> None:
    async def main() -> None:
        breaker = Breaker(threshold=3, cooldown_s=10, max_down_s=600)
        breaker.record(outage=True, probe=False)
        breaker.record(outage=True, probe=False)
        breaker.record(outage=False, probe=False)  # a success in between resets the count
        breaker.record(outage=True, probe=False)
        breaker.record(outage=True, probe=False)
        assert not breaker.is_open
        breaker.record(outage=True, probe=False)
        assert breaker.is_open

    run_virtual(main)


def test_open_breaker_lets_exactly_one_probe_through_after_cooldown_and_closes_on_success() -> None:
    log = Log()

    async def main() -> None:
        breaker = Breaker(threshold=3, cooldown_s=10, max_down_s=600)
        gate = Gate(concurrency=8, breaker=breaker)
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(lambda: send(gate, Log(), duration=1.0, error=server_error()))
        assert breaker.is_open  # opened at t = 1
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(lambda: send(gate, log, duration=2.0))
        assert not breaker.is_open

    run_virtual(main)
    assert log.probes == [11.0]
    assert sorted(log.admitted) == [11.0, 13.0, 13.0, 13.0, 13.0]  # the rest wait for the probe's answer


def test_failed_probe_keeps_the_breaker_open_for_another_cooldown() -> None:
    log = Log()

    async def main() -> None:
        breaker = Breaker(threshold=2, cooldown_s=10, max_down_s=600)
        gate = Gate(concurrency=8, breaker=breaker)
        for _ in range(2):
            await send(gate, Log(), error=server_error())  # opens at t = 2
        await send(gate, log, error=server_error())  # the probe at t = 12 fails at t = 13
        assert breaker.is_open
        await send(gate, log)  # next probe at t = 23, succeeds
        assert not breaker.is_open

    run_virtual(main)
    assert log.probes == [12.0, 23.0]


def test_open_breaker_holds_requests_already_waiting_for_a_slot() -> None:
    log = Log()

    async def main() -> None:
        breaker = Breaker(threshold=2, cooldown_s=10, max_down_s=600)
        gate = Gate(concurrency=2, breaker=breaker)
        async with anyio.create_task_group() as tg:
            for _ in range(6):  # two go out, four queue for a slot; the first two fail and open the breaker
                tg.start_soon(lambda: send(gate, log, duration=1.0, error=server_error()))

    run_virtual(main)
    # Nothing leaves while the breaker is open except one probe per cooldown.
    assert log.admitted[:2] == [0.0, 0.0]
    assert log.admitted[2] == 11.0 and log.probes[0] == 11.0
    assert all(t in log.probes for t in log.admitted[2:])


def test_breaker_that_stays_open_too_long_stops_the_run() -> None:
    log = Log()

    async def main() -> Gate:
        gate = Gate(concurrency=4, breaker=Breaker(threshold=2, cooldown_s=10, max_down_s=60))

        async def worker() -> None:
            while await send(gate, log, duration=1.0, error=server_error()):
                pass

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)
        return gate

    gate = run_virtual(main)
    assert isinstance(gate.stop_reason, RunAborted)
    assert "breaker_max_down_s" in str(gate.stop_reason)
    opened = 1.0
    assert len(log.stopped) == 4  # every worker was told to stop
    assert opened + 60 <= min(log.stopped) <= opened + 60 + 10 + 1
    assert all(t <= opened or t in log.probes for t in log.admitted)  # only probes while open
    assert len(log.probes) <= 60 / 10


def test_rate_limited_answers_do_not_open_the_breaker() -> None:
    async def main() -> None:
        breaker = Breaker(threshold=2, cooldown_s=10, max_down_s=600)
        gate = Gate(concurrency=4, breaker=breaker)
        for _ in range(5):
            await send(gate, Log(), error=rate_limited())
        assert not breaker.is_open

    run_virtual(main)


# --- Budget -----------------------------------------------------------------------------------------------------


def test_budget_reserves_the_worst_case_and_settles_the_actual_cost() -> None:
    async def main() -> None:
        budget = Budget(max_cost_usd=1.0, max_requests=None)
        await budget.reserve(0.5)
        await budget.reserve(0.25)
        admitted_at: list[float] = []

        async def third() -> None:
            await budget.reserve(0.5)  # 0.75 reserved, 0.5 more could pass 1.0: wait for a settlement
            admitted_at.append(anyio.current_time())

        async with anyio.create_task_group() as tg:
            tg.start_soon(third)
            await anyio.sleep(3)
            assert admitted_at == []
            budget.settle(0.5, 0.25)  # cost less than feared: room for the third
        assert admitted_at == [3.0]
        assert budget.spent_usd == 0.25
        assert budget.requests == 3

    run_virtual(main)


def test_budget_refuses_when_nothing_in_flight_could_free_room() -> None:
    async def main() -> None:
        budget = Budget(max_cost_usd=1.0, max_requests=None)
        await budget.reserve(0.5)
        budget.settle(0.5, 0.75)
        with pytest.raises(RunAborted, match="cost budget reached"):
            await budget.reserve(0.5)
        assert budget.requests == 1

    run_virtual(main)


def test_budget_gives_up_after_in_flight_work_settles_without_room() -> None:
    async def main() -> None:
        budget = Budget(max_cost_usd=1.0, max_requests=None)
        await budget.reserve(0.75)
        with anyio.fail_after(100):
            async with anyio.create_task_group() as tg:

                async def settle_later() -> None:
                    await anyio.sleep(5)
                    budget.settle(0.75, 0.75)

                tg.start_soon(settle_later)
                with pytest.raises(RunAborted):
                    await budget.reserve(0.5)
                assert anyio.current_time() == 5.0

    run_virtual(main)


def test_gate_never_spends_past_the_budget() -> None:
    log = Log()

    async def main() -> Gate:
        gate = Gate(concurrency=4, budget=Budget(max_cost_usd=1.0, max_requests=None))

        async def worker() -> None:
            while await send(gate, log, worst=0.5, cost=0.25):
                pass

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)
        return gate

    gate = run_virtual(main)
    assert isinstance(gate.stop_reason, RunAborted)
    assert gate.budget.spent_usd <= 1.0
    assert gate.budget.spent_usd == 0.25 * len(log.admitted)
    assert len(log.admitted) == 3  # a fourth could have cost up to 0.5 more than the 0.75 spent
    assert len(log.stopped) == 4


def test_max_requests_stops_sending() -> None:
    log = Log()

    async def main() -> Gate:
        gate = Gate(concurrency=3, budget=Budget(max_cost_usd=None, max_requests=5))
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(send, gate, log)
        return gate

    gate = run_virtual(main)
    assert len(log.admitted) == 5
    assert len(log.stopped) == 7
    assert isinstance(gate.stop_reason, RunAborted) and "request budget" in str(gate.stop_reason)
    assert gate.budget.requests == 5


# --- stop -------------------------------------------------------------------------------------------------------


def test_stop_refuses_waiting_and_new_requests_and_lets_in_flight_ones_finish() -> None:
    log = Log()

    async def main() -> Gate:
        gate = Gate(concurrency=2)
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(lambda: send(gate, log, duration=3.0))
            await anyio.sleep(1.0)
            gate.stop(RunAborted("enough"))
            assert not await send(gate, log)  # a new request after the stop
        return gate

    gate = run_virtual(main)
    assert log.admitted == [0.0, 0.0]
    assert log.finished == [3.0, 3.0]  # in flight: not cancelled
    assert log.stopped == [1.0, 1.0, 1.0, 1.0]
    assert str(gate.stop_reason) == "enough"
    assert gate.in_flight == 0


def test_stop_releases_requests_held_by_a_pause_and_returns_their_reservation() -> None:
    log = Log()

    async def main() -> Gate:
        gate = Gate(concurrency=4, budget=Budget(max_cost_usd=10.0, max_requests=None))
        gate.pause(100)
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(lambda: send(gate, log, worst=1.0))
            await anyio.sleep(5)
            gate.stop(RunAborted("enough"))
        return gate

    gate = run_virtual(main)
    assert log.admitted == [] and log.stopped == [5.0, 5.0, 5.0]
    assert gate.budget.requests == 0 and gate.budget.spent_usd == 0.0


def test_cancelled_admission_gives_back_its_slot_and_reservation() -> None:
    log = Log()

    async def main() -> Gate:
        gate = Gate(concurrency=1, requests_per_minute=6, budget=Budget(max_cost_usd=10.0, max_requests=None))
        await send(gate, log, worst=1.0, cost=1.0)  # t = 0..1; the next rate slot is t = 10
        with anyio.move_on_after(4):  # holds the slot and 1.0 reserved while waiting for the rate limiter
            await send(gate, log, worst=1.0)
        await send(gate, log, worst=1.0, cost=1.0)
        return gate

    gate = run_virtual(main)
    assert log.admitted == [0.0, 10.0]
    assert gate.budget.requests == 2 and gate.budget.spent_usd == 2.0


def test_a_hanging_probe_does_not_delay_giving_up() -> None:
    """While the probe waits on a slow server, the others still give up once the outage is max_down_s old."""

    async def main() -> float:
        breaker = Breaker(threshold=1, cooldown_s=5, max_down_s=30)
        gate = Gate(concurrency=4, breaker=breaker)
        with pytest.raises(ApiError):
            async with gate.request():
                raise ApiError("connection refused", kind="connection", retryable=True)  # opens at t=0
        stopped_at = 0.0

        async def probe_that_hangs() -> None:
            async with gate.request():
                await anyio.sleep(1000)

        async def waiter() -> None:
            nonlocal stopped_at
            with pytest.raises(Stopped):
                async with gate.request():
                    pass
            stopped_at = anyio.current_time()

        async with anyio.create_task_group() as tg:
            tg.start_soon(probe_that_hangs)
            await anyio.sleep(6)
            tg.start_soon(waiter)
            await anyio.sleep(60)
            tg.cancel_scope.cancel()
        return stopped_at

    assert run_virtual(main) == pytest.approx(30, abs=0.01)


def test_a_collection_passes_a_spent_budget_but_a_request_it_turns_into_takes_its_share() -> None:
    # An earlier night's batch answer is collected whatever tonight's budget says (the night that submitted it
    # counted it); if its job failed meanwhile, the route sends the request anew: that one is paid tonight, so it
    # must fit, and count, like any other.
    async def main() -> tuple[Gate, bool]:
        gate = Gate(concurrency=2, budget=Budget(max_cost_usd=1.0, max_requests=2))
        async with gate.request(0.8) as ticket:  # one request of tonight's, settled at 0.8
            ticket.cost_usd = 0.8
        async with gate.request(0.8, collect=True) as collected:  # collected: no room needed, not a request
            collected.cost_usd = 0.6
        assert gate.budget.requests == 1 and not gate.stopping
        refused = False
        async with gate.request(0.5, collect=True) as again:
            try:
                gate.budget_late(again)  # its job failed: sent anew, it would take the spend past 1.0
            except Stopped:
                refused = True
        return gate, refused

    gate, refused = run_virtual(main)
    assert refused and gate.stopping and isinstance(gate.stop_reason, RunAborted)
    assert gate.budget.spent_usd == pytest.approx(0.8) and gate.budget.requests == 1
