"""Job manifests: a YAML file -> a validated stream of :class:`WorkItem`.

The YAML document itself is parsed once, but items are resolved one at a time
as they are consumed: no image is read and no request is built here. A run
first walks the whole stream with :meth:`Manifest.check` (which stats each
input file and collects every problem, not just the first) and sends nothing
unless it is clean.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from . import models
from .config import did_you_mean
from .errors import ManifestError, Problem

__all__ = ["Manifest", "WorkItem", "load_manifest"]

logger = logging.getLogger("nanobatch")

_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_MODALITIES = {"IMAGE", "TEXT"}


class ItemFields(BaseModel):
    """Every field an item (or ``defaults:``) may set."""

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
    output: str | None = None
    keep_steps: bool | None = None


class ManifestFields(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    model: str | None = None
    output_dir: str | None = None
    defaults: dict[str, Any] = {}
    items: list[Any] = []


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkItem:
    """One unit of work, fully resolved: what to send, in order, and where the result goes.

    ``inputs`` are absolute paths (or URLs); ``steps`` has one instruction per request.
    """

    id: str
    model: str
    inputs: tuple[str, ...]
    steps: tuple[str, ...]
    aspect_ratio: str | None = None
    image_size: str | None = None
    response_modalities: tuple[str, ...] = ("IMAGE",)
    thinking_level: str | None = None
    output: str | None = None
    keep_steps: bool = False

    def settings(self) -> dict[str, Any]:
        """Everything besides the input bytes that decides the output (part of the work key)."""
        return {
            "model": self.model,
            "steps": list(self.steps),
            "aspect_ratio": self.aspect_ratio,
            "image_size": self.image_size,
            "response_modalities": list(self.response_modalities),
            "thinking_level": self.thinking_level,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    """What :meth:`Manifest.check` found: totals for estimates, and every problem."""

    items: int
    requests: int
    images_in: int
    problems: list[Problem]


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A loaded manifest. Iterate :meth:`items` for the work, :meth:`check` to validate it all."""

    path: Path
    name: str
    model: str
    output_dir: Path | None
    defaults: ItemFields
    raw_items: list[Any] = field(repr=False)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def items(self, *, check_files: bool = True) -> Iterator[WorkItem]:
        """The work items in manifest order; raises :class:`ManifestError` at the first bad one."""
        for index, raw in enumerate(self.raw_items):
            item, problems = self._resolve(index, raw, check_files=check_files)
            if problems:
                raise ManifestError(problems)
            assert item is not None
            yield item

    def check(self, *, check_files: bool = True, visit: Callable[[WorkItem], None] | None = None) -> CheckReport:
        """Resolve every item, collecting all problems (duplicate ids, missing files, model limits, ...)."""
        problems: list[Problem] = []
        seen: set[str] = set()
        count = requests = images_in = 0
        warned: set[str] = set()
        for index, raw in enumerate(self.raw_items):
            item, found = self._resolve(index, raw, check_files=check_files)
            problems.extend(found)
            if item is None:
                continue
            if item.id in seen:
                problems.append(self._problem(item.id, "id", f"duplicate id {item.id!r}: ids must be unique"))
            seen.add(item.id)
            if models.lookup(item.model) is None and item.model not in warned:
                warned.add(item.model)
                logger.warning("unknown model %r: sending it as is, without local checks of ratios and sizes", item.model)
            if visit is not None:
                visit(item)
            count += 1
            requests += len(item.steps)
            images_in += len(item.inputs)
        return CheckReport(items=count, requests=requests, images_in=images_in, problems=problems)

    def _problem(self, item: str | None, fld: str | None, message: str) -> Problem:
        return Problem(file=str(self.path), item=item, field=fld, message=message)

    def _resolve(self, index: int, raw: Any, *, check_files: bool = True) -> tuple[WorkItem | None, list[Problem]]:
        label = f"#{index + 1}"
        if not isinstance(raw, dict):
            return None, [self._problem(label, None, "an item must be a mapping with at least an id")]
        label = str(raw.get("id", label))
        fields, problems = _parse_fields(raw, self, label)
        if fields is None:
            return None, problems
        merged = _merge(self.defaults, fields)
        return _build_item(merged, self, label, check_files=check_files)


