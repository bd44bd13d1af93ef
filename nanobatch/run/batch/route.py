"""The batch tier: Gemini's Batch API as a :class:`~nanobatch.run.route.Route`, crash-safe, at half price.

The engine sends each step exactly as it does online (same gate, budget, retries, record and writer);
:class:`BatchRoute` appends the body as a line of the open *chunk* (a JSONL file in the output folder) and the
step waits until that chunk's job has answered, holding nothing but its key and chunk (the body is taken from its
:class:`~nanobatch.run.route.Request`, and read back from the chunk only with an answer the step may be sent again
for). A chunk is sealed when it is full (``chunk_requests`` lines or ``chunk_mb``) or when no request came for
``linger_s``; then one task per chunk uploads it, creates its job, polls it (growing intervals) and downloads its
results into the folder, and each waiting step gets its own line back as a :class:`~nanobatch.api.gemini.Reply` or
:class:`~nanobatch.errors.ApiError`.

Every step is journaled in ``.nanobatch-batches/batches.jsonl`` (:class:`Ledger`) before and after it happens::

    written {chunk, model, display, path, keys}   the chunk file is complete on disk
    uploaded {chunk, file}                       the Files API holds it
    creating {chunk}                             a create is about to be sent
    created {chunk, job}                         the job exists
    state {chunk, state, counts}                 the job's state changed (for `nanobatch status`)
    collected {chunk, results} | ended {chunk, state}   its results are on disk / it ended without any
    closed {chunk}                               every answer was used; local files deleted

A re-run reads the ledger first: chunks not yet collected are resumed (uploaded, created or polled), and a step
whose request key is in one of them waits for that job instead of being sent again. Before any create, jobs are
looked up by ``displayName`` (``nanobatch <run> chunk <n>``), so a create whose reply was lost is found, not
repeated. With ``wait=False`` a step whose job is not done yet raises :class:`~nanobatch.run.limits.Stopped`: the
item is left for the next run, which collects it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import orjson

from ...errors import ApiError, ConfigError
from ..limits import Stopped
from ..route import Answer, Request, Step
from .ledger import Chunk, Ledger

if TYPE_CHECKING:
    from ...api.batch_api import BatchClient, BatchJob
    from ...config import BatchSettings

__all__ = ["DEADLINE_KIND", "LANDING_PLACES", "BatchRoute", "Landing"]

logger = logging.getLogger("nanobatch")

# Answers read from results files and not yet with the writer, at most (see Landing): 64 of 1 MB images is
# 64 MB, and reading them is not what a chunk's collection waits on.
LANDING_PLACES = 64

_CREATE_ATTEMPTS = 5
DEADLINE_KIND = "batch_deadline"  # a step the batch tier gave up on at --batch-deadline: sent online instead


class BatchRoute:
    """Sends steps through Gemini's Batch API (see the module doc). Enter it, then hand it to the engine."""

    def __init__(
        self,
        client: BatchClient,
        folder: Path,
        run_id: str,
        settings: BatchSettings,
        shown: dict[str, tuple[str, int, int]] | None = None,
    ) -> None:
        self.client = client
        self.shown = shown if shown is not None else {}  # open jobs for the progress display (RunStats.batch_jobs)
        self.folder = folder
        self.run_id = run_id
        self.settings = settings
        self._chunk_bytes = int(settings.chunk_mb * 1024 * 1024)  # the API takes 2 GB per file
        self.ledger = Ledger(folder)
        self.chunks = self.ledger.load()
        if all(chunk.closed for chunk in self.chunks.values()):
            self.ledger.path.unlink(missing_ok=True)  # nothing left to follow: the ledger starts afresh
            self.chunks = {}
        self._sweep()
        self.by_key: dict[str, Chunk] = {}  # requests in a chunk whose answer is still to be used
        for chunk in self.chunks.values():
            if not chunk.closed and chunk.ended is None:
                self.by_key.update(dict.fromkeys(chunk.keys, chunk))
        self.left_waiting = 0  # steps left in jobs not done (wait=False): the next run collects them
        self.past_deadline = False
        self.landing = Landing(LANDING_PLACES)
        self._deadline = anyio.Event()
        self._filling: dict[str, _Filling] = {}
        self._count = sum(1 for chunk in self.chunks.values() if chunk.id.startswith(run_id))
        self._tg: anyio.abc.TaskGroup | None = None

    def _sweep(self) -> None:
        """Delete what a killed run left in the folder that the ledger does not name: a chunk being filled,
        a download not finished (everything in this reserved folder is nanobatch's)."""
        if not self.folder.is_dir():
            return
        kept = {self.ledger.path.name}
        for chunk in self.chunks.values():
            if not chunk.closed:
                kept.update(name for name in (chunk.path, chunk.results) if name)
        for path in self.folder.iterdir():
            if path.is_file() and path.name not in kept:
                path.unlink()

    async def __aenter__(self) -> BatchRoute:
        await self.check_endpoint()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._seal_idle)
        if self.settings.deadline_s is not None:
            self._tg.start_soon(self._at_deadline, anyio.current_time() + self.settings.deadline_s)
        for chunk in self.chunks.values():
            if chunk.open:
                logger.info("resuming batch chunk %s (%s)", chunk.id, chunk.job or chunk.state)
                self._tg.start_soon(self._drive, chunk)
            elif not chunk.closed:
                await self._index(chunk)
                chunk.settled.set()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            for filling in self._filling.values():
                filling.handle.close()
            self.ledger.close()

    async def check_endpoint(self) -> None:
        """ConfigError, before anything is uploaded, if the endpoint has no Batch API (most proxies)."""
        try:
            async for _job in self.client.jobs(page_size=1):
                break
        except ApiError as exc:
            if exc.kind != "bad_response" and exc.status_code not in (404, 405, 501):
                raise
            raise ConfigError(
                f"{self.client.where} does not offer Gemini's Batch API that --tier batch needs "
                f"(GET batches: {exc.message}); use --tier flex there for half price online"
            ) from None

    # -- the route ----------------------------------------------------------------------------

    waits_on_disk = True

    async def send(self, model: str, request: Request, *, timeout_s: float, step: Step) -> Answer:
        """Put the request in a chunk (or find it in one already sent) and wait for its job's answer. Meanwhile
        the request is on disk only: its body is taken from *request*, and put back by :meth:`_answer`.

        The answer is read only once the step's item holds one of :attr:`landing`'s places, which it keeps
        until :meth:`release` (the engine's: once the item's images are with the writer)."""
        if self.past_deadline:
            raise _deadline_error()
        key = step.key
        chunk = self.by_key.get(key)
        if chunk is None:
            chunk = self._add(model, key, request.take())
        else:
            request.take()  # in a chunk already (a resumed run's): its line there is the request
        await chunk.settled.wait()
        await self.landing.hold(step.item)
        return self._answer(chunk, key, request)

    def release(self, item: str) -> None:
        self.landing.release(item)

    def fallback_tier(self, exc: ApiError) -> str | None:
        """Past the deadline, online: standard or flex, per config."""
        return self.settings.fallback_tier if exc.kind == DEADLINE_KIND else None

    def finish(self) -> None:
        """The run went through every item: close the chunks whose answers were all used or are not wanted."""
        for chunk in self.chunks.values():
            if not chunk.closed and not chunk.open:
                self._close(chunk)

    def _add(self, model: str, key: str, body: dict[str, Any]) -> Chunk:
        line = orjson.dumps({"key": key, "request": body}) + b"\n"
        filling = self._filling.get(model)
        if filling is not None and filling.size + len(line) > self._chunk_bytes:
            self._seal(model)
            filling = None
        if filling is None:
            filling = self._filling[model] = self._start(model)
        filling.handle.write(line)
        assert filling.chunk.requests is not None  # a new chunk knows where each of its lines is
        filling.chunk.requests[key] = filling.size
        filling.size += len(line)
        filling.chunk.keys.append(key)
        filling.touched = anyio.current_time()
        self.by_key[key] = filling.chunk
        chunk = filling.chunk
        if len(chunk.keys) >= self.settings.chunk_requests:
            self._seal(model)
        return chunk

    def _start(self, model: str) -> _Filling:
        number = self._count
        self._count += 1
        chunk_id = f"{self.run_id}-{number}"
        self.folder.mkdir(exist_ok=True)
        path = f"{chunk_id}.jsonl"
        display = f"nanobatch {self.run_id} chunk {number}"
        chunk = Chunk(id=chunk_id, model=model, display=display, path=path, keys=[], requests={})
        return _Filling(chunk=chunk, handle=(self.folder / path).open("wb"))

    def _seal(self, model: str) -> None:
        filling = self._filling.pop(model)
        filling.handle.flush()
        os.fsync(filling.handle.fileno())
        filling.handle.close()
        chunk = filling.chunk
        self.ledger.note("written", chunk, model=model, display=chunk.display, path=chunk.path, keys=chunk.keys)
        self.chunks[chunk.id] = chunk
        assert self._tg is not None
        self._tg.start_soon(self._drive, chunk)

    async def _seal_idle(self) -> None:
        while True:
            await anyio.sleep(self.settings.linger_s / 2)
            now = anyio.current_time()
            for model, filling in list(self._filling.items()):
                if now - filling.touched >= self.settings.linger_s:
                    self._seal(model)

    def _answer(self, chunk: Chunk, key: str, request: Request) -> Answer:
        """*key*'s answer from *chunk*. With an answer the step may be sent again for (an error: retried, or sent
        online past the deadline; or no image: retried), its body is read back from the chunk into *request*."""
        if chunk.outcome is not None:
            if isinstance(chunk.outcome, ApiError):
                request.body = self._request(chunk, key)
            raise _again(chunk.outcome)
        if self.by_key.get(key) is chunk:
            del self.by_key[key]  # used: a retry of this request goes into a new chunk
        chunk.served.add(key)
        offset = chunk.offsets.get(key)
        result = self.client.result_line(self._line(chunk.results, offset)) if offset is not None else None
        if result is None or result.reply is None or not result.reply.images:
            request.body = self._request(chunk, key)  # before the chunk's files are deleted
        if len(chunk.served) == len(chunk.keys):  # each key once in a chunk: every answer was used
            self._close(chunk)
        if result is None:
            raise _deadline_error() if self.past_deadline else ApiError(
                f"batch job {chunk.job} ended {chunk.state} without answering this request; it goes in a later batch",
                kind="batch_unanswered", retryable=True,
            )  # fmt: skip
        if result.error is not None:
            raise result.error
        assert result.reply is not None
        return Answer(reply=result.reply, job=chunk.job or None)

    def _line(self, name: str | None, offset: int) -> bytes:
        assert name is not None
        with (self.folder / name).open("rb") as handle:
            handle.seek(offset)
            return handle.readline()

    def _request(self, chunk: Chunk, key: str) -> dict[str, Any] | None:
        """*key*'s request body, read back from *chunk*'s file (indexed once, when first wanted)."""
        if chunk.requests is None:  # a chunk written by an earlier run: its file is read once for them
            chunk.requests = self._keys_in(chunk.path)
        offset = chunk.requests.get(key)
        if offset is None:
            return None
        body = orjson.loads(self._line(chunk.path, offset)).get("request")
        return body if isinstance(body, dict) else None

    async def _index(self, chunk: Chunk) -> None:
        """Where each key's line is in the chunk's results file: read in a worker thread (a file of a thousand
        answers is gigabytes with 2K images), while the run goes on."""
        chunk.offsets = await anyio.to_thread.run_sync(self._keys_in, chunk.results)

    def _keys_in(self, name: str | None) -> dict[str, int]:
        """Where each key's line is in the folder's JSONL file *name* (read as a stream)."""
        offsets: dict[str, int] = {}
        if name is None or not (self.folder / name).exists():
            return offsets
        with (self.folder / name).open("rb") as handle:
            offset = 0
            for line in handle:
                try:
                    key = orjson.loads(line).get("key")
                except (orjson.JSONDecodeError, AttributeError):
                    key = None
                if key is not None:
                    offsets[str(key)] = offset
                offset += len(line)
        return offsets

    def _close(self, chunk: Chunk) -> None:
        for name in (chunk.path, chunk.results):
            if name:
                (self.folder / name).unlink(missing_ok=True)
        chunk.closed = True
        chunk.offsets, chunk.requests, chunk.served = {}, None, set()  # nothing more is asked of it
        self.ledger.note("closed", chunk)

    # -- a chunk's life ------------------------------------------------------------------------

    async def _drive(self, chunk: Chunk) -> None:
        """Upload, create, poll and collect *chunk*, from wherever its ledger left it."""
        try:
            if chunk.job is None:
                if self.past_deadline:
                    await self._abandon(chunk)
                    return
                if chunk.file is None:
                    chunk.file = await self.client.upload(self.folder / chunk.path, display_name=chunk.display)
                    self.ledger.note("uploaded", chunk, file=chunk.file)
                await self._create(chunk)
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
                self._settle(chunk, exc)
            else:
                self._settle(chunk, Stopped(f"the batch job of chunk {chunk.id} is not known to be done"))

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
                    self.left_waiting += len(chunk.keys)
                    self._settle(chunk, Stopped(f"batch job {chunk.job} is {job.state}: the next run collects it"))
                    return None
            with anyio.move_on_after(interval):
                await self._deadline.wait()
            interval = min(interval * 1.5, self.settings.poll_max_s)

    def _note_state(self, chunk: Chunk, job: BatchJob) -> None:
        counts = {"requests": job.request_count, "succeeded": job.successful_count, "failed": job.failed_count,
                  "pending": job.pending_count}  # fmt: skip
        self.shown[chunk.id] = (job.state, job.successful_count + job.failed_count, len(chunk.keys))
        if (job.state, counts) != (chunk.state, chunk.counts):
            chunk.state, chunk.counts = job.state, counts
            self.ledger.note("state", chunk, state=job.state, counts=counts)
            logger.info("batch job %s: %s (%d of %d answered)", chunk.job, job.state,
                        job.successful_count + job.failed_count, len(chunk.keys))  # fmt: skip

    async def _collect(self, chunk: Chunk, job: BatchJob) -> None:
        """Download the results (if any) into the folder, journal it, free the API's files, wake the steps."""
        if job.responses_file:
            results = f"{chunk.id}.results.jsonl"
            await self.client.download(job.responses_file, self.folder / results)
            chunk.results = results
            self.ledger.note("collected", chunk, results=results, state=job.state)
        else:
            chunk.ended = job.state
            self.ledger.note("ended", chunk, state=job.state)
        if job.state != "succeeded":
            logger.warning("batch job %s ended %s%s: unanswered items go in a later batch", job.name, job.state,
                           f" ({job.error})" if job.error else "")  # fmt: skip
        for name in (chunk.file, job.responses_file):
            if name:
                await self._quietly(self.client.delete_file(name))
        await self._index(chunk)
        self.shown.pop(chunk.id, None)
        self._settle(chunk, None)

    async def _abandon(self, chunk: Chunk) -> None:
        """Past the deadline, before its create: no job for *chunk* (one found is cancelled)."""
        for job in await self.client.find(chunk.display):
            await self._quietly(self.client.cancel(job.name))
        chunk.ended = "abandoned"
        self.ledger.note("ended", chunk, state="abandoned")
        if chunk.file:
            await self._quietly(self.client.delete_file(chunk.file))
        self._settle(chunk, _deadline_error())

    async def _at_deadline(self, at: float) -> None:
        await anyio.sleep_until(at)
        logger.warning("the batch deadline has come: cancelling open jobs; what they did not answer goes online")
        self.past_deadline = True
        for model in list(self._filling):
            self._seal(model)
        self._deadline.set()
        for chunk in self.chunks.values():
            if chunk.open and chunk.job:
                await self._quietly(self.client.cancel(chunk.job))

    async def _quietly(self, call: Any) -> None:
        try:
            await call
        except ApiError as exc:
            logger.info("batch clean-up: %s", exc)

    def _settle(self, chunk: Chunk, outcome: BaseException | None) -> None:
        """Wake *chunk*'s steps: its answers are there, or *outcome* is what each step raises."""
        chunk.outcome = outcome
        if outcome is not None and not isinstance(outcome, Stopped):
            for key in chunk.keys:  # a retry of one of them goes into a new chunk
                if self.by_key.get(key) is chunk:
                    del self.by_key[key]
        chunk.settled.set()


