"""The run: one task group of workers that send requests, and one writer that keeps results.

::

    producer --items--> N workers --finished items--> writer
                         (Gate)                        images, results.jsonl

Only the writer touches the output folder's files, and it runs outside the
workers' cancel scope, so whatever finished is written even when the run is
cut short. Only fatal errors stop the run; an item's failure becomes its record.
"""

from __future__ import annotations

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
from ._retry import RetryPolicy, retrying
from .client import GeminiClient
from .errors import ApiError, FatalApiError, RunAborted
from .gemini import Image, Reply, build_request, check_reply, sum_usage
from .inputs import MAX_INPUT_BYTES, InputLoader, image_digest, load_inputs, local_stamps, work_key
from .limits import Gate, Stopped
from .manifest import WorkItem
from .results import IndexEntry, Journal, ResultsIndex, ResultsLog, atomic_write, fsync_dir, is_done

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


def _spare_workers(concurrency: int) -> int:
    """Workers beyond the concurrency limit. The gate still lets at most ``concurrency`` requests out; the
    spare workers read their next item's inputs while all slots are busy, so a freed slot is taken at once
    instead of after a worker-thread hand-off (~10 ms on a busy loop). Each holds one item's inputs."""
    return max(1, concurrency // 8)


@dataclass(frozen=True, slots=True)
class _Finished:
    record: dict[str, Any]
    files: list[tuple[str, bytes]]

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
    ) -> None:
        self.client = client
        self.gate = gate
        self.out_dir = out_dir
        self.index = index
        self.retry = retry
        self.timeout_s = timeout_s
        self.pricing = pricing
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
                logger.error("%s: %s; stopping the run", item.id, exc)
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
                    self.stats.skipped += 1
                    return None
            images = await load_inputs(
                item.inputs, resize=item.resize_inputs, loader=self.inputs, retry=self.retry, contents=contents
            )
            if stamps is None:
                record["key"] = key = work_key(item, [image_digest(image) for image in images])
                if not self._wanted(entry, key):
                    self.stats.skipped += 1
                    return None
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
        return _Finished(record, files)

    async def _send(
        self,
        item: WorkItem,
        instruction: str,
        images: list[Image],
        record: dict[str, Any],
        step: dict[str, Any],
        sent_at: list[float],
    ) -> Reply:
        body = build_request(
            instruction,
            images,
            response_modalities=item.response_modalities,
            aspect_ratio=item.aspect_ratio,
            image_size=item.image_size,
            thinking_level=item.thinking_level,
        )
        pricing = models.pricing_for(item.model, self.pricing)
        _, worst = models.request_cost_range(
            item.model, instruction=instruction, n_images=len(images), image_size=item.image_size, pricing=pricing
        )
        timeout = max(self.timeout_s, 600.0) if item.image_size == "4K" else self.timeout_s

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
                finally:
                    self.stats.in_flight = self.gate.in_flight - 1
                ticket.cost_usd = models.usage_cost(reply.usage, pricing)
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
        stem = item.stem
        if step is not None:
            stem = f"{stem}.step{step}"
        if len(images) == 1:
            return [f"{stem}.{images[0].extension}"]
        return [f"{stem}-{n}.{image.extension}" for n, image in enumerate(images, 1)]

    async def _write(self, done: _WriteQueue) -> None:
        """Persist finished items in arrival order, in batches: whatever queued up while the last batch was
        written goes into one thread hand-off and one results.jsonl write + fsync (group commit)."""
        unsaved: list[_Finished] = []
        try:
            while batch := await done.take():
                try:
                    written, error = await anyio.to_thread.run_sync(self._persist, batch)
                except OSError as exc:
                    written, error = 0, exc
                done.written(batch)
                for finished in batch[:written]:
                    self.index.add(finished.record)
                    self.stats.count(finished.record)
                    if self.on_record is not None:
                        self.on_record(finished.record)
                if error is not None:
                    unsaved = batch[written:]
                    # Exit 3, not 1: a cron wrapper must not take a full disk for "some items failed".
                    failure = RunAborted(f"cannot write results into {self.out_dir}: {error}")
                    self.stop(failure, grace_s=0)
                    raise failure from error
        finally:
            _report_unsaved(unsaved + done.stop_writing())

    def _persist(self, batch: list[_Finished]) -> tuple[int, OSError | None]:
        """Write the batch's images, then the records of the items whose images were all written, in one
        append. Returns how many items (from the start of the batch) are on disk, and the error that
        stopped the rest; an error appending the records propagates (then none of the batch counts)."""
        written, error = 0, None
        folders: set[str] = set()
        try:
            for finished in batch:
                for name, data in finished.files:
                    path = os.path.join(self.out_dir, name)
                    atomic_write(path, data)
                    folders.add(os.path.dirname(path))
                written += 1
        except OSError as exc:
            error = exc
        # The renames are durable only once their folders are: fsync each once per batch, before the
        # records that point at the images (a power cut must not leave a record without its image).
        for folder in folders:
            fsync_dir(folder)
        if written:
            self.log.append_many([finished.record for finished in batch[:written]])
        return written, error
