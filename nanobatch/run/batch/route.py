"""The batch tier: Gemini's Batch API as a :class:`~nanobatch.run.route.Route`, crash-safe, at half price.

The engine sends each step exactly as it does online (same gate, budget, retries, record and writer);
:class:`BatchRoute` appends the body as a line of the open *chunk* (a JSONL file in the output folder) and the
step waits until that chunk's job has answered, holding nothing but its key and chunk (the body is taken from its
:class:`~nanobatch.run.route.Request`, and read back from the chunk only with an answer the step may be sent again
for). A chunk is sealed when it is full (``chunk_requests`` lines or ``chunk_mb``) or when no request came for
``linger_s``; then one task per chunk uploads it, creates its job, polls it (growing intervals) and downloads its
results into the folder, and each waiting step gets its own line back as a :class:`~nanobatch.api.gemini.Reply` or
:class:`~nanobatch.errors.ApiError`.

:class:`BatchRoute` is what the engine talks to. The work is done, in this order, by :class:`~.filling.Filler`
(writing requests into chunk files), :class:`~.jobs.Jobs` (a chunk's job from upload to results) and
:class:`~.landing.Answers` (waking a chunk's steps and handing each its answer); :class:`~.chunks.Chunks` knows
the chunks and reads their files back.

Every step is journaled in ``.nanobatch-batches/batches.jsonl`` before and after it happens (its lines are listed
in :mod:`nanobatch.run.batch.ledger`).

A re-run reads the ledger first: chunks not yet collected are resumed (uploaded, created or polled), and a step
whose request key is in one of them waits for that job instead of being sent again, whatever the run's tier
(:meth:`BatchRoute.holds`). Before any create, jobs are looked up by ``displayName`` (``nanobatch <run> chunk
<n>``), so a create whose reply was lost is found, not repeated. With ``wait=False`` a step whose job is not done
yet raises :class:`~nanobatch.run.limits.Stopped`: the item is left for the next run, which collects it.

A collected chunk's results file stays until every answer in it is landed (its item's record written,
:meth:`BatchRoute.landed`): an answer read by a run that ended before its item did (its next step waits in a
later job, or the run was killed) is read again by the next run, which goes on from the step after it. A batch
folder that cannot be written (a full disk) aborts the run (:class:`~nanobatch.errors.RunAborted`, exit 3).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from ...errors import ApiError, ConfigError, RunAborted
from ..route import Answer, Request, Step
from .chunks import KEEP_UNUSED_S, Chunks
from .filling import Filler
from .jobs import Jobs
from .landing import DEADLINE_KIND, Answers, deadline_error
from .ledger import Chunk, Ledger

if TYPE_CHECKING:
    from ...api.batch_api import BatchClient
    from ...api.gemini import Image
    from ...config import BatchSettings
    from ...item import WorkItem

__all__ = ["BatchRoute"]

logger = logging.getLogger("nanobatch")


COLLECT_AT_END_S = 300.0  # at most this long collecting, at a run's end, the jobs no item of it waited for


class BatchRoute:
    """Sends steps through Gemini's Batch API (see the module doc). Enter it, then hand it to the engine."""

    waits_on_disk = True

    def __init__(
        self,
        client: BatchClient,
        folder: Path,
        run_id: str,
        settings: BatchSettings,
        shown: dict[str, tuple[str, int, int]] | None = None,
        *,
        submits: bool = True,
    ) -> None:
        self.client = client
        self.settings = settings
        self.submits = submits  # False: no item is in the batch tier; the route only collects the folder's jobs
        try:
            self.chunks = Chunks(folder, Ledger(folder))
        except OSError as exc:
            raise _folder_failed(folder, exc) from None
        self.filler = Filler(self.chunks, run_id, settings, sealed=self._start_job)
        self.answers = Answers(self.chunks, client)
        self.jobs = Jobs(client, self.chunks, self.answers, settings, shown if shown is not None else {})
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> BatchRoute:
        if self.submits or any(chunk.open for chunk in self.chunks.by_id.values()):  # answers on disk need none
            await self.check_endpoint()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._guarded, self.filler.seal_idle)
        if self.settings.deadline_s is not None:
            self._tg.start_soon(self._guarded, self._at_deadline, anyio.current_time() + self.settings.deadline_s)
        for chunk in self.chunks.by_id.values():
            if chunk.open:
                logger.info("resuming batch chunk %s (%s)", chunk.id, chunk.job or chunk.state)
                self._tg.start_soon(self._guarded, self.jobs.drive, chunk)
            else:  # collected: its answers not landed yet are read again
                self._tg.start_soon(self._guarded, self._reopen, chunk)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self.filler.abandon()
            self.chunks.ledger.close()

    async def check_endpoint(self) -> None:
        """ConfigError, before anything is uploaded, if the endpoint has no Batch API (most proxies)."""
        try:
            async for _job in self.client.jobs(page_size=1):
                break
        except ApiError as exc:
            if exc.kind != "bad_response" and exc.status_code not in (404, 405, 501):
                raise
            if not self.submits:  # an online run, to collect the folder's jobs
                raise ConfigError(
                    f"{self.client.where} does not offer Gemini's Batch API, and this output folder has batch jobs "
                    "that may still answer (`nanobatch status` lists them): run with the --base-url that made them, "
                    "so that they are collected, not paid for again"
                ) from None
            raise ConfigError(
                f"{self.client.where} does not offer Gemini's Batch API that --tier batch needs "
                f"(GET batches: {exc.message}); use --tier flex there for half price online"
            ) from None

    async def _guarded(self, work: Callable[..., Awaitable[None]], *args: Any) -> None:
        """The route's background *work*; a batch folder that fails it (a full disk) stops the run cleanly."""
        try:
            await work(*args)
        except OSError as exc:
            self._break(exc)

    def _break(self, exc: OSError) -> RunAborted:
        """The batch folder failed: every step waiting here, and every later one, raises the reason (exit 3),
        and nothing more is written. What was sent is in the ledger: the next run resumes it."""
        if self.answers.broken is None:
            waiting = [*self.chunks.by_id.values(), *self.filler.abandon()]
            self.answers.break_down(_folder_failed(self.chunks.folder, exc), waiting)
        return RunAborted(str(self.answers.broken))

    @property
    def broken(self) -> RunAborted | None:
        """Why the batch folder failed, if it did (the run is aborted)."""
        return self.answers.broken

    async def _reopen(self, chunk: Chunk) -> None:
        await self.chunks.index(chunk)
        chunk.settled.set()

    def _start_job(self, chunk: Chunk) -> None:
        """A sealed chunk: its job is made and followed in a task of its own."""
        assert self._tg is not None
        self._tg.start_soon(self._guarded, self.jobs.drive, chunk)

    async def _at_deadline(self, at: float) -> None:
        await anyio.sleep_until(at)
        logger.warning("the batch deadline has come: cancelling open jobs; what they did not answer goes online")
        self.answers.past_deadline = True
        self.filler.seal_all()
        await self.jobs.cancel_open()

    # -- the route ----------------------------------------------------------------------------

    async def send(
        self, model: str, request: Request, *, timeout_s: float, step: Step, on_send: Callable[[], None]
    ) -> Answer:
        """Put the request in a chunk (*on_send*: it is this run's request) or find it in one already sent (an
        earlier run's, collected: not sent again, nor counted), and wait for its job's answer. Meanwhile
        the request is on disk only: its body is taken from *request*, and put back with an answer the step may
        be sent again for.

        The answer is read only once the step's item holds a landing place, which it keeps until :meth:`release`
        (the engine's: once the item's images are with the writer)."""
        self.answers.check()
        key, request.committed = step.key, False
        try:
            chunk = self.chunks.by_key.get(key)
            if chunk is None:
                # Past the deadline only a request in no chunk goes online: one a job holds, or whose answer is
                # on disk, was paid for (or may be) and is collected, as it is by any run.
                if self.answers.past_deadline:
                    raise deadline_error()
                on_send()  # (first: it may refuse, the run's budget spent)
                chunk = self.filler.add(model, key, request.take())
            else:
                request.take()  # in a chunk already (a resumed run's): its line there is the request
            try:
                return await self.answers.land(chunk, key, step.item, request)
            except BaseException:  # stopped, cancelled: a sealed chunk goes out (now or by the next run), paid
                request.committed = chunk.id in self.chunks.by_id
                raise
        except OSError as exc:
            raise self._break(exc) from None

    def holds(self, step: Step) -> bool:
        """Whether *step*'s request is in a chunk whose answer is still to be used: its job may still answer it,
        or its answer is on disk. Then it is never sent again, in any tier: :meth:`send` collects it."""
        return step.key in self.chunks.by_key

    def has_work(self, item: WorkItem, work_key: str) -> bool:
        """Whether a step of *item*'s work (its key), or a request sent again for its output checks, is in a chunk
        whose answer is still to be used."""
        by_key = self.chunks.by_key
        if not by_key:
            return False
        last, retries = len(item.steps), item.qa.retries if item.qa is not None and item.qa.active else 0
        steps = [Step(item=item.id, work_key=work_key, number=n) for n in range(1, last + 1)]
        steps += [Step(item=item.id, work_key=work_key, number=last, again=n) for n in range(1, retries + 1)]
        return any(step.key in by_key for step in steps)

    def sent_request(self, step: Step) -> dict[str, Any] | None:
        """The body of *step*'s request, read back from its chunk: its answer is read and not landed yet (the
        engine sends it again when the output checks refuse the answer). None if no chunk holds it for the item."""
        for chunk, key in self.answers.held.get(step.item, ()):
            if key == step.key:
                try:
                    return self.chunks.request(chunk, key)
                except OSError as exc:
                    raise self._break(exc) from None
        return None

    async def images_of(self, step: Step) -> list[Image]:
        """The images of *step*'s answer, read again from its chunk's results (kept there until its item's record
        is written): a failed item keeps the image of its latest step (:mod:`nanobatch.output.carried`)."""
        for chunk, key in self.answers.held.get(step.item, ()):
            if key == step.key and chunk.results and (offset := chunk.offsets.get(key)) is not None:
                try:
                    result = await self.client.decode_line(self.chunks.line(chunk.results, offset))
                except OSError as exc:
                    raise self._break(exc) from None
                return list(result.reply.images) if result.reply is not None else []
        return []

    def release(self, item: str) -> None:
        self.answers.landing.release(item)

    def recorded(self, item: str, run: str, *, kept: bool) -> None:
        """*item*'s record (of *run*) is written: the answers it read need not be kept for it any longer; or, *kept*
        (its images could not be written), they are, for the next run, noted as counted by this record."""
        try:
            if kept:
                self.answers.counted(item, run)
            else:
                self.answers.landed(item)
        except OSError as exc:  # a chunk could not be closed: it is, by a later run; this one stops
            self._break(exc)

    def fallback_tier(self, exc: ApiError) -> str | None:
        """Past the deadline, online: standard or flex, per config."""
        return self.settings.fallback_tier if exc.kind == DEADLINE_KIND else None

    def waiting(self) -> list[Chunk]:
        """The chunks whose jobs may still answer (left so by ``wait=False``, or not known to be done): the next
        run of the folder, whatever its tier, collects them."""
        return [chunk for chunk in self.chunks.by_id.values() if chunk.open and chunk.job]

    async def collect_done(self, limit_s: float) -> None:
        """At the end of a complete run: the folder's jobs that are done now collected (see Jobs.collect_done), for
        at most *limit_s* (what is left of the run's time) and COLLECT_AT_END_S: the rest is the next run's."""
        if limit_s <= 0:  # the run's time limit has come
            return
        try:
            with anyio.move_on_after(min(limit_s, COLLECT_AT_END_S)):
                await self.jobs.collect_done()
        except OSError as exc:
            raise self._break(exc) from None

    def unfollowed(self) -> int:
        """Requests in the chunks this run was to follow and could not, for an error (a job it could not read, or
        make: not those ``wait=False`` leaves, nor jobs no item of this run asked about): still open."""
        return sum(len(c.keys) for c in self.chunks.by_id.values() if c.open and c.id in self.jobs.unfollowed)

    def finish(self) -> None:
        """The run went through every item: close the collected chunks, but those holding answers of items
        whose next step waits in a job (the next run reads them again)."""
        try:
            unused = self.chunks.finish(kept=self.answers.kept())
        except OSError as exc:
            raise self._break(exc) from None
        if unused:
            logger.info("%d paid batch answers of items this run did not send are kept in %s (up to %d days) for "
                        "the run that sends them", unused, self.chunks.folder, KEEP_UNUSED_S // 86400)  # fmt: skip


def _folder_failed(folder: Path, exc: OSError) -> RunAborted:
    return RunAborted(f"cannot write the batch tier's files into {folder}: {exc.strerror or exc}; nothing more was "
                      "sent, and the next run resumes the batch jobs from its ledger")  # fmt: skip
