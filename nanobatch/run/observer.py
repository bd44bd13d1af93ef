"""What a run tells the systems its owner already watches (docs/observability.md): the Prometheus textfile
(:mod:`.metrics`), OpenTelemetry's GenAI metrics (:mod:`.otel`, with the ``[otel]`` extra) and the end-of-run
webhook (:mod:`.notify`). Each is optional; with none configured an :class:`Observer` only counts requests.

The runner builds one per run before the output folder is taken (a metrics file or webhook URL that cannot
be used is a ConfigError before anything is sent), the steps report each request's end to it
(:meth:`Observer.answered`), and the runner tells it how the run ended (:meth:`Observer.ended`, or
:meth:`Observer.reporting` for a run that ends by an exception). Nothing it does changes the run's outcome.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from ..api.gemini import Reply
from ..config import NotifySettings, Settings, read_notify_url
from ..errors import ApiError, Interrupted, LockHeld, NanobatchError, RunAborted
from .metrics import Counts, Ending, MetricsFile, metrics_file, token_kind
from .notify import one_line, post_notice, reason_line
from .otel import GenAiMetrics, meter_provider_from_environment
from .stats import RunStats
from .summary import RunClock

__all__ = ["STATUSES", "Observer", "tell_refused", "tell_refused_now"]

# The item statuses RunStats may count, in the order they are shown; those it does not have are left out.
STATUSES = ("ok", "failed", "blocked", "rejected", "skipped")
REFRESH_S = 15.0  # how often the metrics file is rewritten while a run goes

logger = logging.getLogger("nanobatch")


class Observer:
    """One run's metrics file, OpenTelemetry metrics and webhook (each None when not configured)."""

    def __init__(
        self,
        *,
        job: str,
        tier: str,
        out_dir: Path,
        run_id: str,
        stats: RunStats,
        clock: RunClock,
        metrics: MetricsFile | None,
        otel: GenAiMetrics | None,
        webhook: str | None,
        notify: NotifySettings,
    ) -> None:
        self.job = job
        self.tier = tier
        self.out_dir = out_dir
        self.run_id = run_id
        self.stats = stats
        self.clock = clock
        self.metrics = metrics
        self.otel = otel
        self._webhook = webhook  # a secret: never logged, never in repr
        self.notify = notify
        self.requests: Counter[str] = Counter()  # requests that ended, by outcome: ok or the error's kind

    @classmethod
    def for_run(
        cls, settings: Settings, *, job: str, out_dir: Path, run_id: str, stats: RunStats, clock: RunClock
    ) -> Observer:
        """The run's observer, from *settings* and the environment; ConfigError if its metrics file or webhook
        URL cannot be used (before anything is sent)."""
        metrics, webhook = metrics_file(settings.output.metrics_file, job), read_notify_url(settings)
        found = meter_provider_from_environment(os.environ)  # last: nothing after it may fail
        return cls(
            job=job, tier=settings.api.tier, out_dir=out_dir, run_id=run_id, stats=stats, clock=clock,
            metrics=metrics, webhook=webhook, notify=settings.notify,
            otel=GenAiMetrics(found[0], backend=settings.api.backend, owned=found[1]) if found else None,
        )  # fmt: skip

    def answered(self, model: str, started: float, answer: Reply | ApiError, *, batch: bool) -> None:
        """A request to *model* sent at *started* (the event loop's clock) ended with *answer*; *batch*: it was
        a batch job's line (whose wait is the job's, not the request's: not timed)."""
        error = answer.kind if isinstance(answer, ApiError) else None
        self.requests[error or "ok"] += 1
        if self.otel is not None:
            reply = answer.reply if isinstance(answer, ApiError) else answer  # a blocked answer is billed too
            usage = reply.usage if isinstance(reply, Reply) else None
            self.otel.record(model, None if batch else anyio.current_time() - started, usage, error)

    async def refreshing(self) -> None:
        """Rewrite the metrics file now and every :data:`REFRESH_S` seconds (until cancelled)."""
        while self.metrics is not None:
            counts = self._counts()
            await anyio.to_thread.run_sync(self.metrics.write, counts)
            await anyio.sleep(REFRESH_S)

    async def ended(
        self, outcome: str, exit_code: int, reason: str | None, *, metrics: bool = True, signals: bool = False,
        waiting: bool = False,
    ) -> None:  # fmt: skip
        """The run ended (*waiting*: leaving requests in batch jobs, ``--no-wait``): the metrics file's last write
        (unless *metrics* is False), OpenTelemetry's last export and the webhook, each bounded in time; never
        raises. With *signals*, a SIGINT or SIGTERM meanwhile cuts the notices short: the run has ended, and ends
        as it did (a signal here killed it, exit 143)."""
        now = time.time()
        if self.metrics is not None and metrics:
            self.metrics.write(self._counts(), Ending(exit_code=exit_code, at=now, waiting=waiting))
        async with anyio.create_task_group() as outer:
            if signals:
                outer.start_soon(_cut_short_by_a_signal, outer.cancel_scope)
            async with anyio.create_task_group() as tg:
                if self.otel is not None:
                    tg.start_soon(anyio.to_thread.run_sync, self.otel.close)  # never raises
                if self._webhook is not None:
                    notice = self._notice(outcome, exit_code, reason, now)
                    if self.notify.payload == "text":
                        notice = {"text": notice["text"]}
                    tg.start_soon(lambda: post_notice(self._webhook or "", notice, limit_s=self.notify.timeout_s))
            outer.cancel_scope.cancel()

    @asynccontextmanager
    async def reporting(self, held: Callable[[], bool] = lambda: True) -> AsyncIterator[None]:
        """Tell of a run that ends by an exception (a full disk, another run holding the folder, a bug) as of
        any other, then let the exception go on. The folder's metrics file is left to a run holding it: not
        written by one that never *held* it (it found the folder held, or was stopped while waiting for it)."""
        try:
            yield
        except Exception as exc:
            outcome = (
                "interrupted" if isinstance(exc, Interrupted) else "aborted" if isinstance(exc, RunAborted) else "error"
            )
            code = getattr(exc, "exit_code", 1)  # as the CLI exits: a bug's traceback exits 1
            ours = held() and not isinstance(exc, LockHeld)
            await self.ended(outcome, int(code), str(exc) or type(exc).__name__, metrics=ours)
            raise

    def _statuses(self) -> dict[str, int]:
        return {status: getattr(self.stats, status) for status in STATUSES if hasattr(self.stats, status)}

    def _counts(self) -> Counts:
        tokens = {token_kind(name): n for name, n in self.stats.tokens.items() if name != "totalTokenCount"}
        return Counts(
            items=self.stats.total, statuses=self._statuses(), requests=dict(self.requests), tokens=tokens,
            cost_usd=self.stats.cost_usd, started_at=self.clock.wall, duration_s=self.clock.elapsed(),
        )  # fmt: skip

    def _notice(self, outcome: str, exit_code: int, reason: str | None, now: float) -> dict[str, Any]:
        """The webhook's JSON object: the one-line ``text`` and the run's figures."""
        statuses, duration_s, cost = self._statuses(), self.clock.elapsed(), self.stats.cost_usd
        stamp = "%Y-%m-%dT%H:%M:%SZ"
        return {
            "text": one_line(self.job, outcome, reason, statuses, cost, duration_s),
            "job": self.job,
            "outcome": outcome,
            "exit_code": exit_code,
            "reason": reason,
            "counts": {"items": self.stats.total, **statuses},
            "requests": self.stats.requests,
            "cost_usd": round(cost, 6),
            "tier": self.tier,
            "started_at": time.strftime(stamp, time.gmtime(self.clock.wall)),
            "finished_at": time.strftime(stamp, time.gmtime(now)),
            "duration_s": round(duration_s, 3),
            "out_dir": str(self.out_dir),
            "run": self.run_id,
            "host": socket.gethostname(),
        }


