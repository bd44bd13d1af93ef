"""Measure one output image against the item's ``qa:`` settings (CPU only, thread-safe; run it off the loop).

The image is decoded once, small: a JPEG at 1/2..1/8 scale by its decoder (DCT scaling, ``draft``), anything
else in full and then box-averaged (``reduce``), to about :data:`WORK_EDGE` pixels on its long side; every
check then works on that copy with numpy. The box average is also what makes the checks tolerant of JPEG
noise. The thresholds below are described, with the reasons for them, in docs/qa.md.

>>> from nanobatch.qa import QaSettings
>>> check_image(png, original=None, aspect_ratio="1:1", settings=QaSettings(min_side=1000))  # doctest: +SKIP
Verdict(passed=False, failed=('min_side',), values={'width': 512, 'height': 512, 'min_side': 512})
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageChops, UnidentifiedImageError

from .qa import NOT_MEASURED, QA_CHECKS, QaSettings, UndecodableImage, Verdict

__all__ = ["WORK_EDGE", "check_image", "eight_bit"]

WORK_EDGE = 256  # the checks measure a copy with a long side of WORK_EDGE / 2 to WORK_EDGE pixels
BAND = 0.02  # the border band: this share of the width at the left and right, of the height at top and bottom
WHITE_LEVEL = 250  # the band is white when its median pixel's channels are at least this (255 less JPEG noise)
OFF_WHITE = 242  # and a band pixel is off white when a channel is below this (noise stays above it, shadows not)
BAND_OFF_SHARE = 0.02  # the share of the band's pixels that may be off white (a stray shadow, a watermark)
SUBJECT_DIFF = 32  # a pixel is subject when a channel differs this much from the band's median colour
SUBJECT_MIN_PIXELS = 2  # a row or column belongs to the subject's box when it has at least this many such pixels
COMPARE_EDGE = 64  # ``changed`` compares the two images at this size
CHANGED_DIFF = 6  # a pixel has changed when a channel differs more than this (at COMPARE_EDGE): 249 -> 255 does
CHANGED_EDGE = 16  # a pixel next to one this different in either image is an edge: left out of ``changed``
CHANGED_MIN_SHARE = 0.005  # an output with fewer changed pixels than this share is the input handed back
CROP_EDGE = 32  # ``same_subject`` compares the subjects' crops, padded square, at this size
SAME_SUBJECT_MIN = 0.5  # the least correlation of the two crops that is still the same subject
ASPECT_SLACK = 0.02  # ``aspect``: allowed error of log(width / height), besides rounding each side to 16 px

Pixels = npt.NDArray[np.uint8]
# What decoding an image may raise (Pillow's UnidentifiedImageError is an OSError; a broken PNG chunk, SyntaxError)
_UNDECODABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# EXIF orientation -> the turn that makes the picture upright (as a viewer, and the model, shows it).
_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True, slots=True)
class _Look:
    """An image decoded small (and its pixels), its band's median colour, its subject's mask and box (y0, y1, x0,
    x1; ends excluded)."""

    image: Image.Image
    pixels: Pixels
    background: tuple[int, int, int]
    mask: npt.NDArray[np.bool_]
    box: tuple[int, int, int, int] | None


def check_image(output: bytes, *, original: bytes | None, aspect_ratio: str | None, settings: QaSettings) -> Verdict:
    """The verdict on *output* (an encoded image): *original* is the item's first input image (None for a
    text-to-image item or an input sent by reference: ``changed`` and ``same_subject`` are then not measured),
    *aspect_ratio* the requested one (``"16:9"``) or None (``aspect`` is then not measured).

    Raises :class:`~nanobatch.qa.UndecodableImage` for an *output* Pillow cannot decode; an *original* it cannot
    decode (a HEIC photo) leaves ``changed`` and ``same_subject`` out, named in ``values["not_measured"]``."""
    values: dict[str, Any] = {}
    failed: set[str] = set()
    try:
        with Image.open(io.BytesIO(output)) as image:
            width, height = _upright_size(image)
            look = _look(image) if settings.reads_pixels(compares=original is not None) else None
    except _UNDECODABLE as exc:
        said = str(exc) if not isinstance(exc, UnidentifiedImageError) else "not an image type Pillow reads"
        raise UndecodableImage(f"it cannot be decoded: {said}") from None
    values.update(width=width, height=height)
    if settings.min_side is not None:
        values["min_side"] = max(width, height)
        _fail_if(failed, "min_side", max(width, height) < settings.min_side)
    if settings.aspect and aspect_ratio is not None:
        error = abs(math.log(width / height) - math.log(_ratio(aspect_ratio)))
        values["aspect"] = round(width / height, 3)
        _fail_if(failed, "aspect", error > ASPECT_SLACK + 8 / width + 8 / height)
    if look is not None:
        _check_look(look, original, settings, values, failed)
    return Verdict(passed=not failed, failed=tuple(c for c in QA_CHECKS if c in failed), values=values)


def _check_look(
    look: _Look, original: bytes | None, settings: QaSettings, values: dict[str, Any], failed: set[str]
) -> None:
    if settings.background == "white":
        share, level = _band_white(look.pixels)
        values.update(background=round(share, 3), background_level=round(level, 1))
        _fail_if(failed, "background", share < 1 - BAND_OFF_SHARE or level < WHITE_LEVEL)
    if settings.min_fill is not None:
        values["min_fill"] = round(_fill(look), 3)
        _fail_if(failed, "min_fill", values["min_fill"] < settings.min_fill)
    if original is None or not (settings.changed or settings.same_subject):
        return
    try:
        with Image.open(io.BytesIO(original)) as image:
            before = _look(image)
    except _UNDECODABLE:
        values[NOT_MEASURED] = [c for c in ("changed", "same_subject") if getattr(settings, c)]
        return
    if settings.changed:
        values["changed"] = round(_changed_share(before.image, look.image), 3)
        _fail_if(failed, "changed", values["changed"] < CHANGED_MIN_SHARE)
    if settings.same_subject:
        values["same_subject"] = round(_resemblance(before, look), 3)
        _fail_if(failed, "same_subject", values["same_subject"] < SAME_SUBJECT_MIN)


def _fail_if(failed: set[str], check: str, condition: bool) -> None:
    if condition:
        failed.add(check)


def _ratio(aspect_ratio: str) -> float:
    width, height = aspect_ratio.split(":")
    return int(width) / int(height)


# -------------------------------------------------------------------------------------------- decoding


def _look(image: Image.Image) -> _Look:
    """*image* decoded once, small (see the module's docstring), and its subject found."""
    width, height = image.size
    scale = WORK_EDGE / max(width, height)
    if image.format == "JPEG" and scale < 1:
        # The decoder takes the smallest DCT scale (1/2..1/8) that keeps half of WORK_EDGE: 2048 -> 256, 1600 -> 200.
        image.draft("RGB", (max(1, round(width * scale / 2)), max(1, round(height * scale / 2))))
    turn = _UPRIGHT.get(image.getexif().get(_ORIENTATION, 1))  # a phone photo stored sideways
    small = image if image.mode == "RGB" and "transparency" not in image.info else _rgb(image)
    factor = -(-max(small.size) // WORK_EDGE)  # (rounded up: 767 px -> 3, to 256)
    if factor > 1:
        small = small.reduce(factor)  # a box average: noise and JPEG ringing average out
    if turn is not None:
        small = small.transpose(turn)
    small.load()
    pixels = np.asarray(small)
    red, green, blue = (int(v) for v in np.median(_band(pixels), axis=0))
    difference = np.asarray(ImageChops.difference(small, Image.new("RGB", small.size, (red, green, blue))))
    mask = _largest_channel(difference) > SUBJECT_DIFF
    return _Look(image=small, pixels=pixels, background=(red, green, blue), mask=mask, box=_box(mask))


def eight_bit(image: Image.Image) -> Image.Image:
    """*image*, a 16- or 32-bit grey one scaled to 8 bits (``L``): Pillow's own convert clips such values at 255,
    which turns a 16-bit picture all white. Others are returned as they are."""
    if image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return image
    grey = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(grey.max()), 255.0)
    return Image.fromarray(np.clip(grey * (255.0 / top), 0, 255).astype(np.uint8), "L")


def _rgb(image: Image.Image) -> Image.Image:
    """*image* in RGB: a 16- or 32-bit grey scaled (:func:`eight_bit`), and what is transparent black (a
    transparent pixel is no white background, whatever colour it keeps under it)."""
    image = eight_bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown: turned by its EXIF orientation."""
    width, height = image.size
    return (height, width) if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def _band(pixels: Pixels) -> Pixels:
    """The border band's pixels, as rows of (r, g, b): top and bottom strips, and the sides between them."""
    height, width = pixels.shape[:2]
    by, bx = max(1, round(height * BAND)), max(1, round(width * BAND))
    strips = (pixels[:by], pixels[height - by :], pixels[by : height - by, :bx], pixels[by : height - by, width - bx :])
    return np.concatenate([strip.reshape(-1, 3) for strip in strips])


def _box(mask: npt.NDArray[np.bool_]) -> tuple[int, int, int, int] | None:
    """The subject's bounding box (y0, y1, x0, x1; ends excluded): the rows and columns with enough subject."""
    rows = np.flatnonzero(mask.sum(axis=1) >= SUBJECT_MIN_PIXELS)
    columns = np.flatnonzero(mask.sum(axis=0) >= SUBJECT_MIN_PIXELS)
    if rows.size == 0 or columns.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1


# -------------------------------------------------------------------------------------------- the checks


def _band_white(pixels: Pixels) -> tuple[float, float]:
    """The share of the band's pixels that are white but for noise, and the band's median brightness (its
    darkest channel): noise keeps a white band's median at white and its pixels near it, whatever the picture's
    size (a small one is averaged less), while a grey backdrop moves the median, and a shadow the pixels."""
    band = _band(pixels)
    darkest = np.minimum(np.minimum(band[:, 0], band[:, 1]), band[:, 2])
    return float((darkest >= OFF_WHITE).mean()), float(np.median(darkest))


def _fill(look: _Look) -> float:
    """How much of the frame the subject's box spans: the larger of its width's and its height's share."""
    if look.box is None:
        return 0.0
    y0, y1, x0, x1 = look.box
    height, width = look.mask.shape
    return float(max((y1 - y0) / height, (x1 - x0) / width))


def _changed_share(before: Image.Image, after: Image.Image) -> float:
    """The share of pixels that differ noticeably between the two images, at a small common size, edges left out
    (an outline falls on other pixels once resized from another size: a copy of the input would differ there).
    The input is taken whole, cropped to the output's shape (the model may have cropped it), and, when the rest
    of the output is one flat colour, whole against the middle of the output of its own shape (the model may
    have padded it, letterboxed; sides painted with new content, outpainting, are an edit); the least share
    counts."""
    size = (COMPARE_EDGE, COMPARE_EDGE)
    framings = [(before, after)]
    if _shape(before) != _shape(after):
        middle = _centre_box(after.size, before.width / before.height)
        framings.append((before.crop(_centre_box(before.size, after.width / after.height)), after))
        if _padding_flat(np.asarray(after), middle):
            framings.append((before, after.crop(middle)))
    small: dict[int, tuple[npt.NDArray[np.int16], npt.NDArray[np.bool_]]] = {}  # each image's, made once

    def compared(image: Image.Image) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.bool_]]:
        if id(image) not in small:  # its pixels at the common size, and where they are not an edge
            pixels = np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.int16)
            small[id(image)] = pixels, _edges(pixels) <= CHANGED_EDGE
        return small[id(image)]

    shares = []
    for source_image, target_image in framings:
        (source, source_flat), (target, target_flat) = compared(source_image), compared(target_image)
        changed = _largest_channel(np.abs(source - target)) > CHANGED_DIFF
        shares.append(float((changed & source_flat & target_flat).mean()))
    return min(shares)


