"""The Files API of the simulator: resumable upload, get, list, delete, download.

Files live on disk in a private temporary folder (made at the first file, removed with the app), so a
big batch costs the simulator disk, not memory. The wire format follows the
google-genai SDK: ``POST /upload/v1beta/files`` with ``X-Goog-Upload-Protocol:
resumable`` and ``X-Goog-Upload-Command: start`` answers with an
``x-goog-upload-url``; chunks go there with ``upload`` (``x-goog-upload-status:
active``) and the last with ``upload, finalize`` (``final``, body ``{"file":
{...}}``); ``query`` tells how much arrived.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from .errors import google_error

__all__ = ["FileStore", "StoredFile", "rfc3339"]

MAX_FILE_BYTES = 2 * 1024**3
MAX_PROJECT_BYTES = 20 * 1024**3
FILE_LIFETIME_S = 48 * 3600.0
UPLOAD_GRANULARITY = 256 * 1024


def rfc3339(moment: datetime) -> str:
    """Google's timestamp form: UTC, microseconds, ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(slots=True, kw_only=True)
class StoredFile:
    """One file's metadata; its bytes are at ``path``."""

    id: str
    path: Path
    display_name: str | None
    mime_type: str
    declared_size: int
    source: str  # UPLOADED or GENERATED
    created: datetime
    expires_at: float  # on the simulator's clock
    received: int = 0
    finalized: bool = False
    sha256: Any = field(default_factory=hashlib.sha256)

    @property
    def name(self) -> str:
        return f"files/{self.id}"

    def resource(self, base_url: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "mimeType": self.mime_type,
            "sizeBytes": str(self.received),
            "createTime": rfc3339(self.created),
            "updateTime": rfc3339(self.created),
            "expirationTime": rfc3339(self.created + timedelta(seconds=FILE_LIFETIME_S)),
            "sha256Hash": base64.b64encode(self.sha256.hexdigest().encode()).decode(),
            "uri": f"{base_url}v1beta/{self.name}",
            "state": "ACTIVE" if self.finalized else "PROCESSING",
            "source": self.source,
        }
        if self.display_name:
            body["displayName"] = self.display_name
        if self.source == "GENERATED":
            body["downloadUri"] = f"{base_url}download/v1beta/{self.name}:download?alt=media"
        return body


