"""The fields of a manifest and of one item, as parsed (:mod:`nanobatch.item` holds one item resolved)."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..config import did_you_mean
from ..errors import Problem
from ..models import ModelInfo
from ..qa import QaFields

__all__ = [
    "INPUT_MODES", "PICTURE_FIELDS", "SYNC_TIERS", "THINKING_LEVELS", "ItemFields", "ManifestFields", "Merged",
    "merge_given", "parse_fields", "plain_fields", "thinking_problem", "without_empty_pictures",
]  # fmt: skip

THINKING_LEVELS = ("minimal", "low", "medium", "high")
PICTURE_FIELDS = frozenset({"image", "images"})
SYNC_TIERS = ("standard", "flex", "priority")
INPUT_MODES = ("inline", "by_reference", "auto")


class ItemFields(BaseModel):
    """Every field an item (or ``defaults:``, or an ``items_from:`` source) may set."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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


@dataclass(frozen=True, slots=True, kw_only=True)
class Merged:
    """An item's fields merged with the defaults, every one checked: what :class:`ItemFields` holds, without
    pydantic's cost per item (built from :func:`plain_fields` and :func:`merge_given`)."""

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
    inputs: str | None = None
    output_format: str | None = None
    qa: QaFields | None = None


# What each field holds, for plain_fields: a value of exactly this type is what pydantic would give unchanged.
_KINDS: dict[str, type] = {name: str for name in ItemFields.model_fields}
_KINDS.update(images=list, steps=list, response_modalities=list, keep_steps=bool, resize_inputs=bool)
del _KINDS["qa"]
_NUMBERS = ("aspect_ratio", "image_size", "id")  # id: 1001 and image_size: 512 are fine unquoted
_RANK = {name: n for n, name in enumerate(ItemFields.model_fields)}
_ORDERS: dict[tuple[str, ...], list[str]] = {}  # the names an item sets, as given -> in _RANK's order


def plain_fields(raw: Mapping[Any, Any]) -> dict[str, Any] | None:
    """*raw*'s fields that are set, as :func:`parse_fields` would give them, when each has exactly the type it
    holds (a text, a list of texts, true or false; a number for the fields in :data:`_NUMBERS`); None when one
    has not, or is unknown, or is ``qa:`` (then :func:`parse_fields` converts it or says what is wrong)."""
    given: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        kind, of = _KINDS.get(name), type(value)
        if of is kind and (of is not list or all(type(v) is str for v in value)):
            given[name] = value
        elif name in _NUMBERS and (of is int or of is float):
            given[name] = str(value)
        else:
            return None
    return given


def without_empty_pictures(raw: dict[str, Any], defaults: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """*raw* without the picture fields it gives no value (null, "" or [], as an empty CSV cell is read), and
    the first such field when no picture is left, nor in the *defaults*: the item names a place for its picture
    and leaves it empty (a row whose photo is missing), which is not asking for a text-to-image request."""
    empty = [name for name in ("image", "images") if name in raw and raw[name] in (None, "", [])]
    if not empty:
        return raw, None
    kept = {name: value for name, value in raw.items() if name not in empty}
    return kept, None if kept.keys() & PICTURE_FIELDS or defaults.keys() & PICTURE_FIELDS else empty[0]


def merge_given(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """The fields set on an item (*own*) over the defaults' (*defaults*), in the order of :class:`ItemFields`'
    fields, the defaults' first: an item's own image(s) or instruction(s) replace the defaults' as a whole;
    ``qa:`` (a mapping, when both set it) is merged key by key."""
    data = dict(defaults)
    if "image" in own or "images" in own:
        data.pop("image", None)
        data.pop("images", None)
    if "instruction" in own or "steps" in own:
        data.pop("instruction", None)
        data.pop("steps", None)
    names = tuple(own)
    if (order := _ORDERS.get(names)) is None:  # most items set the same few fields, in the same order
        if len(_ORDERS) >= 1024:
            _ORDERS.clear()
        order = _ORDERS[names] = sorted(names, key=_RANK.__getitem__)
    for name in order:
        value = own[name]
        if name == "qa" and isinstance(data.get("qa"), dict):  # key by key: the item's checks over the defaults'
            value = {**data["qa"], **value}
        data[name] = value
    return data


class ManifestFields(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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
    if err["type"] == "value_error":  # a check of our own: its words, without pydantic's prefix
        message = message.removeprefix("Value error, ")
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


def thinking_problem(level: str, info: ModelInfo | None) -> str | None:
    """Why *level* is no thinking level of the model *info* (None: one the facts table does not know, which may
    take any), or None: the API answers a level its model does not take with a 400, item after item."""
    if info is not None and not info.supports_thinking:
        return f"{info.id} has no thinking level; remove it"
    levels = info.thinking_levels if info is not None and info.thinking_levels else THINKING_LEVELS
    if level.lower() in levels:
        return None
    return f"{level!r} is not a thinking level{f' of {info.id}' if info else ''}; choose one of {', '.join(levels)}"
