"""Bad images on demand, so that every output check (nanobatch.checks) can be seen failing end to end.

A request gets one when ``--fault-rate qa_grey=RATE`` (and so on) draws it, or on every request whose
instruction carries the marker ``[simulate qa_grey]``: the same item then fails the same way each time.

- ``qa_grey``: the background comes back light grey, not white;
- ``qa_small_subject``: the product shrunk to 40% of the frame;
- ``qa_unchanged``: the input handed back as it was (only framed to the requested shape and size);
- ``qa_other_product``: another product, striped and of another shape, where the input's was;
- ``qa_small_output``: 512 px on the long side, whatever size was asked for;
- ``qa_wrong_shape``: the requested long side, but square for a ratio that is not, 16:9 for 1:1.
"""

from __future__ import annotations

import random
import re

from PIL import Image, ImageChops, ImageDraw

__all__ = ["GREY", "QA_FLAWS", "flaw_in", "other_product", "small_subject", "wrong_shape"]

QA_FLAWS = ("qa_grey", "qa_small_subject", "qa_unchanged", "qa_other_product", "qa_small_output", "qa_wrong_shape")
GREY = (232, 232, 232)  # a "studio white" that is not white
SMALL_SUBJECT = 0.4
_MARKER = re.compile(r"\[simulate (qa_[a-z_]+)\]")


def flaw_in(instruction: str) -> str | None:
    """The flaw an instruction's ``[simulate KIND]`` marker asks for, or None.

    >>> flaw_in("Replace the background with white [simulate qa_grey]")
    'qa_grey'
    """
    for found in _MARKER.finditer(instruction):
        if found.group(1) in QA_FLAWS:
            return found.group(1)
    return None


def _background(image: Image.Image) -> tuple[int, int, int]:
    red, green, blue = image.getpixel((0, 0))  # type: ignore[misc]
    return red, green, blue


def small_subject(image: Image.Image) -> Image.Image:
    """*image* shrunk to SMALL_SUBJECT of each side, in the middle of its background's colour."""
    small = image.resize(
        (max(1, round(image.width * SMALL_SUBJECT)), max(1, round(image.height * SMALL_SUBJECT))),
        Image.Resampling.BILINEAR,
    )
    canvas = Image.new("RGB", image.size, _background(image))
    canvas.paste(small, ((image.width - small.width) // 2, (image.height - small.height) // 2))
    return canvas


def wrong_shape(image: Image.Image) -> Image.Image:
    """*image* whole, on a canvas of the wrong shape with the same long side: square, or 16:9 for a square."""
    edge = max(image.size)
    size = (edge, max(16, round(edge * 9 / 16 / 16) * 16)) if image.width == image.height else (edge, edge)
    fitted = image.copy()
    fitted.thumbnail(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", size, _background(image))
    canvas.paste(fitted, ((size[0] - fitted.width) // 2, (size[1] - fitted.height) // 2))
    return canvas


def other_product(image: Image.Image, seed: int) -> Image.Image:
    """Another product where *image*'s is (its box: what differs from the corner's colour): a striped bag with a
    handle, on the same background."""
    colour = _background(image)
    mask = ImageChops.difference(image, Image.new("RGB", image.size, colour)).convert("L")
    box = mask.point(lambda v: 255 if v > 32 else 0).getbbox() or (
        image.width // 5, image.height // 5, image.width * 4 // 5, image.height * 4 // 5
    )  # fmt: skip
    x0, y0, x1, y1 = box
    canvas = Image.new("RGB", image.size, colour)
    draw = ImageDraw.Draw(canvas)
    rnd = random.Random(seed)
    ink = tuple(rnd.randrange(0, 120) for _ in range(3))
    paper = tuple(rnd.randrange(140, 230) for _ in range(3))
    top = y0 + (y1 - y0) // 3
    draw.ellipse((x0 + (x1 - x0) // 4, y0, x1 - (x1 - x0) // 4, top + (y1 - y0) // 6), outline=ink, width=6)
    draw.polygon([(x0 + (x1 - x0) // 6, top), (x1 - (x1 - x0) // 6, top), (x1, y1), (x0, y1)], fill=paper)
    stripe = max(4, (y1 - top) // 9)
    for y in range(top, y1, 2 * stripe):
        left = x0 + (x1 - x0) // 6 * (y1 - y) // max(1, y1 - top)
        draw.rectangle((left, y, x1 - (left - x0), min(y1, y + stripe)), fill=ink)
    return canvas