class FileStore:
    """Files by id, on disk; *clock* (simulated seconds) decides when a file expires."""

    def __init__(self, clock: Callable[[], float], wall: Callable[[], datetime], lifetime_s: float) -> None:
        self._clock = clock
        self._wall = wall
        self._lifetime_s = lifetime_s
        self._files: dict[str, StoredFile] = {}
        self._uploads: dict[str, str] = {}  # upload id -> file id
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        """The store's private folder, made at the first file: a simulator that stores none leaves nothing
        behind, even when its process is killed."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="nanobatch-sim-files-"))
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        return self._folder

    # -- the store --------------------------------------------------------------

    def new(self, *, display_name: str | None, mime_type: str, size: int, source: str) -> StoredFile:
        file_id = secrets.token_hex(6)
        stored = StoredFile(
            id=file_id, path=self.folder / file_id, display_name=display_name, mime_type=mime_type,
            declared_size=size, source=source, created=self._wall(), expires_at=self._clock() + self._lifetime_s,
        )  # fmt: skip
        stored.path.touch()
        self._files[file_id] = stored
        return stored

    def get(self, name: str) -> StoredFile | None:
        """The live file named ``files/ID`` (or ``ID``), None when missing or expired."""
        file_id = name.removeprefix("files/")
        stored = self._files.get(file_id)
        if stored is not None and self._clock() >= stored.expires_at:
            self.remove(file_id)
            return None
        return stored

    def remove(self, file_id: str) -> None:
        stored = self._files.pop(file_id, None)
        if stored is not None:
            stored.path.unlink(missing_ok=True)

    def lines(self, stored: StoredFile) -> Iterator[bytes]:
        """The file's lines, read as a stream."""
        with stored.path.open("rb") as handle:
            yield from handle

    def used_bytes(self) -> int:
        return sum(max(f.received, f.declared_size) for f in self._files.values())

    # -- HTTP -------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        """``POST /upload/{version}/files``: start a resumable upload, or take a chunk of one."""
        upload_id = request.query_params.get("upload_id")
        if upload_id is None:
            return await self._start(request)
        file_id = self._uploads.get(upload_id)
        stored = self.get(file_id) if file_id else None
        if stored is None:
            return google_error(404, "Upload session not found or expired.")
        command = {part.strip() for part in request.headers.get("x-goog-upload-command", "").lower().split(",")}
        if command == {"query"}:
            return self._finished(request, stored) if stored.finalized else _upload_status(stored, "active")
        if stored.finalized or not command or not command <= {"upload", "finalize"}:
            return google_error(400, f"Invalid upload command {request.headers.get('x-goog-upload-command')!r}.")
        offset = request.headers.get("x-goog-upload-offset", "")
        if offset != str(stored.received):
            return google_error(400, f"Invalid upload offset {offset!r}: {stored.received} bytes were received.")
        with stored.path.open("ab") as handle:
            async for chunk in request.stream():
                handle.write(chunk)
                stored.sha256.update(chunk)
                stored.received += len(chunk)
        if "finalize" not in command:
            return _upload_status(stored, "active")
        if stored.received != stored.declared_size:
            return google_error(
                400, f"The upload has {stored.received} bytes but {stored.declared_size} were declared."
            )
        stored.finalized = True
        return self._finished(request, stored)

    def _finished(self, request: Request, stored: StoredFile) -> Response:
        """The answer to the last chunk, and to a query after it (when that answer was lost)."""
        response = JSONResponse({"file": stored.resource(str(request.base_url))})
        response.headers.update(_status_headers(stored, "final"))
        return response

    async def _start(self, request: Request) -> Response:
        headers = request.headers
        if headers.get("x-goog-upload-protocol", "").lower() != "resumable" or (
            headers.get("x-goog-upload-command", "").lower() != "start"
        ):
            return google_error(
                400, "The simulator takes resumable uploads only (X-Goog-Upload-Protocol: resumable, Command: start)."
            )
        try:
            size = int(headers.get("x-goog-upload-header-content-length", ""))
            body = await request.body()
            meta = (json.loads(body) if body.strip() else {}).get("file") or {}
        except (ValueError, AttributeError):
            return google_error(400, "Invalid upload start: need X-Goog-Upload-Header-Content-Length and a JSON body.")
        if size < 0 or size > MAX_FILE_BYTES:
            return google_error(400, f"File size {size} bytes is over the limit of {MAX_FILE_BYTES} bytes.")
        if self.used_bytes() + size > MAX_PROJECT_BYTES:
            return google_error(429, f"The project's file storage of {MAX_PROJECT_BYTES} bytes is full.")
        # Proto JSON: camelCase or snake_case names (the SDK sends the latter).
        mime = (
            meta.get("mimeType") or meta.get("mime_type") or headers.get("x-goog-upload-header-content-type")
            or "application/octet-stream"
        )  # fmt: skip
        display_name = meta.get("displayName") or meta.get("display_name")
        stored = self.new(display_name=display_name, mime_type=mime, size=size, source="UPLOADED")
        upload_id = secrets.token_urlsafe(24)
        self._uploads[upload_id] = stored.id
        url = f"{request.base_url}upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
        return Response(
            b"",
            headers={
                "x-goog-upload-url": url,
                "x-goog-upload-status": "active",
                "x-goog-upload-chunk-granularity": str(UPLOAD_GRANULARITY),
                "x-goog-upload-control-url": url,
            },
        )

    async def file(self, request: Request) -> Response:
        """``GET|DELETE /{version}/files/{id}`` and ``GET .../files/{id}:download?alt=media``."""
        file_id, _, method = request.path_params["target"].partition(":")
        stored = self.get(file_id)
        if stored is None or not stored.finalized:
            return google_error(403, f"You do not have permission to access the File {file_id} or it may not exist.")
        if method == "download":
            return self.download(stored)
        if method:
            return google_error(404, f"files/{file_id}:{method} is not supported by the simulator")
        if request.method == "DELETE":
            self.remove(file_id)
            return JSONResponse({})
        return JSONResponse(stored.resource(str(request.base_url)))

    def download(self, stored: StoredFile) -> Response:
        if stored.source != "GENERATED":
            return google_error(400, "Only generated files can be downloaded; uploaded files cannot.")
        return FileResponse(stored.path, media_type=stored.mime_type)

    async def download_route(self, request: Request) -> Response:
        """``GET /download/{version}/files/{id}:download?alt=media`` (the ``downloadUri``)."""
        file_id, _, method = request.path_params["target"].partition(":")
        stored = self.get(file_id)
        if method != "download" or stored is None or not stored.finalized:
            return google_error(404, f"File {file_id} not found.")
        return self.download(stored)

    async def list_files(self, request: Request) -> Response:
        """``GET /{version}/files?pageSize=&pageToken=``: newest first."""
        ids = [file_id for file_id, f in reversed(self._files.items()) if f.finalized]  # created in this order
        page, token = paginate(ids, request, default_size=10, max_size=100)
        body: dict[str, Any] = {"files": [self._files[i].resource(str(request.base_url)) for i in page]}
        if token:
            body["nextPageToken"] = token
        return JSONResponse(body)


def paginate(ids: list[str], request: Request, *, default_size: int, max_size: int) -> tuple[list[str], str | None]:
    """One page of *ids* after the ``pageToken`` (the last id of the page before) and the next token."""
    try:
        size = int(request.query_params.get("pageSize") or default_size)
    except ValueError:
        size = default_size
    size = min(max(size, 1), max_size)
    token = request.query_params.get("pageToken")
    start = ids.index(token) + 1 if token in ids else 0
    page = ids[start : start + size]
    return page, (page[-1] if start + size < len(ids) else None)


def _status_headers(stored: StoredFile, status: str) -> dict[str, str]:
    return {"x-goog-upload-status": status, "x-goog-upload-size-received": str(stored.received)}


def _upload_status(stored: StoredFile, status: str) -> Response:
    return Response(b"", headers=_status_headers(stored, status))
