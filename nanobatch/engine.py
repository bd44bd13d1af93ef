"""The run: one task group of workers that send requests, and one writer that keeps results.

::

    producer --items--> N workers --finished items--> writer
                         (Gate)                        images, results.jsonl

Only the writer touches the output folder's files, and it runs outside the
workers' cancel scope, so whatever finished is written even when the run is
cut short. Only fatal errors stop the run; an item's failure becomes its record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from . import models
from ._failures import FailureLog
from ._retry import RetryPolicy, retrying
from .client import GeminiClient
from .errors import ApiError, FatalApiError, RunAborted
from .gemini import OUTPUT_EXTENSIONS, Image, Reply, build_request, check_reply, sum_usage
from .inputs import MAX_INPUT_BYTES, InputLoader, image_digest, load_inputs, local_stamps, work_key
from .limits import Gate, Stopped
from .manifest import WorkItem
from .names import output_names
from .results import (
    FOLDER_ERRNOS,
    TOKEN_FIELDS,
    IndexEntry,
    Journal,
    ResultsIndex,
    ResultsLog,
    atomic_write,
    fsync_dir,
    is_done,
    move_file,
    renamed_files,
)

__all__ = ["Engine", "RunStats"]

logger = logging.getLogger("nanobatch")


@dataclass(slots=True)
class RunStats:
    """Live counters of a run, for progress displays and the summary."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    blocked: int = 0
    skipped: int = 0
    requests: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    failure_examples: dict[str, list[str]] = field(default_factory=dict)
    tokens: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0
    latencies: array[float] = field(default_factory=lambda: array("d"))  # 8 bytes per item, for percentiles
    started: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    concurrency: float = 0.0  # the adaptive window: lower than the limit while the server pushes back
    rpm_limit: float | None = None
    fallbacks: int = 0  # flex items finally sent at standard price

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.blocked + self.skipped

    def count(self, record: dict[str, Any]) -> None:
        status = record["status"]
        setattr(self, status, getattr(self, status) + 1)
        for name, value in (record.get("usage") or {}).items():
            if isinstance(value, int):
                self.tokens[name] += value
        self.cost_usd += record.get("cost_usd") or 0.0
        if record.get("latency_s") is not None:
            self.latencies.append(record["latency_s"])
        if record.get("error"):
            kind = record["error"]["kind"]
            self.failures[kind] += 1
            examples = self.failure_examples.setdefault(kind, [])
            if len(examples) < 5:
                examples.append(record["id"])


# Finished items wait for the writer in memory (a 2K image is ~6 MB): past this many bytes, workers wait for it.
_WRITE_QUEUE_BYTES = 32 * 1024 * 1024
# ... or past this many items: with small answers the bytes alone let tens of thousands of records (a few KB
# each in Python objects) pile up behind a writer that fsyncs every image, and memory grew with the manifest.
_WRITE_QUEUE_ITEMS = 1024

# What a shed flex request looks like: overload answers (429 without a daily quota, 503), retried on flex first.
SHED_KINDS = frozenset({"rate_limited", "overloaded"})


