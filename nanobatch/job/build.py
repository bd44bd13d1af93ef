"""One :class:`WorkItem` from an item's merged fields: every problem with them, its inputs found and checked."""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import models
from ..api.storage import USERINFO_REFUSED, is_bucket_url
from ..errors import Problem, has_userinfo, without_userinfo
from ..item import WorkItem
from ..names import name_length_problem, output_name, template_problems, text_problem
from ..qa import QaFields, QaSettings
from .fields import INPUT_MODES, SYNC_TIERS, Merged, thinking_problem
from .pictures import PictureCheck, Stat
from .sources import RawItem

__all__ = ["SCHEME", "Shapes", "build_item", "build_plain", "local_paths"]

_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_MODALITIES = {"IMAGE", "TEXT"}
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def build_item(
    f: Merged, given: dict[str, Any], raw: RawItem, *, model: str, base: str, check_files: bool | PictureCheck,
    qa: tuple[QaFields, ...] = (),
) -> tuple[WorkItem | None, list[Problem]]:  # fmt: skip
    """The item *f* (merged with the defaults; *given*: its fields that are set) of *raw*, or every problem
    with it. *model*: the manifest's, for an item that names none; *base*: the folder inputs resolve against.
    *check_files* may also read the pictures to check them. *qa*: the ``qa:`` layers under the item's own."""
    problems: list[Problem] = []

    def bad(fld: str | None, message: str, bad_input: bool = False) -> None:
        problems.append(Problem(raw.file, raw.label, fld, message, bad_input))

    _check_texts(given, bad)
    steps = _steps(f, bad)
    model = f.model or model
    inputs, total = _inputs(f, base, check_files, bad)
    # Together only: one picture too big is reported once, as itself.
    if total > models.MAX_TOTAL_INPUT_BYTES and not f.resize_inputs and not problems and len(inputs) > 1:
        bad("images", (
            f"the item's pictures take {total / models.MB:.1f} MB together, but one request can carry at most "
            f"{models.MAX_TOTAL_INPUT_BYTES // models.MB} MB: set resize_inputs: true to downscale them"
        ))  # fmt: skip
    modalities = _modalities(f, bad)
    info = models.lookup(model)
    _check_model_limits(f, info, len(inputs), bad)
    checks = _checks((*qa, f.qa))  # None when no check is on: the run then decodes nothing
    _check_reachable(checks, f, info, bad)
    output = _output(f, raw, bad)
    output_format = _output_format(f, bad)
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
        thinking_level=f.thinking_level.lower() if f.thinking_level is not None else None,
        tier=f.tier.lower() if f.tier is not None else None,
        output=output,
        keep_steps=bool(f.keep_steps),
        resize_inputs=bool(f.resize_inputs),
        input_mode=f.inputs.lower() if f.inputs is not None else None,
        output_format=output_format,
        qa=checks,
    ), []


# The fields that differ from item to item in most catalogs: checked for each item by build_plain(); the others
# (the model, ratios, sizes, the output template, qa: ...) once for every item that shares them (Shapes).
_OWN_FIELDS = frozenset({"id", "image", "images", "instruction", "steps"})


@dataclass(frozen=True, slots=True)
class _Shape:
    """What an item's fields other than :data:`_OWN_FIELDS` make of it, found free of problems."""

    model: str
    aspect_ratio: str | None
    image_size: str | None
    modalities: tuple[str, ...]
    thinking_level: str | None
    tier: str | None
    output: str | None  # the template
    keep_steps: bool
    resize_inputs: bool
    input_mode: str | None
    output_format: str | None
    qa: QaSettings | None
    max_inputs: int | None  # the model's, when known


