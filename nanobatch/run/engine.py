"""The run: work items in, records out.

::

    items --> N workers --finished items--> writer (nanobatch.output.writer)
              (Gate, Route)                 images, results.jsonl

A worker prepares an item (:meth:`Engine._prepare`: its inputs and work key, then whether to skip, move or send
it, asked of :class:`~nanobatch.output.resume.Resume`), sends its steps one after another (:class:`~.steps.Steps`:
one call per step, whatever :class:`Route` carries it), and hands the record (:mod:`nanobatch.output.tally`) and
images to the writer, through whose :class:`~nanobatch.output.outdir.OutDir` every write goes. Only fatal errors
stop the run; an item's failure becomes its record, and so does one stopped between steps that were paid for."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import anyio

from ..api.gemini import FileRef, Image, Reply
from ..api.retry import RetryPolicy
from ..config import Settings
from ..errors import ApiError, FatalApiError
from ..inputs.load import InputLoader, load_inputs
from ..inputs.remote import Referrer
from ..inputs.stamps import image_digest, is_remote, local_stamps, work_key
from ..item import WorkItem
from ..names import output_names
from ..output.carried import carry, go_on, keep_known, take_over, taken_in
from ..output.files import Owned
from ..output.outdir import OutDir
from ..output.record import ErrorInfo, ItemRecord, StepRecord
from ..output.results import IndexEntry, ResultsIndex
from ..output.resume import Move, Resume, Send, Skip
from ..output.tally import Tally, build_record, moved_record
from ..output.upload import Uploads
from ..output.verdicts import Checker, out_of_date, set_aside
from ..output.writer import NOT_OURS, UNSAVED_KINDS, Finished, Holding, WriteQueue, Writer, in_memory, report_unsaved
from ..qa import Verdict
from .batch.route import BatchRoute
from .failures import FailureLog
from .limits import Gate, Stopped, spare_workers
from .observer import Observer
from .route import Request, Route, Step
from .stats import RunStats
from .steps import Steps

__all__ = ["Engine"]

logger = logging.getLogger("nanobatch")


def _original(images: list[Image | FileRef]) -> bytes | None:
    """The item's first input picture as sent (its bytes), for the checks that compare the answer with it; None
    for a text-to-image item or an input sent by reference."""
    first = images[0] if images else None
    return first.data if isinstance(first, Image) else None


@dataclass(slots=True)
class _Prepared:
    """An item ready to send: its inputs (its tally, the caller's, has the work key and the input stamps), and
    the files its answer may replace (see :class:`~nanobatch.output.resume.Send`)."""

    images: list[Image | FileRef]
    replaceable: Owned


class Engine:
    """Runs work items through one route within one gate, writing into one output folder."""

    def __init__(
        self,
        *,
        settings: Settings,
        gate: Gate,
        route: Route,
        batch_route: BatchRoute | None,
        retry: RetryPolicy,
        inputs: InputLoader,
        referrer: Referrer,
        uploads: Uploads | None,
        out: OutDir,
        index: ResultsIndex,
        resume: Resume,
        failures: FailureLog,
        stats: RunStats,
        run_id: str,
        observer: Observer,
        written: WriteQueue,
    ) -> None:
        self.batch_route = batch_route  # for items in the batch tier, and requests waiting in its jobs
        self.gate = gate
        self.retry = retry
        self.tier = settings.api.tier
        self.concurrency = settings.gate_limits()[0]
        self.checker = Checker(settings.limits.workers)  # where the output checks run (Engine._check)
        self.inputs = inputs  # the run's downloader and cache
        # What goes by reference, and the stamps of bucket objects (pass the items through referrer.stamps.watch).
        self.referrer = referrer
        self.uploads = uploads  # output.upload_to: images also go there, and done means "its objects are there"
        self.out = out
        self.index = index
        self.resume = resume
        self.failures = failures
        self.stats = stats
        self.run_id = run_id
        self.observer = observer  # told of each request's end (metrics, OpenTelemetry)
        # Finished items on their way to the writer, bounded by bytes: a slow disk slows the workers down instead
        # of piling images up in memory (and the client reads no answer while it is full: see WriteQueue.room).
        self.written = written
        self.steps = Steps(settings=settings, gate=gate, route=route, batch_route=batch_route, retry=retry,
                           journal=out.journal, failures=failures, stats=stats, observer=observer)  # fmt: skip
        self.work_scope = anyio.CancelScope()
        # Inputs hashed for their work key are kept, up to the per-image limit, so they are not read again.
        self._keep_up_to = inputs.max_input_bytes

    async def run(self, items: Iterable[WorkItem]) -> None:
        """Process *items*; returns when all are done or the run was stopped (see ``gate.stop_reason``)."""
        # The workers take the next item from the iterator themselves: next() runs without an await, so
        # one worker at a time, and there is no hand-off from a producer task (one loop iteration per item).
        pending = iter(items)
        done = self.written
        writer = Writer(self.out, self._count, lambda failure: self.stop(failure, grace_s=0))
        self.out.open()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run, done)
                try:
                    with self.work_scope:
                        async with anyio.create_task_group() as workers:
                            for _ in range(self.concurrency + spare_workers(self.concurrency, self.tier)):
                                workers.start_soon(self._work, pending, done)
                finally:
                    done.close()
        finally:
            self.checker.close()
            self.out.close()

    def stop(self, reason: BaseException, *, grace_s: float | None = None) -> None:
        """Send nothing new; cancel requests in flight after *grace_s* (None: let them finish)."""
        self.gate.stop(reason)
        self.written.let_in()  # an answer that came back must be read within the grace, not wait for the disk
        if grace_s is not None:
            self.work_scope.deadline = min(self.work_scope.deadline, anyio.current_time() + grace_s)

    def cancel(self) -> None:
        """Cancel requests in flight now; what already finished is still written."""
        self.work_scope.cancel()

    async def _work(self, items: Iterator[WorkItem], done: WriteQueue) -> None:
        while not self.gate.stopping and (item := next(items, None)) is not None:
            try:
                await self._finish(item, done)
            finally:
                if self.batch_route is not None:
                    self.batch_route.release(item.id)  # its answer is the writer's now, or dropped

    async def _finish(self, item: WorkItem, done: WriteQueue) -> None:
        """Process *item* and hand what it finished to the writer."""
        try:
            finished = await self._process(item)
        except Stopped:
            return  # never sent: left for the next run, not recorded as failed
        except FatalApiError as exc:
            # Told once, as a warning: the reason the run stopped is its outcome (the CLI's one error line);
            # the same answer to each other request in flight adds nothing.
            log = logger.info if self.gate.stopping else logger.warning
            log("%s: %s; stopping the run", item.id, exc)
            self.gate.stop(exc)
            return
        if finished is None:
            # Skipped, maybe without an await (its stamps matched): let the other tasks run.
            await anyio.lowlevel.checkpoint()
            return
        # Paid for and finished: the hand-off to the writer must survive the grace deadline.
        with anyio.CancelScope(shield=True):
            if not await done.put(finished):
                report_unsaved([finished])

    async def _process(self, item: WorkItem) -> Finished | None:
        """One item, start to end: its record, and the images to write (None: skipped, nothing to write)."""
        tally = Tally(tier=item.tier or self.tier)
        replaceable: Owned = {}
        try:
            prepared = await self._prepare(item, tally)
            if isinstance(prepared, Finished) and prepared.moves and self.uploads is not None:
                moved = await self.uploads.publish_moved(prepared, self.index, self.out)
                self.stats.skipped += moved is None  # left as it was, for the next run
                return moved
            if not isinstance(prepared, _Prepared):
                return prepared
            replaceable = prepared.replaceable
            return await self._send(item, tally, prepared)
        except (Stopped, FatalApiError) as exc:
            # Nothing paid by this run, or its latest answer kept in a batch job (the next run reads it there); an
            # answer online (past the deadline) is kept by the record (nanobatch.output.carried)
            if not tally.paid_now() or tally.answered_in_batch:
                raise
            if isinstance(exc, FatalApiError):  # a step after others were paid for: recorded with their cost
                self.gate.stop(exc)
            return await self._failed_item(item, tally, exc, replaceable)
        except ApiError as exc:
            return await self._failed_item(item, tally, exc, replaceable)
        except anyio.get_cancelled_exc_class():
            # The grace ran out with a step in flight: the steps the item paid for are recorded all the same.
            if tally.paid_now() and not tally.answered_in_batch:
                with anyio.CancelScope(shield=True):
                    finished = await self._failed_item(item, tally, Stopped(), replaceable)
                    if not await self.written.put(finished):
                        report_unsaved([finished])
            raise

    async def _send(self, item: WorkItem, tally: Tally, prepared: _Prepared) -> Finished:
        """Send *item*'s steps, check its final image (``qa:``), and hand back its record and images: those the
        checks refuse under ``rejected/``, never uploaded. Raises ApiError if a step fails."""
        qa = item.qa if item.qa is not None and item.qa.active else None
        # The first input as sent, for the checks that compare the answer with it. Not held in the batch tier,
        # where an item waits for its job holding no picture: read again for the checks.
        compared = qa is not None and (qa.changed or qa.same_subject) and _original(prepared.images) is not None
        original = _original(prepared.images) if compared and tally.tier != "batch" else None
        sent: list[Image | FileRef] = prepared.images  # handed to each step (see Steps.send)
        images: list[Image] = []
        request: Request | None = None  # the last step's, kept to be sent again if the checks refuse its answer
        start = 0  # the steps answered by earlier runs (nanobatch.output.carried)
        if tally.kept is not None and (kept := await go_on(item, tally, tally.kept, self.out)):
            sent, start = [*kept], tally.kept.step
        for number, instruction in enumerate(item.steps[start:], start + 1):
            tally.steps.append(StepRecord(step=number, instruction=instruction))
            images = []  # the last step's images are in *sent* alone while this step is sent
            if qa is not None and qa.retries and number == len(item.steps):
                request = self.steps.request(item, instruction, sent)
            reply = await self.steps.send(item, tally, instruction, sent, request)
            tally.usages.append(reply.usage)
            images = list(reply.images)
            sent = [*images]  # the next step edits this step's result
            if number < len(item.steps):  # kept on disk if the item is cut off before its last step (a step that
                tally.carried = (number, sent)  # waits in a batch job empties *sent*: its answer is kept there)
            del reply  # nor is its answer held while the next step waits
            if item.keep_steps and number < len(item.steps):
                names = output_names(item, [image.extension for image in images], step=number)
                tally.steps[-1] = replace(tally.steps[-1], outputs=tuple(names))
                tally.step_files += zip(names, images, strict=True)
        verdict = None
        # The answer's images count toward the writer's queue from here (see WriteQueue.holding): while checks
        # or uploads fall behind the API, the next answers wait unread instead of piling up in memory.
        with self.written.holding() as hold:
            hold.size = in_memory(images)
            if qa is not None:
                original = original or (await self._read_again(item) if compared else None)
                images, verdict = await self._verdict(item, tally, images, original, request, hold)
            outputs = output_names(item, [image.extension for image in images])
            files = [*tally.step_files, *zip(outputs, images, strict=True)]
            record = build_record(item, tally, run=self.run_id, outputs=outputs)
            if verdict is not None:
                record, files = set_aside(record, files, verdict)
            if self.uploads is not None and record.status == "ok":
                record = await self.uploads.publish(record, files, self.index, self.out.journal)
        return self._finished(item, tally, record, files, prepared.replaceable)

    def _finished(
        self, item: WorkItem, tally: Tally, record: ItemRecord, files: list[tuple[str, Image]], replaceable: Owned
    ) -> Finished:  # fmt: skip
        """*record* and its *files* for the writer, with the files of the item's they make out of date. A record
        not done (failed: a step, an upload) keeps the image of the step the item goes on from."""
        done = record.status in ("ok", "rejected")
        if not done:
            record, carried = carry(item, tally, record, taken=taken_in(self.out, replaceable))
            files = [*files, *carried]
        drops = out_of_date(replaceable, files, ok=record.status == "ok", done=done, named=record.files)
        return Finished(record, files, replaceable=replaceable, drops=drops, earlier=tally.earlier)

    async def _verdict(
        self, item: WorkItem, tally: Tally, images: list[Image], original: bytes | None, request: Request | None,
        hold: Holding,
    ) -> tuple[list[Image], Verdict]:  # fmt: skip
        """The output checks' verdict on *images* (the item's final answer, *hold* counting them for the writer);
        an answer they refuse is sent again as a new request (paid, counted in the item's cost and attempts,
        within the budget), up to ``qa.retries`` times. Returns the last answer's images and their verdict."""
        assert item.qa is not None
        verdict = await self._check(item, images, original)
        tries = 0
        while not verdict.passed and request is not None and tries < item.qa.retries:
            tries += 1
            logger.info("%s: its image failed the checks (%s); sending it again (%d of %d)", item.id,
                        ", ".join(verdict.failed), tries, item.qa.retries)  # fmt: skip
            hold.size = 0  # waiting for an answer: holding nothing the writer's queue waits for (see holding)
            reply = await self._send_again(item, tally, request)
            images = images if reply is None else list(reply.images)
            hold.size = in_memory(images)
            if reply is None:
                break
            del reply
            verdict = await self._check(item, images, original)
        if not verdict.passed:
            logger.warning("%s rejected: its image failed the checks (%s)", item.id, ", ".join(verdict.failed))
        return images, verdict

    async def _send_again(self, item: WorkItem, tally: Tally, request: Request) -> Reply | None:
        """The last step sent again for the output checks; None if it could not be (the item is then rejected
        with the answer it has): the run is stopping, or the request failed."""
        try:
            reply = await self.steps.send_again(item, tally, item.steps[-1], request)
        except Stopped:
            if self.batch_route is not None and self.batch_route.holds(Steps.step_of(item, tally, request)):
                raise  # it waits in a batch job (--no-wait): the next run collects it, nothing paid twice
            logger.info("%s: not sent again, the run is stopping", item.id)
            return None
        except FatalApiError as exc:
            logger.warning("%s: %s; stopping the run", item.id, exc)
            self.gate.stop(exc)
            return None
        except ApiError as exc:
            if isinstance(exc.reply, Reply) and exc.reply.usage:
                tally.usages.append(exc.reply.usage)  # a withheld answer is billed all the same
            logger.warning("%s: sending it again for the checks failed: %s", item.id, exc.message)
            return None
        tally.usages.append(reply.usage)
        return reply

    async def _read_again(self, item: WorkItem) -> bytes | None:
        """The item's first input read again for the checks (as :meth:`_prepare` read it to be sent); None if it
        cannot be now: then the checks that compare with it are not measured."""
        try:
            (first,) = await load_inputs(
                item.inputs[:1], resize=item.resize_inputs, loader=self.inputs, retry=self.retry
            )
        except ApiError as exc:
            logger.warning("%s: its input could not be read again for the checks: %s", item.id, exc.message)
            return None
        return first.data

    async def _check(self, item: WorkItem, images: list[Image], original: bytes | None) -> Verdict:
        """:func:`~nanobatch.output.verdicts.check_images` on *images*, in a worker process (``limits.workers``)
        or thread: the event loop goes on sending and writing meanwhile (the one place the checks run)."""
        assert item.qa is not None
        return await self.checker.check(images, original=original, aspect_ratio=item.aspect_ratio, settings=item.qa)

    async def _failed_item(self, item: WorkItem, tally: Tally, exc: ApiError | Stopped, replaceable: Owned) -> Finished:
        """*item*'s failure: its record, and the image of the latest step it answered before its last (kept for
        the next run to go on from; read again from its batch job's results if a step waiting there let it go)."""
        if tally.key is None and (entry := self.index.get(item.id)) is not None:  # (its inputs could not be read)
            keep_known(item, tally, entry, self.index.owned(item.id, entry.files), self.out)
        if self.batch_route is not None and tally.carried is not None and not tally.carried[1]:
            step = Step(item=item.id, work_key=tally.key, number=tally.carried[0])
            tally.carried = (step.number, [*await self.batch_route.images_of(step)])
        return self._finished(item, tally, self._failed(item, tally, exc), [*tally.step_files], replaceable)

    def _failed(self, item: WorkItem, tally: Tally, exc: ApiError | Stopped) -> ItemRecord:
        if isinstance(exc, Stopped):  # between the steps of an item: those sent were paid for
            exc = ApiError(f"the run stopped ({self.gate.stop_reason}) before this step was answered", kind="stopped")
        status = "blocked" if exc.kind == "blocked" else "failed"
        if isinstance(exc.reply, Reply) and exc.reply.usage:
            tally.usages.append(exc.reply.usage)  # a withheld answer is billed all the same
        step = max(len(tally.steps), tally.kept.step + 1 if tally.kept else 0)  # the first one not answered
        error = ErrorInfo(kind=exc.kind, status_code=exc.status_code, message=exc.message,
                          step=step if len(item.steps) > 1 else None)  # fmt: skip
        logger.warning("%s %s: %s", item.id, status, exc.message)
        return build_record(item, tally, run=self.run_id, status=status, error=error)

    async def _prepare(self, item: WorkItem, tally: Tally) -> _Prepared | Finished | None:
        """Read *item*'s inputs and find its work key (into *tally*), or the reason it is not sent: skipped
        (None) or its done files moved to new names (a :class:`Finished`). Raises ApiError if it cannot be sent."""
        # Inputs are fingerprinted without reading them first, so done work is skipped unread: local files by
        # their stamps, bucket objects by their ETag/generation, inputs sent by reference by their URL. A file
        # hashed here is kept (up to the per-image limit) and not read again to be sent.
        entry = self.index.get(item.id)
        contents: dict[str, bytes] = {}
        local = [ref for ref in item.inputs if not is_remote(ref)]
        known = entry.stamps if entry else {}
        stamps = await local_stamps(local, known, contents=contents, keep_up_to=self._keep_up_to)
        plan = await self.referrer.plan(item)
        digests = {**{ref: stamp[2] for ref, stamp in (stamps or {}).items()}, **plan.digests}
        send: Send | None = None  # once the work key is known, and the item not skipped or moved
        if all(ref in digests for ref in item.inputs):
            if stamps is not None and len(local) == len(item.inputs):
                tally.input_stamps = tuple(stamps[ref] for ref in item.inputs)
            if not isinstance(decided := self._decide(item, entry, tally, [digests[r] for r in item.inputs]), Send):
                return decided
            send = decided
        inline = [ref for ref in item.inputs if ref not in plan.refs]
        loaded = await load_inputs(
            inline, resize=item.resize_inputs, loader=self.inputs, retry=self.retry, contents=contents
        )
        read = dict(zip(inline, loaded, strict=True))
        if send is None:  # an http(s) input sent inline: known by its bytes
            found = [digests.get(ref) or image_digest(read[ref]) for ref in item.inputs]
            if not isinstance(decided := self._decide(item, entry, tally, found), Send):
                return decided
            send = decided
        images: dict[str, Image | FileRef] = {**read, **await self.referrer.sign(plan.refs)}
        if self.uploads is not None and send.taken is None and send.uploads:  # looked for before paying
            urls = [self.uploads.url(name) for name in send.uploads]
            await self.uploads.free(list(send.uploads), self.index.uploaded(item.id, urls))
        if send.taken is not None:
            why = f"{send.taken} {send.why or NOT_OURS}: nothing was sent (move it away, or change the output name)"
            raise ApiError(why, kind="output_exists")
        return _Prepared([images[ref] for ref in item.inputs], send.replaceable)

    def _decide(
        self, item: WorkItem, entry: IndexEntry | None, tally: Tally, digests: list[str]
    ) -> Send | Finished | None:
        """Send *item*, whose inputs have *digests* (its work key into *tally*), taking over the steps an earlier run
        kept (a record of it names them from here on); or what :meth:`_settled` makes of a skip or a move."""
        tally.key = work_key(item, digests)
        decision = self.resume.decide(item, entry, tally.key)
        if not isinstance(decision, Send):
            return self._settled(item, entry, tally, decision)
        if decision.carried is not None:
            take_over(item, tally, decision.carried)
        return decision

    def _settled(
        self, item: WorkItem, entry: IndexEntry | None, tally: Tally, decision: Skip | Move
    ) -> Finished | None:
        """An item not sent: skipped (None), or its done files to move to the names its ``output`` template now
        gives (an ``output`` template's column changed), with the record to say so."""
        if isinstance(decision, Skip):
            self.stats.skipped += 1
            return None
        assert entry is not None  # a move is of done work: its record
        renamed = dict(decision.moves)
        record = moved_record(
            item, tally, run=self.run_id, outputs=[renamed.get(name, name) for name in entry.outputs],
            tokens=entry.tokens, cost_usd=entry.cost_usd,  # what it cost when it was made; this run paid nothing
            paid_in=entry.paid_in, moves=decision.moves,
        )  # fmt: skip
        return Finished(record, [], replaceable=decision.replaceable, moves=decision.paths)

    def _count(self, finished: Finished) -> None:
        record = finished.record
        if not finished.saved:  # a move that failed: the item keeps its old record, and the run exits 1
            self.stats.failed += 1
            self.stats.failure("write", record.id)
            return
        self.index.add(record)
        if self.batch_route is not None:  # its batch answers are landed, or kept (its images were not written)
            self.batch_route.recorded(record.id, self.run_id, kept=_unsaved(record))
        if finished.moves:
            self.stats.skipped += 1  # done work under new names: nothing sent, nothing paid
        else:
            self.stats.count(record, finished.earlier)


def _unsaved(record: ItemRecord) -> bool:
    """Whether *record* says its answer's images could not be written (the writer's failure): a batch answer it
    read is kept for the next run, which writes it without paying again."""
    return record.status == "failed" and record.error is not None and record.error.kind in UNSAVED_KINDS
