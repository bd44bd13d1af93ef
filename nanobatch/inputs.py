"""Reading an item's input images when it is dispatched (never before)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import anyio

from .errors import ApiError
from .gemini import Image, sniff_mime
from .manifest import WorkItem

__all__ = ["load_inputs", "work_key"]

_ACCEPTED = {"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"}


class InputError(ApiError):
    """An input image could not be read: the item fails, nothing is sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="input")


def _read_local(path: str) -> Image:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read input image {path}: {exc.strerror or exc}") from None
    mime = sniff_mime(data)
    if mime not in _ACCEPTED:
        raise InputError(f"{path} is not a PNG, JPEG, WEBP or HEIC/HEIF image")
    return Image(mime, data)


async def load_inputs(refs: Sequence[str]) -> list[Image]:
    """The bytes of each input, in order, read in a worker thread."""
    images = []
    for ref in refs:
        if ref.startswith(("http://", "https://")):
            raise InputError(f"{ref}: image URLs are not supported yet")
        images.append(await anyio.to_thread.run_sync(_read_local, ref))
    return images


def work_key(item: WorkItem, inputs: Sequence[Image]) -> str:
    """A digest of everything that decides the item's output: settings, instructions and input bytes."""
    doc = {
        "v": 1,
        "settings": item.settings(),
        "inputs": [hashlib.sha256(image.data).hexdigest() for image in inputs],
    }
    return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