class Shapes:
    """The shapes of a manifest's items (:class:`_Shape`), each checked once: a catalog's items share a few.
    A shape with a problem is None, and so is any shape once :data:`LIMIT` are known (then every item of a new
    shape goes the whole way through :func:`build_item`)."""

    LIMIT = 1024

    def __init__(self, model: str, qa: tuple[QaFields, ...]) -> None:
        self._model = model
        self._qa = qa
        self._known: dict[tuple[tuple[str, Any], ...], _Shape | None] = {}
        self._defaults: _Shape | None = None  # the shape of the items that set only their own fields, once known
        self._defaults_known = False

    def get(self, given: Mapping[str, Any], *, the_defaults: bool = False) -> _Shape | None:
        """The shape of an item whose merged fields that are set are *given*; None: see the class.
        *the_defaults*: the item sets none of the fields a shape is made of (its shape is the defaults')."""
        if the_defaults and self._defaults_known:
            return self._defaults
        key = tuple((k, tuple(v) if type(v) is list else v) for k, v in given.items() if k not in _OWN_FIELDS)
        if the_defaults:
            self._defaults, self._defaults_known = self._get(key), True
            return self._defaults
        return self._get(key)

    def _get(self, key: tuple[tuple[str, Any], ...]) -> _Shape | None:
        try:
            return self._known[key]
        except KeyError:
            pass
        except TypeError:  # a value that cannot be a key: not a shape this looks after
            return None
        if len(self._known) >= self.LIMIT:
            return None
        shape = self._known[key] = self._shape(dict(key))
        return shape

    def _shape(self, shared: dict[str, Any]) -> _Shape | None:
        problems: list[str | None] = []

        def bad(fld: str | None, message: str, bad_input: bool = False) -> None:
            problems.append(fld)

        shared = {name: list(v) if type(v) is tuple else v for name, v in shared.items()}
        _check_texts(shared, bad)
        f = Merged(**shared, id="a", instruction="a")  # an id and a step that pass: their checks are per item
        _steps(f, bad)
        modalities = _modalities(f, bad)
        info = models.lookup(f.model or self._model)
        _check_model_limits(f, info, 0, bad)
        checks = _checks((*self._qa, f.qa))
        _check_reachable(checks, f, info, bad)
        if f.output is not None and template_problems(f.output):
            bad("output", "")
        output_format = _output_format(f, bad)
        if problems:
            return None
        return _Shape(
            model=f.model or self._model, aspect_ratio=f.aspect_ratio, image_size=f.image_size, modalities=modalities,
            thinking_level=f.thinking_level.lower() if f.thinking_level is not None else None,
            tier=f.tier.lower() if f.tier is not None else None, output=f.output, keep_steps=bool(f.keep_steps),
            resize_inputs=bool(f.resize_inputs), input_mode=f.inputs.lower() if f.inputs is not None else None,
            output_format=output_format, qa=checks,
            max_inputs=info.max_input_images if info is not None else None,
        )  # fmt: skip


def build_plain(
    given: Mapping[str, Any], raw: RawItem, shapes: Shapes, *, base: str, check_files: bool | PictureCheck,
    own: Mapping[str, Any] | None = None,
) -> WorkItem | None:  # fmt: skip
    """The item of *raw* (*given*: its merged fields that are set, each of the type it holds: see
    ``fields.plain_fields``) when it has no problem at all, its shape's fields checked once for all (*shapes*);
    None when it has one, or may have: :func:`build_item` then checks it and says what is wrong. What one
    accepts, the other does (tests/test_scale.py holds them to it). *own*: the item's own fields, if known."""
    shape = shapes.get(given, the_defaults=own is not None and own.keys() <= _OWN_FIELDS)
    item_id = given.get("id")
    if shape is None or type(item_id) is not str or not _ID.fullmatch(item_id):
        return None
    steps = _plain_steps(given)
    refs = _plain_refs(given)
    if steps is None or refs is None:
        return None
    inputs, total = [], 0
    for ref in refs:
        resolved, message, st = _resolve_input(ref, base, check_files=check_files, resize=shape.resize_inputs)
        if message or isinstance(check_files, PictureCheck) and st is not None and check_files(resolved, st):
            return None
        inputs.append(resolved)
        total += st.st_size if st is not None else 0
    if total > models.MAX_TOTAL_INPUT_BYTES and not shape.resize_inputs and len(inputs) > 1:
        return None
    if shape.max_inputs is not None and len(inputs) > shape.max_inputs:
        return None
    output = None
    if shape.output is not None:
        output, message = output_name(shape.output, item_id, raw.context)
        if message or output is not None and name_length_problem(output):
            return None
    elif name_length_problem(item_id):
        return None
    return WorkItem(
        id=item_id, model=shape.model, inputs=tuple(inputs), steps=steps, aspect_ratio=shape.aspect_ratio,
        image_size=shape.image_size, response_modalities=shape.modalities, thinking_level=shape.thinking_level,
        tier=shape.tier, output=output, keep_steps=shape.keep_steps, resize_inputs=shape.resize_inputs,
        input_mode=shape.input_mode, output_format=shape.output_format, qa=shape.qa,
    )  # fmt: skip


