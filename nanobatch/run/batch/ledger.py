"""The batch tier's ledger: ``.nanobatch-batches/batches.jsonl`` in the output folder, and what ``nanobatch
status`` and ``cancel`` read from it. One line per step of each chunk (see :mod:`nanobatch.run.batch.route`),
written before and after it happens::

    written {chunk, model, display, path, keys}   the chunk file is complete on disk
    uploaded {chunk, file}                       the Files API holds it
    creating {chunk}                             a create is about to be sent
    created {chunk, job}                         the job exists
    state {chunk, state, counts}                 the job's state changed (for `nanobatch status`)
    collected {chunk, results} | ended {chunk, state}   its results are on disk / it ended without any
    indexed {chunk, offsets}                     where each key's answer is in the results file
    landed {chunk, keys}                         these answers are in records (never read again)
    counted {chunk, keys, run}                   these answers are in a record of *run* that could not write
                                                 their images (kept; the record that writes them refers to it)
    closed {chunk}                               every answer is landed or not wanted; local files deleted

A chunk's results file is kept until each answer in it is landed (its item's record written) or no longer
wanted: an answer a run could not land (its item's next step waits in a later job, or the run was killed) is
read again by the next run, never paid for again.

Kept free of the HTTP stack and pydantic: ``nanobatch status`` loads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import anyio
import orjson

from ...errors import ApiError
from ...names import BATCH_FOLDER, LEDGER_FILE
from ...output.files import atomic_write
from ...output.own import open_own
from ..route import Step

if TYPE_CHECKING:
    from ...api.batch_api import BatchClient, BatchJob

__all__ = ["Cancel", "Chunk", "Ledger", "answers_kept", "answers_to_come", "cancel_jobs", "job_counts", "open_chunks"]


@dataclass(slots=True)
class Chunk:
    """One JSONL file of requests and the job that answers it, as the ledger tells it."""

    id: str
    model: str
    display: str
    path: str
    keys: list[str]
    file: str | None = None
    job: str | None = None
    results: str | None = None
    ended: str | None = None
    closed: bool = False
    state: str = "written"
    counts: dict[str, int] = field(default_factory=dict)
    settled: anyio.Event = field(default_factory=anyio.Event)
    outcome: BaseException | None = None
    offsets: dict[str, int] = field(default_factory=dict)  # where each key's answer is in the results file
    requests: dict[str, int] | None = None  # where each key's request is in the chunk file (None: not read yet)
    indexed: bool = False  # offsets is known (from the ledger: a results file is not read twice for it)
    landed: set[str] = field(default_factory=set)  # keys whose answers are landed: no longer kept for them
    # keys whose answers a record counted (and paid) already, and its run: kept, its image not written
    counted: dict[str, str] = field(default_factory=dict)
    collected_before: bool = False  # its results were collected by an earlier run (read from the ledger)
    collected_at: float | None = None  # when (Unix time; None: a ledger from before it said, or not collected)

    @property
    def open(self) -> bool:
        """Not collected yet: its requests may still be answered (and paid for) by its job."""
        return not self.closed and self.results is None and self.ended is None


class Ledger:
    """``batches.jsonl``: one line per step of each chunk, written before the next step (see the module doc)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LEDGER_FILE
        self._file: IO[bytes] | None = None

    def load(self) -> dict[str, Chunk]:
        chunks: dict[str, Chunk] = {}
        if not self.path.exists():
            return chunks
        with self.path.open("rb") as lines:
            for line in lines:
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line torn by a kill: its step is redone (each is safe to redo)
                _apply(chunks, event)
        return chunks

    def note(self, event: str, chunk: Chunk, **fields: Any) -> None:
        """Append one line, written whole to the kernel (unbuffered: nothing is left to flush at close, which a
        full disk would refuse); on disk before the API's own copy of what it says goes (:data:`_DURABLE`)."""
        if self._file is None:
            self._file = self._open()
        view = memoryview(orjson.dumps({"event": event, "chunk": chunk.id, **fields}) + b"\n")
        while view:
            view = view[self._file.write(view) or 0 :]
        if event in _DURABLE:
            os.fsync(self._file.fileno())

    def _open(self) -> IO[bytes]:
        self.folder.mkdir(exist_ok=True)
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as last:
                last.seek(-1, os.SEEK_END)
                torn = last.read(1) != b"\n"
        handle = os.fdopen(open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab", buffering=0)
        if torn:  # a line cut short by a full disk or a kill: the next one must not be glued to it
            handle.write(b"\n")
        return handle

    def compact(self, live: set[str]) -> None:
        """Rewrite the ledger with the lines of the *live* chunks only: a closed chunk's lines are history, and
        a folder that always has a job open (nightly --no-wait) would otherwise keep every night's."""
        with self.path.open("rb") as lines:
            kept = [line.rstrip(b"\n") + b"\n" for line in lines if _chunk_of(line) in live]
        atomic_write(self.path, b"".join(kept))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _chunk_of(line: bytes) -> str | None:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return str(event.get("chunk")) if isinstance(event, dict) else None


# Lines on disk before the next step: "creating" (and with it the chunk's "written" and "uploaded" before it),
# before a job that bills its requests may exist: a power cut that lost it would leave a run that knows no chunk,
# which sweeps the file and sends its items again, paid twice; and the lines written just before the run deletes
# the API's files they stand for (the ledger must not say less than the API has forgotten).
_DURABLE = frozenset({"creating", "created", "collected", "ended"})


def _apply(chunks: dict[str, Chunk], event: dict[str, Any]) -> None:
    kind, chunk = event.get("event"), chunks.get(str(event.get("chunk")))
    if kind == "written":
        chunks[event["chunk"]] = Chunk(id=event["chunk"], model=event["model"], display=event["display"],
                                       path=event["path"], keys=list(event["keys"]))  # fmt: skip
    elif chunk is None:
        return
    elif kind == "uploaded":
        chunk.file, chunk.state = event["file"], "uploaded"
    elif kind == "created":
        chunk.job, chunk.state = event["job"], "pending"
    elif kind == "state":
        chunk.state, chunk.counts = event["state"], dict(event.get("counts") or {})
    elif kind == "collected":
        chunk.results, chunk.state = event["results"], event.get("state", "succeeded")
        chunk.collected_before = True  # the ledger is loaded as a run starts: that was an earlier run
        chunk.collected_at = float(event["at"]) if isinstance(event.get("at"), int | float) else None
    elif kind == "indexed":
        chunk.offsets, chunk.indexed = {str(k): int(v) for k, v in dict(event["offsets"]).items()}, True
    elif kind == "ended":
        chunk.ended = chunk.state = event["state"]
    elif kind == "closed":
        chunk.closed = True
    elif kind == "landed":
        chunk.landed.update(str(key) for key in event.get("keys") or ())
    elif kind == "counted":
        for key in event.get("keys") or ():
            chunk.counted.setdefault(str(key), str(event.get("run")))


def answers_to_come(folder: Path) -> bool:
    """Whether the batch *folder* has a chunk not closed: a job that may still answer, or answers on disk not
    landed yet. Then every run of its output folder, whatever its tier, collects them (nothing is sent twice)."""
    return any(not chunk.closed for chunk in Ledger(folder).load().values())


def answers_kept(out_dir: Path, written: Callable[[str, str | None], bool]) -> int:
    """How many answers of *out_dir*'s batch jobs are on disk, collected (and paid for) but not written yet (the
    run that collected them ended first): the next run writes them without paying again. *written(item, work
    key)* says whether the item's record for that work is written."""
    kept = 0
    for chunk in Ledger(out_dir / BATCH_FOLDER).load().values():
        if chunk.results is not None and not chunk.closed:
            for key in chunk.keys:
                step = Step.from_key(key)
                kept += not written(step.item, step.work_key)
    return kept


def open_chunks(out_dir: Path) -> list[Chunk]:
    """The chunks of *out_dir* whose jobs may still answer (for ``nanobatch status`` and ``cancel``)."""
    return [chunk for chunk in Ledger(out_dir / BATCH_FOLDER).load().values() if chunk.open]


class Cancel(NamedTuple):
    """What ``nanobatch cancel`` did with one job."""

    name: str
    state: str  # after the cancel, noted in the ledger (``succeeded``: it was done first)
    refused: ApiError | None  # the error that refused the cancel of a job still running
    ended_before: bool = False  # an earlier cancel or run saw it end: not asked again


async def cancel_jobs(out_dir: Path, client: BatchClient) -> list[Cancel]:
    """Cancel the open jobs of *out_dir* (also one whose create reply was lost), each noted in the ledger
    (``nanobatch status`` shows it); the next run collects them and sends their unanswered items again. A cancel
    refused (a job that ended since a run last saw it, which an API may refuse to cancel; a passing error) does
    not keep the other jobs from being cancelled. A job the ledger says ended (cancelled by an earlier
    ``cancel``) is not asked again."""
    from ...api.batch_api import DONE_STATES  # not at the top: status reads the ledger without the HTTP stack

    ledger = Ledger(out_dir / BATCH_FOLDER)
    cancelled: list[Cancel] = []
    try:
        for chunk in [chunk for chunk in ledger.load().values() if chunk.open]:
            if chunk.job and chunk.state in DONE_STATES:
                cancelled.append(Cancel(chunk.job, chunk.state, None, ended_before=True))
                continue
            names = [chunk.job] if chunk.job else [job.name for job in await client.find(chunk.display)]
            if names and chunk.job is None:
                ledger.note("created", chunk, job=names[-1])  # the first create's (listed newest first)
            for name in names:
                refused = None
                try:
                    await client.cancel(name)
                except ApiError as exc:
                    refused = exc
                state = await _note_cancelled(ledger, chunk, client, name, asked=refused is None)
                cancelled.append(Cancel(name, state, refused if state not in DONE_STATES else None))
    finally:
        ledger.close()
    return cancelled


async def _note_cancelled(ledger: Ledger, chunk: Chunk, client: BatchClient, name: str, *, asked: bool) -> str:
    """The job's state once cancelled (``cancelled``, or how it ended if it was done first), into the ledger;
    *asked*: whether the cancel was taken (else the state is only looked at, and noted if it can be read)."""
    try:
        job = await client.get(name)
    except ApiError:
        if not asked:
            return chunk.state or "unknown"
        ledger.note("state", chunk, state="cancelling", counts=chunk.counts)  # asked: its end is seen next run
        return "cancelling"
    ledger.note("state", chunk, state=job.state, counts=job_counts(job))
    return job.state


def job_counts(job: BatchJob) -> dict[str, int]:
    """A job's request counts as the ledger keeps them (and ``nanobatch status`` shows them)."""
    return {"requests": job.request_count, "succeeded": job.successful_count, "failed": job.failed_count,
            "pending": job.pending_count}  # fmt: skip
