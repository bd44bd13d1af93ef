"""Filling the batch tier's chunk files: each request is written as a JSONL line of its model's open chunk.

A chunk is sealed when it is full (``chunk_requests`` lines, or ``chunk_mb``) or when no request came for
``linger_s``: its file is complete on disk and journaled, and it is handed on to have its job made.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import orjson

from ...output.own import open_own
from .chunks import Chunks
from .ledger import Chunk

if TYPE_CHECKING:
    from ...config import BatchSettings

__all__ = ["Filler", "open_chunk_file"]


class Filler:
    """Fills one chunk per model, numbered within run *run_id*, into *chunks*; *sealed* is handed each chunk
    once it is sealed."""

    def __init__(self, chunks: Chunks, run_id: str, settings: BatchSettings, sealed: Callable[[Chunk], None]) -> None:
        self.chunks = chunks
        self.run_id = run_id
        self.settings = settings
        self._sealed = sealed
        self._max_bytes = int(settings.chunk_mb * 1024 * 1024)  # the API takes 2 GB per file
        self._filling: dict[str, _Filling] = {}
        self._count = sum(1 for chunk in chunks.by_id.values() if chunk.id.startswith(run_id))

    def add(self, model: str, key: str, body: dict[str, Any]) -> Chunk:
        """Write *body* as *key*'s line of *model*'s chunk; returns that chunk."""
        line = orjson.dumps({"key": key, "request": body}) + b"\n"
        filling = self._filling.get(model)
        if filling is not None and filling.size + len(line) > self._max_bytes:
            self._seal(model)
            filling = None
        if filling is None:
            filling = self._filling[model] = self._start(model)
        view = memoryview(line)
        while view:  # unbuffered: a short write only on a full disk, whose next write raises
            view = view[filling.handle.write(view) or 0 :]
        assert filling.chunk.requests is not None  # a new chunk knows where each of its lines is
        filling.chunk.requests[key] = filling.size
        filling.size += len(line)
        filling.chunk.keys.append(key)
        filling.touched = anyio.current_time()
        self.chunks.by_key[key] = filling.chunk
        chunk = filling.chunk
        if len(chunk.keys) >= self.settings.chunk_requests:
            self._seal(model)
        return chunk

    def _start(self, model: str) -> _Filling:
        number = self._count
        self._count += 1
        chunk_id = f"{self.run_id}-{number}"
        self.chunks.folder.mkdir(exist_ok=True)
        path = f"{chunk_id}.jsonl"
        display = f"nanobatch {self.run_id} chunk {number}"
        chunk = Chunk(id=chunk_id, model=model, display=display, path=path, keys=[], requests={})
        return _Filling(chunk=chunk, handle=open_chunk_file(self.chunks.folder / path))

    def _seal(self, model: str) -> None:
        filling = self._filling.pop(model)
        chunk = filling.chunk
        self.chunks.by_id[chunk.id] = chunk  # known from here on: if the disk fails now, its steps are woken too
        try:
            os.fsync(filling.handle.fileno())
        finally:
            filling.handle.close()
        self.chunks.ledger.note("written", chunk, model=model, display=chunk.display, path=chunk.path, keys=chunk.keys)
        self._sealed(chunk)

    async def seal_idle(self) -> None:
        """Seal each chunk no request came for in ``linger_s`` (runs until cancelled)."""
        while True:
            await anyio.sleep(self.settings.linger_s / 2)
            now = anyio.current_time()
            for model, filling in list(self._filling.items()):
                if now - filling.touched >= self.settings.linger_s:
                    self._seal(model)

    def seal_all(self) -> None:
        for model in list(self._filling):
            self._seal(model)

    def abandon(self) -> list[Chunk]:
        """Close the files being filled and return their chunks: never sealed, never sent, their files are swept
        away by the next run."""
        for filling in self._filling.values():
            with contextlib.suppress(OSError):
                filling.handle.close()
        abandoned = [filling.chunk for filling in self._filling.values()]
        self._filling.clear()
        return abandoned


def open_chunk_file(path: Path) -> IO[bytes]:
    """A new chunk file, unbuffered: each line goes to the kernel whole, and closing it has nothing left to write
    (which a full disk would refuse)."""
    return os.fdopen(open_own(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb", buffering=0)  # no link followed


@dataclass(slots=True)
class _Filling:
    """The chunk being written for one model."""

    chunk: Chunk
    handle: IO[bytes]
    size: int = 0
    touched: float = 0.0