def _spare_workers(concurrency: int) -> int:
    """Workers beyond the concurrency limit. The gate still lets at most ``concurrency`` requests out; the
    spare workers read their next item's inputs while all slots are busy, so a freed slot is taken at once
    instead of after a worker-thread hand-off (~10 ms on a busy loop). Each holds one item's inputs."""
    return max(1, concurrency // 8)


@dataclass(frozen=True, slots=True)
class _Finished:
    record: dict[str, Any]
    files: list[tuple[str, bytes]]
    # Of the names it writes, those a record of this item says nanobatch wrote: the only files it may replace.
    replaceable: frozenset[str] = frozenset()
    moves: list[tuple[str, str]] = field(default_factory=list)  # done work, renamed: (old, new)
    saved: bool = True  # False: a move that failed; its item keeps its old record and names

    @property
    def size(self) -> int:
        return 1024 + sum(len(data) for _, data in self.files)  # 1 KB: about what a record takes


class _WriteQueue:
    """Finished items on their way to the writer, bounded by their bytes and by their count.

    The writer takes everything queued at once (one thread hand-off and one fsync for all of it), so
    workers wait only when the writer falls far behind: big results hold at most ``max_bytes`` in memory
    (queued or being written; one item bigger than that is let through alone), small ones at most
    ``max_items`` records.
    """

    def __init__(self, max_bytes: int, max_items: int = _WRITE_QUEUE_ITEMS) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.bytes = 0
        self.count = 0  # items queued or being written
        self._items: deque[_Finished] = deque()
        self._closed = False  # no more items will come
        self._writing = True  # False: the writer has stopped, items are dropped
        self._ready = anyio.Event()
        self._room = anyio.Event()

    async def put(self, finished: _Finished) -> bool:
        """Queue *finished*; False if the writer has stopped (the run is ending with its error)."""
        size = finished.size
        while self._writing and self.count and (self.bytes + size > self.max_bytes or self.count >= self.max_items):
            await self._room.wait()
        if not self._writing:
            return False
        self._items.append(finished)
        self.bytes += size
        self.count += 1
        self._ready.set()
        return True

    async def take(self) -> list[_Finished]:
        """All queued items, oldest first, once there is one; empty when closed and drained."""
        while not self._items:
            if self._closed:
                return []
            await self._ready.wait()
            self._ready = anyio.Event()
        batch = list(self._items)
        self._items.clear()
        return batch

    def written(self, batch: list[_Finished]) -> None:
        """The writer is done with *batch*: its bytes make room."""
        self.bytes -= sum(finished.size for finished in batch)
        self.count -= len(batch)
        self._room.set()
        self._room = anyio.Event()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def stop_writing(self) -> list[_Finished]:
        """No more writing: returns what was still queued, for the caller to report lost."""
        self._writing = False
        left = list(self._items)
        self._items.clear()
        self._room.set()
        return left


def _report_unsaved(lost: list[_Finished]) -> None:
    """Name the finished items whose results could not be written: they were paid for and will be sent
    again by the next run (which also warns of them, from the journal)."""
    if lost:
        ids = ", ".join(finished.record["id"] for finished in lost[:20])
        more = f" and {len(lost) - 20} more" if len(lost) > 20 else ""
        logger.error(
            "%d finished items could not be saved and will be sent again by the next run: %s%s", len(lost), ids, more
        )


_NOT_OURS = "exists and is not a file nanobatch wrote for this item"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Engine:
    """Runs work items through one client within one gate, writing into one output folder."""

    def __init__(
        self,
        *,
        client: GeminiClient,
        gate: Gate,
        out_dir: Path,
        index: ResultsIndex,
        retry: RetryPolicy,
        timeout_s: float,
        pricing: dict[str, Any],
        concurrency: int,
        force: bool = False,
        retry_failed: bool = False,
        stats: RunStats | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        run_id: str = "",
        inputs: InputLoader | None = None,
        tier: str = "standard",
        flex_fallback: bool = True,
    ) -> None:
        self.client = client
        self.gate = gate
        self.out_dir = out_dir
        self.index = index
        self.retry = retry
        self.timeout_s = timeout_s
        self.pricing = pricing
        self.tier = tier
        self.flex_fallback = flex_fallback
        self.concurrency = concurrency
        self.force = force
        self.retry_failed = retry_failed
        self.stats = stats or RunStats()
        self.on_record = on_record
        self.work_scope = anyio.CancelScope()
        self.run_id = run_id
        self.inputs = inputs  # the run's downloader and cache; None: a one-off loader per item
        # Inputs hashed for their work key are kept, up to the per-image limit, so they are not read again.
        self._keep_up_to = inputs.max_input_bytes if inputs is not None else MAX_INPUT_BYTES
        self.log = ResultsLog(out_dir / "results.jsonl")
        self.journal = Journal(out_dir, run_id)
        self.failures = FailureLog(client.where)

    async def run(self, items: Iterable[WorkItem]) -> None:
        """Process *items*; returns when all are done or the run was stopped (see ``gate.stop_reason``)."""
        # The workers take the next item from the iterator themselves: next() runs without an await, so
        # one worker at a time, and there is no hand-off from a producer task (one loop iteration per item).
        pending = iter(items)
        # Bounded by bytes: a slow disk slows the workers down instead of piling images up in memory.
        done = _WriteQueue(_WRITE_QUEUE_BYTES, _WRITE_QUEUE_ITEMS)
        self.log.open()
        self.journal.open()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write, done)
                try:
                    with self.work_scope:
                        async with anyio.create_task_group() as workers:
                            for _ in range(self.concurrency + _spare_workers(self.concurrency)):
                                workers.start_soon(self._work, pending, done)
                finally:
                    done.close()
        finally:
            self.log.close()
            self.journal.close()

    def stop(self, reason: BaseException, *, grace_s: float | None = None) -> None:
        """Send nothing new; cancel requests in flight after *grace_s* (None: let them finish)."""
        self.gate.stop(reason)
        if grace_s is not None:
            self.work_scope.deadline = min(self.work_scope.deadline, anyio.current_time() + grace_s)

    def cancel(self) -> None:
        """Cancel requests in flight now; what already finished is still written."""
        self.work_scope.cancel()

    async def _work(self, items: Iterator[WorkItem], done: _WriteQueue) -> None:
        while not self.gate.stopping and (item := next(items, None)) is not None:
            try:
                finished = await self._process(item)
            except Stopped:
                continue  # never sent: left for the next run, not recorded as failed
            except FatalApiError as exc:
                # Told once, as a warning: the reason the run stopped is its outcome (the CLI's one error line);
                # the same answer to each other request in flight adds nothing.
                log = logger.info if self.gate.stopping else logger.warning
                log("%s: %s; stopping the run", item.id, exc)
                self.gate.stop(exc)
                continue
            if finished is None:
                # Skipped, maybe without an await (its stamps matched): let the other tasks run.
                await anyio.lowlevel.checkpoint()
                continue
            # Paid for and finished: the hand-off to the writer must survive the grace deadline.
            with anyio.CancelScope(shield=True):
                if not await done.put(finished):
                    _report_unsaved([finished])

    def _wanted(self, entry: IndexEntry | None, key: str) -> bool:
        if self.retry_failed:
            return entry is not None and entry.status in ("failed", "blocked")
        return self.force or not is_done(entry, key, self.out_dir)

    async def _process(self, item: WorkItem) -> _Finished | None:
        started = time.time()
        api_s: list[float] = []  # per step: from its first request (the gate let it through) to its last answer
        record: dict[str, Any] = {
            "id": item.id,
            "run": self.run_id,
            "status": "failed",
            "outputs": [],
            "finish_reason": None,
            "text": None,
            "usage": {},
            "steps": None,
            "attempts": 0,
            "latency_s": None,
            "cost_usd": 0.0,
            "model": item.model,
            "model_version": None,
            "response_id": None,
            "key": None,
            "error": None,
            "instructions": list(item.steps),
            "inputs": list(item.inputs),
            "aspect_ratio": item.aspect_ratio,
            "image_size": item.image_size,
            "tier": item.tier or self.tier,
            "fallback": False,
            "started_at": _utc(started),
            "finished_at": None,
        }
        files: list[tuple[str, bytes]] = []
        steps: list[dict[str, Any]] = []
        usages: list[dict[str, Any]] = []
        try:
            # Local inputs are fingerprinted from their stamps first, so done work is skipped unread.
            # A file hashed here is kept (up to the per-image limit) and not read again to be sent.
            entry = self.index.get(item.id)
            contents: dict[str, bytes] = {}
            known = entry.stamps if entry else {}
            stamps = await local_stamps(item.inputs, known, contents=contents, keep_up_to=self._keep_up_to)
            if stamps is not None:
                record["input_stamps"] = [list(stamps[ref]) for ref in item.inputs]
                record["key"] = key = work_key(item, [stamps[ref][2] for ref in item.inputs])
                if not self._wanted(entry, key):
                    return self._settled(item, entry, key, record)
            images = await load_inputs(
                item.inputs, resize=item.resize_inputs, loader=self.inputs, retry=self.retry, contents=contents
            )
            if stamps is None:
                record["key"] = key = work_key(item, [image_digest(image) for image in images])
                if not self._wanted(entry, key):
                    return self._settled(item, entry, key, record)
            if (taken := self._taken_name(item)) is not None:
                # Found before paying: the answer could not be saved (the writer would refuse it the same way).
                raise ApiError(f"{taken} {_NOT_OURS}: nothing was sent (move it away, or change the output name)",
                               kind="output_exists")  # fmt: skip
            for number, instruction in enumerate(item.steps, 1):
                step: dict[str, Any] = {"step": number, "instruction": instruction}
                steps.append(step)
                sent_at: list[float] = []
                try:
                    reply = await self._send(item, instruction, images, record, step, sent_at)
                finally:
                    if sent_at:
                        api_s.append(anyio.current_time() - sent_at[0])
                usages.append(reply.usage)
                images = list(reply.images)  # the next step edits this step's result
                if item.keep_steps and number < len(item.steps):
                    step["outputs"] = self._name_outputs(item, images, step=number)
                    files += zip(step["outputs"], (i.data for i in images), strict=True)
            record["outputs"] = self._name_outputs(item, images)
            files += zip(record["outputs"], (i.data for i in images), strict=True)
            record["status"] = "ok"
        except (Stopped, FatalApiError):
            raise
        except ApiError as exc:
            record["status"] = "blocked" if exc.kind == "blocked" else "failed"
            record["error"] = exc.as_record()
            if exc.reply is not None and exc.reply.usage:
                usages.append(exc.reply.usage)  # a withheld answer is billed all the same
            if len(item.steps) > 1:
                record["error"]["step"] = len(steps)
            files = []
            logger.warning("%s %s: %s", item.id, record["status"], exc.message)
        record["steps"] = steps if len(item.steps) > 1 else None
        record["usage"] = sum_usage(usages) if usages else {}
        # The API's time: retries count, waiting for a slot, the rate limit, the inputs or between steps does
        # not (that is queueing). None: nothing was sent.
        record["latency_s"] = round(sum(api_s), 3) if api_s else None
        record["finished_at"] = _utc(time.time())
        record["cost_usd"] = round(record["cost_usd"], 6)
        return _Finished(record, files, replaceable=self.index.owned(item.id, (name for name, _ in files)))

    def _taken_name(self, item: WorkItem) -> str | None:
        """A path where *item*'s image or kept step would go, taken by a file nanobatch did not write for it."""
        stems = [item.stem, *(f"{item.stem}.step{n}" for n in range(1, len(item.steps)) if item.keep_steps)]
        names = [f"{stem}.{ext}" for stem in stems for ext in OUTPUT_EXTENSIONS]
        there = [name for name in names if os.path.lexists(os.path.join(self.out_dir, name))]
        foreign = sorted(set(there) - self.index.owned(item.id, there))
        return os.path.join(self.out_dir, foreign[0]) if foreign else None

    def _settled(self, item: WorkItem, entry: IndexEntry | None, key: str, record: dict[str, Any]) -> _Finished | None:
        """An item not to be sent: skipped (None), or, when it is done but its output names changed (an
        ``output`` template's column did), its files to move to the new names, with the record to say so."""
        moves = (
            renamed_files(entry, item.stem) if entry is not None and entry.status == "ok" and entry.key == key else []
        )
        moves = [(old, new) for old, new in moves if os.path.isfile(os.path.join(self.out_dir, old))]
        if entry is None or not moves:
            self.stats.skipped += 1
            return None
        renamed = dict(moves)
        record.update(
            status="ok",
            outputs=[renamed.get(name, name) for name in entry.outputs],
            usage={name: n for name, n in zip(TOKEN_FIELDS, entry.tokens, strict=True) if n},
            cost_usd=entry.cost_usd,  # what the result cost when it was made; this run paid nothing for it
            moved_from=[old for old, _ in moves],
            finished_at=_utc(time.time()),
        )
        if len(item.steps) > 1:
            record["steps"] = steps = [{"step": n, "instruction": text} for n, text in enumerate(item.steps, 1)]
            for step in steps:
                mark = f"{item.stem}.step{step['step']}"
                names = [new for _, new in moves if new.startswith((mark + ".", mark + "-"))]
                if names:
                    step["outputs"] = names
        return _Finished(record, [], replaceable=self.index.owned(item.id, renamed.values()), moves=moves)

    async def _send(
        self,
        item: WorkItem,
        instruction: str,
        images: list[Image],
        record: dict[str, Any],
        step: dict[str, Any],
        sent_at: list[float],
    ) -> Reply:
        """One step in the item's tier; a flex request still shed after its retries goes out at standard
        price if ``limits.flex_fallback`` allows (``fallback: true`` in the record, counted in the summary)."""
        tier = "standard" if record["fallback"] else item.tier or self.tier
        try:
            return await self._send_in(tier, item, instruction, images, record, step, sent_at)
        except FatalApiError:
            raise
        except ApiError as exc:
            if tier != "flex" or not self.flex_fallback or exc.kind not in SHED_KINDS:
                raise
            logger.warning("%s: flex shed it (%s); sending it at standard price", item.id, exc.message)
            record["fallback"] = True
            self.stats.fallbacks += 1
            return await self._send_in("standard", item, instruction, images, record, step, sent_at)

    async def _send_in(
        self,
        tier: str,
        item: WorkItem,
        instruction: str,
        images: list[Image],
        record: dict[str, Any],
        step: dict[str, Any],
        sent_at: list[float],
    ) -> Reply:
        record["tier"] = tier
        body = build_request(
            instruction,
            images,
            response_modalities=item.response_modalities,
            aspect_ratio=item.aspect_ratio,
            image_size=item.image_size,
            thinking_level=item.thinking_level,
            service_tier=tier,
        )
        pricing = models.pricing_for(item.model, self.pricing, tier)
        _, worst = models.request_cost_range(
            item.model, instruction=instruction, n_images=len(images), image_size=item.image_size, pricing=pricing
        )
        timeout = max(self.timeout_s, 600.0) if item.image_size == "4K" else self.timeout_s
        if tier == "flex":
            timeout = max(timeout, models.FLEX_TIMEOUT_S)  # flex answers take 1-15 minutes

        async def attempt() -> Reply:
            async with self.gate.request(worst) as ticket:
                record["attempts"] += 1
                self.stats.requests += 1
                self.journal.dispatched(item.id, record["key"], record["attempts"])
                self.stats.in_flight = self.gate.in_flight
                self.stats.concurrency = self.gate.window
                if not sent_at:
                    sent_at.append(anyio.current_time())
                try:
                    reply = await self.client.generate(item.model, body, timeout_s=timeout)
                except ApiError as exc:
                    # An error answer, or no connection at all, is definite: not "possibly charged". Only a
                    # request with no answer stays open in the journal (and a 200, until its record is written).
                    if not exc.sent or exc.status_code not in (None, 200):
                        self.journal.settled(item.id, record["attempts"])
                    raise
                finally:
                    self.stats.in_flight = self.gate.in_flight - 1
                served = models.reported_tier(reply.usage)
                if served is not None and served != tier:
                    record["tier"] = served
                ticket.cost_usd = models.usage_cost(
                    reply.usage,
                    pricing if served in (None, tier) else models.pricing_for(item.model, self.pricing, served),
                )
            record["cost_usd"] += ticket.cost_usd
            self._note_reply(record, step, reply)
            try:
                check_reply(reply)
            except ApiError as exc:
                exc.reply = reply
                raise
            return reply

        def on_retry(exc: ApiError, wait: float, attempt_number: int) -> None:
            self.stats.retries[exc.kind] += 1
            self.failures.failed(exc)
            logger.info("%s: attempt %d: %s; retrying in %.1f s", item.id, attempt_number, exc.message, wait)

        return await retrying(attempt, self.retry, on_retry=on_retry)

    @staticmethod
    def _note_reply(record: dict[str, Any], step: dict[str, Any], reply: Reply) -> None:
        """Keep what the latest answer said, for the record (also when it has no image)."""
        record["finish_reason"] = step["finish_reason"] = reply.finish_reason or reply.block_reason
        record["text"] = step["text"] = reply.text
        record["model_version"] = reply.model_version or record["model_version"]
        record["response_id"] = reply.response_id
        step["usage"] = reply.usage
        if reply.finish_message:
            record["finish_message"] = reply.finish_message

    def _name_outputs(self, item: WorkItem, images: list[Image], *, step: int | None = None) -> list[str]:
        return output_names(item, [image.extension for image in images], step=step)

    async def _write(self, done: _WriteQueue) -> None:
        """Persist finished items in arrival order, in batches: whatever queued up while the last batch was
        written goes into one thread hand-off and one results.jsonl write + fsync (group commit)."""
        unsaved: list[_Finished] = []
        try:
            while batch := await done.take():
                for finished in batch:  # first: a run killed before the records must still know them for its own
                    if names := [name for name, _ in finished.files] + [new for _, new in finished.moves]:
                        self.journal.writing(finished.record["id"], names)
                try:
                    handled, error = await anyio.to_thread.run_sync(self._persist, batch)
                except OSError as exc:
                    handled, error = [], exc
                done.written(batch)
                for finished in handled:
                    self._count(finished)
                if error is not None:
                    unsaved = batch[len(handled) :]
                    # Exit 3, not 1: a cron wrapper must not take a full disk for "some items failed".
                    failure = RunAborted(f"cannot write results into {self.out_dir}: {error}")
                    self.stop(failure, grace_s=0)
                    raise failure from error
        finally:
            _report_unsaved(unsaved + done.stop_writing())

    def _count(self, finished: _Finished) -> None:
        record = finished.record
        if not finished.saved:  # a move that failed: the item keeps its old record, and the run exits 1
            self.stats.failed += 1
            self.stats.failures["write"] += 1
            return
        self.index.add(record)
        if finished.moves:
            self.stats.skipped += 1  # done work under new names: nothing sent, nothing paid
        else:
            self.stats.count(record)
        if self.on_record is not None:
            self.on_record(record)

    def _persist(self, batch: list[_Finished]) -> tuple[list[_Finished], OSError | None]:
        """Write the batch's images, then the records of the items whose images were all written, in one
        append. An item whose image cannot be written gets a failed record instead (and is sent again by the
        next run). Returns the items handled, from the start of the batch (as they are to be counted), and
        the error that stopped the rest: one no other write would escape (a full disk); an error appending
        the records propagates (then none of the batch counts)."""
        handled: list[_Finished] = []
        error = None
        folders: set[str] = set()
        for finished in batch:
            try:
                self._put_files(finished, folders)
                handled.append(finished)
            except OSError as exc:
                if exc.errno in FOLDER_ERRNOS:
                    error = exc
                    break
                handled.append(self._write_failed(finished, exc))
        # The renames are durable only once their folders are: fsync each once per batch, before the
        # records that point at the images (a power cut must not leave a record without its image).
        for folder in folders:
            fsync_dir(folder)
        if records := [finished.record for finished in handled if finished.saved]:
            self.log.append_many(records)
        return handled, error

    def _put_files(self, finished: _Finished, folders: set[str]) -> None:
        """Move and write one item's files; on an error, undo what it did here and raise."""
        undo: list[tuple[str, str | None]] = []  # (path, where it was moved from; None: made here)
        target = ""
        try:
            for old, new in finished.moves:
                src, dst = os.path.join(self.out_dir, old), self._claim(new, finished)
                target = dst
                move_file(src, dst)
                undo.append((dst, src))
                folders.update((os.path.dirname(src), os.path.dirname(dst)))
            for name, data in finished.files:
                target = path = self._claim(name, finished)
                existed = os.path.lexists(path)
                atomic_write(path, data)
                if not existed:
                    undo.append((path, None))
                folders.add(os.path.dirname(path))
        except OSError as exc:
            if not isinstance(exc, FileExistsError) and target:
                exc.filename = target  # the image's name, not its temporary file's
            for done, origin in reversed(undo):
                with contextlib.suppress(OSError):
                    if origin is not None:
                        os.replace(done, origin)
                    else:
                        os.unlink(done)
            raise

    def _claim(self, name: str, finished: _Finished) -> str:
        """The path of *name*; FileExistsError if something is there that nanobatch did not write for this item."""
        path = os.path.join(self.out_dir, name)
        if name not in finished.replaceable and os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "already there, and not written by nanobatch for this item", path)
        return path

    def _write_failed(self, finished: _Finished, exc: OSError) -> _Finished:
        """*finished* with a failed record (its image could not be written), or, for a move, not saved."""
        item_id = finished.record["id"]
        where = str(exc.filename or self.out_dir)
        if isinstance(exc, FileExistsError):
            kind = "output_exists"
            message = f"{where} {_NOT_OURS}: it was left as it is"
        else:
            kind, message = "write", f"cannot write {where}: {exc.strerror or exc}"
        if finished.moves:
            logger.error("%s: its files could not be moved to their new names (%s); they stay where they were",
                         item_id, message)  # fmt: skip
            return dataclasses.replace(finished, saved=False)
        logger.error("%s failed: %s; it will be sent again by the next run", item_id, message)
        record = {**finished.record, "status": "failed", "outputs": [], "error": {
            "kind": kind, "status_code": None, "message": message}}  # fmt: skip
        if record.get("steps"):
            record["steps"] = [{k: v for k, v in step.items() if k != "outputs"} for step in record["steps"]]
        return _Finished(record, [])
