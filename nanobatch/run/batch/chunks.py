"""The batch tier's chunks in the batch folder: which are known, which request key is in which, and reading a
request or an answer back from their files."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio.to_thread
import orjson

from .ledger import Chunk, Ledger

__all__ = ["KEEP_UNUSED_S", "Chunks"]

# How long a collected answer no run has asked for is kept (its item failed before its step, or was not in the
# manifest): paid for, it is collected by the run that sends its item again, not paid for twice.
KEEP_UNUSED_S = 14 * 86400


class Chunks:
    """The chunks whose files are in *folder*: those its *ledger* knows, and those sealed since."""

    def __init__(self, folder: Path, ledger: Ledger) -> None:
        self.folder = folder
        self.ledger = ledger
        loaded = ledger.load()
        self.by_id = {chunk.id: chunk for chunk in loaded.values() if not chunk.closed}
        if not self.by_id:
            ledger.path.unlink(missing_ok=True)  # nothing left to follow: the ledger starts afresh
        elif len(self.by_id) < len(loaded):
            ledger.compact(set(self.by_id))
        self._sweep()
        self.by_key: dict[str, Chunk] = {}  # requests in a chunk whose answer is still to be used
        # Later chunks holding the same key, in order: a step whose answer (paid: no image, say) was read by a run
        # that stopped before its item's record was sent again in a later chunk. The next run reads them in the
        # same order, each answer counted in the item's cost, none dropped for the last.
        self._later: dict[str, list[Chunk]] = {}
        for chunk in self.by_id.values():  # (in the order they were written)
            if not chunk.closed and chunk.ended is None:  # (an answer landed by an earlier run is not used again)
                for key in chunk.keys:
                    if key in chunk.landed:
                        continue
                    if key in self.by_key:
                        self._later.setdefault(key, []).append(chunk)
                    else:
                        self.by_key[key] = chunk

    def _sweep(self) -> None:
        """Delete what a killed run left in the folder that the ledger does not name: a chunk being filled,
        a download not finished (everything in this reserved folder is nanobatch's)."""
        if not self.folder.is_dir():
            return
        kept = {self.ledger.path.name}
        for chunk in self.by_id.values():
            if not chunk.closed:
                kept.update(name for name in (chunk.path, chunk.results) if name)
        for path in self.folder.iterdir():
            if path.is_file() and path.name not in kept:
                path.unlink()

    # -- reading back ----------------------------------------------------------------------------

    def line(self, name: str | None, offset: int) -> bytes:
        assert name is not None
        with (self.folder / name).open("rb") as handle:
            handle.seek(offset)
            return handle.readline()

    def request(self, chunk: Chunk, key: str) -> dict[str, Any] | None:
        """*key*'s request body, read back from *chunk*'s file (indexed once, when first wanted)."""
        if chunk.requests is None:  # a chunk written by an earlier run: its file is read once for them
            chunk.requests = self._keys_in(chunk.path)
        offset = chunk.requests.get(key)
        if offset is None:
            return None
        body = orjson.loads(self.line(chunk.path, offset)).get("request")
        return body if isinstance(body, dict) else None

    async def index(self, chunk: Chunk) -> None:
        """Where each key's line is in the chunk's results file: read in a worker thread (a file of a thousand
        answers is gigabytes with 2K images), while the run goes on; once (the ledger keeps it)."""
        if not chunk.indexed:
            chunk.offsets = await anyio.to_thread.run_sync(self._keys_in, chunk.results)
            chunk.indexed = True

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

    # -- done with -------------------------------------------------------------------------------

    def forget(self, chunk: Chunk, key: str) -> None:
        """*key*'s answer in *chunk* is used or not to be had: the step's next request is the one a later chunk
        holds, if one does, else a retry of it goes into a new chunk."""
        if self.by_key.get(key) is chunk:
            if later := self._later.get(key):
                self.by_key[key] = later.pop(0)
                if not later:
                    del self._later[key]
            else:
                del self.by_key[key]

    def landed(self, chunk: Chunk, keys: list[str]) -> None:
        """*keys*' answers in *chunk* are landed (their items' records are written, or there is none): the ledger
        says so at once, so that a run that ends early (its budget, a signal, a kill) leaves none for the next to
        read again, as if new, into a second record; the chunk's files are deleted once every answer in them is."""
        chunk.landed.update(keys)
        if chunk.closed:
            return
        if len(chunk.landed) == len(chunk.keys):  # each key once in a chunk
            self.close(chunk)
        else:
            self.ledger.note("landed", chunk, keys=keys)

    def close(self, chunk: Chunk) -> None:
        """Delete *chunk*'s files: its answers were all landed, or are not wanted."""
        self.ledger.note("closed", chunk)  # first: a file the ledger still names is never missed
        for name in (chunk.path, chunk.results):
            if name:
                (self.folder / name).unlink(missing_ok=True)
        chunk.closed = True
        chunk.offsets, chunk.requests, chunk.landed = {}, None, set()  # nothing more is asked of it

    def finish(self, kept: set[str]) -> int:
        """The run went through every item: close the chunks collected, but those in *kept* (holding answers
        of items whose next step waits in a job, or whose image could not be written) and those holding
        answers no item of this run asked for (it failed before its step, or left the manifest for a night),
        for :data:`KEEP_UNUSED_S` after their collection: each is paid for, and the run that sends its item
        again collects it. Returns how many such answers are kept."""
        # answers no item of this run read
        unused = Counter(chunk.id for chunk in [*self.by_key.values(), *(c for cs in self._later.values() for c in cs)])
        now, kept_unused = time.time(), 0
        for chunk in self.by_id.values():
            if chunk.closed or chunk.open or chunk.id in kept:
                continue
            if unused[chunk.id] and now - self._collected_at(chunk) < KEEP_UNUSED_S:
                kept_unused += unused[chunk.id]
                continue
            self.close(chunk)
        return kept_unused

    def _collected_at(self, chunk: Chunk) -> float:
        """When *chunk* was collected: as its ledger line says, or (an older ledger's) when its file was written."""
        if chunk.collected_at is not None:
            return chunk.collected_at
        try:
            return (self.folder / str(chunk.results)).stat().st_mtime
        except OSError:
            return 0.0