def _padding_flat(pixels: Pixels, middle: tuple[int, int, int, int]) -> bool:
    """Whether the output's *pixels* outside its *middle* box (left, top, right, bottom) are one colour, but for
    noise: bars a letterbox pads with, not an extension painted in."""
    x0, y0, x1, y1 = middle
    parts = [pixels[:, :x0], pixels[:, x1:]] if x1 - x0 < pixels.shape[1] else [pixels[:y0], pixels[y1:]]
    rest = np.concatenate([part.reshape(-1, 3) for part in parts]).astype(np.int16)
    if rest.size == 0:
        return False
    off = _largest_channel(np.abs(rest - np.median(rest, axis=0).astype(np.int16))) > CHANGED_EDGE
    return float(off.mean()) <= BAND_OFF_SHARE


def _shape(image: Image.Image) -> float:
    """*image*'s width / height, to two decimals (a few pixels' rounding is the same shape)."""
    return round(image.width / image.height, 2)


def _edges(pixels: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """Each pixel's largest difference (in any channel) from its four neighbours."""
    across = _largest_channel(np.abs(pixels[:, 1:] - pixels[:, :-1]))
    down = _largest_channel(np.abs(pixels[1:] - pixels[:-1]))
    edges = np.zeros(pixels.shape[:2], dtype=np.int16)
    for view, step in ((edges[:, 1:], across), (edges[:, :-1], across), (edges[1:], down), (edges[:-1], down)):
        np.maximum(view, step, out=view)
    return edges


def _resemblance(before: _Look, after: _Look) -> float:
    """The correlation (-1..1) of the two subjects' grey crops (backgrounds blanked, padded square), over the
    pixels where either has its subject: the blank both share would make any two products look alike."""
    (first, first_mask), (second, second_mask) = _subject_crop(before), _subject_crop(after)
    where = first_mask | second_mask
    if not where.any():
        return 0.0  # neither has a subject (a flat picture): nothing resembles nothing
    # And the pixels next to them: a plain product (a rod, a cable) is one shade inside, so only its outline
    # against the blank tells its shape; without it the correlation is of noise.
    where = _grown(where)
    first, second = first[where] - first[where].mean(), second[where] - second[where].mean()
    norm = math.sqrt(float((first * first).sum()) * float((second * second).sum()))
    return float((first * second).sum()) / norm if norm > 0 else 0.0


def _grown(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """*mask* and its pixels' four neighbours."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _subject_crop(look: _Look) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """The subject's box in grey, its background white, in the middle of a white square; and where it is subject."""
    grey = np.asarray(look.image.convert("L"), dtype=np.float64)  # a copy: writable
    grey[~look.mask] = 255.0  # every background the same white, so a new background does not count
    y0, y1, x0, x1 = look.box or (0, grey.shape[0], 0, grey.shape[1])
    crop = grey[y0:y1, x0:x1]
    side = max(crop.shape)
    square = np.full((side, side), 255.0)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    image = Image.fromarray(square.astype(np.float32)).resize((CROP_EDGE, CROP_EDGE), Image.Resampling.BOX)
    small = np.asarray(image, dtype=np.float64)
    return small, small < 255.0 - SUBJECT_DIFF / 2


def _centre_box(size: tuple[int, int], ratio: float) -> tuple[int, int, int, int]:
    """The middle of an image of *size* with the shape *ratio* (width / height), as a centre crop takes it."""
    width, height = size
    if width / height > ratio:
        keep = max(1, round(height * ratio))
        return (width - keep) // 2, 0, (width - keep) // 2 + keep, height
    keep = max(1, round(width / ratio))
    return 0, (height - keep) // 2, width, (height - keep) // 2 + keep


def _largest_channel(pixels: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Each pixel's largest channel (numpy's ``max(axis=2)`` is ten times slower over three values)."""
    return np.asarray(np.maximum(np.maximum(pixels[..., 0], pixels[..., 1]), pixels[..., 2]))
