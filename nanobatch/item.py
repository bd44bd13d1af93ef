"""One work item, fully resolved: what the engine sends and what the output folder names after it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # nanobatch.qa loads pydantic, which `status` (through names) must not
    from .qa import QaSettings

__all__ = ["IMAGE_SUFFIXES", "WorkItem", "looks_like_picture", "stem_of"]

# An output name ending in one of these has it replaced by the returned image's own type.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif", ".gif"})


def stem_of(output: str | None, item_id: str) -> str:
    """The output name before its extension: the id, or *output* without an image extension."""
    if output is None:
        return item_id
    suffix = os.path.splitext(output)[1]
    return output[: -len(suffix)] if suffix.lower() in IMAGE_SUFFIXES else output


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkItem:
    """One unit of work, fully resolved: what to send, in order, and where the result goes.

    ``inputs`` are absolute paths, http(s) URLs or bucket URLs (``s3://``, ``gs://``, ``az://``); ``steps``
    has one instruction per request; ``output`` is the output name relative to the output folder (placeholders
    filled), or None for ``<id>.<ext>``.
    """

    id: str
    model: str
    inputs: tuple[str, ...]
    steps: tuple[str, ...]
    aspect_ratio: str | None = None
    image_size: str | None = None
    response_modalities: tuple[str, ...] = ("IMAGE",)
    thinking_level: str | None = None
    tier: str | None = None  # None: the configured api.tier
    output: str | None = None
    keep_steps: bool = False
    resize_inputs: bool = False
    input_mode: str | None = None  # the ``inputs`` field: None for the configured api.inputs
    output_format: str | None = None  # None: the model's own choice
    qa: QaSettings | None = None  # the checks its final image must pass (not part of the work key)

    @property
    def stem(self) -> str:
        """The output name before its extension, which follows the returned image type: ``<stem>.png``,
        ``<stem>-2.png`` for a second image, ``<stem>.step1.png`` for a kept step."""
        return stem_of(self.output, self.id)

    def settings(self) -> dict[str, Any]:
        """Everything besides the input bytes that decides the output (part of the work key)."""
        return {
            "model": self.model,
            "steps": list(self.steps),
            "aspect_ratio": self.aspect_ratio,
            "image_size": self.image_size,
            "response_modalities": list(self.response_modalities),
            "thinking_level": self.thinking_level,
            "resize_inputs": self.resize_inputs,
            # only when set, so that the keys of work done before this field existed stay the same
            **({"output_format": self.output_format} if self.output_format is not None else {}),
        }


def looks_like_picture(value: str) -> bool:
    """Whether *value* reads as a picture's file name or URL: an image extension ends it (a URL's query apart)."""
    if "." not in value:
        return False
    path = value.strip().split("?", 1)[0].split("#", 1)[0] if "://" in value else value.strip()
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES
