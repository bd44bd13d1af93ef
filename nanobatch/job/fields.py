"""The fields of a manifest and of one item, as parsed (:mod:`nanobatch.item` holds one item resolved)."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..config import did_you_mean
from ..errors import Problem
from ..qa import QaFields

__all__ = ["INPUT_MODES", "SYNC_TIERS", "THINKING_LEVELS", "ItemFields", "ManifestFields", "parse_fields"]

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
    inputs: str | None = None  # inline | by_reference | auto (see nanobatch.inputs.remote)
    output_format: str | None = None  # png | jpeg: Vertex AI's imageConfig.imageOutputOptions
    qa: QaFields | None = None  # the output checks (nanobatch.qa): over the manifest's and the config's, key by key


class ManifestFields(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    model: str | None = None
    output_dir: str | None = None
    defaults: dict[str, Any] = {}
    items: list[Any] | None = None
    items_from: list[Any] | None = None
    qa: QaFields | None = None


def parse_fields(
    raw: Mapping[str, Any], file: str, label: str | None, *, where: str | None = None
) -> tuple[ItemFields | None, list[Problem]]:
    item = None if where else label
    data = dict(raw)
    problems: list[Problem] = []
    for name in ("aspect_ratio", "image_size", "id"):
        value = data.get(name)
        # id: 1001 and image_size: 512 are fine unquoted (and 16:9 or 00123 stay as written: see safe_yaml.py).
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
        message = "unknown field" + did_you_mean(str(err["loc"][-1]), _field_names(model, err["loc"][:-1]))
    return Problem(file, item, loc, message)


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The fields of the model at *loc* inside *model* (``("qa",)``: QaFields'), for a "did you mean"."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        nested = [t for t in (field.annotation, *typing.get_args(field.annotation)) if _is_model(t)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
