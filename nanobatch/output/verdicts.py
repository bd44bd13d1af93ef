"""Verdicts in the output folder: an item's images checked against its ``qa:`` settings, and the record of an item
whose image failed them.

A rejected item's record has ``"status": "rejected"``, the verdict in ``qa`` (``{"passed": false, "failed":
[...], "values": {...}}``), an ``error`` of kind ``qa`` naming the checks it failed, and every file it wrote under
``rejected/`` (``names.REJECTED_FOLDER``): ``rejected/sku-1.png``, never at the folder's top, never uploaded. An
ok item carries its verdict in ``qa`` too. The next run sends a rejected item again, as a failed one; once it
passes, the images an earlier run set aside for it are deleted (its records say nanobatch wrote them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace

import anyio
import anyio.to_process
import anyio.to_thread

from ..api.decoding import Blocks, attached, settle_worker, worker_slots
from ..api.gemini import Image
from ..errors import ApiError
from ..names import REJECTED_FOLDER, is_kept_step, rejected_name
from ..qa import QA_CHECKS, QaSettings, UndecodableImage, Verdict
from .carried import is_carried
from .record import ErrorInfo, ItemRecord

__all__ = [
    "CHECK_BYTES", "QA_KIND", "Checker", "check_images", "check_in_worker", "rejected_record", "set_aside",
    "out_of_date",
]  # fmt: skip

QA_KIND = "qa"  # the error kind of a rejected item
# What a check that decodes pixels weighs toward starting the workers (WORKERS_AFTER_BYTES of big answers): its
# CPU, ~10 ms for a 2K answer with every check on, is about what decoding 3 MiB of an answer's JSON costs.
CHECK_BYTES = 3 * 2**20
# Shared memory kept for the next checks: a 2K JPEG answer and its input are ~0.4 MB, a 2K PNG ~6 MB; a check in
# each worker at once fits (a bigger one gets a block of its own, let go after it).
CHECK_KEEP_BYTES = 32 * 2**20

logger = logging.getLogger("nanobatch")


class Checker:
    """Runs :func:`check_images` off the event loop: in the run's worker processes (``limits.workers``, the
    same ones that decode answers, once they are in use: a run that checks pixels starts them once it has
    checked a few dozen images), or in a thread of this process (0, not yet, header-only checks, or workers that
    failed).

    In a worker, the checks cost this process only the copy of the images in memory and the original into
    shared memory (an image a worker wrote is read by the worker from its file) and a verdict back through the
    pipe: with every check on, a 2K JPEG answer cost the run's process 0.7-0.8 ms more than without, against 7-8 ms
    with the checks in its own thread (docs/qa.md, "Speed")."""

    def __init__(self, workers: int | None) -> None:
        self.workers = workers
        self.failed = False
        # Shared memory kept for the next checks: a new block's pages are zeroed on first touch, which cost the
        # run's process more than the copy (0.4 ms of its ~0.8 ms per 2K JPEG check, py-spy, 2026-12-07).
        self.blocks = Blocks(CHECK_KEEP_BYTES)

    def close(self) -> None:
        """Let go of the shared memory kept for the next checks."""
        self.blocks.close()

    async def check(
        self, images: Sequence[Image], *, original: bytes | None, aspect_ratio: str | None, settings: QaSettings
    ) -> Verdict:
        """The verdict on *images*. Raises ApiError (``bad_image``, as for an answer whose image cannot be used)
        when one cannot be decoded: the item fails with what it cost, and the next run sends it again."""
        try:
            return await self._check(images, original=original, aspect_ratio=aspect_ratio, settings=settings)
        except UndecodableImage as exc:
            raise ApiError(f"the answer's image failed the output checks: {exc}", kind="bad_image",
                           status_code=200) from None  # fmt: skip

    async def _check(
        self, images: Sequence[Image], *, original: bytes | None, aspect_ratio: str | None, settings: QaSettings
    ) -> Verdict:
        # Only checks that decode pixels are worth a trip to a worker; each counts toward starting them.
        pixels = settings.reads_pixels(compares=original is not None)
        slots = worker_slots(self.workers, CHECK_BYTES) if pixels and not self.failed else None
        if slots is not None:
            try:
                return await self._in_worker(images, original, aspect_ratio, settings, slots)
            except anyio.BrokenWorkerProcess as exc:
                if not self.failed:
                    logger.warning("worker processes failed (%s); images are checked in the run's process", exc)
                    self.failed = True

        def check() -> Verdict:
            return check_images([image.data for image in images], original=original, aspect_ratio=aspect_ratio,
                                settings=settings)  # fmt: skip

        return await anyio.to_thread.run_sync(check)

    async def _in_worker(
        self, images: Sequence[Image], original: bytes | None, aspect_ratio: str | None, settings: QaSettings,
        slots: anyio.CapacityLimiter,
    ) -> Verdict:  # fmt: skip
        held = [image.content for image in images if image.spooled is None]
        parts = [*held, *([original] if original is not None else [])]
        # Each image: its temporary file, or None and its size in the block (the original last, if any).
        where = [(None if i.spooled is None else i.spooled.path, len(i.content)) for i in images]
        where += [(None, len(original))] if original is not None else []
        with self.blocks.lent(sum(map(len, parts))) as block:
            assert block.buf is not None
            at = 0
            for data in parts:
                block.buf[at : at + len(data)] = data
                at += len(data)
            return await anyio.to_process.run_sync(
                check_in_worker, block.name, where, original is not None, aspect_ratio, settings, os.getpid(),
                limiter=slots,
            )  # fmt: skip


def check_in_worker(
    name: str, where: list[tuple[str | None, int]], has_original: bool, aspect_ratio: str | None,
    settings: QaSettings, parent: int,
) -> Verdict:  # fmt: skip
    """In a worker process (of *parent*, the run's): :func:`check_images` on the images *where* says, each a
    temporary file or the next bytes in shared memory *name*, the last of them the original if *has_original*."""
    settle_worker(parent)
    block = attached(name)  # kept mapped: the run lends the same blocks again
    assert block.buf is not None
    parts, at = [], 0
    for path, size in where:
        if path is not None:
            with open(path, "rb") as f:
                parts.append(f.read())
        else:
            parts.append(bytes(block.buf[at : at + size]))
            at += size
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
    record: ItemRecord, files: list[tuple[str, Image]], verdict: Verdict
) -> tuple[ItemRecord, list[tuple[str, Image]]]:
    """*record* and its *files* as the checks' *verdict* has them: an ok record carrying its verdict, or a
    rejected one whose files go under ``rejected/``."""
    if verdict.passed:
        return replace(record, qa=verdict), files
    return rejected_record(record, verdict), [(rejected_name(name), data) for name, data in files]


def out_of_date(
    replaceable: Iterable[str], files: Iterable[tuple[str, Image]], *, ok: bool, done: bool = True,
    named: Iterable[str] = (),
) -> tuple[str, ...]:  # fmt: skip
    """Of *replaceable* (files a record of the item says nanobatch wrote, under its name), those the new *files*
    do not replace: the image of a step a stopped run kept for it (``.nanobatch-steps/``: see
    :mod:`nanobatch.output.carried`); once the item is *done* (ok or rejected), what an earlier run set aside
    under ``rejected/`` for it; and once it is *ok*, its earlier images of another type or number (``a-1.png``
    to ``a-3.png`` for a new ``a.png``), which a folder synced to a shop would publish beside it. Kept steps
    (``a.step1.png``) stay; so does the image of an earlier edit while the new one is rejected: the catalog
    keeps the image it had. A file the new record still *names* (a kept step, named again) is never out of date."""
    new = {name for name, _ in files} | set(named)
    prefix = REJECTED_FOLDER + "/"
    return tuple(
        sorted(
            name for name in replaceable
            if name not in new and (
                is_carried(name) or done and (name.startswith(prefix) or ok and not is_kept_step(name))
            )
        )
    )  # fmt: skip
