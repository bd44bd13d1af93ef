"""The library's front door: :func:`run_job` and :func:`check_job`.

Set-up and tear-down around the engine: settings, manifest validation (a bad
manifest sends nothing), the output folder and its lock, the API key, the
HTTP client (or the built-in simulator), signals, and ``summary.json``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx2

from ..api.client import GeminiClient
from ..api.connect import batch_client, connect
from ..api.credentials import credentials_for
from ..api.retry import RetryPolicy
from ..config import Settings
from ..errors import ConfigError, Interrupted, NanobatchError, RunAborted, TimeLimitReached, sole_error
from ..inputs.load import InputLoader
from ..inputs.remote import Referrer, endpoint_for
from ..job.check import left_out_text
from ..job.manifest import Manifest
from ..names import RESULTS_FILE
from ..output.outdir import OutDir
from ..output.results import ResultsIndex
from ..output.resume import Resume
from ..output.upload import Uploads
from ..output.writer import WriteQueue
from .batch.ledger import answers_to_come
from .batch.route import BatchRoute
from .changed import ChangedRows
from .engine import Engine
from .failures import FailureLog
from .limits import Gate
from .meters import Breaker, Budget, FirstContact
from .observer import Observer, tell_refused
from .preflight import CheckResult, check_job, resolve_out_dir
from .route import Bounded, GenerateContent, Route
from .stats import RunStats
from .summary import STATE, RunClock, build_summary, file_stamp, folder_state, started_summary
from .unchanged import held_check

__all__ = ["CheckResult", "RunSummary", "check_job", "resolve_out_dir", "run_job"]

logger = logging.getLogger("nanobatch")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSummary:
    """How a run ended, with its live counters and the folder-wide totals that went into summary.json."""

    out_dir: Path
    outcome: Literal["complete", "aborted", "interrupted"]
    reason: str | None
    stats: RunStats
    summary: dict[str, Any] = field(repr=False)
    unfollowed: int = 0  # requests left in batch jobs a run that waits could not follow to their end

    @property
    def exit_code(self) -> int:
        """0 all ok, 1 some failed, blocked or rejected (or left in batch jobs the run was to wait for), 3 aborted,
        130 interrupted (the CLI's exit codes)."""
        if self.outcome == "interrupted":
            return 130
        if self.outcome == "aborted":
            return 3
        return 1 if (self.stats.failed or self.stats.blocked or self.stats.rejected or self.unfollowed) else 0


async def run_job(
    manifest: str | os.PathLike[str] | Manifest,
    *,
    settings: Settings | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    retry_failed: bool = False,
    simulate: bool = False,
    wait_lock: bool = False,
    handle_signals: bool = False,
    transport: httpx2.AsyncBaseTransport | None = None,
    retry_sleep: Callable[[float], Awaitable[None]] | None = None,
    stats: RunStats | None = None,
    skip_bad_inputs: bool = False,
) -> RunSummary:
    """Run a job manifest to the end and return how it went.

    The manifest is checked whole before anything is sent (:class:`ManifestError`
    otherwise). Items already done with the same work key are skipped, so a
    re-run finishes what is missing. *transport* replaces the network (tests);
    *simulate* runs against the built-in simulator; *handle_signals* makes
    SIGINT/SIGTERM stop the run gracefully (the CLI sets it); *retry_sleep*
    replaces the waiting between retries (tests pass one that returns at once).
    *skip_bad_inputs* reads every local picture first, as ``check_job`` does, and lists those that cannot be
    decoded instead of refusing the job; their items are recorded as failed, nothing sent for them.

    >>> summary = await nanobatch.run_job("jobs/example.yaml", simulate=True)
    >>> summary.stats.ok
    """
    began = anyio.current_time()  # --max-duration counts from here: the check and waiting for the lock included
    if force and retry_failed:
        raise ConfigError("--force and --retry-failed contradict each other: choose one")
    try:
        needed = not simulate and transport is None  # a key (tests' transports need none)
        # The settings checked as validate checks them (run.presend), then the items
        checked = check_job(manifest, settings=settings, out_dir=out_dir, check_urls=False, count_done=False,
                            check_pictures=skip_bad_inputs, skip_bad_inputs=skip_bad_inputs, simulate=simulate,
                            key_needed=needed, from_summary=not force and not retry_failed)  # fmt: skip
        # Before the folder: a refusal (no Google credentials found) is told as one, and leaves no summary
        api_key = credentials_for(checked.settings, simulate=simulate, needed=needed)
    except NanobatchError as exc:
        job = manifest.name if isinstance(manifest, Manifest) else Path(manifest).stem
        await tell_refused(settings or Settings(), job, exc)
        raise
    if checked.left_out_items:
        logger.warning("%s", left_out_text(checked.left_out, checked.left_out_items))
    options = _Options(force=force, retry_failed=retry_failed, simulate=simulate, wait_lock=wait_lock,
                       handle_signals=handle_signals, transport=transport, retry_sleep=retry_sleep,
                       api_key=api_key)  # fmt: skip
    return await _run(checked, options, stats, began)


async def _run(checked: CheckResult, options: _Options, stats: RunStats | None, began: float) -> RunSummary:
    """Run the job *checked*: the folder's lock held, its results resumed from, summary.json written at the end."""
    manifest, settings, api_key = checked.job, checked.settings, options.api_key
    stats = _stats(stats, checked)
    clock = RunClock.now()
    out = OutDir(checked.out_dir, uuid.uuid4().hex[:12])
    observer = Observer.for_run(settings, job=manifest.name, out_dir=out.path, run_id=out.journal.run_id,
                                stats=stats, clock=clock)  # fmt: skip
    ends = began + (settings.limits.max_duration_s or math.inf)  # waiting for the lock, collecting done jobs: within
    async with (
        observer.reporting(lambda: out.held),  # a run that ends by an exception is told of too
        out.hold(wait=options.wait_lock, handle_signals=options.handle_signals, deadline=ends),
        AsyncExitStack() as stack,
    ):
        index = stack.enter_context(ResultsIndex.load(out.path))
        rows, left = _to_send(checked, out, index, options.force or options.retry_failed)  # before any write
        orphans = out.recover(index)
        # Replaced at the end: one that still says "started" tells `status` this run was killed or crashed.
        out.write_summary(started_summary(manifest, out.path, clock, out.journal.run_id, settings.api.tier))
        engine, batch = await _engine(stack, checked, options, api_key, out, index, stats, observer)
        logger.info("running %s into %s (%d items)", manifest.path, out.path, checked.items)
        stats.skipped = checked.items - left  # skipped as the engine would skip each
        if not left:
            logger.info("every item is done, and nothing has changed since the last run: nothing to send")
        else:
            if stats.skipped:
                logger.info("%d items done as the last run left them: going through the %d of rows added since",
                            stats.skipped, left)  # fmt: skip
            await _drive(engine, rows, settings, stats, left, began, options.handle_signals)
        outcome, reason = _outcome(engine.gate.stop_reason, stats)
        waiting = await _end_batch(batch, outcome, manifest, out.path, ends) if batch is not None else None
        unfollowed = _unfollowed(batch.unfollowed() if batch is not None and outcome == "complete" else 0)
        summary = build_summary(manifest, out.path, outcome, reason, stats, index, engine.gate, clock,
                                settings.api.tier)  # fmt: skip
        summary["last_run"].update(run=out.journal.run_id, recovered_in_flight=len(orphans))
        # Items left are counted only when the run reached every item (nor cut short, nor --retry-failed)
        counted = not options.retry_failed and stats.done == stats.total
        summary[STATE] = folder_state(manifest, out.path, stats, index, counted=counted, check=checked.held,
                                      upload_to=settings.output.upload_to)  # fmt: skip
        if waiting is not None:
            summary["last_run"]["batch_waiting"] = waiting
        out.write_summary(summary)
    if reason is not None:
        logger.warning("run %s: %s", outcome, reason)
    result = RunSummary(out_dir=out.path, outcome=outcome, reason=str(reason) if reason else None, stats=stats,
                        summary=summary, unfollowed=unfollowed)  # fmt: skip
    await observer.ended(result.outcome, result.exit_code, result.reason, signals=options.handle_signals,
                         waiting=bool(waiting and waiting["requests"]))  # fmt: skip
    return result


def _to_send(checked: CheckResult, out: OutDir, index: ResultsIndex, redo: bool) -> tuple[Manifest, int]:
    """The items this run goes through (a manifest, and how many): all of the job's, unless the check found them
    done from the last run's summary (run.unchanged) but for rows appended since, and that still holds now that
    this run holds the folder (results.jsonl as the check found it; after a ``--wait-lock`` wait, all the summary
    rests on looked at again): then only those rows' items. A run that uploads, or in the batch tier (its jobs
    may want collecting), goes through every item all the same."""
    manifest, settings = checked.job, checked.settings
    every = (manifest, checked.items)
    if redo or checked.held is None or settings.output.upload_to is not None or settings.api.tier == "batch":
        return every  # (redo: --force or --retry-failed)
    starts = checked.rows_since or {}
    if out.waited:  # also when the check found the folder mid-run: the run it waited for may have done it all
        held = held_check(out.path, checked.held, index.every_entry())
        if held is None or held.starts and held.starts != starts:
            return every
        starts = held.starts  # none: the run that held the folder did the rest
    elif checked.done_as_of is None or file_stamp(str(out.path / RESULTS_FILE)) != checked.done_as_of:
        return every
    return (manifest.since(starts), checked.items - checked.done_items) if starts else (manifest, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Options:
    """How :func:`run_job` was asked to run, for the parts of the run built from it."""

    force: bool
    retry_failed: bool
    simulate: bool
    wait_lock: bool
    handle_signals: bool
    transport: httpx2.AsyncBaseTransport | None
    retry_sleep: Callable[[float], Awaitable[None]] | None
    api_key: str | None  # found before the folder was taken (credentials_for)


def _stats(stats: RunStats | None, checked: CheckResult) -> RunStats:
    """The run's live counters (the caller's, if it keeps its own display), sized from the check."""
    stats = stats if stats is not None else RunStats()
    stats.total = checked.items
    stats.concurrency, stats.rpm_limit = checked.settings.gate_limits()
    return stats


async def _engine(
    stack: AsyncExitStack,
    checked: CheckResult,
    options: _Options,
    api_key: str | None,
    out: OutDir,
    index: ResultsIndex,
    stats: RunStats,
    observer: Observer,
) -> tuple[Engine, BatchRoute | None]:
    """The engine, built whole from its parts, and its batch route (None when no item goes in the batch tier)."""
    settings, simulate, transport = checked.settings, options.simulate, options.transport
    uploads = await _uploads(settings, index, out, options.force)
    client = await _client(stack, settings, api_key, simulate, transport, os.fspath(out.path))
    loader = await stack.enter_async_context(InputLoader(transport=transport))
    batch = await _batch_route(stack, settings, client, None if simulate else api_key, transport, out, stats, checked)
    batch_tier = settings.api.tier == "batch"
    route: Route = GenerateContent(client)
    written = WriteQueue()
    client.backlog = written  # while the writer is behind, answers wait in their sockets, not in memory
    if batch_tier:  # its gate admits whole chunks: online steps keep limits.concurrency
        route = Bounded(route, settings.limits.concurrency)
    retry = RetryPolicy(settings=settings.retry)
    if options.retry_sleep is not None:
        retry = RetryPolicy(settings=settings.retry, sleep=options.retry_sleep)
    endpoint = endpoint_for(settings.api.base_url, backend=settings.api.backend, simulate=simulate)
    in_batch = batch.has_work if batch is not None else None
    resume = Resume(out=out, index=index, uploads=uploads, force=options.force, retry_failed=options.retry_failed,
                    in_batch=in_batch)  # fmt: skip
    engine = Engine(
        settings=settings,
        gate=_gate(settings),
        route=route,
        batch_route=batch,
        retry=retry,
        inputs=loader,
        referrer=Referrer(endpoint, settings.api.inputs, batch=batch_tier),
        uploads=uploads,
        out=out,
        index=index,
        resume=resume,
        failures=FailureLog(client.where),
        stats=stats,
        run_id=out.journal.run_id,
        observer=observer,
        written=written,
    )
    return engine, batch


async def _batch_route(
    stack: AsyncExitStack,
    settings: Settings,
    client: GeminiClient,
    api_key: str | None,
    transport: httpx2.AsyncBaseTransport | None,
    out: OutDir,
    stats: RunStats,
    checked: CheckResult,
) -> BatchRoute | None:
    """The batch tier's route, over the same endpoint as *client* (its Batch API checked first); None when no
    item goes in the batch tier and the folder has no batch job to collect. An online run collects what waits
    in the folder's jobs too: while a job may still answer a request, it is not sent again."""
    if "batch" not in checked.tiers and not answers_to_come(out.batch_folder):
        return None
    batches = await stack.enter_async_context(
        batch_client(
            settings, base_url=client.base_url, api_key=api_key, transport=transport, spool=os.fspath(out.path)
        )
    )
    route = BatchRoute(batches, out.batch_folder, out.journal.run_id, settings.batch, shown=stats.batch_jobs,
                       submits="batch" in checked.tiers)  # fmt: skip
    return await stack.enter_async_context(route)


async def _end_batch(batch: BatchRoute, outcome: str, manifest: Manifest, out_dir: Path, ends: float) -> dict[str, Any]:
    """Collect the jobs that are done, close what the run is done with; what still waits, for the summary."""
    if outcome == "complete" and batch.broken is None:
        await batch.collect_done(ends - anyio.current_time())
    if batch.broken is not None:  # the batch folder failed (a full disk) where no step was left to say so
        raise batch.broken
    if outcome == "complete":
        batch.finish()
    waiting = batch.waiting()
    requests = sum(len(chunk.keys) for chunk in waiting)
    if requests:
        logger.info(
            "%d requests wait in batch jobs: a later `nanobatch run %s` into %s collects them "
            "(`nanobatch status %s` lists the jobs)", requests, manifest.path, out_dir, out_dir,
        )  # fmt: skip
    return {"requests": requests, "jobs": [chunk.job for chunk in waiting]}


def _unfollowed(requests: int) -> int:
    """*requests* left in batch jobs the run tried to follow and could not (it could not read a job): said."""
    if requests:
        logger.error("%d requests are left in batch jobs this run could not follow to their end (the warnings above "
                     "say why): the next run collects them", requests)  # fmt: skip
    return requests


def _outcome(
    reason: BaseException | None, stats: RunStats
) -> tuple[Literal["complete", "aborted", "interrupted"], BaseException | None]:
    """How the run ended, and why, from the reason its gate stopped (None: it was not stopped)."""
    late = stats.done == stats.total and not stats.failures["stopped"]  # every item finished (none cut short)
    if isinstance(reason, (TimeLimitReached, Interrupted)) and late:
        reason = None  # it came after the last item had gone out and finished: the run is complete
    if isinstance(reason, Interrupted):
        return "interrupted", reason
    return ("aborted" if reason is not None else "complete"), reason


async def _uploads(settings: Settings, index: ResultsIndex, out: OutDir, force: bool) -> Uploads | None:
    """``output.upload_to``'s uploads (checked by check_job), knowing which objects a dead run PUT for its items
    and which done items lost their objects."""
    if settings.output.upload_to is None:
        return None
    uploads = Uploads(settings.output.upload_to)
    await uploads.adopt(out.upload_claims, index, out.journal)
    if not force:
        await uploads.find_gone(index.ok_files(), out.path, index, out.journal)
    return uploads


async def _client(
    stack: AsyncExitStack,
    settings: Settings,
    api_key: str | None,
    simulate: bool,
    transport: httpx2.AsyncBaseTransport | None,
    spool: str,
) -> GeminiClient:
    """The run's HTTP client: to the API, or to the built-in simulator (*simulate*), closed with *stack*; its
    worker processes write answers' images into *spool* (the output folder), for the writer to rename."""
    simulator_url = None
    if simulate:
        from ..simulator import SimulatorConfig, run_in_thread

        simulator_url = stack.enter_context(run_in_thread(SimulatorConfig()))
    connection = await stack.enter_async_context(
        connect(settings, api_key=api_key, simulator_url=simulator_url, transport=transport)
    )
    return await stack.enter_async_context(connection.gemini(spool))


async def _drive(
    engine: Engine, manifest: Manifest, settings: Settings, stats: RunStats, limit: int, began: float,
    handle_signals: bool,
) -> None:  # fmt: skip
    """Run *engine* over the manifest's items, with the signal watcher and the time limit beside it. The writer's
    abort (a full disk) ends it as a stop rule does: the run's outcome, and its summary, say so."""
    try:
        async with anyio.create_task_group() as tg:
            if handle_signals:
                tg.start_soon(_watch_signals, engine, settings.limits.grace_s)
            tg.start_soon(engine.observer.refreshing)  # the metrics file, if any
            if settings.limits.max_duration_s is not None:
                tg.start_soon(_stop_in_time, engine, began, settings.limits.max_duration_s, settings.limits.grace_s)
            # The items the check passed, and no more: rows added to a source since then wait for the next
            # run (and its check); a row changed into a bad one is skipped, not the end of a paid-for run.
            changed = ChangedRows(stats)  # a row turned bad since: skipped, told when the workers get there
            items = changed.read(manifest.items(check_files=False, on_problem=changed.note, limit=limit))
            # Bucket objects stamped, and the items' records read, in batches ahead of the workers
            await engine.run(changed.taken(engine.index.read_ahead(engine.referrer.stamps.watch(items))))
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if (error := sole_error(group)) is not None:
            if isinstance(error, RunAborted) and error is engine.gate.stop_reason:
                return
            raise error from None  # callers get our error itself, not the task groups' wrapping
        raise


def _gate(settings: Settings) -> Gate:
    """The run's gate: its limits, the breaker and the budget."""
    limits = settings.limits
    first_contact = FirstContact(settings.retry.first_contact_s)
    (concurrency, rpm), batch = settings.gate_limits(), settings.api.tier == "batch"
    # In the batch tier a job's failed lines arrive together and say nothing about an outage: no adaptive
    # window or breaker either.
    breaker = None if batch else Breaker(threshold=limits.breaker_threshold, cooldown_s=limits.breaker_cooldown_s,
                                         max_down_s=limits.breaker_max_down_s, first_contact=first_contact)  # fmt: skip
    return Gate(
        concurrency=concurrency,
        requests_per_minute=rpm,
        rpm_burst=limits.rpm_burst,
        adaptive=limits.adaptive and not batch,
        breaker=breaker,
        budget=Budget(max_cost_usd=settings.budget.max_cost_usd, max_requests=settings.budget.max_requests),
        first_contact=first_contact,
    )


async def _watch_signals(engine: Engine, grace_s: float) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        received = 0
        async for signum in signals:
            received += 1
            if received == 1:
                logger.warning(
                    "%s: sending nothing new; waiting up to %g s for %d requests in flight (again to cancel them)",
                    signal.Signals(signum).name,
                    grace_s,
                    engine.gate.in_flight,
                )
                engine.stop(Interrupted(f"interrupted by {signal.Signals(signum).name}"), grace_s=grace_s)
            else:
                logger.warning("cancelling the requests in flight; finished results are kept")
                engine.cancel()


async def _stop_in_time(engine: Engine, began: float, limit_s: float, grace_s: float) -> None:
    """At ``began + limit_s``: send nothing new; requests in flight get *grace_s* to finish."""
    await anyio.sleep_until(began + limit_s)
    logger.warning(
        "time limit reached: sending nothing new; waiting up to %g s for %d requests in flight",
        grace_s,
        engine.gate.in_flight,
    )
    reason = f"the time limit was reached (limits.max_duration_s = {limit_s:g}); unsent items are left for the next run"
    engine.stop(TimeLimitReached(reason), grace_s=grace_s)
