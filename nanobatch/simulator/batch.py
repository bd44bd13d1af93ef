"""The Batch API of the simulator: ``batchGenerateContent``, batches get/list/cancel/delete.

A job is an operation ``{"name": "batches/ID", "metadata": {...}, "done", "response"|"error"}``
(the shape the google-genai SDK reads). It is ``BATCH_STATE_PENDING`` for the
first tenth of ``batch_latency_s`` (times ``time_scale``), then ``RUNNING``,
then done. When it is first seen done, its input file is read line by line and
each ``{"key", "request"}`` is answered by the same code as ``generateContent``;
the results file (``{"key", "response"}`` or ``{"key", "error"}`` per line, not
in input order) is written to disk and named in ``output.responsesFile``.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..models import ModelInfo, lookup
from ._fetch import fetch_files
from .config import SimulatorConfig
from .errors import InvalidRequest, google_error
from .faults import Draw, draw
from .files import FILE_LIFETIME_S, FileStore, StoredFile, paginate, rfc3339
from .responses import Usage
from .validation import ParsedRequest, parse_request

__all__ = ["BatchService"]

logger = logging.getLogger("nanobatch.simulator")

_METADATA_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
_TERMINAL = {"failed": 13, "expired": 4, "cancelled": 1}  # state -> google.rpc code of the operation's error
_JOB_ERRORS = {
    "failed": "The batch job failed: an internal error occurred while processing it.",
    "expired": "The batch job expired: it did not finish within 48 hours.",
    "cancelled": "The batch job was cancelled.",
}
# Transport faults of the online simulator, as a batch line's google.rpc.Status.
_LINE_ERRORS = {
    "429": (8, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    "503": (14, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    "500": (13, "INTERNAL", "An internal error has occurred."),
    "504": (4, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
    "drop": (13, "INTERNAL", "An internal error has occurred."),
}
_SHUFFLE_BLOCK = 64  # results are written in reversed blocks: "in any order", without holding a file in memory
Compose = Callable[[ParsedRequest, Draw], Awaitable[tuple[dict[str, Any], Usage]]]


@dataclass(slots=True, kw_only=True)
class _Job:
    id: str
    display_name: str
    model: ModelInfo
    model_id: str
    input_file: str
    created: datetime
    created_at: float
    fate: str  # succeeded, failed or expired: drawn at creation
    state: str = "pending"
    ended: datetime | None = None
    output_file: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"request": 0, "successful": 0, "failed": 0})
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def name(self) -> str:
        return f"batches/{self.id}"


class BatchService:
    """Batch jobs and the files they read and write.

    *guard* wraps each endpoint (auth, counters); *compose* answers one parsed request.
    """

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        compose: Compose,
        guard: Callable[[Callable[[Request], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self._compose = compose
        self._guard = guard
        self._clock = clock
        self._rng = random.Random(f"batch-{config.seed}")
        self._jobs: dict[str, _Job] = {}
        self._epoch: tuple[float, datetime] | None = None
        # Files are deleted after 48 hours; time_scale 0 ("never wait") keeps them.
        lifetime_s = FILE_LIFETIME_S * config.time_scale if config.time_scale > 0 else float("inf")
        self.files = FileStore(clock, self._wall, lifetime_s=lifetime_s)

    def routes(self) -> list[Route]:
        g = self._guard
        return [
            Route("/upload/{version}/files", g(self.files.upload), methods=["POST"]),
            Route("/download/{version}/files/{target}", g(self.files.download_route), methods=["GET"]),
            Route("/{version}/files", g(self.files.list_files), methods=["GET"]),
            Route("/{version}/files/{target}", g(self.files.file), methods=["GET", "DELETE"]),
            Route("/{version}/models/{model}:batchGenerateContent", g(self.create), methods=["POST"]),
            Route("/{version}/batches", g(self.list_jobs), methods=["GET"]),
            Route("/{version}/batches/{target}", g(self.batch), methods=["GET", "POST", "DELETE"]),
        ]

    def _wall(self) -> datetime:
        """Wall-clock time that moves with the simulator's clock (a virtual one in tests)."""
        now = self._clock()
        if self._epoch is None:
            self._epoch = (now, datetime.now().astimezone())
        start, wall = self._epoch
        return wall + timedelta(seconds=now - start)

    # -- endpoints --------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        """``POST /{version}/models/{model}:batchGenerateContent``: a job over an uploaded JSONL file."""
        model_id = request.path_params["model"].removeprefix("models/")
        model = lookup(model_id)
        if model is None:
            return google_error(404, f"models/{model_id} is not found for batchGenerateContent.")
        try:
            batch = json.loads(await request.body())["batch"]
            display_name = batch["displayName"]
            input_config = batch["inputConfig"]
        except (ValueError, KeyError, TypeError):
            return google_error(400, 'Invalid JSON payload: expected {"batch": {"displayName", "inputConfig"}}.')
        if not isinstance(display_name, str) or not display_name.strip():
            return google_error(400, "batch.displayName is required.")
        file_name = input_config.get("fileName") if isinstance(input_config, dict) else None
        if not isinstance(file_name, str):
            return google_error(400, "The simulator takes batch.inputConfig.fileName (inline requests are not served).")
        stored = self.files.get(file_name)
        if stored is None or not stored.finalized:
            return google_error(400, f"File {file_name} not found, or its upload is not finished.")
        job = self._new_job(display_name, model, model_id, stored)
        if self._rng.random() < self.config.batch_rate_lost_create:
            logger.debug("batch %s created, its reply lost (fault)", job.name)
            return google_error(500, "An internal error has occurred. Please retry.")
        return JSONResponse(self._operation(job))

    async def batch(self, request: Request) -> Response:
        """``GET|DELETE /{version}/batches/{id}`` and ``POST /{version}/batches/{id}:cancel``."""
        job_id, _, method = request.path_params["target"].partition(":")
        job = self._jobs.get(job_id)
        if job is None:
            return google_error(404, f"Batch batches/{job_id} not found.")
        if request.method == "POST" and method == "cancel":
            await self._advance(job)
            if job.state in ("pending", "running"):
                self._end(job, "cancelled")
            return JSONResponse({})
        if method or request.method == "POST":
            return google_error(404, f"batches/{job_id}:{method} is not supported by the simulator")
        if request.method == "DELETE":
            del self._jobs[job_id]
            return JSONResponse({})
        await self._advance(job)
        return JSONResponse(self._operation(job))

    async def list_jobs(self, request: Request) -> Response:
        """``GET /{version}/batches?pageSize=&pageToken=``: newest first, as ``{"operations": [...]}``."""
        ids = list(reversed(self._jobs))  # created in this order
        page, token = paginate(ids, request, default_size=50, max_size=1000)
        operations = []
        for job_id in page:
            await self._advance(self._jobs[job_id])
            operations.append(self._operation(self._jobs[job_id]))
        body: dict[str, Any] = {"operations": operations}
        if token:
            body["nextPageToken"] = token
        return JSONResponse(body)

    # -- the job's life ---------------------------------------------------------

    def _new_job(self, display_name: str, model: ModelInfo, model_id: str, stored: StoredFile) -> _Job:
        roll = self._rng.random()
        fate = "failed" if roll < self.config.batch_rate_failed else "succeeded"
        if fate == "succeeded" and roll < self.config.batch_rate_failed + self.config.batch_rate_expired:
            fate = "expired"
        job = _Job(
            id=secrets.token_hex(8), display_name=display_name, model=model, model_id=model_id, input_file=stored.name,
            created=self._wall(), created_at=self._clock(), fate=fate,
        )  # fmt: skip
        job.counts["request"] = sum(1 for line in self.files.lines(stored) if line.strip())
        self._jobs[job.id] = job
        logger.debug("batch %s created: %d requests, will end %s", job.name, job.counts["request"], fate)
        return job

    async def _advance(self, job: _Job) -> None:
        """Move *job* along to where the clock says it is; answer its lines when it first finishes."""
        if job.state not in ("pending", "running"):
            return
        latency = self.config.batch_latency_s * self.config.time_scale
        elapsed = self._clock() - job.created_at
        if elapsed < latency:
            job.state = "pending" if elapsed < latency / 10 else "running"
            return
        async with job.lock:
            if job.state not in ("pending", "running"):
                return
            if job.fate != "succeeded":
                self._end(job, job.fate)
                return
            stored = self.files.get(job.input_file)
            if stored is None:  # deleted while the job waited: nothing to read
                self._end(job, "failed")
                return
            job.output_file = await self._answer_all(job, stored)
            self._end(job, "succeeded")

    def _end(self, job: _Job, state: str) -> None:
        job.state = state
        job.ended = self._wall()

    async def _answer_all(self, job: _Job, stored: StoredFile) -> str:
        output = self.files.new(
            display_name=f"batch-{job.id}", mime_type="application/jsonl", size=0, source="GENERATED"
        )
        block: list[bytes] = []
        with output.path.open("ab") as handle:
            for raw in self.files.lines(stored):
                if not raw.strip():
                    continue
                line = await self._answer(job, raw)
                block.append(json.dumps(line, separators=(",", ":")).encode() + b"\n")
                if len(block) >= _SHUFFLE_BLOCK:
                    self._flush(handle, output, block)
            self._flush(handle, output, block)
        output.declared_size = output.received
        output.finalized = True
        return output.name

    @staticmethod
    def _flush(handle: Any, output: StoredFile, block: list[bytes]) -> None:
        for data in reversed(block):
            handle.write(data)
            output.sha256.update(data)
            output.received += len(data)
        block.clear()

    async def _answer(self, job: _Job, raw: bytes) -> dict[str, Any]:
        """One results line for one input line: ``{"key", "response"}`` or ``{"key", "error"}``."""
        try:
            line = json.loads(raw)
            key, request = line.get("key"), line["request"]
            if not isinstance(request, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            job.counts["failed"] += 1
            return {"error": _status(3, "INVALID_ARGUMENT", 'Each line must be {"key": ..., "request": {...}}.')}
        result: dict[str, Any] = {} if key is None else {"key": key}
        chance = draw(self.config, self._rng)
        if self._rng.random() < self.config.batch_rate_line_error:
            chance_error: tuple[int, str, str] | None = _LINE_ERRORS["500"]
        else:
            chance_error = _LINE_ERRORS.get(chance.fault or "")
        try:
            parsed = parse_request(json.dumps(request).encode(), model=job.model, model_id=job.model_id)
            parsed = await fetch_files(parsed)  # as online: fileData URLs on this machine are fetched
            if chance_error is not None:
                result["error"] = _status(*chance_error)
            else:
                result["response"], _usage = await self._compose(parsed, chance)
        except InvalidRequest as exc:
            result["error"] = _status(3, "INVALID_ARGUMENT", exc.message)
        job.counts["failed" if "error" in result else "successful"] += 1
        return result

    def _operation(self, job: _Job) -> dict[str, Any]:
        done = job.state not in ("pending", "running")
        counts = job.counts
        stats = {"requestCount": str(counts["request"])}
        if done:
            stats.update(successfulRequestCount=str(counts["successful"]), failedRequestCount=str(counts["failed"]))
            if job.state != "succeeded":
                stats["pendingRequestCount"] = str(counts["request"] - counts["successful"] - counts["failed"])
        else:
            stats["pendingRequestCount"] = str(counts["request"])
        metadata: dict[str, Any] = {
            "@type": _METADATA_TYPE,
            "model": f"models/{job.model_id}",
            "displayName": job.display_name,
            "inputConfig": {"fileName": job.input_file},
            "createTime": rfc3339(job.created),
            "updateTime": rfc3339(job.ended or job.created),
            "batchStats": stats,
            "state": f"BATCH_STATE_{job.state.upper()}",
            "name": job.name,
        }
        operation: dict[str, Any] = {"name": job.name, "metadata": metadata}
        if job.ended is not None:
            metadata["endTime"] = rfc3339(job.ended)
            operation["done"] = True
        if job.output_file is not None:
            metadata["output"] = {"responsesFile": job.output_file}
            operation["response"] = {"@type": _OUTPUT_TYPE, "responsesFile": job.output_file}
        elif done:
            operation["error"] = {"code": _TERMINAL[job.state], "message": _JOB_ERRORS[job.state]}
        return operation


def _status(code: int, status: str, message: str) -> dict[str, Any]:
    """A google.rpc.Status, as batch results carry per-line errors."""
    return {"code": code, "message": message, "status": status}
