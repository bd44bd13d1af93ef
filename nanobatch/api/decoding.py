"""Where answers are decoded (online answers and batch results lines): in worker processes (``limits.workers``),
or in this one.

A 4K answer is 32 MB of JSON around 24 MB of PNG in base64: parsing and decoding it costs ~100 ms of CPU, and
writing the image ~30 ms more; in one process every answer waits for that one core. With workers, the body is
read from the socket straight into shared memory, and a worker process (``anyio.to_process``, at most
``workers`` at once) parses it, decodes its images and writes each into a temporary file of its own in the
output folder, fsync'ed (:mod:`nanobatch.api.spool`); only the answer's small fields and the files' names come
back through the worker's pipe. The event loop's process moves the body's bytes; it does not parse, decode,
copy or write the image. Small answers (under :data:`WORKERS_FROM_BYTES`) are decoded in place: the trip to a
worker costs more than they do.

``limits.workers`` unset (the default) means one worker per CPU, started only once the run has read
:data:`WORKERS_AFTER_BYTES` of big answers (decoded in place until then): a worker costs ~0.2 s of CPU to
start, about what two 4K answers cost to decode, so a small run, or one of small answers, starts none. A
number starts them with the first big answer; 0 decodes everything in the run's process.

The output folder keeps one writer of records: the run's writer renames each temporary file into place and
appends the record, as it writes an image decoded in place. A run killed while answers are in workers has
written no output and no record of them (at most temporary files, removed by the next run, which sends those
answers again as it does any request in flight); a worker dies with the run's process (Linux). The shared
memory is this process's (created and unlinked here; a killed run's is removed by Python's resource tracker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from mmap import mmap
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import anyio
import anyio.to_process
import orjson
from anyio.lowlevel import RunVar

from ..children import die_with
from ..errors import ApiError
from .gemini import Image, Reply, parse_reply, reply_from
from .lifting import Buffer, Lifted, Unlifted, parsed
from .redaction import scrub
from .spool import Spooled, drop_spooled, spool_name, write_spooled

__all__ = [
    "KEEP_BYTES",
    "WORKERS_AFTER_BYTES",
    "WORKERS_FROM_BYTES",
    "Blocks",
    "Decoded",
    "Decoder",
    "attach",
    "attached",
    "decode_in_worker",
    "decode_text",
    "settle_worker",
    "worker_slots",
]

logger = logging.getLogger("nanobatch")

WORKERS_FROM_BYTES = 1 << 20  # a 1K answer (~1.5 MB of JSON) and up go to a worker
# With workers unset (one per CPU): big answers read before they start, decoded in place (about eight 4K answers,
# forty 2K ones): what the workers' start-up costs, so that a run too small to gain from them does not pay it.
WORKERS_AFTER_BYTES = 256 * 2**20
# Shared memory kept for the next answers (and mapped by each worker): what the bodies read at once use (the
# client's byte budget, 64 MiB, in blocks an eighth bigger than each body), so it does not add to the peak.
KEEP_BYTES = 128 * 2**20

_Failure = tuple[str, str, "int | None", bool]  # an ApiError's message, kind, status code and retryable
_Places = list[tuple[str, str, int, "str | None"]]  # each image's mime type, temporary file, size and problem
# From a worker: the answer's key (a batch results line's), and the reply without its images and where they are,
# or why it is not one; None: not an answer the worker decodes (a results line with an error), for this process.
_Outcome = tuple[str | None, Reply | _Failure, _Places] | None
Decoded = tuple[str | None, Reply | ApiError] | None


class Decoder:
    """Decodes 200 bodies and batch results lines into replies: in up to *workers* processes (None: one per
    CPU, once the run has read :data:`WORKERS_AFTER_BYTES` of big answers; 0: in this one), which write the
    images into temporary files in *spool* (the output folder; default: the system's temporary folder)."""

    def __init__(self, workers: int | None, spool: str | None = None) -> None:
        self.workers = workers
        self.failed = False  # the workers failed: this process decodes from then on
        if spool is None:
            import tempfile  # not at start-up: a run gives its output folder

            spool = tempfile.gettempdir()
        self.spool = spool
        self.blocks = Blocks(KEEP_BYTES)

    def at_once(self) -> int:
        """How many big answers can be decoded at once now: one per worker once the workers are in use, else
        one (this process)."""
        slots = None if self.failed else worker_slots(self.workers)
        return 1 if slots is None else int(slots.total_tokens)

    def takes(self, size: int) -> bool:
        """Whether an answer of *size* bytes goes to a worker (then read it with :meth:`read_reply`). Asked once
        per answer: a big one counts toward starting the workers."""
        return size >= WORKERS_FROM_BYTES and not self.failed and worker_slots(self.workers, size) is not None

    async def reply(self, body: bytearray, *, asked: bool = False) -> Reply:
        """A ``generateContent`` body parsed (see :func:`~nanobatch.api.gemini.parse_reply`); the bytearray is
        consumed. *asked*: :meth:`takes` said no for it already (it is not asked, nor the answer counted, again)."""
        if asked or not self.takes(len(body)):
            return parse_reply(body)
        return await self.read_reply(len(body), functools.partial(_copy, body))

    async def read_reply(self, size: int, fill: Callable[[memoryview], Awaitable[None]]) -> Reply:
        """The reply in a body of *size* bytes that *fill* writes straight into shared memory (no copy of it in
        this process), decoded in a worker."""
        decoded = await self._decode("answer", size, fill)
        assert decoded is not None  # a worker decodes every answer, or says why it is not one
        if isinstance(reply := decoded[1], ApiError):
            raise reply
        return reply

    async def result(self, line: bytes) -> tuple[str | None, Reply | ApiError] | None:
        """A batch results line's key and answer (or why its answer is not one), decoded in a worker; None for
        a line to parse in this process (a small one, or one without an answer)."""
        if not self.takes(len(line)):
            return None
        return await self._decode("line", len(line), functools.partial(_copy, line))

    async def _decode(self, what: str, size: int, fill: Callable[[memoryview], Awaitable[None]]) -> Decoded:
        with self.blocks.lent(size) as body:
            with _view(body)[:size] as view:
                await fill(view)
            if (slots := None if self.failed else worker_slots(self.workers)) is not None:
                prefix = spool_name(self.spool)
                try:
                    outcome = await anyio.to_process.run_sync(
                        decode_in_worker, what, body.name, size, prefix, os.getpid(), limiter=slots
                    )
                    return _received(outcome)
                except anyio.BrokenWorkerProcess as exc:  # none could be started, or one died: decode here
                    drop_spooled(prefix)  # the prefix is this answer's alone: what is there, its worker wrote
                    if not self.failed:
                        logger.warning("worker processes failed (%s); answers are decoded in the run's process", exc)
                        self.failed = True
                except OSError:
                    # The worker could not write the image: decode here (a full disk then stops the run at the
                    # writer, as without workers). It removed what it made itself: a file that was there before
                    # (O_EXCL refused it) is not ours.
                    pass
                except BaseException:
                    drop_spooled(prefix)  # cancelled while waiting for it: what it wrote is nobody's
                    raise
            return decode_text(what, _mapped(body), size)

    def close(self) -> None:
        """Let go of the shared memory kept for the next answers."""
        self.blocks.close()


def _received(outcome: _Outcome) -> Decoded:
    """A worker's outcome, its images as :class:`~nanobatch.api.spool.Spooled` files this process owns (made at
    once: nothing is awaited between the worker's answer and here, so no file goes unowned)."""
    if outcome is None:
        return None
    key, reply, places = outcome
    if not isinstance(reply, Reply):
        message, kind, status_code, retryable = reply  # (a worker knows no secret: this process cuts them)
        return key, ApiError(scrub(message, None), kind=kind, status_code=status_code, retryable=retryable)
    images = tuple(Image(mime, spooled=Spooled(path, n, problem)) for mime, path, n, problem in places)
    return key, dataclasses.replace(reply, images=images)


def decode_text(what: str, body: Buffer, size: int) -> Decoded:
    """The answer in the first *size* bytes of *body*: ``answer``, a ``generateContent`` body (a bytearray is
    consumed), or ``line``, a batch results line (None if it carries no answer). Its images are decoded from the
    body's own bytes (:mod:`~nanobatch.api.lifting`)."""
    if what == "answer":
        try:
            return None, parse_reply(body, size)
        except ApiError as exc:
            return None, exc
    return parsed(body, size, _result)


def _result(text: bytes | bytearray, lifted: Lifted | None) -> Decoded:
    """The line's key and answer (or why it is not one); None if it has none. With *lifted*, anything but an
    answer raises instead, so that the whole line says why (:func:`~nanobatch.api.lifting.parsed`)."""
    if (found := _response(text)) is None:
        if lifted is not None:
            raise Unlifted
        return None
    key, response = found
    try:
        return key, reply_from(response, lifted)
    except ApiError as exc:
        if lifted is not None:
            raise
        return key, exc


async def _copy(data: bytes | bytearray, view: memoryview) -> None:
    view[:] = data
    if isinstance(data, bytearray):
        data.clear()


class Blocks:
    """Blocks of shared memory lent out and kept for the next answers, at most *keep* bytes of them.

    A new block costs the run's process more than the copy into it: the kernel zeroes each of its pages on first
    touch, and unlinking it frees them again (a 4K answer: ~8,000 pages, 70-110 ms of CPU in all). A kept block's
    pages are there already, and a worker keeps it mapped (:func:`attached`)."""

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


@dataclass(slots=True)
class _Pool:
    """A run's worker processes: at most *slots* at once, in use once *started*."""

    slots: anyio.CapacityLimiter
    started: bool
    read: int = 0  # bytes of big answers read before they started


_POOLS: RunVar[dict[int | None, _Pool]] = RunVar("nanobatch_worker_pools")


def worker_slots(workers: int | None, read: int = 0) -> anyio.CapacityLimiter | None:
    """The run's one limit of *workers* processes at once, shared by whatever sends work to them (decoding
    answers, checking images); None while they are not to be used: 0, or unset (one per CPU) before the run
    has read :data:`WORKERS_AFTER_BYTES` of big answers (*read*: the bytes of one more)."""
    if workers == 0:
        return None
    try:
        pools = _POOLS.get()
    except LookupError:
        pools = {}
        _POOLS.set(pools)
    if (pool := pools.get(workers)) is None:
        pool = pools[workers] = _Pool(anyio.CapacityLimiter(workers or os.cpu_count() or 1), workers is not None)
    if not pool.started and read:
        pool.read += read
        pool.started = pool.read > WORKERS_AFTER_BYTES
    return pool.slots if pool.started else None


def decode_in_worker(what: str, body_name: str, size: int, prefix: str, parent: int) -> _Outcome:
    """In a worker process (of *parent*, the run's): parse the answer (*what*: ``answer``, a ``generateContent``
    body, or ``line``, a batch results line) in shared memory *body_name* and write its images into new
    temporary files ``<prefix>-<k>.tmp``. An error goes back as its fields: ApiError takes keyword arguments,
    which pickling an exception does not carry. OSError if an image cannot be written (none is left)."""
    settle_worker(parent)
    decoded = decode_text(what, _mapped(attached(body_name)), size)  # read where it is: no copy of it here
    if decoded is None:
        return None
    key, reply = decoded
    if isinstance(reply, ApiError):
        return key, (reply.message, reply.kind, reply.status_code, reply.retryable), []
    places: _Places = []
    try:
        for k, image in enumerate(reply.images):
            path = write_spooled(prefix, k, image.content)
            places.append((image.mime_type, path, image.size, image.problem()))
    except BaseException:
        for _, path, *_ in places:  # only the files this worker made (write_spooled leaves none of its own)
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return key, dataclasses.replace(reply, images=()), places


_SETTLED: list[int] = []  # in a worker: the run's process, once settled


def settle_worker(parent: int) -> None:
    """Once per worker process (Linux, glibc): die with the run's process *parent* (its answers are nobody's
    then: the next run removes their temporary files before any worker of the dead run could write more), and
    keep big allocations in the heap: each answer allocates its image (24 MB at 4K; the body is read where it is,
    in shared memory), and fresh pages from the kernel, zeroed on first touch and given back when freed, would
    cost that again on every answer."""
    if _SETTLED or not sys.platform.startswith("linux"):
        return
    _SETTLED.append(parent)
    libc = die_with(parent)
    with contextlib.suppress(OSError, AttributeError):
        if libc is not None:
            libc.mallopt(-3, 128 * 2**20)  # M_MMAP_THRESHOLD: allocations below it come from the heap
            libc.mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD: freed memory is kept up to this much


_ATTACHED: dict[str, SharedMemory] = {}  # in a worker: the run's blocks, mapped once, the last used last
_KEEP_ATTACHED = KEEP_BYTES


def attached(name: str) -> SharedMemory:
    """The run's block *name*, kept mapped for the next answer that comes in it (the run's process lends the
    same blocks again: :class:`Blocks`); the least recently used ones are let go beyond :data:`_KEEP_ATTACHED`
    bytes (a block the run's process has let go of stays mapped here until then)."""
    block = _ATTACHED.pop(name, None) or attach(name)
    _ATTACHED[name] = block
    while len(_ATTACHED) > 1 and sum(b.size for b in _ATTACHED.values()) > _KEEP_ATTACHED:
        _ATTACHED.pop(next(iter(_ATTACHED))).close()
    return block


def _response(line: bytes | bytearray) -> tuple[str | None, dict[str, Any]] | None:
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


def _mapped(block: SharedMemory) -> mmap:
    """The block's memory as the mmap it is (what :func:`~nanobatch.api.lifting.lift` searches)."""
    mapped = _view(block).obj
    assert isinstance(mapped, mmap)
    return mapped


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
