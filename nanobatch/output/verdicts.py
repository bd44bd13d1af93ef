"""Verdicts in the output folder: an item's images checked against its ``qa:`` settings, and the record of an item
whose image failed them.

A rejected item's record has ``"status": "rejected"``, the verdict in ``qa`` (``{"passed": false, "failed":
[...], "values": {...}}``), an ``error`` of kind ``qa`` naming the checks it failed, and every file it wrote under
``rejected/`` (``names.REJECTED_FOLDER``): ``rejected/sku-1.png``, never at the folder's top, never uploaded. An
ok item carries its verdict in ``qa`` too. The next run sends a rejected item again, as a failed one; once it
passes, the images an earlier run set aside for it are deleted (its records say nanobatch wrote them).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from multiprocessing.shared_memory import SharedMemory

import anyio
import anyio.to_process
import anyio.to_thread

from ..api.decoding import attach, worker_slots
from ..names import REJECTED_FOLDER, rejected_name
from ..qa import QA_CHECKS, QaSettings, Verdict
from .record import ErrorInfo, ItemRecord

__all__ = ["QA_KIND", "Checker", "check_images", "check_in_worker", "rejected_record", "set_aside", "stale_rejected"]

QA_KIND = "qa"  # the error kind of a rejected item

logger = logging.getLogger("nanobatch")


class Checker:
    """Runs :func:`check_images` off the event loop: in the run's worker processes (``limits.workers``, the
    same ones that decode answers), or in a thread of this process (0, or workers that failed).

    In a worker, the checks cost this process only the copy of the images and the original into shared memory
    and a verdict back through the pipe: with every check on, a 2K JPEG item cost the run's process 2.5 ms more
    than without, against 12 ms with the checks in its own thread (docs/qa.md, "Speed")."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    async def check(
        self, images: Sequence[bytes], *, original: bytes | None, aspect_ratio: str | None, settings: QaSettings
    ) -> Verdict:
        if self.workers > 0:
            try:
                return await self._in_worker(images, original, aspect_ratio, settings)
            except anyio.BrokenWorkerProcess as exc:
                if self.workers:
                    logger.warning("worker processes failed (%s); images are checked in the run's process", exc)
                    self.workers = 0
        check = functools.partial(check_images, images, original=original, aspect_ratio=aspect_ratio,
                                  settings=settings)  # fmt: skip
        return await anyio.to_thread.run_sync(check)

    async def _in_worker(
        self, images: Sequence[bytes], original: bytes | None, aspect_ratio: str | None, settings: QaSettings
    ) -> Verdict:
        parts = [*images, *([original] if original is not None else [])]
        block = SharedMemory(create=True, size=max(1, sum(map(len, parts))))
        try:
            assert block.buf is not None
            sizes = []
            at = 0
            for data in parts:
                block.buf[at : at + len(data)] = data
                at += len(data)
                sizes.append(len(data))
            return await anyio.to_process.run_sync(
                check_in_worker, block.name, sizes, original is not None, aspect_ratio, settings,
                limiter=worker_slots(self.workers),
            )  # fmt: skip
        finally:
            block.close()
            block.unlink()


def check_in_worker(
    name: str, sizes: list[int], has_original: bool, aspect_ratio: str | None, settings: QaSettings
) -> Verdict:
    """In a worker process: :func:`check_images` on the images in shared memory *name*, one after another of
    *sizes*, the last of them the original if *has_original*."""
    block = attach(name)
    try:
        assert block.buf is not None
        parts, at = [], 0
        for size in sizes:
            parts.append(bytes(block.buf[at : at + size]))
            at += size
    finally:
        block.close()
    original = parts.pop() if has_original else None
    return check_images(parts, original=original, aspect_ratio=aspect_ratio, settings=settings)


def check_images(
    images: Sequence[bytes], *, original: bytes | None, aspect_ratio: str | None, settings: QaSettings
) -> Verdict:
    """The verdict on an answer's *images* (CPU only: call it off the event loop): it passes only if each image
    passes. ``failed`` lists every check some image failed; ``values`` are those of the first image that failed
    (of the first image if all passed), with ``"image": n`` when the answer has several."""
    from ..checks import check_image  # numpy and Pillow (0.2 s to import): only when an answer is checked

    verdicts = [check_image(data, original=original, aspect_ratio=aspect_ratio, settings=settings) for data in images]
    if len(verdicts) == 1:
        return verdicts[0]
    failed = {name for verdict in verdicts for name in verdict.failed}
    shown = next((n for n, verdict in enumerate(verdicts) if not verdict.passed), 0)
    return Verdict(
        passed=not failed,
        failed=tuple(name for name in (*QA_CHECKS, *sorted(failed - set(QA_CHECKS))) if name in failed),
        values={**verdicts[shown].values, "image": shown + 1},
    )


def rejected_record(record: ItemRecord, verdict: Verdict) -> ItemRecord:
    """*record* (an item's, whose image failed the checks) turned rejected: its files named under ``rejected/``."""
    steps = record.steps
    if steps is not None:
        steps = tuple(
            replace(step, outputs=tuple(map(rejected_name, step.outputs)) if step.outputs is not None else None)
            for step in steps
        )
    message = "the image failed the output checks: " + ", ".join(verdict.failed)
    return replace(
        record, status="rejected", outputs=tuple(map(rejected_name, record.outputs)), steps=steps,
        error=ErrorInfo(kind=QA_KIND, message=message), qa=verdict,
    )  # fmt: skip


def set_aside(
    record: ItemRecord, files: list[tuple[str, bytes]], verdict: Verdict
) -> tuple[ItemRecord, list[tuple[str, bytes]]]:
    """*record* and its *files* as the checks' *verdict* has them: an ok record carrying its verdict, or a
    rejected one whose files go under ``rejected/``."""
    if verdict.passed:
        return replace(record, qa=verdict), files
    return rejected_record(record, verdict), [(rejected_name(name), data) for name, data in files]


def stale_rejected(replaceable: Iterable[str], files: Iterable[tuple[str, bytes]]) -> tuple[str, ...]:
    """Of *replaceable* (files a record of the item says nanobatch wrote), those under ``rejected/`` that the new
    *files* do not replace: what an earlier run set aside for the item, out of date now."""
    new = {name for name, _ in files}
    prefix = REJECTED_FOLDER + "/"
    return tuple(sorted(name for name in replaceable if name.startswith(prefix) and name not in new))
