"""retrying(): what is retried, how often, and how long it waits (recorded through a fake sleep)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import tenacity.wait

from nanobatch.api.retry import RetryPolicy, retrying
from nanobatch.config import RetrySettings
from nanobatch.errors import ApiError, FatalApiError


class Script:
    """An awaitable call that raises (or returns) the scripted outcomes in order, the last one repeating."""

    def __init__(self, outcomes: Iterable[Any]) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self) -> Any:
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class Sleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def policy(sleeps: Sleeps, **overrides: Any) -> RetryPolicy:
    return RetryPolicy(settings=RetrySettings(**overrides), sleep=sleeps)


def overloaded(n: int = 0, retry_after: float | None = None) -> ApiError:
    return ApiError(f"HTTP 503: overloaded #{n}", kind="overloaded", status_code=503, retryable=True,
                    retry_after=retry_after)  # fmt: skip


def no_image(n: int = 0) -> ApiError:
    return ApiError(f"no image #{n}", kind="no_image", status_code=200, retryable=True)


async def test_success_needs_no_wait() -> None:
    sleeps = Sleeps()
    call = Script(["done"])
    assert await retrying(call, policy(sleeps)) == "done"
    assert call.calls == 1 and sleeps == []


async def test_transient_error_then_success() -> None:
    sleeps = Sleeps()
    call = Script([overloaded(1), overloaded(2), "done"])
    assert await retrying(call, policy(sleeps)) == "done"
    assert call.calls == 3 and len(sleeps) == 2


async def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    sleeps = Sleeps()
    errors = [overloaded(n) for n in range(1, 10)]
    call = Script(errors)
    with pytest.raises(ApiError) as info:
        await retrying(call, policy(sleeps, max_attempts=4))
    assert call.calls == 4
    assert info.value is errors[3]
    assert len(sleeps) == 3


async def test_max_attempts_of_one_means_no_retry() -> None:
    sleeps = Sleeps()
    call = Script([overloaded()])
    with pytest.raises(ApiError):
        await retrying(call, policy(sleeps, max_attempts=1))
    assert call.calls == 1 and sleeps == []


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ApiError("HTTP 400: bad size", kind="bad_request", status_code=400), id="bad-request"),
        pytest.param(ApiError("blocked (SAFETY)", kind="blocked", status_code=200), id="blocked"),
        pytest.param(FatalApiError("HTTP 401: bad key", kind="auth", status_code=401), id="fatal"),
        pytest.param(
            FatalApiError("daily quota", kind="quota_exhausted", status_code=429, retryable=True, retry_after=26.0),
            id="fatal-even-if-marked-retryable",
        ),  # fmt: skip
        pytest.param(ValueError("a bug, not an answer"), id="not-an-api-error"),
    ],
)
async def test_final_errors_are_tried_once(error: Exception) -> None:
    sleeps = Sleeps()
    call = Script([error, "never reached"])
    with pytest.raises(type(error)) as info:
        await retrying(call, policy(sleeps))
    assert info.value is error
    assert call.calls == 1 and sleeps == []


async def test_no_image_gets_exactly_its_extra_tries() -> None:
    sleeps = Sleeps()
    errors = [no_image(n) for n in range(1, 10)]
    call = Script(errors)
    with pytest.raises(ApiError) as info:
        await retrying(call, policy(sleeps, max_attempts=6, no_image_attempts=2))
    assert call.calls == 3  # the first try and two extra
    assert info.value is errors[2]


async def test_no_image_attempts_zero_means_one_try() -> None:
    call = Script([no_image(), "done"])
    with pytest.raises(ApiError):
        await retrying(call, policy(Sleeps(), no_image_attempts=0))
    assert call.calls == 1


async def test_no_image_tries_do_not_use_up_the_attempts_for_other_errors() -> None:
    call = Script([no_image(1), overloaded(2), overloaded(3), "not reached"])
    with pytest.raises(ApiError) as info:
        await retrying(call, policy(Sleeps(), max_attempts=2, no_image_attempts=1))
    assert call.calls == 3
    assert info.value.kind == "overloaded"


async def test_undecodable_images_share_the_no_image_tries() -> None:
    # Each is a billed answer that cannot be used: together they get retry.no_image_attempts, not max_attempts.
    bad = ApiError("the answer's image cannot be used", kind="bad_image", status_code=200, retryable=True)
    call = Script([no_image(1), bad, bad, "not reached"])
    with pytest.raises(ApiError) as info:
        await retrying(call, policy(Sleeps(), max_attempts=6, no_image_attempts=2))
    assert call.calls == 3 and info.value is bad
    assert await retrying(Script([bad, overloaded(), "done"]), policy(Sleeps(), max_attempts=2, no_image_attempts=1))


async def test_server_retry_delay_is_waited_exactly() -> None:
    sleeps = Sleeps()
    call = Script([overloaded(1, retry_after=45.837906927), overloaded(2, retry_after=26.0), "done"])
    assert await retrying(call, policy(sleeps, backoff_max_s=10)) == "done"
    assert sleeps == [45.837906927, 26.0]  # the server's word beats the backoff cap


async def test_backoff_waits_stay_under_an_exponentially_growing_cap() -> None:
    sleeps = Sleeps()
    call = Script([overloaded()])
    with pytest.raises(ApiError):
        await retrying(call, policy(sleeps, max_attempts=9, backoff_initial_s=1.0, backoff_max_s=20.0))
    caps = [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0]
    assert len(sleeps) == len(caps)
    for wait, cap in zip(sleeps, caps, strict=True):
        assert 0.0 <= wait <= cap


async def test_backoff_cap_doubles_up_to_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenacity.wait.random, "uniform", lambda low, high: high)  # always the longest wait
    sleeps = Sleeps()
    with pytest.raises(ApiError):
        await retrying(Script([overloaded()]), policy(sleeps, max_attempts=8, backoff_initial_s=2.0, backoff_max_s=50))
    assert sleeps == [2.0, 4.0, 8.0, 16.0, 32.0, 50.0, 50.0]


async def test_retry_delay_and_backoff_mix() -> None:
    sleeps = Sleeps()
    call = Script([overloaded(1), overloaded(2, retry_after=7.5), overloaded(3), "done"])
    await retrying(call, policy(sleeps, backoff_initial_s=1.0, backoff_max_s=60.0))
    assert sleeps[1] == 7.5
    assert 0.0 <= sleeps[0] <= 1.0 and 0.0 <= sleeps[2] <= 4.0


async def test_on_retry_hears_each_error_wait_and_attempt() -> None:
    sleeps = Sleeps()
    first, second = overloaded(1, retry_after=3.0), no_image(2)
    heard: list[tuple[ApiError, float, int]] = []
    call = Script([first, second, "done"])
    await retrying(call, policy(sleeps), on_retry=lambda e, w, n: heard.append((e, w, n)))
    assert [(e, n) for e, _, n in heard] == [(first, 1), (second, 2)]
    assert heard[0][1] == 3.0
    assert [w for _, w, _ in heard] == sleeps


async def test_on_retry_is_not_called_when_giving_up() -> None:
    heard: list[int] = []
    with pytest.raises(ApiError):
        await retrying(Script([overloaded()]), policy(Sleeps(), max_attempts=3),
                       on_retry=lambda e, w, n: heard.append(n))  # fmt: skip
    assert heard == [1, 2]
