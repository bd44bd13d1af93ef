"""Where answers are decoded (online answers and batch results lines): in worker processes (``limits.workers``),
or in this one.

A 4K answer is 32 MB of JSON around 24 MB of PNG in base64: parsing and decoding it costs ~100 ms of CPU, and in
one process every answer waits for that one core. With workers, the body goes into shared memory and a worker
process (``anyio.to_process``, at most ``workers`` at once) parses it and decodes its images into a second
block of shared memory; only the answer's small fields come back through the worker's pipe, and the images are
copied out of shared memory. The event loop's process copies bytes; it does not parse or decode them (a pipe
would cost it more than decoding: the body pickled and written, the image read back in 64 KB pieces). Small
answers (under :data:`WORKERS_FROM_BYTES`) are decoded in place: the trip to a worker costs more than they do.

Nothing is written into the output folder by a worker: the run's writer, in this process, stays its one
writer, so a run killed while answers are in workers has written nothing of them, and the next run sends them
again as it does any request in flight. The shared memory is this process's (created and unlinked here; a
killed run's is removed by Python's resource tracker).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import anyio
import anyio.to_process
import orjson
from anyio.lowlevel import RunVar

from ..errors import ApiError
from .gemini import Image, Reply, parse_reply, reply_from

__all__ = ["KEEP_BYTES", "WORKERS_FROM_BYTES", "Blocks", "Decoder", "attach", "decode_in_worker", "worker_slots"]

logger = logging.getLogger("nanobatch")

WORKERS_FROM_BYTES = 1 << 20  # a 1K answer (~1.5 MB of JSON) and up go to a worker
# Shared memory kept for the next answers (and mapped by each worker): what the answers read and decoded at once
# use (the client's byte budget, 64 MiB of bodies, and their images), so it does not add to the peak.
KEEP_BYTES = 256 * 2**20

_Failure = tuple[str, str, "int | None", bool]  # an ApiError's message, kind, status code and retryable
_Places = list[tuple[str, int, int]]  # each image's mime type, offset and size in the images' block
# From a worker: the answer's key (a batch results line's), and the reply without its images and where they are,
# or why it is not one; None: not an answer the worker decodes (a results line with an error), for this process.
_Outcome = tuple[str | None, Reply | _Failure, _Places] | None


class Decoder:
    """Decodes 200 bodies and batch results lines into replies, in up to *workers* processes (0: in this one)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers  # 0 once they have failed: this process decodes then
        self.blocks = Blocks(KEEP_BYTES)

    def takes(self, size: int) -> bool:
        """Whether an answer of *size* bytes goes to a worker (then read it with :meth:`read_reply`)."""
        return self.workers > 0 and size >= WORKERS_FROM_BYTES

    async def reply(self, body: bytearray) -> Reply:
        """A ``generateContent`` body parsed (see :func:`~nanobatch.api.gemini.parse_reply`); the bytearray is
        consumed."""
        if not self.takes(len(body)):
            return parse_reply(body)
        return await self.read_reply(len(body), functools.partial(_copy, body))

    async def read_reply(self, size: int, fill: Callable[[memoryview], Awaitable[None]]) -> Reply:
        """The reply in a body of *size* bytes that *fill* writes straight into shared memory (no copy of it in
        this process), decoded in a worker."""
        outcome = await self._decode("answer", size, fill)
        assert outcome is not None  # a worker decodes every answer, or says why it is not one
        reply = _reply(outcome)
        if isinstance(reply, ApiError):
            raise reply
        return reply

    async def result(self, line: bytes) -> tuple[str | None, Reply | ApiError] | None:
        """A batch results line's key and answer (or why its answer is not one), decoded in a worker; None for
        a line to parse in this process (a small one, or one without an answer)."""
        if not self.takes(len(line)):
            return None
        outcome = await self._decode("line", len(line), functools.partial(_copy, line))
        return None if outcome is None else (outcome[0], _reply(outcome))

    async def _decode(self, what: str, size: int, fill: Callable[[memoryview], Awaitable[None]]) -> _Outcome:
        # Decoded base64 is 3/4 of its text, which is less than the body.
        with self.blocks.lent(size) as body, self.blocks.lent(size * 3 // 4 + 4) as images:
            with _view(body)[:size] as view:
                await fill(view)
            try:
                outcome: _Outcome = await anyio.to_process.run_sync(
                    decode_in_worker, what, body.name, size, images.name, limiter=worker_slots(self.workers)
                )
            except anyio.BrokenWorkerProcess as exc:  # no process could be started, or one died: decode here
                if self.workers:
                    logger.warning("worker processes failed (%s); answers are decoded in the run's process", exc)
                    self.workers = 0
                outcome = decode_in_worker(what, body.name, size, images.name)
            if outcome is not None and isinstance(reply := outcome[1], Reply):
                view = _view(images)
                pictures = tuple(Image(mime, bytes(view[at : at + n])) for mime, at, n in outcome[2])
                outcome = outcome[0], dataclasses.replace(reply, images=pictures), []
            return outcome

    def close(self) -> None:
        """Let go of the shared memory kept for the next answers."""
        self.blocks.close()


async def _copy(data: bytes | bytearray, view: memoryview) -> None:
    view[:] = data
    if isinstance(data, bytearray):
        data.clear()


class Blocks:
    """Blocks of shared memory lent out and kept for the next answers, at most *keep* bytes of them.

    A new block costs the run's process more than the copy into it: the kernel zeroes each of its pages on first
    touch, and unlinking it frees them again (a 4K answer: ~8,000 pages, 70-110 ms of CPU in all). A kept block's
    pages are there already, and a worker keeps it mapped (:func:`_attached`)."""

    def __init__(self, keep: int) -> None:
        self._keep = keep  # bytes
        self._free: list[SharedMemory] = []
        self.made = 0  # blocks created (for tests and the bench)

    @contextmanager
    def lent(self, size: int) -> Iterator[SharedMemory]:
        """A block of at least *size* bytes, kept for the next answer once the block ends."""
        fits = [block for block in self._free if block.size >= size]
        if fits:
            block = min(fits, key=lambda b: b.size)
            self._free.remove(block)
        else:
            # Room for a slightly bigger answer next time, in whole MiB.
            block = SharedMemory(create=True, size=-(-max(1, size + size // 8) // 2**20) * 2**20)
            self.made += 1
        try:
            yield block
        finally:
            self._free.append(block)
            while sum(b.size for b in self._free) > self._keep:  # the smallest first: big answers don't fit them
                _drop(min(self._free, key=lambda b: b.size), self._free)

    def close(self) -> None:
        while self._free:
            _drop(self._free[-1], self._free)


def _drop(block: SharedMemory, free: list[SharedMemory]) -> None:
    free.remove(block)
    block.close()
    block.unlink()


_SLOTS: RunVar[dict[int, anyio.CapacityLimiter]] = RunVar("nanobatch_worker_slots")


def worker_slots(workers: int) -> anyio.CapacityLimiter | None:
    """The run's one limit of *workers* processes at once, shared by whatever sends work to them (decoding
    answers, checking images); None for 0 (no workers: the work is done in this process)."""
    if workers <= 0:
        return None
    try:
        slots = _SLOTS.get()
    except LookupError:
        slots = {}
        _SLOTS.set(slots)
    return slots.setdefault(workers, anyio.CapacityLimiter(workers))


def _reply(outcome: tuple[str | None, Reply | _Failure, _Places]) -> Reply | ApiError:
    if isinstance(outcome[1], Reply):
        return outcome[1]
    message, kind, status_code, retryable = outcome[1]
    return ApiError(message, kind=kind, status_code=status_code, retryable=retryable)


def decode_in_worker(what: str, body_name: str, size: int, images_name: str) -> _Outcome:
    """In a worker process: parse the answer (*what*: ``answer``, a ``generateContent`` body, or ``line``, a batch
    results line) in shared memory *body_name* and put its images one after another into *images_name*. An
    error goes back as its fields: ApiError takes keyword arguments, which pickling an exception does not carry."""
    body, images = _attached(body_name), _attached(images_name)
    with _view(body)[:size] as view:
        text = view.tobytes()
    key: str | None = None
    try:
        if what == "answer":
            reply = parse_reply(text)
        elif (found := _response(text)) is None:
            return None
        else:
            key, response = found
            reply = reply_from(response)
    except ApiError as exc:
        return key, (exc.message, exc.kind, exc.status_code, exc.retryable), []
    del text
    places: _Places = []
    at = 0
    for image in reply.images:
        _view(images)[at : at + len(image.data)] = image.data
        places.append((image.mime_type, at, len(image.data)))
        at += len(image.data)
    return key, dataclasses.replace(reply, images=()), places


_ATTACHED: dict[str, SharedMemory] = {}  # in a worker: the run's blocks, mapped once, the last used last
_KEEP_ATTACHED = KEEP_BYTES


def _attached(name: str) -> SharedMemory:
    """The run's block *name*, kept mapped for the next answer that comes in it (the run's process lends the
    same blocks again: :class:`Blocks`); the least recently used ones are let go beyond :data:`_KEEP_ATTACHED`
    bytes (a block the run's process has let go of stays mapped here until then)."""
    block = _ATTACHED.pop(name, None) or attach(name)
    _ATTACHED[name] = block
    while len(_ATTACHED) > 1 and sum(b.size for b in _ATTACHED.values()) > _KEEP_ATTACHED:
        _ATTACHED.pop(next(iter(_ATTACHED))).close()
    return block


def _response(line: bytes) -> tuple[str | None, dict[str, Any]] | None:
    """A results line's key and its ``response``, if it has one."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("response"), dict):
        return None
    return (None if data.get("key") is None else str(data["key"])), data["response"]


def _view(block: SharedMemory) -> memoryview:
    assert block.buf is not None  # open until closed
    return block.buf


def attach(name: str) -> SharedMemory:
    """A block the run's process made, and will unlink. Before Python 3.13 attaching registers the block with
    this process's resource tracker too, which would start a tracker process and unlink the block when this
    worker ends (python/cpython#82300): not here, where the run's process owns it."""
    register = resource_tracker.register
    resource_tracker.register = lambda name, rtype: None
    try:
        return SharedMemory(name=name)
    finally:
        resource_tracker.register = register
