"""Pillow edits that stand in for the model: visible, deterministic, cheap.

The image to edit is the last opaque input image (in a multi-turn request
that is the model's previous output); other images of the last turn, such as
a logo, are pasted onto it as thumbnails. A few instructions are recognised
by keyword (white background, blur, warm, cool, black and white); any other
instruction tints the image and writes itself as a caption.
"""

from __future__ import annotations

import functools
import io
import math
import random
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont, ImageOps

from ..models import pixel_size
from .errors import UNPROCESSABLE_IMAGE, InvalidRequest
from .flaws import GREY, other_product, small_subject, wrong_shape
from .validation import InputImage, ParsedRequest

__all__ = ["Rendered", "choose_aspect_ratio", "edits_for", "load_canned", "render"]

_WHITE = (255, 255, 255)
# Every pattern is matched in one pass, in time linear in the instruction: "A ... B" on one line is
# "the first A ends before some B starts", never a backtracking ``A.*B``, which is quadratic: a 1 MB instruction
# would hold the GIL, and so a `run --simulate` client in the same process, for minutes.
_WORD_WHITE = re.compile(r"white\b", re.I)
_WORD_BACKGROUND = re.compile(r"\bbackground", re.I)
_BACKGROUND_WORD = re.compile(r"background\b", re.I)
_WORD_WHITE_START = re.compile(r"\bwhite", re.I)
_REMOVE_BACKGROUND = re.compile(r"remove the background", re.I)


def _before(first: re.Pattern[str], second: re.Pattern[str], text: str) -> bool:
    """True if *second* matches after a match of *first*, on the same line (``first.*second``, linearly)."""
    for line in text.split("\n"):
        if (found := first.search(line)) is not None and second.search(line, found.end()) is not None:
            return True
    return False


def _asks_white_background(text: str) -> bool:
    return (
        _before(_WORD_WHITE, _WORD_BACKGROUND, text)
        or _before(_BACKGROUND_WORD, _WORD_WHITE_START, text)
        or _REMOVE_BACKGROUND.search(text) is not None
    )


_GRAYSCALE = re.compile(r"black[ -]and[ -]white|\bgr[ae]yscale|\bmonochrome|\bb&w\b", re.I)
_EDITS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("white_background", _asks_white_background),
    ("blur", lambda text: re.search(r"\bblur", text, re.I) is not None),
    ("warm", lambda text: re.search(r"\bwarm", text, re.I) is not None),
    ("cool", lambda text: re.search(r"\bcool", text, re.I) is not None),
    ("grayscale", lambda text: _GRAYSCALE.search(text) is not None),
)
_ANALYSIS_EDGE = 160  # background detection runs on a thumbnail this big
_SIMILAR = 40  # max channel difference that still counts as "background colour"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    """The encoded result, and the draft the model "thought" with (if any)."""

    data: bytes
    mime_type: str
    size: tuple[int, int]
    aspect_ratio: str
    thought: bytes | None


def edits_for(instruction: str) -> tuple[str, ...]:
    """The keyword edits *instruction* asks for, in the order they are applied.

    >>> edits_for("Replace the background with pure white, then make it black and white")
    ('white_background', 'grayscale')
    """
    return tuple(name for name, wanted in _EDITS if wanted(instruction))


def choose_aspect_ratio(requested: str | None, base: Image.Image | None, ratios: tuple[str, ...]) -> str:
    """The requested ratio; else the supported ratio nearest the input's (as the API does); else 1:1."""
    if requested:
        return requested
    if base is None or "1:1" not in ratios:
        return "1:1"
    target = math.log(base.width / base.height)
    return min(ratios, key=lambda r: abs(math.log(_ratio(r)) - target))


def render(
    request: ParsedRequest, *, image_format: str, seed: int, thought_image: bool, flaw: str | None = None
) -> Rendered:
    """Edit (or generate) the image for *request*, with *flaw* (a QA_FLAWS kind) if given. CPU-bound: run it in
    a worker thread."""
    base, overlays = _split_inputs(request.images, request.last_turn)
    try:
        base_rgb = _to_rgb(base.image) if base else None
        overlay_images = [_load(o.image) for o in overlays]
    except (OSError, ValueError, SyntaxError):
        raise InvalidRequest(UNPROCESSABLE_IMAGE) from None
    ratio = choose_aspect_ratio(request.aspect_ratio, base_rgb, request.model.aspect_ratios)
    size = pixel_size(ratio, "512" if flaw == "qa_small_output" else request.image_size or request.model.default_size)
    if flaw == "qa_small_output":  # 512 px on the long side (the 512 tier's 1:4 is 256 x 1024), of the same shape
        size = (max(1, round(size[0] * 512 / max(size))), max(1, round(size[1] * 512 / max(size))))
    if base_rgb is None:
        result = _generate(request.instruction, size, seed)
    elif flaw == "qa_unchanged":
        result = ImageOps.fit(base_rgb, size, Image.Resampling.BILINEAR)
    else:
        result = _edit(ImageOps.fit(base_rgb, size, Image.Resampling.BILINEAR), overlay_images, request.instruction)
    result = _flawed(result, flaw, seed)
    thought = _encode(_draft(result), image_format) if thought_image else None
    return Rendered(
        data=_encode(result, image_format),
        mime_type=f"image/{image_format}",
        size=result.size,
        aspect_ratio=ratio,
        thought=thought,
    )