async def _cut_short_by_a_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        async for signum in received:
            logger.warning("%s: the end-of-run notices were cut short", signal.Signals(signum).name)
            scope.cancel()
            return


async def tell_refused(settings: Settings, job: str, exc: NanobatchError) -> None:
    """Tell the webhook of a run refused before anything was sent (a manifest or a picture that does not pass
    the check, exit 2): a cron job's owner learns of a broken manifest the night it breaks. Never raises."""
    try:
        url = read_notify_url(settings)
    except NanobatchError:
        return  # the variable itself is unusable: the CLI's error says so
    if url is None:
        return
    text = f"{job}: refused, nothing was sent (exit {exc.exit_code}): {reason_line(str(exc))}"
    notice: dict[str, Any] = {"text": text}
    if settings.notify.payload != "text":
        notice.update(job=job, outcome="refused", exit_code=exc.exit_code, reason=str(exc), counts={},
                      requests=0, cost_usd=0.0, tier=settings.api.tier, host=socket.gethostname())  # fmt: skip
    await post_notice(url, notice, limit_s=settings.notify.timeout_s)


def tell_refused_now(settings: Settings, job: str, exc: NanobatchError) -> None:
    """:func:`tell_refused`, from code that is not async (the command line, whose manifest could not be read)."""
    anyio.run(tell_refused, settings, job, exc)
