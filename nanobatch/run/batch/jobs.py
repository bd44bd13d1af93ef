"""A sealed chunk's job, from upload to results: one task per chunk uploads it, creates its job (or finds the
one a lost reply made), polls it at growing intervals and downloads its results into the folder, then wakes
the chunk's steps. Each step is journaled in the ledger before and after it happens, so a re-run resumes it.
Past the deadline, jobs not done are cancelled and chunks without a job are not submitted."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ...errors import ApiError
from ...output.files import fsync_dir
from ..limits import Stopped
from .chunks import Chunks
from .landing import Answers, deadline_error
from .ledger import Chunk, job_counts

if TYPE_CHECKING:
    from ...api.batch_api import BatchClient, BatchJob
    from ...config import BatchSettings

__all__ = ["Jobs"]

logger = logging.getLogger("nanobatch")

_CREATE_ATTEMPTS = 5


class Jobs:
    """The batch jobs of *chunks*, made and followed with *client*; *shown* is told each open job's state (for
    the progress display: RunStats.batch_jobs)."""

    def __init__(
        self,
        client: BatchClient,
        chunks: Chunks,
        answers: Answers,
        settings: BatchSettings,
        shown: dict[str, tuple[str, int, int]],
    ) -> None:
        self.client = client
        self.chunks = chunks
        self.answers = answers
        self.settings = settings
        self.shown = shown
        self.ledger = chunks.ledger
        self._deadline = anyio.Event()
        self.unfollowed: set[str] = set()  # chunks whose job this run tried to follow and could not (an error)
        self._collecting: dict[str, anyio.Lock] = {}  # one collection of a chunk at a time (see collect_done)

    async def drive(self, chunk: Chunk) -> None:
        """Upload, create, poll and collect *chunk*, from wherever its ledger left it."""
        try:
            if chunk.job is None and not await self._submit(chunk):
                return
            job = await self._follow(chunk)
            if job is not None:
                await self._collect(chunk, job)
        except ApiError as exc:
            logger.warning("batch chunk %s: %s", chunk.id, exc)
            # A definite refusal before any job exists: nothing was paid, its steps fail like requests (and are
            # retried). Otherwise a job may exist or still answer: its items wait for the next run.
            if chunk.job is None and not exc.retryable and exc.status_code not in (None, 200):
                self.ledger.note("ended", chunk, state="not submitted")
                chunk.ended = "not submitted"
                self.answers.settle(chunk, exc)
            else:
                self.unfollowed.add(chunk.id)
                self.answers.settle(chunk, Stopped(f"the batch job of chunk {chunk.id} is not known to be done"))

    def _lost(self, chunk: Chunk, exc: ApiError) -> None:
        """*chunk*'s job is done but its results file is gone from the API (deleted, or past the 48 hours the API
        keeps one): its answers, paid for, cannot be had. Said once, loudly; its steps are sent
        again (and paid again), rather than wait for ever for answers no run can collect."""
        logger.error("batch job %s of chunk %s can no longer be read (%s): the answers it gave, if any, are lost; "
                     "its %d requests are sent again", chunk.job, chunk.id, exc.message, len(chunk.keys))  # fmt: skip
        self.ledger.note("ended", chunk, state="lost")
        chunk.ended = chunk.state = "lost"
        lost = ApiError(f"batch job {chunk.job} can no longer be read: its answer is lost; sent again",
                        kind="batch_lost", retryable=True)  # fmt: skip
        self.answers.settle(chunk, lost)

    async def _submit(self, chunk: Chunk) -> bool:
        """Upload *chunk* and create its job; False if the deadline came first (no job: its steps go online). The
        deadline may come while either is on its way: then no job is created, and one just created is cancelled
        (:meth:`cancel_open` knew no job of it yet), so that the run does not wait for it past its deadline."""
        if self.answers.past_deadline and await self._abandon(chunk):
            return False
        if chunk.job is None and chunk.file is None:
            path = self.chunks.folder / chunk.path
            chunk.file = await self.client.upload(path, display_name=chunk.display)
            self.ledger.note("uploaded", chunk, file=chunk.file)
            if self.answers.past_deadline and await self._abandon(chunk):
                return False
        if chunk.job is None:
            await self._create(chunk)
            if self._deadline.is_set() and chunk.job is not None:
                await self._quietly(self.client.cancel(chunk.job))
        return True

    async def _create(self, chunk: Chunk) -> None:
        """Create *chunk*'s job, unless a create whose reply was lost made it already (looked up by its
        display name before every create). A failed create may have made the job: it is looked up again."""
        wait = self.settings.poll_initial_s
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                job = await self._find_or_create(chunk)
                break
            except ApiError as exc:
                if not exc.retryable or attempt == _CREATE_ATTEMPTS - 1:
                    raise
                logger.info("batch chunk %s: create: %s; looking again in %.0f s", chunk.id, exc, wait)
                await anyio.sleep(wait)
                wait = min(wait * 2, self.settings.poll_max_s)
        chunk.job = job.name
        self.ledger.note("created", chunk, job=job.name)
        logger.info("batch job %s created for %d requests (chunk %s)", job.name, len(chunk.keys), chunk.id)

    async def _find_or_create(self, chunk: Chunk) -> BatchJob:
        found = await self.client.find(chunk.display)
        if found:
            logger.info("batch chunk %s: found its job %s (a create whose reply was lost)", chunk.id, found[-1].name)
            return found[-1]  # listed newest first: the first create
        assert chunk.file is not None
        self.ledger.note("creating", chunk)
        return await self.client.create(chunk.model, file_name=chunk.file, display_name=chunk.display)

    async def _follow(self, chunk: Chunk) -> BatchJob | None:
        """Poll *chunk*'s job until it is done (None: not waiting for it, see ``wait``)."""
        assert chunk.job is not None
        interval = self.settings.poll_initial_s
        while True:
            try:
                job = await self.client.get(chunk.job)
            except ApiError as exc:
                if not exc.retryable:
                    raise
                logger.info("batch job %s: %s; asking again", chunk.job, exc)
            else:
                self._note_state(chunk, job)
                if job.done:
                    return job
                if not self.settings.wait:
                    waiting = Stopped(f"batch job {chunk.job} is {job.state}: the next run collects it")
                    self.answers.settle(chunk, waiting)
                    return None
            if self._deadline.is_set():  # (its wait would return at once: a job still running after its cancel)
                await anyio.sleep(interval)
            else:
                with anyio.move_on_after(interval):
                    await self._deadline.wait()
            interval = min(interval * 1.5, self.settings.poll_max_s)

    def _note_state(self, chunk: Chunk, job: BatchJob) -> None:
        counts = job_counts(job)
        self.shown[chunk.id] = (job.state, job.successful_count + job.failed_count, len(chunk.keys))
        if (job.state, counts) != (chunk.state, chunk.counts):
            chunk.state, chunk.counts = job.state, counts
            self.ledger.note("state", chunk, state=job.state, counts=counts)
            logger.info("batch job %s: %s (%d of %d answered)", chunk.job, job.state,
                        job.successful_count + job.failed_count, len(chunk.keys))  # fmt: skip

    async def collect_done(self) -> None:
        """Each open job asked about now, and those done collected: at the end of a complete run, the jobs no item
        of it waited for (an earlier night's, whose items changed or left the manifest) are not left "pending"
        for ever, their paid answers kept on the API's side only until it deletes them."""
        for chunk, name in [(chunk, chunk.job) for chunk in self.chunks.by_id.values() if chunk.open and chunk.job]:
            try:
                job = await self.client.get(name)
                self._note_state(chunk, job)
                if job.done:
                    await self._collect(chunk, job)
            except ApiError as exc:
                logger.info("batch job %s: %s; the next run collects it", chunk.job, exc)

    async def _collect(self, chunk: Chunk, job: BatchJob) -> None:
        """Download the results (if any) into the folder, journal it, free the API's files, wake the steps."""
        async with self._collecting.setdefault(chunk.id, anyio.Lock()):
            if chunk.open:  # not collected meanwhile by the other of its follow and collect_done
                await self._collect_now(chunk, job)

    async def _collect_now(self, chunk: Chunk, job: BatchJob) -> None:
        if job.responses_file:
            results = f"{chunk.id}.results.jsonl"
            try:
                await self.client.download(job.responses_file, self.chunks.folder / results)
            except ApiError as exc:
                if exc.status_code != 404:
                    raise
                # The job is there and done (just asked), its results file gone: the answers are lost. (A job
                # itself not found proves less: another key or project may be in use; its items wait.)
                self._lost(chunk, exc)
                return
            # On disk before the API's copy is deleted below: paid answers, with no other copy after that.
            await anyio.to_thread.run_sync(_durable, self.chunks.folder / results)
            chunk.results, chunk.collected_at = results, time.time()
            self.ledger.note("collected", chunk, results=results, state=job.state, at=round(chunk.collected_at))
        else:
            chunk.ended = job.state
            self.ledger.note("ended", chunk, state=job.state)
        if job.state != "succeeded":
            # Past the deadline the run cancelled it itself, and said so once: what it did not answer goes online.
            log = logger.info if self._deadline.is_set() else logger.warning
            log("batch job %s ended %s%s: what it did not answer is sent again", job.name, job.state,
                f" ({job.error})" if job.error else "")  # fmt: skip
        for name in (chunk.file, job.responses_file):
            if name:
                await self._quietly(self.client.delete_file(name))
        await self.chunks.index(chunk)
        if chunk.results:
            self.ledger.note("indexed", chunk, offsets=chunk.offsets)  # a later run need not read the file for it
        self.shown.pop(chunk.id, None)
        self.answers.settle(chunk, None)

    async def _abandon(self, chunk: Chunk) -> bool:
        """Past the deadline, before its create: no job is made for *chunk*, whose steps go online (True). But a
        job a create whose reply was lost made is found (False): it is cancelled if still running, and followed
        like any job at the deadline, so that what it answered (paid) is collected, not sent online again."""
        found = await self.client.find(chunk.display)
        if found:
            job = found[-1]  # listed newest first: the first create
            chunk.job = job.name
            self.ledger.note("created", chunk, job=job.name)
            logger.info("batch chunk %s: found its job %s past the deadline: collecting what it answered", chunk.id,
                        job.name)  # fmt: skip
            for other in found[:-1]:  # (a second create of the same chunk: never followed, so cancelled)
                await self._quietly(self.client.cancel(other.name))
            if not job.done:
                await self._quietly(self.client.cancel(job.name))
            return False
        chunk.ended = "abandoned"
        self.ledger.note("ended", chunk, state="abandoned")
        if chunk.file:
            await self._quietly(self.client.delete_file(chunk.file))
        self.answers.settle(chunk, deadline_error())
        return True

    async def cancel_open(self) -> None:
        """The deadline has come: each job is polled now, and those not done are cancelled."""
        self._deadline.set()
        for chunk in self.chunks.by_id.values():
            if chunk.open and chunk.job:
                await self._quietly(self.client.cancel(chunk.job))

    async def _quietly(self, call: Any) -> None:
        try:
            await call
        except ApiError as exc:
            logger.info("batch clean-up: %s", exc)


def _durable(path: Path) -> None:
    """*path*'s bytes and its name on disk (fsync of the file, then of its folder)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(path.parent)
