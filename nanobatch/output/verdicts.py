"""Verdicts in the output folder: an item's images checked against its ``qa:`` settings, and the record of an item
whose image failed them.

A rejected item's record has ``"status": "rejected"``, the verdict in ``qa`` (``{"passed": false, "failed":
[...], "values": {...}}``), an ``error`` of kind ``qa`` naming the checks it failed, and every file it wrote under
``rejected/`` (``names.REJECTED_FOLDER``): ``rejected/sku-1.png``, never at the folder's top, never uploaded. An
ok item carries its verdict in ``qa`` too. The next run sends a rejected item again, as a failed one; once it
passes, the images an earlier run set aside for it are deleted (its records say nanobatch wrote them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from ..names import REJECTED_FOLDER, rejected_name
from ..qa import QA_CHECKS, QaSettings, Verdict
from .record import ErrorInfo, ItemRecord

__all__ = ["QA_KIND", "check_images", "rejected_record", "set_aside", "stale_rejected"]

QA_KIND = "qa"  # the error kind of a rejected item


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
