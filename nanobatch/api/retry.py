"""The one place that knows tenacity: retry one request while it is worth it.

What is retried is decided by :class:`~nanobatch.errors.ApiError` itself
(``retryable``); how long to wait is the server's hint when it gives one
(RetryInfo, Retry-After), else exponential backoff with full jitter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import anyio

from ..config import RetrySettings
from ..errors import ApiError, FatalApiError

if TYPE_CHECKING:  # tenacity itself is imported by the first request that fails: most runs never need it
    from tenacity import RetryCallState, wait_random_exponential

__all__ = ["RetryPolicy", "retrying"]

T = TypeVar("T")


async def _sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


_DEFAULTS = RetrySettings()


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry one request: the ``retry`` settings, and how waiting is done.

    ``sleep``: tests pass a function that records the delay and returns at once, or run on a virtual clock.
    """

    settings: RetrySettings = _DEFAULTS
    sleep: Callable[[float], Awaitable[None]] = _sleep


# A 200 whose answer cannot be used: billed like any answer, so these share the small retry.no_image_attempts
# budget instead of max_attempts (a model or proxy that keeps answering so would be paid for six times).
_UNUSABLE_ANSWERS = frozenset({"no_image", "bad_image"})

# Called before each wait with (error, seconds to wait, attempt number just failed).
OnRetry = Callable[[ApiError, float, int], None]


@dataclass(slots=True)
class _Decisions:
    """tenacity's callbacks for one request: whether to try again, how long to wait first, whom to tell."""

    settings: RetrySettings
    on_retry: OnRetry | None
    backoff: wait_random_exponential
    unusable_seen: int = 0  # answers of _UNUSABLE_ANSWERS' kinds so far

    def worth_retrying(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if not isinstance(exc, ApiError) or isinstance(exc, FatalApiError) or not exc.retryable:
            return False
        if exc.retry_after is not None and exc.retry_after > self.settings.max_server_wait_s:
            return False
        if exc.kind in _UNUSABLE_ANSWERS:
            self.unusable_seen += 1
            return self.unusable_seen <= self.settings.no_image_attempts
        return state.attempt_number - self.unusable_seen < self.settings.max_attempts

    def wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self.backoff(state))

    def before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if self.on_retry is not None and isinstance(exc, ApiError) and state.next_action is not None:
            self.on_retry(exc, state.next_action.sleep, state.attempt_number)


async def retrying(call: Callable[[], Awaitable[T]], policy: RetryPolicy, *, on_retry: OnRetry | None = None) -> T:
    """Await ``call()`` until it succeeds or fails in a way not worth retrying; the last error propagates.

    A 200 with no image (``no_image``) or one that cannot be decoded (``bad_image``) gets
    ``retry.no_image_attempts`` extra tries of its own, shared by both.
    """
    # Most calls succeed at once: try without tenacity's bookkeeping (kept for bench row "1 dispatch":
    # bench/RESULTS.md). A failure is handed to tenacity as its first attempt, replayed: every decision is tenacity's.
    try:
        return await call()
    except Exception as exc:  # cancellation (a BaseException) is never retried: it propagates from here
        replay: Exception | None = exc

    from tenacity import AsyncRetrying, wait_random_exponential

    settings = policy.settings
    backoff = wait_random_exponential(multiplier=settings.backoff_initial_s, max=settings.backoff_max_s)
    decide = _Decisions(settings, on_retry, backoff)

    async def again() -> T:
        nonlocal replay
        if replay is not None:
            first, replay = replay, None
            raise first
        return await call()

    retryer = AsyncRetrying(
        retry=decide.worth_retrying,
        wait=decide.wait,
        before_sleep=decide.before_sleep,
        sleep=policy.sleep,
        reraise=True,
    )
    try:
        return await retryer(again)
    except ApiError as exc:
        if isinstance(exc, FatalApiError) or exc.retry_after is None or exc.retry_after <= settings.max_server_wait_s:
            raise
        raise FatalApiError(
            f"{exc.message} (the server asks to wait {exc.retry_after:.0f} s, longer than "
            f"retry.max_server_wait_s = {settings.max_server_wait_s:g}: the quota will not recover soon)",
            kind="quota_exhausted",
            status_code=exc.status_code,
        ) from None