def load_manifest(path: str | os.PathLike[str], *, default_model: str) -> Manifest:
    """Read and check the top level of a manifest; items are resolved later, one by one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError([Problem(str(path), None, None, f"cannot read the manifest: {exc.strerror or exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError([Problem(str(path), None, None, f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ManifestError([Problem(str(path), None, None, "a manifest must be a mapping with an items: list")])
    try:
        top = ManifestFields.model_validate(data)
    except ValidationError as exc:
        raise ManifestError([_from_pydantic(str(path), None, err, ManifestFields) for err in exc.errors()]) from None
    probe = Manifest(
        path=path, name="", model=default_model, output_dir=None, defaults=ItemFields(), raw_items=[]
    )
    defaults, problems = _parse_fields(top.defaults, probe, "defaults", where="defaults")
    if defaults is not None and defaults.id is not None:
        problems.append(Problem(str(path), None, "defaults.id", "defaults cannot set an id"))
    if not top.items:
        problems.append(Problem(str(path), None, "items", "the manifest lists no items"))
    if problems:
        raise ManifestError(problems)
    assert defaults is not None
    return Manifest(
        path=path,
        name=top.name or path.stem,
        model=top.model or default_model,
        output_dir=(path.parent / top.output_dir) if top.output_dir else None,
        defaults=defaults,
        raw_items=top.items,
    )


def _parse_fields(
    raw: dict[str, Any], manifest: Manifest, label: str, *, where: str | None = None
) -> tuple[ItemFields | None, list[Problem]]:
    item = None if where else label
    raw = dict(raw)
    problems: list[Problem] = []
    for name in ("aspect_ratio", "image_size", "id"):
        value = raw.get(name)
        if name == "aspect_ratio" and isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 16:9 as the base-60 number 969.
            guess = f"{value // 60}:{value % 60}"
            problems.append(_at(manifest, item, where, name, f'write the ratio in quotes, as "{guess}"'))
            raw.pop(name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            raw[name] = str(value)
    try:
        fields = ItemFields.model_validate(raw)
    except ValidationError as exc:
        prefix = f"{where}." if where else ""
        for err in exc.errors():
            problem = _from_pydantic(str(manifest.path), item, err, ItemFields)
            problems.append(Problem(problem.file, problem.item, prefix + (problem.field or ""), problem.message))
        return None, problems
    return (None if problems else fields), problems


def _at(manifest: Manifest, item: str | None, where: str | None, name: str, message: str) -> Problem:
    return Problem(str(manifest.path), item, f"{where}.{name}" if where else name, message)


def _from_pydantic(file: str, item: str | None, err: Any, model: type[BaseModel]) -> Problem:
    loc = ".".join(str(p) for p in err["loc"])
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field" + did_you_mean(str(err["loc"][-1]), list(model.model_fields))
    return Problem(file, item, loc, message)


def _merge(defaults: ItemFields, item: ItemFields) -> ItemFields:
    data = defaults.model_dump(exclude_none=True)
    own = item.model_dump(exclude_none=True)
    # An item's own image(s) or instruction(s) replace the defaults' as a whole.
    if "image" in own or "images" in own:
        data.pop("image", None)
        data.pop("images", None)
    if "instruction" in own or "steps" in own:
        data.pop("instruction", None)
        data.pop("steps", None)
    data.update(own)
    return ItemFields.model_validate(data)


def _build_item(
    f: ItemFields, manifest: Manifest, label: str, *, check_files: bool
) -> tuple[WorkItem | None, list[Problem]]:
    problems: list[Problem] = []

    def bad(fld: str | None, message: str) -> None:
        problems.append(manifest._problem(label, fld, message))

    if f.id is None:
        bad("id", "every item needs an id (letters, digits, '.', '_' and '-')")
    elif not _ID.fullmatch(f.id):
        bad("id", f"{f.id!r} is not a valid id: use letters, digits, '.', '_' and '-', not starting with '.' or '-'")
    if f.image is not None and f.images is not None:
        bad("images", "give either image or images, not both")
    if f.instruction is not None and f.steps is not None:
        bad("steps", "give either instruction or steps, not both")
    steps = tuple(f.steps) if f.steps is not None else ((f.instruction,) if f.instruction is not None else ())
    if not steps or any(not s.strip() for s in steps):
        bad("instruction", "no instruction: set instruction (or steps) on the item or in defaults")
    model = f.model or manifest.model
    info = models.lookup(model)
    inputs: list[str] = []
    for n, ref in enumerate([f.image] if f.image is not None else (f.images or [])):
        fld = "image" if f.image is not None else f"images[{n}]"
        resolved, message = _resolve_input(ref, manifest.base_dir, check_files=check_files)
        if message:
            bad(fld, message)
        inputs.append(resolved)
    modalities = tuple(m.upper() for m in (f.response_modalities or ["IMAGE"]))
    if not set(modalities) <= _MODALITIES or "IMAGE" not in modalities:
        bad("response_modalities", f"must be [IMAGE] or [TEXT, IMAGE], not {list(modalities)}")
    if info is not None:
        _check_model_limits(f, info, len(inputs), bad)
    if f.output is not None:
        message = _check_output_template(f.output)
        if message:
            bad("output", message)
    if problems:
        return None, problems
    assert f.id is not None
    return WorkItem(
        id=f.id,
        model=model,
        inputs=tuple(inputs),
        steps=steps,
        aspect_ratio=f.aspect_ratio,
        image_size=f.image_size,
        response_modalities=modalities,
        thinking_level=f.thinking_level,
        output=f.output,
        keep_steps=bool(f.keep_steps),
    ), []


def _check_model_limits(f: ItemFields, info: models.ModelInfo, n_inputs: int, bad: Any) -> None:
    if f.aspect_ratio is not None and f.aspect_ratio not in info.aspect_ratios:
        bad("aspect_ratio", f"{info.id} does not support {f.aspect_ratio!r}; choose one of {', '.join(info.aspect_ratios)}")
    if f.image_size is not None:
        if not info.image_sizes:
            bad("image_size", f"{info.id} takes no image_size (sending one fails); remove it")
        elif f.image_size not in info.image_sizes:
            bad("image_size", f"{info.id} does not support {f.image_size!r}; choose one of {', '.join(info.image_sizes)}")
    if n_inputs > info.max_input_images:
        bad("images", f"{n_inputs} images, but {info.id} takes at most {info.max_input_images}")
    if f.thinking_level is not None and not info.supports_thinking:
        bad("thinking_level", f"{info.id} has no thinking level")


def _resolve_input(ref: str, base: Path, *, check_files: bool) -> tuple[str, str | None]:
    if re.match(r"https?://", ref):
        return ref, None
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = base / path
    path = Path(os.path.normpath(path.absolute()))
    if check_files and not path.is_file():
        return str(path), f"image file not found: {path}"
    return str(path), None


def _check_output_template(template: str) -> str | None:
    if "{id}" not in template:
        return "the output name must contain {id} so that items do not overwrite each other"
    sample = template.replace("{id}", "x")
    if os.path.isabs(sample) or Path(sample).drive:
        return "the output name must be relative to the output folder"
    if ".." in Path(sample).parts:
        return "the output name must stay inside the output folder (no '..')"
    return None