@dataclass(slots=True)
class _Filling:
    """The chunk being written for one model."""

    chunk: Chunk
    handle: IO[bytes]
    size: int = 0
    touched: float = 0.0


def _again(outcome: BaseException) -> BaseException:
    """A copy of *outcome* for one more step to raise (``copy.copy`` cannot remake an ApiError from its args)."""
    again = type(outcome).__new__(type(outcome), *outcome.args)
    again.__dict__.update(outcome.__dict__)
    return again


def _deadline_error() -> ApiError:
    return ApiError("the batch deadline has passed: sent online instead", kind=DEADLINE_KIND)


class Landing:
    """At most *places* batch answers read and not yet handed on. A job answers its chunk's thousand requests
    at once; read together, each answer would hold its images in memory until the writer takes them."""

    def __init__(self, places: int) -> None:
        self._limiter = anyio.CapacityLimiter(places)
        self._holders: set[str] = set()

    async def hold(self, holder: str) -> None:
        if holder not in self._holders:
            await self._limiter.acquire_on_behalf_of(holder)
            self._holders.add(holder)

    def release(self, holder: str) -> None:
        """*holder*'s answer is handed on (to the writer, or into its next request): its place is free."""
        if holder in self._holders:
            self._holders.discard(holder)
            self._limiter.release_on_behalf_of(holder)