def _plain_steps(given: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The item's steps, if :func:`_steps` and :func:`_check_texts` would find nothing wrong with them."""
    instruction, steps = given.get("instruction"), given.get("steps")
    if steps is None:
        if instruction is None:
            return None
        steps = (instruction,)
    elif instruction is not None:
        return None
    for step in steps:
        if not step.strip() or ("\x00" in step or not step.isascii()) and text_problem(step):
            return None
    return tuple(steps) if steps else None


def _plain_refs(given: Mapping[str, Any]) -> list[str] | None:
    """The item's image references, if :func:`_check_texts` and :func:`_steps` would find nothing wrong."""
    image, images = given.get("image"), given.get("images")
    if image is not None and images is not None:
        return None
    refs: list[str] = [image] if image is not None else (images or [])
    for ref in refs:
        if ("\x00" in ref or not ref.isascii()) and text_problem(ref):
            return None
    return refs


@functools.lru_cache(maxsize=64)  # most items share their layers: the config's, the manifest's, the defaults'
def _checks(layers: tuple[QaFields | None, ...]) -> QaSettings | None:
    checks = QaSettings.layered(*layers)
    return checks if checks.active else None


def _modalities(f: Merged, bad: Callable[[str | None, str], None]) -> tuple[str, ...]:
    modalities = tuple(m.upper() for m in (f.response_modalities or ["IMAGE"]))
    if not set(modalities) <= _MODALITIES or "IMAGE" not in modalities:
        bad("response_modalities", f"must be [IMAGE] or [TEXT, IMAGE], not {list(modalities)}")
    return modalities


def _output_format(f: Merged, bad: Callable[[str | None, str], None]) -> str | None:
    output_format = (f.output_format or "").lower().replace("jpg", "jpeg") or None
    if output_format not in (None, "png", "jpeg"):
        bad("output_format", f"must be png or jpeg, not {f.output_format!r}")
    return output_format


def _check_texts(given: dict[str, Any], bad: Callable[[str | None, str], None]) -> None:
    """Every text the item sets, checked to be one a request and a file name can carry (its model id apart: a URL
    path carries it, and models.model_id_problem says what it cannot hold, a NUL among others)."""
    for name, value in given.items():
        if name == "model":
            continue
        for text in value if isinstance(value, list) else [value]:
            # Plain ASCII without NUL (isascii: a flag, not a scan) is always fine: most texts ask nothing more.
            if isinstance(text, str) and ("\x00" in text or not text.isascii()) and (message := text_problem(text)):
                bad(name, message)


def _steps(f: Merged, bad: Callable[[str | None, str], None]) -> tuple[str, ...]:
    """The item's instructions, in order; its id and how it gives images and instructions checked."""
    if f.id is None:
        bad("id", "every item needs an id (ASCII letters, digits, '.', '_' and '-')")
    elif not _ID.fullmatch(f.id):
        bad("id", (
            f"{f.id!r} is not a valid id: use ASCII letters (a-z, A-Z), digits, '.', '_' and '-', "
            "not starting with '.' or '-'"
        ))  # fmt: skip
    if f.image is not None and f.images is not None:
        bad("images", "give either image or images, not both")
    if f.instruction is not None and f.steps is not None:
        bad("steps", "give either instruction or steps, not both")
    steps = tuple(f.steps) if f.steps is not None else ((f.instruction,) if f.instruction is not None else ())
    if not steps or any(not s.strip() for s in steps):
        bad("instruction", "no instruction: set instruction (or steps) on the item or in defaults")
    return steps


def _inputs(
    f: Merged, base: str, check_files: bool | PictureCheck, bad: Callable[[str | None, str, bool], None]
) -> tuple[list[str], int]:
    """The item's inputs, resolved, and their size together (as far as known); a local picture that cannot be
    decoded (when *check_files* reads them) is a bad input."""
    inputs: list[str] = []
    total = 0
    for n, ref in enumerate([f.image] if f.image is not None else (f.images or [])):
        fld = "image" if f.image is not None else f"images[{n}]"
        resolved, message, st = _resolve_input(ref, base, check_files=check_files, resize=bool(f.resize_inputs))
        if message:
            bad(fld, message, False)
        elif isinstance(check_files, PictureCheck) and st is not None and (verdict := check_files(resolved, st)):
            bad(fld, f"{resolved}: {verdict}", True)
        inputs.append(resolved)
        total += st.st_size if st is not None else 0
    return inputs, total


def _output(f: Merged, raw: RawItem, bad: Callable[[str | None, str], None]) -> str | None:
    """The item's output name, its template filled (None: named after its id); either checked to fit."""
    output = None
    if f.output is not None and f.id is not None:
        output, message = output_name(f.output, f.id, raw.context)
        if message:
            bad("output", message)
        elif output is not None and (message := name_length_problem(output)):
            bad("output", message)
    elif f.id is not None and _ID.fullmatch(f.id) and (message := name_length_problem(f.id)):
        bad("id", f"{message}; give a shorter id, or an output name")
    return output


def _check_model_limits(f: Merged, info: models.ModelInfo | None, n_inputs: int, bad: Any) -> None:
    if f.model is not None and (message := models.model_id_problem(f.model)):
        bad("model", message)
    if f.thinking_level is not None and (message := thinking_problem(f.thinking_level, info)):
        bad("thinking_level", message)
    if f.inputs is not None and f.inputs.lower() not in INPUT_MODES:
        bad("inputs", f"{f.inputs!r} is not a way to send inputs; choose one of {', '.join(INPUT_MODES)}")
    if f.tier is not None and f.tier.lower() not in models.TIERS:  # the sync tiers, and batch for every model
        bad("tier", f"{f.tier!r} is not a service tier; choose one of {', '.join(models.TIERS)}")
    if info is None:
        return
    if f.tier is not None and f.tier.lower() in SYNC_TIERS and f.tier.lower() not in info.tiers:
        bad("tier", f"{info.id} is not sold in the {f.tier.lower()} tier; choose one of {', '.join(info.tiers)}")
    if f.aspect_ratio is not None and f.aspect_ratio not in info.aspect_ratios:
        choices = ", ".join(info.aspect_ratios)
        bad("aspect_ratio", f"{info.id} does not support {f.aspect_ratio!r}; choose one of {choices}")
    if f.image_size is not None:
        if not info.image_sizes:
            bad("image_size", f"{info.id} takes no image_size (sending one fails); remove it")
        elif f.image_size not in info.image_sizes:
            choices = ", ".join(info.image_sizes)
            bad("image_size", f"{info.id} does not support {f.image_size!r}; choose one of {choices}")
    if n_inputs > info.max_input_images:
        bad("images", f"{n_inputs} images, but {info.id} takes at most {info.max_input_images}")


def _not_found(path: str, why: str | None) -> str:
    """Why the picture at *path* cannot be read, its name shown so that white space at an end can be seen."""
    spaced = path != path.strip()
    shown = f"{path!r} (its name begins or ends with white space)" if spaced else path
    return f"image file not found: {shown}" if why is None else f"cannot read the image {shown}: {why}"


def _check_reachable(checks: QaSettings | None, f: Merged, info: models.ModelInfo | None, bad: Any) -> None:
    """A ``qa.min_side`` that no image of the item's size can reach: every answer would be rejected, and each
    retry paid for. (The sizes are the facts table's: never below the API's, for any ratio.)"""
    if checks is None or checks.min_side is None or info is None or f.aspect_ratio not in (None, *info.aspect_ratios):
        return  # (a ratio the model does not take is its own problem)
    ratios = (f.aspect_ratio,) if f.aspect_ratio else info.aspect_ratios

    def longest(size: str) -> int:
        return max((max(models.pixel_size(ratio, size)) for ratio in ratios), default=0)

    size = f.image_size or info.default_size
    if (edge := longest(size)) and checks.min_side > edge:
        larger = [other for other in info.image_sizes if longest(other) >= checks.min_side]
        ask = f"ask for image_size {larger[0]}, or lower qa.min_side" if larger else "lower qa.min_side"
        bad("qa.min_side", f"{checks.min_side} px: {info.id}'s {size} images are at most {edge} px on their "
                           f"longest side, so every image would be rejected (each retry paid); {ask}")  # fmt: skip


def _resolve_input(
    ref: str, base: str, *, check_files: bool | PictureCheck, resize: bool = False
) -> tuple[str, str | None, Stat | None]:
    """An absolute path (against *base*, the manifest's folder) or URL, what is wrong with it, and the file's
    stat (None when not a file looked at: a URL, or files not checked; taken by *check_files* if it is the
    picture check, which may have looked ahead)."""
    if not ref.strip():
        return ref, "the image path is empty", None
    if SCHEME.match(ref):
        if is_bucket_url(ref) and has_userinfo(ref):
            return ref, f"{without_userinfo(ref)}: {USERINFO_REFUSED}", None
        if ref.lower().startswith(("http://", "https://")) or is_bucket_url(ref):
            return ref, None, None  # checked by validate in batches (inputs.load, inputs.remote), not one by one here
        return ref, (
            f"cannot fetch {without_userinfo(ref)}: only http(s):// URLs, bucket URLs (s3://, gs://, az://, abfs://) "
            "and local paths are supported"
        ), None  # fmt: skip
    # os.path rather than pathlib: this runs once per input of every item.
    path = _joined(base, ref)
    if check_files:
        why = None
        try:
            st = check_files.stat(path) if isinstance(check_files, PictureCheck) else os.stat(path)
        except OSError as exc:  # not there, or a name too long, a loop of links, a folder not searchable
            st, why = None, None if exc.errno == errno.ENOENT else exc.strerror
        except ValueError:  # a NUL in the path
            st = None
        if st is None:
            return path, _not_found(path, why), None
        if not stat.S_ISREG(st.st_mode):
            mode = st.st_mode
            kind = (
                "a folder" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device"
            )  # fmt: skip
            return path, f"{path} is not a regular file ({kind}); an image must be a file", None
        size = st.st_size
        if size > models.MAX_INPUT_BYTES and not resize:
            return (
                path,
                (
                    f"{path} is {size / models.MB:.1f} MB, but an input image can be at most "
                    f"{models.MAX_INPUT_BYTES // models.MB} MB: set resize_inputs: true to downscale it, "
                    "or make it smaller"
                ),
                st,
            )
        return path, None, st
    return path, None, None


def local_paths(fields: Mapping[str, Any] | None, defaults: Mapping[str, Any], base: str) -> list[str]:
    """The local files an item's *fields* (or else its *defaults*) name as its pictures, as far as known without
    checking them: a hint for looking at them ahead (``pictures.looked_ahead``)."""
    if not fields:
        return []
    refs = fields.get("image") or fields.get("images") or defaults.get("image") or defaults.get("images")
    if type(refs) is str:
        return [_joined(base, refs)] if refs.strip() and not SCHEME.match(refs) else []
    if type(refs) is not list:
        return []
    return [_joined(base, ref) for ref in refs if isinstance(ref, str) and ref.strip() and not SCHEME.match(ref)]


def _joined(base: str, ref: str) -> str:
    """``normpath(join(base, expanduser(ref)))``, *base* being absolute and normal; most references are plain
    relative paths, which need only the join."""
    # No "~" or "/" first, no "//", no part "." or ".." (nor one starting with ".": more than needed, and cheap)
    if os.sep == "/" and ref[0] not in "~/." and "//" not in ref and "/." not in ref and ref[-1] != "/":
        return f"{base}{ref}" if base.endswith("/") else f"{base}/{ref}"
    return os.path.normpath(os.path.join(base, os.path.expanduser(ref)))
