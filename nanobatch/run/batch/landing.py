"""Landing the batch tier's answers: each step waiting in a chunk gets its own line of the results file back,
as an :class:`~nanobatch.run.route.Answer` or an error, a few at a time (:class:`Landing`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from ...api.gemini import reply_error
from ...errors import ApiError, RunAborted
from ..limits import Stopped
from ..route import Answer, Request
from .chunks import Chunks
from .ledger import Chunk

if TYPE_CHECKING:
    from ...api.batch_api import BatchClient, ResultLine

__all__ = ["DEADLINE_KIND", "LANDING_PLACES", "Answers", "Landing", "deadline_error"]

# Answers read from results files and not yet with the writer, at most (see Landing): 64 of 1 MB images is
# 64 MB, and reading them is not what a chunk's collection waits on.
LANDING_PLACES = 64

DEADLINE_KIND = "batch_deadline"  # a step the batch tier gave up on at --batch-deadline: sent online instead


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


class Answers:
    """Wakes the steps of a chunk whose job is done (:meth:`settle`) and hands each its answer (:meth:`land`).

    An answer read stays in its chunk's results file until its item is landed (:meth:`landed`: its record is
    written): a run that ends before that (the item's next step waits in a later job, or the run was killed)
    leaves it there for the next run to read again, so that no step is paid for twice."""

    def __init__(self, chunks: Chunks, client: BatchClient) -> None:
        self.chunks = chunks
        self.client = client  # reads a results line
        self.landing = Landing(LANDING_PLACES)
        self.past_deadline = False  # then what a job did not answer goes online
        self.held: dict[str, list[tuple[Chunk, str]]] = {}  # item -> the answers it read and has not landed
        self.broken: RunAborted | None = None  # the batch folder failed (a full disk): every step raises this

    async def land(self, chunk: Chunk, key: str, holder: str, request: Request) -> Answer:
        """*key*'s answer, once *chunk* is settled; it is read only once *holder* holds one of :attr:`landing`'s
        places, which it keeps until :meth:`Landing.release`."""
        await chunk.settled.wait()
        await self.landing.hold(holder)
        # Decoded first (a big answer in a worker process), while the key is neither forgotten nor landed.
        offset = chunk.offsets.get(key) if chunk.outcome is None and self.broken is None else None
        result = await self.client.decode_line(self.chunks.line(chunk.results, offset)) if offset is not None else None
        return self._answer(chunk, key, holder, request, result)

    def _answer(self, chunk: Chunk, key: str, holder: str, request: Request, result: ResultLine | None) -> Answer:
        """*key*'s answer from *chunk*, kept there for *holder* until it is landed. With an answer the step may be
        sent again for (an error: retried, or sent online past the deadline; or no image: retried), its body is
        read back from the chunk into *request*."""
        self.check()
        if chunk.outcome is not None:
            if isinstance(chunk.outcome, ApiError):
                request.body = self.chunks.request(chunk, key)
            raise _again(chunk.outcome)
        self.chunks.forget(chunk, key)  # read: a retry of this request goes into a new chunk
        if result is None or result.reply is None or reply_error(result.reply) is not None:
            request.body = self.chunks.request(chunk, key)  # a retry sends it again
        if result is not None:
            self.held.setdefault(holder, []).append((chunk, key))
        else:
            self.chunks.landed(chunk, [key])  # no answer: nothing to keep for it
            raise deadline_error() if self.past_deadline else ApiError(
                f"batch job {chunk.job} ended {chunk.state} without answering this request; it goes in a later batch",
                kind="batch_unanswered", retryable=True,
            )  # fmt: skip
        if result.error is not None:
            raise result.error
        assert result.reply is not None
        return Answer(reply=result.reply, job=chunk.job or None, spent_now=not chunk.collected_before,
                      paid_by=chunk.counted.get(key))  # fmt: skip

    def counted(self, holder: str, run: str) -> None:
        """*holder*'s record, of run *run*, counted (and paid) the answers it read, but its images could not be
        written: they are kept for the next run, whose record refers to that one for them (``paid_in``) rather
        than count them again. Noted in the ledger, by the first such run only."""
        for chunk, key in self.held.get(holder, ()):
            if key not in chunk.counted and not chunk.closed:
                chunk.counted[key] = run
                self.chunks.ledger.note("counted", chunk, keys=[key], run=run)

    def landed(self, holder: str) -> None:
        """*holder*'s record is written: the answers it read are no longer kept for it (one ledger line a chunk)."""
        by_chunk: dict[str, tuple[Chunk, list[str]]] = {}
        for chunk, key in self.held.pop(holder, ()):
            by_chunk.setdefault(chunk.id, (chunk, []))[1].append(key)
        for chunk, keys in by_chunk.values():
            self.chunks.landed(chunk, keys)

    def kept(self) -> set[str]:
        """The chunks holding answers read by items not landed (their next step waits in a job)."""
        return {chunk.id for answers in self.held.values() for chunk, _ in answers}

    def check(self) -> None:
        """Raise what broke the batch folder, if it broke."""
        if self.broken is not None:
            raise RunAborted(str(self.broken))

    def break_down(self, reason: RunAborted, chunks: list[Chunk]) -> None:
        """The batch folder cannot be written (or read): every step waiting in *chunks*, and every step after,
        raises *reason*; the run stops, and the next one resumes the jobs from the ledger."""
        self.broken = reason
        for chunk in chunks:
            chunk.settled.set()

    def settle(self, chunk: Chunk, outcome: BaseException | None) -> None:
        """Wake *chunk*'s steps: its answers are there, or *outcome* is what each step raises."""
        chunk.outcome = outcome
        if outcome is not None and not isinstance(outcome, Stopped):
            for key in chunk.keys:  # a retry of one of them goes into a new chunk
                self.chunks.forget(chunk, key)
        chunk.settled.set()


def _again(outcome: BaseException) -> BaseException:
    """A copy of *outcome* for one more step to raise (``copy.copy`` cannot remake an ApiError from its args)."""
    again = type(outcome).__new__(type(outcome), *outcome.args)
    again.__dict__.update(outcome.__dict__)
    return again


def deadline_error() -> ApiError:
    return ApiError("the batch deadline has passed: sent online instead", kind=DEADLINE_KIND)
