"""Where answers are decoded: in worker processes (``limits.workers``), or in this one.

A 4K answer is 32 MB of JSON around 24 MB of PNG in base64: parsing and decoding it costs ~100 ms of CPU, and in
one process every answer waits for that one core. With workers, the event loop reads the body and hands it to
a worker process (``anyio.to_process``, at most ``workers`` at once), which parses it and decodes the image;
only the decoded answer comes back. Small answers (under :data:`WORKERS_FROM_BYTES`) are decoded in place: the
trip to a process and back costs more than decoding them.

Nothing is written by a worker: the run's writer, in this process, stays the one writer of the output folder,
so a run killed while answers are in workers has written nothing of them, and the next run sends them again
as it does any request in flight.
"""

from __future__ import annotations

import anyio
import anyio.to_process

from ..errors import ApiError
from .gemini import Reply, parse_reply

__all__ = ["WORKERS_FROM_BYTES", "Decoder"]

WORKERS_FROM_BYTES = 1 << 20  # a 1K answer (~1.5 MB of JSON) and up go to a worker

_Failure = tuple[str, str, "int | None", bool]  # an ApiError's message, kind, status code, retryable


class Decoder:
    """Decodes 200 bodies into replies, in up to *workers* processes (0: in this process)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._slots = anyio.CapacityLimiter(workers) if workers > 0 else None

    async def reply(self, body: bytearray) -> Reply:
        """*body* parsed (see :func:`~nanobatch.api.gemini.parse_reply`); the bytearray is consumed."""
        if self._slots is None or len(body) < WORKERS_FROM_BYTES:
            return parse_reply(body)
        try:
            outcome = await anyio.to_process.run_sync(decode_in_worker, body, limiter=self._slots)
        finally:
            body.clear()  # the worker has its own copy
        if isinstance(outcome, Reply):
            return outcome
        message, kind, status_code, retryable = outcome
        raise ApiError(message, kind=kind, status_code=status_code, retryable=retryable)


def decode_in_worker(body: bytearray) -> Reply | _Failure:
    """In a worker process: the reply, or why the body is not one (an exception's own fields: ApiError takes
    keyword arguments, which pickling an exception does not carry)."""
    try:
        return parse_reply(body)
    except ApiError as exc:
        return exc.message, exc.kind, exc.status_code, exc.retryable
