"""Measure one output image against the item's ``qa:`` settings (CPU only, thread-safe; run it off the loop).

SKELETON: only ``min_side`` and ``aspect`` are measured yet; the rest is being written.
"""

from __future__ import annotations

import io

from PIL import Image

from .qa import QaSettings, Verdict

__all__ = ["check_image"]


def check_image(output: bytes, *, original: bytes | None, aspect_ratio: str | None, settings: QaSettings) -> Verdict:
    """The verdict on *output* (an encoded image): *original* is the item's first input image (None for a
    text-to-image item or an input sent by reference: ``changed`` and ``same_subject`` are then not measured),
    *aspect_ratio* the requested one (``"16:9"``) or None."""
    with Image.open(io.BytesIO(output)) as image:
        width, height = image.size
    values: dict[str, object] = {"width": width, "height": height}
    failed: list[str] = []
    if settings.min_side is not None:
        values["min_side"] = max(width, height)
        if max(width, height) < settings.min_side:
            failed.append("min_side")
    if settings.aspect and aspect_ratio is not None:
        w, h = (int(part) for part in aspect_ratio.split(":"))
        values["aspect"] = round(width / height, 4)
        if abs(width / height - w / h) > 0.02 * (w / h):
            failed.append("aspect")
    return Verdict(passed=not failed, failed=tuple(failed), values=values)
