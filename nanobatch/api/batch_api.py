"""HTTP: Gemini's Batch API and the Files API it reads from, through httpx2.

* :meth:`BatchClient.upload` sends a JSONL file from disk with the resumable
  upload protocol, one chunk in memory at a time; a chunk that fails is resumed
  from the offset the server reports.
* :meth:`BatchClient.create` / :meth:`get` / :meth:`jobs` / :meth:`find` /
  :meth:`cancel` handle jobs (:class:`BatchJob`).
* :meth:`BatchClient.results` streams a results file as :class:`ResultLine` s.

Each call is one attempt (the upload's resume aside): failures come back as
:class:`~nanobatch.errors.ApiError`, classified like ``generateContent``'s.
Creating a job is not idempotent: a create whose reply was lost made a job
anyway, so callers look for it with :meth:`find` before creating again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson

from ..errors import ApiError
from .client import ApiClient, api_error, http_errors
from .decoding import Decoded, decode_text
from .gemini import Reply, redact_reply
from .redaction import StreamCut, public_url, scrubbed_error

__all__ = ["BatchClient", "BatchJob", "ResultLine", "parse_job"]

logger = logging.getLogger("nanobatch")

CHUNK_BYTES = 8 * 1024 * 1024  # a multiple of the protocol's 256 KiB granularity
_UPLOAD_RESUMES = 3
_TIMEOUT = httpx2.Timeout(120.0, connect=20.0)
DONE_STATES = frozenset({"succeeded", "failed", "cancelled", "expired"})
# google.rpc.Code of a results line's error -> the HTTP status the same error has online.
_RPC_TO_HTTP = {1: 499, 3: 400, 4: 504, 5: 404, 7: 403, 8: 429, 9: 400, 13: 500, 14: 503, 16: 401}


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchJob:
    """A batch job as the API last described it. ``state`` is lower case without its prefix
    (``pending``, ``running``, ``succeeded``, ``failed``, ``cancelled``, ``expired``, ``unspecified``)."""

    name: str
    display_name: str
    state: str
    model: str | None = None
    request_count: int = 0
    successful_count: int = 0
    failed_count: int = 0
    pending_count: int = 0
    responses_file: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultLine:
    """One line of a results file: the answer to the request sent under ``key``, or its error."""

    key: str | None
    reply: Reply | None = None
    error: ApiError | None = None


def parse_job(data: Mapping[str, Any]) -> BatchJob:
    """A :class:`BatchJob` from an operation (``{"name", "metadata": {...}, "response"|"error"}``).

    Takes ``BATCH_STATE_*`` and ``JOB_STATE_*`` states, and counts as strings or numbers.

    >>> parse_job({"name": "batches/1", "metadata": {"state": "BATCH_STATE_RUNNING",
    ...            "batchStats": {"requestCount": "3"}}}).request_count
    3
    """
    meta = _mapping(data.get("metadata")) or data
    stats = _mapping(meta.get("batchStats"))
    output = _mapping(meta.get("output")) or _mapping(data.get("response"))
    responses_file = output.get("responsesFile")
    error = data.get("error")
    state = str(meta.get("state") or "unspecified")
    for prefix in ("BATCH_STATE_", "JOB_STATE_"):
        state = state.removeprefix(prefix)
    return BatchJob(
        name=str(data.get("name") or meta.get("name") or ""),
        display_name=str(meta.get("displayName") or ""),
        state=state.lower(),
        model=str(meta["model"]) if meta.get("model") else None,
        request_count=_count(stats, "requestCount"),
        successful_count=_count(stats, "successfulRequestCount"),
        failed_count=_count(stats, "failedRequestCount"),
        pending_count=_count(stats, "pendingRequestCount"),
        responses_file=str(responses_file) if responses_file else None,
        error=str(error.get("message") or error) if isinstance(error, Mapping) else None,
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _count(stats: Mapping[str, Any], name: str) -> int:
    try:
        return int(stats.get(name) or 0)
    except (TypeError, ValueError):
        return 0


class BatchClient(ApiClient):
    """An async client for the Batch and Files APIs at *base_url* (auth as :class:`~nanobatch.api.client.GeminiClient`).

    >>> async with BatchClient(base_url=url, api_key=key) as batches:
    ...     file_name = await batches.upload(Path("chunk-0.jsonl"), display_name="run-1 chunk 0")
    ...     job = await batches.create("gemini-3.1-flash-image", file_name=file_name, display_name="run-1 chunk 0")
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        auth: str = "bearer",
        api_version: str = "v1beta",
        chunk_bytes: int = CHUNK_BYTES,
        transport: httpx2.AsyncBaseTransport | None = None,
        workers: int | None = 0,
        spool: str | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url, api_key=api_key, auth=auth, transport=transport, timeout=_TIMEOUT, workers=workers,
            spool=spool,
        )  # fmt: skip  # big results lines decoded in worker processes, their images written into *spool*
        self._version = api_version.strip("/")
        self._chunk_bytes = chunk_bytes

    # -- files ------------------------------------------------------------------

    async def upload(self, path: Path, *, display_name: str, mime_type: str = "application/jsonl") -> str:
        """Upload *path* in chunks and return the file's name (``files/...``)."""
        size = (await anyio.Path(path).stat()).st_size
        start = await self._send(
            "POST", f"/upload/{self._version}/files",
            json={"file": {"displayName": display_name, "mimeType": mime_type}},
            headers={"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                     "X-Goog-Upload-Header-Content-Length": str(size), "X-Goog-Upload-Header-Content-Type": mime_type},
        )  # fmt: skip
        url = start.headers.get("x-goog-upload-url")
        if not url:
            raise ApiError(
                f"{self.where} did not start an upload (no x-goog-upload-url header): it may not offer "
                "the Files API that batches need",
                kind="bad_response",
            )
        async with await anyio.open_file(path, "rb") as handle:
            for _attempt in range(_UPLOAD_RESUMES + 1):
                try:
                    return await self._send_chunks(url, handle, size)
                except ApiError as exc:
                    if not exc.retryable:
                        raise
                    logger.info("upload of %s interrupted (%s); resuming", path, exc)
                    query = await self._send("POST", url, headers={"X-Goog-Upload-Command": "query"})
                    if query.headers.get("x-goog-upload-status") == "final":  # only the last reply was lost
                        return _file_name(query)
                    await handle.seek(int(query.headers.get("x-goog-upload-size-received", 0)))
        raise ApiError(f"the upload of {path} failed {_UPLOAD_RESUMES + 1} times", kind="connection", retryable=True)

    async def _send_chunks(self, url: str, handle: Any, size: int) -> str:
        offset = await handle.tell()
        while True:
            chunk = await handle.read(self._chunk_bytes)
            last = offset + len(chunk) >= size
            response = await self._send(
                "POST", url, content=chunk,
                headers={"X-Goog-Upload-Command": "upload, finalize" if last else "upload",
                         "X-Goog-Upload-Offset": str(offset)},
            )  # fmt: skip
            offset += len(chunk)
            status = response.headers.get("x-goog-upload-status")
            if last or status != "active":
                if status != "final":
                    raise ApiError(f"the upload ended with status {status!r}, not 'final'", kind="bad_response")
                return _file_name(response)

    async def delete_file(self, name: str) -> None:
        """Delete a file; one that is already gone (403/404, as the API answers) is fine."""
        await self._send("DELETE", f"/{self._version}/{_files(name)}", missing_ok=True)

    async def results(self, file_name: str) -> AsyncIterator[ResultLine]:
        """The lines of a results file, parsed one at a time as they arrive."""
        url = f"/download/{self._version}/{_files(file_name)}:download"
        with http_errors(self._secret, self.where):
            async with self._http.stream("GET", url, params={"alt": "media"}) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise api_error(response, self._secret)
                pending = b""
                async for data in response.aiter_bytes():
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield self._result(line)
                if pending.strip():
                    yield self._result(pending)

    async def download(self, file_name: str, path: Path) -> None:
        """Stream a results file to *path* on disk (written whole, then renamed into place), without the key: an
        answer that quotes it (a proxy's error line) does not put it into the output folder."""
        url = f"/download/{self._version}/{_files(file_name)}:download"
        partial = path.with_name(path.name + ".part")
        cut = StreamCut(self._secret)
        with http_errors(self._secret, self.where):
            async with self._http.stream("GET", url, params={"alt": "media"}) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise api_error(response, self._secret)
                async with await anyio.open_file(partial, "wb") as handle:
                    async for data in response.aiter_bytes():
                        await handle.write(cut.feed(data))
                    await handle.write(cut.end())
        partial.replace(path)

    def result_line(self, line: bytes) -> ResultLine:
        """One line of a results file, parsed and classified (see :meth:`results`)."""
        return self._result(line)

    async def decode_line(self, line: bytes) -> ResultLine:
        """:meth:`result_line`, a big answer decoded in a worker process (``limits.workers``)."""
        return self._result(line, await self.decoder.result(line))

    def _result(self, line: bytes, decoded: Decoded = None) -> ResultLine:
        if decoded is None:  # not decoded in a worker: here, its images from the line's bytes (as a worker does)
            decoded = decode_text("line", line, len(line))
        if decoded is not None:
            key, reply = decoded
            if isinstance(reply, ApiError):  # one malformed answer is that line's failure, not the file's
                return ResultLine(key=key, error=reply)
            return ResultLine(key=key, reply=redact_reply(reply, self._secret))
        try:  # a line without an answer: why
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            error = ApiError(f"a results line is not a JSON object: {line[:80]!r}", kind="bad_response")
            return ResultLine(key=None, error=error)
        key = None if data.get("key") is None else str(data["key"])
        status = _mapping(data.get("error")) or {"message": "the line has neither a response nor an error"}
        code = status.get("code")
        http = _RPC_TO_HTTP.get(code if isinstance(code, int) else 13, 500)
        body = orjson.dumps({"error": {**status, "code": http}})
        error = scrubbed_error(http, {}, body, self._secret, one_request=True)  # that request's, not the run's
        return ResultLine(key=key, error=error)

    # -- jobs -------------------------------------------------------------------

    async def create(self, model: str, *, file_name: str, display_name: str) -> BatchJob:
        """Create a job over an uploaded file. Not idempotent: see :meth:`find`."""
        body = {"batch": {"displayName": display_name, "inputConfig": {"fileName": file_name}}}
        response = await self._send("POST", f"/{self._version}/models/{model}:batchGenerateContent", json=body)
        return parse_job(_json(response))

    async def get(self, name: str) -> BatchJob:
        return parse_job(_json(await self._send("GET", f"/{self._version}/{_batches(name)}")))

    async def jobs(self, *, page_size: int = 100) -> AsyncIterator[BatchJob]:
        """Every job of the project (newest first, as the API lists them), page by page."""
        token: str | None = None
        while True:
            params: dict[str, str | int] = {"pageSize": page_size, **({"pageToken": token} if token else {})}
            data = _json(await self._send("GET", f"/{self._version}/batches", params=params))
            for operation in data.get("operations") or []:
                yield parse_job(operation)
            token = data.get("nextPageToken")
            if not token:
                return

    async def find(self, display_name: str) -> list[BatchJob]:
        """The jobs named *display_name*: how a create whose reply was lost is found again."""
        return [job async for job in self.jobs() if job.display_name == display_name]

    async def cancel(self, name: str) -> None:
        await self._send("POST", f"/{self._version}/{_batches(name)}:cancel")

    async def delete_job(self, name: str) -> None:
        await self._send("DELETE", f"/{self._version}/{_batches(name)}", missing_ok=True)

    async def _send(self, method: str, url: str, *, missing_ok: bool = False, **kwargs: Any) -> httpx2.Response:
        with http_errors(self._secret, self.where):
            response = await self._http.request(method, url, **kwargs)
        if response.status_code == 200 or (missing_ok and response.status_code in (403, 404)):
            return response
        raise api_error(response, self._secret)


def _json(response: httpx2.Response) -> dict[str, Any]:
    """The JSON object a 200 carries; anything else (a proxy's page) is an error naming the endpoint."""
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(
            f"{response.request.method} {public_url(response.request.url)} answered 200 without a JSON object: "
            "the endpoint may not offer the Batch API (hint: use --tier flex there)",
            kind="bad_response",
            status_code=200,
        )
    return data


def _file_name(response: httpx2.Response) -> str:
    """The ``files/...`` name in the answer to a finished upload."""
    try:
        name = orjson.loads(response.content)["file"]["name"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        name = None
    if not isinstance(name, str) or not name:
        raise ApiError("the finished upload's answer names no file", kind="bad_response")
    return name


def _files(name: str) -> str:
    return name if name.startswith("files/") else f"files/{name}"


def _batches(name: str) -> str:
    return name if name.startswith("batches/") else f"batches/{name}"
