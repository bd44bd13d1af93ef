"""The simulator's pictures: right size, and visibly edited the way the instruction says."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx2
import pytest
from PIL import Image, ImageChops, ImageDraw, ImageOps, ImageStat

from nanobatch.models import pixel_size
from nanobatch.simulator import SimulatorConfig, create_app
from nanobatch.simulator.imaging import choose_aspect_ratio, edits_for

FLASH_31 = "gemini-3.1-flash-image"
TEAL, RED, YELLOW = (20, 140, 150), (210, 30, 40), (250, 200, 0)

# These tests exercise 2.5 flash image (no image sizes, no thinking), live until 2026-10-02.
pytestmark = pytest.mark.usefixtures("before_2_5_flash_shutdown")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def product(size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A red box on a teal background with a darker teal table."""
    w, h = size
    image = Image.new("RGB", size, TEAL)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(h * 0.75), w, h), fill=(10, 100, 110))
    draw.rectangle((w * 0.3, h * 0.3, w * 0.7, h * 0.8), fill=RED)
    return image


def checkerboard(size: tuple[int, int] = (128, 128), cell: int = 4) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for x in range(0, size[0], cell):
        for y in range((x // cell) % 2 * cell, size[1], 2 * cell):
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(0, 0, 0))
    return image


def part(image: Image.Image, fmt: str = "PNG") -> dict[str, Any]:
    return {"inlineData": {"mimeType": f"image/{fmt.lower()}", "data": base64.b64encode(encode(image, fmt)).decode()}}


async def edit(
    contents: list[dict[str, Any]], model: str = FLASH_31, config: SimulatorConfig | None = None, **image_config: Any
) -> Image.Image:
    payload = {"contents": contents, "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": image_config}}
    transport = httpx2.ASGITransport(app=create_app(config))
    async with httpx2.AsyncClient(transport=transport, base_url="http://sim") as client:
        response = await client.post(f"/v1beta/models/{model}:generateContent", json=payload)
    assert response.status_code == 200, response.text
    parts = response.json()["candidates"][0]["content"]["parts"]
    (result,) = [p for p in parts if "inlineData" in p and not p.get("thought")]
    image = Image.open(io.BytesIO(base64.b64decode(result["inlineData"]["data"])))
    assert image.format == result["inlineData"]["mimeType"].removeprefix("image/").upper()
    return image.convert("RGB")


def user(text: str, *images: Image.Image) -> list[dict[str, Any]]:
    return [{"role": "user", "parts": [{"text": text}, *(part(i) for i in images)]}]


def crop(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """*box* in fractions of the width and height."""
    w, h = image.size
    return image.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))


def mean(image: Image.Image) -> list[float]:
    return list(ImageStat.Stat(image).mean)


@pytest.mark.parametrize(
    ("model", "ratio", "size"),
    [
        (FLASH_31, "16:9", "512"),
        (FLASH_31, "1:4", "512"),
        ("gemini-3-pro-image", "3:4", "1K"),
        ("gemini-2.5-flash-image", "1:1", None),
    ],
)
async def test_edit_has_the_requested_pixel_size_and_differs_from_the_input(
    model: str, ratio: str, size: str | None
) -> None:
    source = product((200, 150))
    config: dict[str, Any] = {"aspectRatio": ratio, **({"imageSize": size} if size else {})}
    result = await edit(user("Make it pop", source), model, **config)
    assert result.size == pixel_size(ratio, size)
    unchanged = ImageOps.fit(source, result.size, Image.Resampling.BILINEAR)
    assert max(mean(ImageChops.difference(result, unchanged))) > 10


async def test_black_and_white_makes_every_pixel_grey() -> None:
    result = await edit(user("Make it black and white", product()), imageSize="512")
    red, green, blue = result.split()
    assert ImageChops.difference(red, green).getbbox() is None
    assert ImageChops.difference(green, blue).getbbox() is None
    assert ImageStat.Stat(result).stddev[0] > 10  # still a picture, not a flat grey


async def test_white_background_whitens_the_background_and_keeps_the_product() -> None:
    result = await edit(user("Replace the background with pure white", product()), imageSize="512")
    for corner in ((0, 0, 0.1, 0.1), (0.9, 0, 1, 0.1), (0, 0.9, 0.1, 1), (0.9, 0.9, 1, 1)):
        assert mean(crop(result, corner)) == [255, 255, 255]
    centre = mean(crop(result, (0.4, 0.4, 0.6, 0.6)))
    assert all(abs(c - t) < 8 for c, t in zip(centre, RED, strict=True))


async def test_blur_softens_the_edges_and_keeps_the_centre_sharp() -> None:
    source = checkerboard()
    result = await edit(user("Blur the background", source), imageSize="512")
    sharp = ImageOps.fit(source, result.size)
    corner, centre = (0, 0, 0.12, 0.12), (0.4, 0.4, 0.6, 0.6)
    assert ImageStat.Stat(crop(result, corner)).stddev[0] < ImageStat.Stat(crop(sharp, corner)).stddev[0] / 4
    assert ImageStat.Stat(crop(result, centre)).stddev[0] > ImageStat.Stat(crop(sharp, centre)).stddev[0] * 0.8


async def test_warmer_light_adds_red_and_removes_blue() -> None:
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    red, _, blue = mean(await edit(user("Make the light warmer", grey), imageSize="512"))
    assert red > 135 and blue < 110


async def test_other_instructions_tint_and_write_a_caption() -> None:
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    result = await edit(user("Remove the price sticker", grey), imageSize="512")
    top, caption = crop(result, (0, 0, 1, 0.5)), crop(result, (0, 0.97, 1, 1))
    assert max(ImageStat.Stat(top).mean) - min(ImageStat.Stat(top).mean) > 20  # tinted
    assert ImageStat.Stat(caption).extrema[0] != ImageStat.Stat(top).extrema[0]  # dark band, white text


async def test_text_to_image_generates_a_picture_of_the_requested_size() -> None:
    result = await edit(user("A poster of a lemon on a blue table"), aspectRatio="9:16", imageSize="512")
    assert result.size == pixel_size("9:16", "512")
    assert ImageStat.Stat(result).stddev[0] > 10


async def test_without_aspect_ratio_the_output_keeps_the_inputs_shape() -> None:
    result = await edit(user("Make it pop", product((300, 400))), imageSize="512")
    assert result.size == pixel_size("3:4", "512")


async def test_a_logo_is_pasted_on_the_photo_not_the_other_way_round() -> None:
    logo = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(logo).ellipse((4, 4, 60, 60), fill=(*YELLOW, 255))
    photo = product((300, 400))
    result = await edit(user("Put the logo on the t-shirt", photo, logo), imageSize="512")
    assert result.size == pixel_size("3:4", "512")  # the photo's shape: it is the image edited
    chest = mean(crop(result, (0.48, 0.53, 0.52, 0.57)))
    assert all(abs(c - y) < 12 for c, y in zip(chest, YELLOW, strict=True))


async def test_a_later_turn_edits_the_models_previous_output() -> None:
    first, previous = product(), Image.new("RGB", (96, 96), (200, 200, 200))
    contents = [
        *user("Put it on a teal background", first),
        {"role": "model", "parts": [part(previous)]},
        {"role": "user", "parts": [{"text": "Make it black and white"}]},
    ]
    result = await edit(contents, imageSize="512")
    assert mean(result) == [200, 200, 200]


async def test_jpeg_output_when_configured() -> None:
    result = await edit(user("Make it pop", product()), config=SimulatorConfig(image_format="jpeg"), imageSize="512")
    assert result.size == (512, 512)


@pytest.mark.parametrize(
    ("instruction", "edits"),
    [
        ("Replace the background with pure white; keep the product unchanged", ("white_background",)),
        ("Make the background white", ("white_background",)),
        ("Blur the background", ("blur",)),
        ("Convert to greyscale", ("grayscale",)),
        ("Black-and-white, warmer light", ("warm", "grayscale")),
        ("Remove the price sticker", ()),
    ],
)
def test_instructions_are_recognised_by_keyword(instruction: str, edits: tuple[str, ...]) -> None:
    assert edits_for(instruction) == edits


def test_aspect_ratio_defaults_to_the_nearest_supported_one() -> None:
    ratios = ("1:1", "3:4", "16:9")
    assert choose_aspect_ratio(None, Image.new("RGB", (1000, 560)), ratios) == "16:9"
    assert choose_aspect_ratio(None, None, ratios) == "1:1"
    assert choose_aspect_ratio("3:4", Image.new("RGB", (1000, 560)), ratios) == "3:4"


def test_keyword_matching_agrees_with_the_plain_patterns() -> None:
    import itertools
    import re

    old = re.compile(r"white\b.*\bbackground|background\b.*\bwhite|remove the background", re.I)
    words = ["white", "Background", "off-white", "backgrounds", "whitebackground", "remove the background", "\n", "x"]
    for n in range(1, 4):
        for combo in itertools.product(words, repeat=n):
            text = " ".join(combo)
            assert ("white_background" in edits_for(text)) == bool(old.search(text)), text


@pytest.mark.parametrize("word", ["white ", "background ", "Background white ", "black and "])
def test_a_megabyte_instruction_is_matched_in_linear_time(word: str) -> None:
    # Quadratic matching took ten minutes of a core (holding the GIL, so a `run --simulate` client in the same
    # process could not even take SIGTERM); linear matching takes well under a second. The bound is a hang guard.
    import subprocess
    import sys

    text = f"{word!r} * (1_000_000 // {len(word)}) + 'blur'"
    code = f"from nanobatch.simulator.imaging import edits_for; print(edits_for({text}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    expected = "('white_background', 'blur')" if "white" in word and "ackground" in word else "('blur',)"
    assert done.stdout.strip() == expected


async def test_a_megabyte_instruction_gets_a_captioned_picture() -> None:
    result = await edit(user("make it pop " * 100_000, product()))  # the caption is cut, with "..."
    assert result.size == (1024, 1024)
