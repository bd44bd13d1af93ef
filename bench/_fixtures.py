"""Benchmark inputs, made fresh in a temporary folder: images, catalogs and manifests."""

from __future__ import annotations

import base64
import io
import json
import os
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

__all__ = ["answer_json", "first_items", "input_jpeg", "noise_png", "product_jpeg", "tiny_png", "write_catalog"]

MODEL = "gemini-3.1-flash-image"
_LINKS_PER_FILE = 50_000
INSTRUCTION = "Replace the background with pure white; keep the product unchanged"


def tiny_png(path: Path) -> Path:
    """A 64x64 flat PNG (about 150 bytes): the "small response" the simulator sends back."""
    _save(Image.new("RGB", (64, 64), (200, 40, 40)), path, "PNG")
    return path


def input_jpeg(path: Path) -> Path:
    """A 256x256 JPEG (under 2 KB): every item's input, so uploads stay small."""
    _save(Image.new("RGB", (256, 256), (30, 140, 60)), path, "JPEG")
    return path


def noise_png(path: Path, edge: int = 2048) -> Path:
    """A 2048x2048 PNG of 3-bit noise: about 5.9 MB, the size of a real 2K answer (7.9 MB in base64)."""
    raw = random.Random(0).randbytes(edge * edge * 3)
    image = Image.frombytes("RGB", (edge, edge), raw.translate(bytes((b & 7) + 96 for b in range(256))))
    _save(image, path, "PNG")
    return path


def product_jpeg(path: Path, edge: int = 1024) -> Path:
    """A 1024x1024 JPEG of coloured shapes on white with a little noise: about 70 KB, like an edited product photo."""
    rng = random.Random(0)
    image = Image.new("RGB", (edge, edge), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = rng.randrange(edge // 5, edge * 4 // 5), rng.randrange(edge // 5, edge * 4 // 5)
        draw.ellipse(
            (x - 60, y - 60, x + 60, y + 60), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256))
        )
    noise = Image.frombytes(
        "RGB", (edge, edge), rng.randbytes(edge * edge * 3).translate(bytes(b & 7 for b in range(256)))
    )
    image = ImageChops.add(image.filter(ImageFilter.GaussianBlur(3)), noise)
    image.save(path, "JPEG", quality=90)
    return path


def photo_jpeg(path: Path, seed: int, edge: int = 1600) -> Path:
    """A JPEG like a catalog's product photo, its own for each *seed*: 1600 px, about 1 MB (shapes on white under
    a camera sensor's noise)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (edge, edge), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y, r = rng.randrange(edge // 5, edge * 4 // 5), rng.randrange(edge // 5, edge * 4 // 5), edge // 12
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    noise = Image.frombytes("RGB", (edge, edge), rng.randbytes(edge * edge * 3).translate(_SENSOR))
    ImageChops.subtract(image, noise).save(path, "JPEG", quality=90)
    return path


_SENSOR = bytes(b & 15 for b in range(256))  # noise of 0-15 levels per channel


def answer_json(picture: Path) -> bytes:
    """A generateContent answer carrying *picture*, with the usageMetadata of a 1K image."""
    data = base64.b64encode(picture.read_bytes()).decode()
    part = {"inlineData": {"mimeType": "image/jpeg", "data": data}}
    usage = {"promptTokenCount": 300, "candidatesTokenCount": 1120, "totalTokenCount": 1420}
    return json.dumps(
        {"candidates": [{"content": {"parts": [part]}, "finishReason": "STOP"}], "usageMetadata": usage}
    ).encode()


def _save(image: Image.Image, path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    path.write_bytes(buffer.getvalue())


def write_catalog(
    folder: Path, n: int, source_image: Path, *, image_size: str = "512", distinct: bool = False, photos: bool = False
) -> Path:
    """A job of *n* edit items read from a CSV, each with its own input file; returns the manifest.

    The inputs are hard links to copies of one small JPEG: every item has a file of its
    own to stat and read, without writing 100,000 copies. With *distinct*, each item's input
    is a different 24x24 PNG instead (different bytes, so different digests and work keys,
    as in a real catalog). With *photos*, each item's input is a photo of its own, as a catalog's
    are (:func:`photo_jpeg`, about 1 MB).
    """
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    data = source_image.read_bytes()
    with (folder / "catalog.csv").open("w") as csv:
        csv.write("id\n")
        for number in range(n):
            item_id = f"sku-{number:06d}"
            csv.write(f"{item_id}\n")
            if photos:
                photo_jpeg(images / f"{item_id}.jpg", number)
                continue
            if distinct:
                colour = (number % 256, number // 256 % 256, number // 65536 % 256)
                # A PNG under the .jpg name the manifest gives: nanobatch reads the type from the bytes.
                _save(Image.new("RGB", (24, 24), colour), images / f"{item_id}.jpg", "PNG")
                continue
            source = folder / f"source-{number // _LINKS_PER_FILE}.jpg"  # ext4 allows 65,000 links per file
            if number % _LINKS_PER_FILE == 0:
                source.write_bytes(data)
            os.link(source, images / f"{item_id}.jpg")
    manifest = folder / "job.yaml"
    manifest.write_text(
        f"name: {folder.name}\n"
        f"model: {MODEL}\n"
        "defaults:\n"
        f"  instruction: {INSTRUCTION}\n"
        f'  image_size: "{image_size}"\n'
        "items_from:\n"
        "  - csv: catalog.csv\n"
        '    image: "images/{id}.jpg"\n'
    )
    return manifest


def first_items(manifest: Path, n: int) -> Path:
    """A manifest beside *manifest* (same folder, same inputs) with only its first *n* items."""
    with (manifest.parent / "catalog.csv").open() as full, (manifest.parent / "catalog-first.csv").open("w") as part:
        for _, line in zip(range(n + 1), full, strict=False):  # the header, then n rows
            part.write(line)
    first = manifest.with_name("job-first.yaml")
    first.write_text(manifest.read_text().replace("csv: catalog.csv", "csv: catalog-first.csv"))
    return first