def _flawed(image: Image.Image, flaw: str | None, seed: int) -> Image.Image:
    if flaw == "qa_grey":
        return _white_background(image, GREY)
    if flaw == "qa_small_subject":
        return small_subject(image)
    if flaw == "qa_other_product":
        return other_product(image, seed)
    if flaw == "qa_wrong_shape":
        return wrong_shape(image)
    return image


def load_canned(path: str) -> Rendered:
    """The image file at *path* as a ready answer, sent as it is whatever the request asks (no draft)."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        size, mime_type = image.size, Image.MIME.get(image.format or "", "image/png")
    divisor = math.gcd(*size)
    ratio = f"{size[0] // divisor}:{size[1] // divisor}"
    return Rendered(data=data, mime_type=mime_type, size=size, aspect_ratio=ratio, thought=None)


def _ratio(ratio: str) -> float:
    width, height = ratio.split(":")
    return int(width) / int(height)


def _split_inputs(images: tuple[InputImage, ...], last_turn: int) -> tuple[InputImage | None, list[InputImage]]:
    if not images:
        return None, []
    opaque = [i for i in images if not i.has_alpha]
    base = opaque[-1] if opaque else images[-1]
    return base, [i for i in images if i.turn == last_turn and i is not base]


def _load(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    image.load()
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    image = _load(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _edit(image: Image.Image, overlays: list[Image.Image], instruction: str) -> Image.Image:
    _paste_overlays(image, overlays)
    edits = edits_for(instruction)
    for name in edits:
        image = _EDIT_FUNCTIONS[name](image)
    if not edits:
        if not overlays:
            image = Image.blend(image, Image.new("RGB", image.size, _colour_for(instruction)), 0.3)
        _caption(image, instruction)
    return image


def _paste_overlays(image: Image.Image, overlays: list[Image.Image]) -> None:
    """One overlay goes on the chest (centre, a little below the middle); several go bottom-right."""
    edge = max(16, round(min(image.size) * 0.28))
    x = image.width - 8
    for overlay in overlays:
        thumb = overlay.convert("RGBA")
        thumb.thumbnail((edge, edge), Image.Resampling.BILINEAR)
        if len(overlays) == 1:
            pos = ((image.width - thumb.width) // 2, round(image.height * 0.55) - thumb.height // 2)
        else:
            x -= thumb.width
            pos = (x, image.height - thumb.height - 8)
            x -= 8
        image.paste(thumb, pos, thumb)


def _white_background(image: Image.Image, colour: tuple[int, int, int] = _WHITE) -> Image.Image:
    """Whiten (or paint *colour*) what looks like background: colours close to the border's that touch it."""
    scale = _ANALYSIS_EDGE / max(image.size)
    small = image.resize(
        (max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.Resampling.BOX
    )
    mask = _connected_to_border(_similar_to_border(small)).filter(ImageFilter.MaxFilter(3))
    mask = mask.resize(image.size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1))
    return Image.composite(Image.new("RGB", image.size, colour), image, mask)


