"""The fields of a manifest and of one item, as parsed, and :class:`WorkItem`, one item fully resolved."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .config import did_you_mean
from .errors import Problem
from .names import stem_of

__all__ = ["INPUT_MODES", "SYNC_TIERS", "THINKING_LEVELS", "ItemFields", "ManifestFields", "WorkItem", "parse_fields"]

THINKING_LEVELS = ("minimal", "low", "medium", "high")
SYNC_TIERS = ("standard", "flex", "priority")
INPUT_MODES = ("inline", "by_reference", "auto")


class ItemFields(BaseModel):
    """Every field an item (or ``defaults:``, or an ``items_from:`` source) may set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = None
    image: str | None = None
    images: list[str] | None = None
    instruction: str | None = None
    steps: list[str] | None = None
    model: str | None = None
    aspect_ratio: str | None = None
    image_size: str | None = None
    response_modalities: list[str] | None = None
    thinking_level: str | None = None
    tier: str | None = None
    output: str | None = None
    keep_steps: bool | None = None
    resize_inputs: bool | None = None
    inputs: str | None = None  # inline | by_reference | auto (see nanobatch.remote)
    output_format: str | None = None  # png | jpeg: Vertex AI's imageConfig.imageOutputOptions


class ManifestFields(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    model: str | None = None
    output_dir: str | None = None
    defaults: dict[str, Any] = {}
    items: list[Any] | None = None
    items_from: list[Any] | None = None


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


def parse_fields(
    raw: Mapping[str, Any], file: str, label: str | None, *, where: str | None = None
) -> tuple[ItemFields | None, list[Problem]]:
    item = None if where else label
    data = dict(raw)
    problems: list[Problem] = []
    for name in ("aspect_ratio", "image_size", "id"):
        value = data.get(name)
        # id: 1001 and image_size: 512 are fine unquoted (and 16:9 or 00123 stay as written: see _yaml.py).
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            data[name] = str(value)
    try:
        fields = ItemFields.model_validate(data)
    except ValidationError as exc:
        prefix = f"{where}." if where else ""
        for err in exc.errors():
            problem = from_pydantic(file, item, err, ItemFields)
            problems.append(Problem(problem.file, problem.item, prefix + (problem.field or ""), problem.message))
        return None, problems
    return (None if problems else fields), problems


def from_pydantic(file: str, item: str | None, err: Any, model: type[BaseModel]) -> Problem:
    loc = ".".join(str(p) for p in err["loc"])
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field" + did_you_mean(str(err["loc"][-1]), list(model.model_fields))
    return Problem(file, item, loc, message)
