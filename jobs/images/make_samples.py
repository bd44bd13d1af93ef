"""Draw the sample product pictures used by jobs/example.yaml.

Run ``python jobs/images/make_samples.py`` to regenerate them (deterministic).
Each product sits on a coloured, patterned background, so edits such as
"white background" visibly change them; each file is a few KB.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).resolve().parent
RGB = tuple[int, int, int]


def backdrop(size: tuple[int, int], wall: tuple[RGB, RGB], table: RGB | None, seed: int) -> Image.Image:
    """A vertical gradient wall with soft diagonal stripes, and maybe a wooden table."""
    w, h = size
    gradient = Image.linear_gradient("L").resize(size)
    image = Image.composite(Image.new("RGB", size, wall[1]), Image.new("RGB", size, wall[0]), gradient)
    draw = ImageDraw.Draw(image, "RGBA")
    for x in range(-h, w, 22):
        draw.line((x, h, x + h, 0), fill=(255, 255, 255, 28), width=8)
    if table is not None:
        top = int(h * 0.72)
        draw.rectangle((0, top, w, h), fill=table)
        rnd = random.Random(seed)
        for y in range(top + 4, h, 7):
            shade = rnd.randint(-22, 22)
            grain = tuple(max(0, min(255, c + shade)) for c in table)
            draw.line((0, y, w, y + rnd.randint(-2, 2)), fill=(*grain, 255), width=2)
    return image


def mug() -> Image.Image:
    image = backdrop((320, 320), ((40, 150, 150), (20, 95, 105)), (140, 90, 50), 1)
    draw = ImageDraw.Draw(image)
    draw.ellipse((222, 130, 272, 200), outline=(200, 30, 40), width=12)
    draw.rectangle((100, 110, 235, 245), fill=(200, 30, 40))
    draw.ellipse((100, 95, 235, 125), fill=(150, 20, 30))
    draw.ellipse((100, 230, 235, 260), fill=(200, 30, 40))
    draw.rectangle((118, 140, 135, 220), fill=(230, 90, 90))
    return image


def sneaker() -> Image.Image:
    image = backdrop((384, 288), ((245, 150, 60), (215, 100, 30)), None, 2)
    draw = ImageDraw.Draw(image)
    for x in range(10, 384, 36):
        for y in range(12, 288, 36):
            draw.ellipse((x, y, x + 8, y + 8), fill=(250, 185, 110))
    draw.rounded_rectangle((50, 190, 335, 222), radius=14, fill=(245, 245, 245))
    draw.polygon([(60, 195), (90, 120), (170, 105), (215, 140), (320, 165), (330, 195)], fill=(30, 70, 200))
    draw.polygon([(120, 118), (165, 108), (190, 150), (140, 160)], fill=(240, 240, 240))
    for i in range(4):
        draw.line((130 + i * 14, 125, 150 + i * 14, 150), fill=(250, 250, 250), width=3)
    return image


def bottle() -> Image.Image:
    image = backdrop((288, 384), ((150, 90, 190), (80, 40, 120)), (200, 180, 150), 3)
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((100, 140, 188, 330), radius=22, fill=(30, 140, 60))
    draw.polygon([(118, 145), (170, 145), (158, 95), (130, 95)], fill=(30, 140, 60))
    draw.rectangle((128, 60, 160, 100), fill=(30, 140, 60))
    draw.rectangle((124, 45, 164, 66), fill=(220, 190, 40))
    draw.rectangle((100, 200, 188, 265), fill=(245, 240, 220))
    draw.text((118, 222), "FRESH", fill=(30, 100, 50))
    return image


def lamp() -> Image.Image:
    image = backdrop((320, 320), ((40, 60, 120), (15, 25, 70)), (120, 75, 45), 4)
    draw = ImageDraw.Draw(image)
    draw.polygon([(115, 70), (205, 70), (240, 160), (80, 160)], fill=(250, 210, 70))
    draw.rectangle((153, 160, 167, 250), fill=(175, 140, 70))
    draw.ellipse((110, 240, 210, 265), fill=(150, 115, 55))
    glow = Image.new("L", image.size, 0)
    ImageDraw.Draw(glow).ellipse((100, 150, 220, 200), fill=90)
    light = Image.new("RGB", image.size, (255, 240, 180))
    return Image.composite(light, image, glow.filter(ImageFilter.GaussianBlur(12)))


def model() -> Image.Image:
    image = backdrop((288, 384), ((120, 160, 120), (70, 110, 80)), None, 5)
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((60, 168, 228, 384), radius=30, fill=(245, 245, 245))  # t-shirt
    draw.polygon([(60, 178), (20, 268), (55, 283), (80, 223)], fill=(245, 245, 245))
    draw.polygon([(228, 178), (268, 268), (233, 283), (208, 223)], fill=(245, 245, 245))
    draw.rectangle((128, 138, 160, 175), fill=(225, 180, 140))  # neck
    draw.ellipse((104, 68, 184, 150), fill=(225, 180, 140))  # head
    draw.chord((100, 60, 188, 122), 180, 360, fill=(70, 45, 30))  # hair
    draw.ellipse((124, 100, 132, 108), fill=(40, 40, 40))
    draw.ellipse((156, 100, 164, 108), fill=(40, 40, 40))
    return image


def logo() -> Image.Image:
    image = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 154, 154), fill=(255, 200, 0, 255), outline=(30, 30, 30, 255), width=6)
    draw.polygon([(80, 28), (128, 120), (32, 120)], fill=(30, 30, 30, 255))
    font = ImageFont.load_default(size=22)
    draw.text((80, 135), "NB", fill=(30, 30, 30, 255), font=font, anchor="mm")
    return image


SAMPLES: dict[str, Callable[[], Image.Image]] = {
    "mug.jpg": mug,
    "sneaker.jpg": sneaker,
    "bottle.jpg": bottle,
    "lamp.jpg": lamp,
    "model.jpg": model,
    "logo.png": logo,
}


def main() -> None:
    for name, draw in SAMPLES.items():
        path = HERE / name
        if name.endswith(".png"):
            draw().save(path, optimize=True)
        else:
            draw().save(path, quality=82, optimize=True)
        print(f"{path.name}: {path.stat().st_size // 1024} KB")  # noqa: T201 - a script, not the library


if __name__ == "__main__":
    main()