def _similar_to_border(small: Image.Image) -> Image.Image:
    w, h = small.size
    mask = Image.new("L", small.size, 0)
    points = [(x, y) for x in (2, w // 4, w // 2, 3 * w // 4, w - 3) for y in (2, h - 3)]
    points += [(x, y) for x in (2, w - 3) for y in (h // 4, h // 2, 3 * h // 4)]
    for x, y in points:
        colour = small.crop((x - 2, y - 2, x + 3, y + 3)).resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
        diff = ImageChops.difference(small, Image.new("RGB", small.size, colour))
        red, green, blue = diff.split()
        nearest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
        mask = ImageChops.lighter(mask, nearest.point(lambda v: 255 if v < _SIMILAR else 0))
    frame = max(1, min(w, h) // 50)
    ImageDraw.Draw(mask).rectangle((0, 0, w - 1, h - 1), outline=255, width=frame)
    return mask


def _connected_to_border(mask: Image.Image) -> Image.Image:
    """Keep only the background regions that reach the edge (so a white mug keeps its inside)."""
    w, h = mask.size
    border = [(x, y) for x in range(w) for y in (0, h - 1)] + [(x, y) for y in range(h) for x in (0, w - 1)]
    for xy in border:
        if mask.getpixel(xy) == 255:
            ImageDraw.floodfill(mask, xy, 128)
    return mask.point(lambda v: 255 if v == 128 else 0)


def _blur_background(image: Image.Image) -> Image.Image:
    """Blur all but a central ellipse, where the subject usually is."""
    w, h = image.size
    blurred = image.resize((max(1, w // 12), max(1, h // 12)), Image.Resampling.BOX)
    blurred = blurred.filter(ImageFilter.GaussianBlur(1)).resize(image.size, Image.Resampling.BILINEAR)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((12, 6, 52, 58), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(4)).resize(image.size, Image.Resampling.BILINEAR)
    return Image.composite(image, blurred, mask)


def _tone(red: float, green: float, blue: float, lift: int) -> list[int]:
    """A 768-entry lookup table scaling each channel (and lifting red or blue by *lift*)."""
    table: list[int] = []
    for factor, add in ((red, max(lift, 0)), (green, 0), (blue, max(-lift, 0))):
        table += [min(255, round(v * factor + add)) for v in range(256)]
    return table


def _warm(image: Image.Image) -> Image.Image:
    return image.point(_tone(1.08, 1.0, 0.80, 14))


def _cool(image: Image.Image) -> Image.Image:
    return image.point(_tone(0.85, 0.98, 1.08, -14))


def _grayscale(image: Image.Image) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


_EDIT_FUNCTIONS = {
    "white_background": _white_background,
    "blur": _blur_background,
    "warm": _warm,
    "cool": _cool,
    "grayscale": _grayscale,
}


def _colour_for(text: str) -> tuple[int, int, int]:
    """A vivid colour picked by the text, so the same instruction tints the same way."""
    hue = zlib.crc32(text.encode()) % 360
    return _hsv(hue, 0.7, 0.95)


def _hsv(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    pixel = Image.new("HSV", (1, 1), (round(hue / 360 * 255), round(saturation * 255), round(value * 255)))
    red, green, blue = pixel.convert("RGB").getpixel((0, 0))  # type: ignore[misc]
    return red, green, blue


# FreeType faces are not thread-safe, and renders run in worker threads.
_FONT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _caption(image: Image.Image, text: str) -> None:
    """Write *text* on a dark band along the bottom."""
    text = " ".join(text.split()) or "(no instruction)"
    size = max(10, image.height // 28)
    band = round(size * 1.8)
    draw = ImageDraw.Draw(image, "RGBA")
    draw.rectangle((0, image.height - band, image.width, image.height), fill=(0, 0, 0, 150))
    limit = image.width * 0.94
    # No glyph is narrower than an eighth of the font size: more characters than this can never fit. Cutting
    # first keeps the trimming below short (one character at a time over a 1 MB instruction would be quadratic).
    fits_at_most = int(limit / (size / 8)) + 1
    cut, text = len(text) > fits_at_most, text[:fits_at_most]
    with _FONT_LOCK:
        font = _font(size)
        if cut or draw.textlength(text, font=font) > limit:
            while text and draw.textlength(text + "...", font=font) > limit:
                text = text[:-1]
            text += "..."
        draw.text((image.width * 0.03, image.height - band + (band - size) // 2), text, font=font, fill=_WHITE)


def _generate(prompt: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A picture for a text-only prompt: a gradient, a few shapes and the caption."""
    rnd = random.Random(seed ^ zlib.crc32(prompt.encode()))
    hue = rnd.uniform(0, 360)
    gradient = Image.linear_gradient("L").resize(size, Image.Resampling.BILINEAR)
    image = ImageOps.colorize(gradient, _hsv(hue, 0.5, 0.95), _hsv((hue + 60) % 360, 0.8, 0.45)).convert("RGB")
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((0, round(h * 0.68), w, h), fill=_hsv((hue + 180) % 360, 0.45, 0.6))
    for _ in range(3):
        r = rnd.uniform(0.08, 0.18) * min(w, h)
        cx, cy = rnd.uniform(0.2, 0.8) * w, rnd.uniform(0.3, 0.65) * h
        fill = _hsv(rnd.uniform(0, 360), 0.8, 0.95)
        draw.ellipse((cx - r * 1.3, cy - r, cx + r * 1.3, cy + r), fill=fill, outline=(40, 40, 40), width=2)
    _caption(image, prompt)
    return image


def _draft(image: Image.Image) -> Image.Image:
    """A small pencil-sketch version: what an interim "thought" image looks like."""
    small = image.copy()
    small.thumbnail((256, 256), Image.Resampling.BOX)
    return ImageOps.grayscale(small).filter(ImageFilter.CONTOUR).convert("RGB")


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, "JPEG", quality=90)
    else:
        image.save(buffer, "PNG", compress_level=1)  # fast: about 1 s for a 4K photo
    return buffer.getvalue()
