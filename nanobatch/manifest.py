"""Job manifests: a YAML file -> a validated stream of :class:`WorkItem`.

The YAML document itself is parsed once, but items are resolved one at a time
as they are consumed, from ``items:`` and then from each ``items_from:`` source
(CSV, JSONL, glob; see :mod:`nanobatch.sources`), which are read as streams:
no image is read, no request is built and no catalog is loaded whole here. A
run first walks the whole stream with :meth:`Manifest.check` (which stats each
input file and collects every problem, not just the first, keeping only the set
of ids) and sends nothing unless it is clean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import re
import sqlite3
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from . import models
from ._pictures import file_problem
from ._scratch import scratch_db
from ._yaml import load_yaml
from .config import did_you_mean
from .errors import ManifestError, Problem, not_utf8
from .results import reserved_name_problem
from .sources import GlobSource, InlineSource, MissingPlaceholder, RawItem, Source, fill, parse_sources, template_fields

__all__ = ["THINKING_LEVELS", "Manifest", "WorkItem", "load_manifest"]

logger = logging.getLogger("nanobatch")

_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_MODALITIES = {"IMAGE", "TEXT"}
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
THINKING_LEVELS = ("minimal", "low", "medium", "high")
SYNC_TIERS = ("standard", "flex", "priority")
# File systems take names of up to 255 bytes; nanobatch may add up to 16 to an output name
# (".step12-3.webp"). Caught here, a name too long costs nothing; at the write, a paid request.
_NAME_MAX = 255
_SUFFIX_ROOM = 16
# An output name ending in one of these has it replaced by the returned image's own type.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif", ".gif"})
# Beyond this many, check() lists no more problems (a broken template in a million-row CSV).
MAX_PROBLEMS = 1000


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

    ``inputs`` are absolute paths or http(s) URLs; ``steps`` has one instruction per
    request; ``output`` is the output name relative to the output folder (placeholders
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

    @property
    def stem(self) -> str:
        """The output name before its extension, which follows the returned image type: ``<stem>.png``,
        ``<stem>-2.png`` for a second image, ``<stem>.step1.png`` for a kept step."""
        if self.output is None:
            return self.id
        suffix = os.path.splitext(self.output)[1]
        return self.output[: -len(suffix)] if suffix.lower() in IMAGE_SUFFIXES else self.output

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
    sources: tuple[Source, ...] = field(default=(), repr=False)
    # Worked out once, not once per item: the absolute folder inputs resolve against, the defaults as a dict.
    _base: str = field(init=False, repr=False, compare=False)
    _defaults: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_base", os.path.abspath(self.path.parent))
        object.__setattr__(self, "_defaults", _given(self.defaults))

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def skipping(self, out_dir: Path) -> Manifest:
        """This manifest with its globs blind to *out_dir*: a run's results are not the next run's inputs."""
        folder = os.path.abspath(out_dir)
        sources = tuple(
            dataclasses.replace(s, skip_dir=folder) if isinstance(s, GlobSource) else s for s in self.sources
        )
        return dataclasses.replace(self, sources=sources)

    def items(
        self,
        *,
        check_files: bool = True,
        on_problem: Callable[[list[Problem]], None] | None = None,
        limit: int | None = None,
    ) -> Iterator[WorkItem]:
        """The work items in manifest order, read lazily; raises :class:`ManifestError` at the first bad one,
        or, with *on_problem*, hands it the bad item's problems and goes on with the next. *limit*: read no
        more than that many items (good or bad)."""
        for raw in itertools.islice(self._raw_items(), limit):
            item, problems = self._resolve(raw, check_files=check_files)
            if problems:
                if on_problem is None:
                    raise ManifestError(problems)
                on_problem(problems)
                continue
            assert item is not None
            yield item

    def check(
        self,
        *,
        check_files: bool = True,
        visit: Callable[[WorkItem], None] | None = None,
        out_dir: Path | None = None,
        decode: bool = False,
    ) -> CheckReport:
        """Resolve every item, collecting all problems (duplicate ids, missing files, model limits, ...).

        Items are not kept: only their ids, to find duplicates, and those on disk. With *out_dir*,
        output names are also checked not to lead out of it through a symbolic link, nor onto an input. With
        *decode*, every local picture is read and checked to be decodable (headers and sizes, no full decode).
        """
        problems = _Problems(self.path)
        with contextlib.closing(_Claims()) as claims:
            files: bool | _PictureCheck = _PictureCheck() if decode and check_files else check_files
            return self._check(problems, claims, check_files=files, visit=visit, out_dir=out_dir)

    def _check(
        self,
        problems: _Problems,
        claims: _Claims,
        *,
        check_files: bool | _PictureCheck,
        visit: Callable[[WorkItem], None] | None,
        out_dir: Path | None,
    ) -> CheckReport:
        count = requests = images_in = 0
        warned: set[str] = set()
        confine = _Confinement(out_dir) if out_dir is not None else None
        places = _Places(out_dir) if out_dir is not None else None
        for raw in self._raw_items():
            item, found = self._resolve(raw, check_files=check_files)
            problems.extend(found)
            # A bad item's id still counts: its duplicate is a problem of its own.
            item_id = item.id if item is not None else _id_of(raw)
            if item_id is not None and not claims.add_id(item_id):
                problems.add(Problem(raw.file, item_id, "id", f"duplicate id {item_id!r}: ids must be unique"))
                continue
            if item is None:
                continue
            if message := claims.claim_outputs(item):
                problems.add(Problem(raw.file, item.id, "output" if item.output else "id", message))
            if confine is not None and item.output is not None and (message := confine.check(item.output)):
                problems.add(Problem(raw.file, item.id, "output", message))
            if places is not None and (clash := claims.claim_places(item, places)):
                problems.add(Problem(raw.file, item.id, *clash))
            if models.lookup(item.model) is None and item.model not in warned:
                warned.add(item.model)
                logger.warning("unknown model %r: sent as is, without local checks of ratios and sizes", item.model)
            if visit is not None:
                visit(item)
            count += 1
            requests += len(item.steps)
            images_in += len(item.inputs)
        if count == 0 and not problems.found:
            problems.add(Problem(str(self.path), None, "items", "the manifest and its sources yield no items"))
        return CheckReport(items=count, requests=requests, images_in=images_in, problems=problems.listed())

    def _raw_items(self) -> Iterator[RawItem]:
        for source in self.sources:
            yield from source.raw_items()

    def _resolve(
        self, raw: RawItem, *, check_files: bool | _PictureCheck = True
    ) -> tuple[WorkItem | None, list[Problem]]:
        if raw.problems or raw.fields is None:
            return None, list(raw.problems)
        fields, problems = _parse_fields(raw.fields, raw.file, raw.label)
        if fields is None:
            return None, problems
        return _build_item(_merge(self._defaults, fields), self, raw, check_files=check_files)


class _Claims:
    """What the items met so far have taken, in a scratch SQLite database (100,000 items do not stay in
    memory): their ids, and the output names they write (before the extension), so that no item
    overwrites another's image.

    Output names caught: the same name (``output`` templates that meet), a kept step's name
    (``shirt.step1``) that is another item's name, and a folder named like another item's image
    (``b.png/{id}`` beside item ``b``). Not caught: ``<stem>-2`` for a second image in one answer,
    which no check can foresee. Keys are bytes: text that is not valid UTF-8 is reported elsewhere.
    """

    def __init__(self) -> None:
        self._db = scratch_db(
            "CREATE TABLE ids (id BLOB PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE names (name BLOB PRIMARY KEY, owner TEXT, what TEXT) WITHOUT ROWID;"
            "CREATE TABLE folders (name BLOB, owner TEXT); CREATE INDEX folders_by_name ON folders (name);"
            # Real places (symbolic links followed) of what items write and of the local inputs in the output
            # folder, without the image extension: see claim_places().
            "CREATE TABLE writes (place BLOB PRIMARY KEY, owner TEXT) WITHOUT ROWID;"
            "CREATE TABLE reads (place BLOB PRIMARY KEY, owner TEXT, path TEXT) WITHOUT ROWID;"
        )
        self._db.execute("BEGIN")  # never committed: the tables are thrown away

    def add_id(self, item_id: str) -> bool:
        """Note *item_id*; False if it was already there."""
        try:
            self._db.execute("INSERT INTO ids VALUES (?)", (_key(item_id),))
        except sqlite3.IntegrityError:
            return False
        return True

    def claim_outputs(self, item: WorkItem) -> str | None:
        """Note what *item* writes; why it cannot, if another item got there first."""
        stem = item.stem.replace(os.sep, "/")
        steps = range(1, len(item.steps)) if item.keep_steps else range(0)
        for name, what in [(stem, "its image"), *((f"{stem}.step{n}", f"its step {n}") for n in steps)]:
            key = _key(name)
            try:
                self._db.execute("INSERT INTO names VALUES (?, ?, ?)", (key, item.id, what))
            except sqlite3.IntegrityError:
                owner, theirs = self._db.execute("SELECT owner, what FROM names WHERE name = ?", (key,)).fetchone()
                return f"{what} would be {name}.<type>, as is {theirs} of item {owner!r}: one would overwrite the other"
            row = self._db.execute("SELECT owner FROM folders WHERE name = ? LIMIT 1", (key,)).fetchone()
            if row is not None:
                return f"{what} would be {name}.<type>, a file where item {row[0]!r} needs a folder"
        parts = stem.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folder = "/".join(parts[:depth])
            suffix = os.path.splitext(folder)[1]
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            key = _key(folder[: -len(suffix)])
            row = self._db.execute("SELECT owner FROM names WHERE name = ?", (key,)).fetchone()
            if row is not None:
                return f"its folder {folder!r} may be the name of item {row[0]!r}'s image"
            self._db.execute("INSERT INTO folders VALUES (?, ?)", (key, item.id))
        return None

    def claim_places(self, item: WorkItem, places: _Places) -> tuple[str, str] | None:
        """The field and problem if *item* would write over an input of the job (its own or another item's),
        or has an input where an item writes; None if not. A run must never write over what it reads."""
        db = self._db
        steps = range(1, len(item.steps)) if item.keep_steps else range(0)
        field = "output" if item.output else "id"
        for n, path in enumerate(item.inputs):
            for place in places.of_input(path):
                db.execute("INSERT OR IGNORE INTO reads VALUES (?, ?, ?)", (place, item.id, path))
                row = db.execute("SELECT owner FROM writes WHERE place = ?", (place,)).fetchone()
                if row is not None:  # an earlier item's (its own: below)
                    where = "image" if len(item.inputs) == 1 else f"images[{n}]"
                    return where, f"the image of item {row[0]!r} would be written over this input, {path}"
        for stem in [item.stem, *(f"{item.stem}.step{n}" for n in steps)]:
            if (spot := places.of_output(stem)) is None:
                continue
            db.execute("INSERT OR IGNORE INTO writes VALUES (?, ?)", (spot, item.id))
            if row := db.execute("SELECT owner, path FROM reads WHERE place = ?", (spot,)).fetchone():
                whose = "its own input" if row[0] == item.id else f"an input of item {row[0]!r}"
                return field, f"its image would be written over {row[1]}, {whose}: choose another output folder or name"
        return None

    def close(self) -> None:
        self._db.close()


class _Places:
    """Where files really are, for :meth:`_Claims.claim_places`: the real folder (symbolic links followed) and
    the file name without an image extension (an output's extension follows the returned image's type)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = os.path.abspath(out_dir)
        self.root = os.path.realpath(out_dir)
        self._inside = self.root.rstrip(os.sep) + os.sep
        self._real: dict[str, str | None] = {}  # by folder: most items share a handful

    def of_output(self, stem: str) -> bytes | None:
        folder, name = os.path.split(os.path.join(self.out_dir, stem))
        return self._place(folder, name)

    def of_input(self, path: str) -> list[bytes]:
        """Where a write would replace the local input *path* or its content: its name, and the file it links
        to (if it is a symbolic link); only those in the output folder with an image extension (the others are
        never written)."""
        if _SCHEME.match(path):
            return []
        paths = [path, os.path.realpath(path)] if os.path.islink(path) else [path]
        places = []
        for each in paths:
            folder, name = os.path.split(each)
            name, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES and (place := self._place(folder, name)) is not None:
                places.append(place)
        return places

    def _place(self, folder: str, name: str) -> bytes | None:
        if folder not in self._real:
            if len(self._real) > 10_000:
                self._real.clear()
            real = os.path.realpath(folder)
            self._real[folder] = real if real == self.root or real.startswith(self._inside) else None
        found = self._real[folder]
        return None if found is None else _key(os.path.join(found, name))


def _key(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _id_of(raw: RawItem) -> str | None:
    value = raw.fields.get("id") if raw.fields is not None else None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


class _Problems:
    """Every problem up to :data:`MAX_PROBLEMS`, then only a count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kept: list[Problem] = []
        self.found = 0

    def add(self, problem: Problem) -> None:
        self.found += 1
        if len(self.kept) < MAX_PROBLEMS:
            self.kept.append(problem)

    def extend(self, problems: list[Problem]) -> None:
        for problem in problems:
            self.add(problem)

    def listed(self) -> list[Problem]:
        if self.found <= len(self.kept):
            return self.kept
        more = f"... and {self.found - len(self.kept)} more problems, not listed: fix these and validate again"
        return [*self.kept, Problem(str(self.path), None, None, more)]


class _Confinement:
    """Whether an output name stays inside the output folder once symbolic links are followed."""

    def __init__(self, out_dir: Path) -> None:
        self.root = out_dir.resolve()
        self.out_dir = out_dir
        self.verdicts: dict[str, str | None] = {}  # by parent folder: most items share a handful

    def check(self, name: str) -> str | None:
        parent = os.path.dirname(name)
        if not parent:
            return None
        if parent not in self.verdicts:
            if len(self.verdicts) > 10_000:
                self.verdicts.clear()
            resolved = (self.root / parent).resolve()
            inside = resolved == self.root or resolved.is_relative_to(self.root)
            self.verdicts[parent] = (
                None
                if inside
                else (f"{name!r} leads out of the output folder {self.out_dir} (through a symbolic link to {resolved})")
            )
        return self.verdicts[parent]


def load_manifest(path: str | os.PathLike[str], *, default_model: str) -> Manifest:
    """Read and check the top level of a manifest and its sources; items are resolved later, one by one."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError([Problem(file, None, None, f"cannot read the manifest: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ManifestError([Problem(file, None, None, not_utf8(exc))]) from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ManifestError([Problem(file, None, None, f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ManifestError([Problem(file, None, None, "a manifest must be a mapping with items: or items_from:")])
    if isinstance(data.get("items_from"), dict):
        data = {**data, "items_from": [data["items_from"]]}  # one source, written without the list dash
    try:
        top = ManifestFields.model_validate(data)
    except ValidationError as exc:
        raise ManifestError([_from_pydantic(file, None, err, ManifestFields) for err in exc.errors()]) from None
    defaults, problems = _parse_fields(top.defaults, file, None, where="defaults")
    if top.name is not None and (message := _plain_name_problem(top.name)):
        problems.append(Problem(file, None, "name", message))
    if defaults is not None and defaults.id is not None:
        problems.append(Problem(file, None, "defaults.id", "defaults cannot set an id"))
    if defaults is not None and defaults.output is not None:
        problems += [Problem(file, None, "defaults.output", m) for m in _template_problems(defaults.output)]
    sources: list[Source] = [InlineSource(items=top.items, file=file)] if top.items else []
    if top.items_from:
        found, source_problems = parse_sources(
            top.items_from,
            manifest_file=file,
            base_dir=path.parent,
            item_fields=list(ItemFields.model_fields),
            default_output=defaults.output if defaults is not None else None,
        )
        sources += found
        problems += source_problems
    if not top.items and not top.items_from:
        problems.append(Problem(file, None, "items", "the manifest lists no items: give items:, items_from:, or both"))
    if problems:
        raise ManifestError(problems)
    assert defaults is not None
    return Manifest(
        path=path,
        name=top.name or path.stem,
        model=top.model or default_model,
        output_dir=(path.parent / top.output_dir) if top.output_dir else None,
        defaults=defaults,
        sources=tuple(sources),
    )


def _parse_fields(
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
            problem = _from_pydantic(file, item, err, ItemFields)
            problems.append(Problem(problem.file, problem.item, prefix + (problem.field or ""), problem.message))
        return None, problems
    return (None if problems else fields), problems


def _at(file: str, item: str | None, where: str | None, name: str, message: str) -> Problem:
    return Problem(file, item, f"{where}.{name}" if where else name, message)


def _from_pydantic(file: str, item: str | None, err: Any, model: type[BaseModel]) -> Problem:
    loc = ".".join(str(p) for p in err["loc"])
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field" + did_you_mean(str(err["loc"][-1]), list(model.model_fields))
    return Problem(file, item, loc, message)


def _merge(defaults: dict[str, Any], item: ItemFields) -> ItemFields:
    data = dict(defaults)
    own = _given(item)
    # An item's own image(s) or instruction(s) replace the defaults' as a whole.
    if "image" in own or "images" in own:
        data.pop("image", None)
        data.pop("images", None)
    if "instruction" in own or "steps" in own:
        data.pop("instruction", None)
        data.pop("steps", None)
    data.update(own)
    return ItemFields.model_validate(data)


def _given(fields: ItemFields) -> dict[str, Any]:
    return fields.model_dump(exclude_none=True)


def _build_item(
    f: ItemFields, manifest: Manifest, raw: RawItem, *, check_files: bool | _PictureCheck
) -> tuple[WorkItem | None, list[Problem]]:
    problems: list[Problem] = []
    label = raw.label

    def bad(fld: str | None, message: str) -> None:
        problems.append(Problem(raw.file, label, fld, message))

    for name, value in _given(f).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and (message := _text_problem(text)):
                bad(name, message)
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
    model = f.model or manifest.model
    info = models.lookup(model)
    inputs: list[str] = []
    base = manifest._base
    total = 0
    for n, ref in enumerate([f.image] if f.image is not None else (f.images or [])):
        fld = "image" if f.image is not None else f"images[{n}]"
        resolved, message, size = _resolve_input(ref, base, check_files=check_files, resize=bool(f.resize_inputs))
        if message:
            bad(fld, message)
        inputs.append(resolved)
        total += size
    # Together only: one picture too big is reported once, as itself.
    if total > models.MAX_TOTAL_INPUT_BYTES and not f.resize_inputs and not problems and len(inputs) > 1:
        bad("images", (
            f"the item's pictures take {total / models.MB:.1f} MB together, but one request can carry at most "
            f"{models.MAX_TOTAL_INPUT_BYTES // models.MB} MB: set resize_inputs: true to downscale them"
        ))  # fmt: skip
    modalities = tuple(m.upper() for m in (f.response_modalities or ["IMAGE"]))
    if not set(modalities) <= _MODALITIES or "IMAGE" not in modalities:
        bad("response_modalities", f"must be [IMAGE] or [TEXT, IMAGE], not {list(modalities)}")
    _check_model_limits(f, info, len(inputs), bad)
    output = None
    if f.output is not None and f.id is not None:
        output, message = _output_name(f.output, f.id, raw.context)
        if message:
            bad("output", message)
        elif output is not None and (message := _name_length_problem(output)):
            bad("output", message)
    elif f.id is not None and _ID.fullmatch(f.id) and (message := _name_length_problem(f.id)):
        bad("id", f"{message}; give a shorter id, or an output name")
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
    ), []


def _check_model_limits(f: ItemFields, info: models.ModelInfo | None, n_inputs: int, bad: Any) -> None:
    level = f.thinking_level
    if level is not None and level.lower() not in THINKING_LEVELS:
        bad("thinking_level", f"{level!r} is not a thinking level; choose one of {', '.join(THINKING_LEVELS)}")
    if f.tier is not None and f.tier.lower() not in SYNC_TIERS:
        bad("tier", f"{f.tier!r} is not a service tier; choose one of {', '.join(SYNC_TIERS)}")
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
    if f.thinking_level is not None and not info.supports_thinking:
        bad("thinking_level", f"{info.id} has no thinking level; remove it")


def _resolve_input(
    ref: str, base: str, *, check_files: bool | _PictureCheck, resize: bool = False
) -> tuple[str, str | None, int]:
    """An absolute path (against *base*, the manifest's folder) or URL, what is wrong with it, and its size
    (0 when unknown: a URL, or files not checked). *check_files* may also read the picture to check it."""
    if not ref.strip():
        return ref, "the image path is empty", 0
    if _SCHEME.match(ref):
        if ref.lower().startswith(("http://", "https://")):
            return ref, None, 0
        return ref, f"cannot fetch {ref}: only http:// and https:// URLs (or local paths) are supported", 0
    # os.path rather than pathlib: this runs once per input of every item.
    path = os.path.normpath(os.path.join(base, os.path.expanduser(ref)))
    if check_files:
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # ValueError: a NUL in the path
            st = None
        if st is None:
            return path, f"image file not found: {path}", 0
        if not stat.S_ISREG(st.st_mode):
            mode = st.st_mode
            kind = (
                "a folder" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device"
            )  # fmt: skip
            return path, f"{path} is not a regular file ({kind}); an image must be a file", 0
        size = st.st_size
        if size > models.MAX_INPUT_BYTES and not resize:
            return (
                path,
                (
                    f"{path} is {size / models.MB:.1f} MB, but an input image can be at most "
                    f"{models.MAX_INPUT_BYTES // models.MB} MB: set resize_inputs: true to downscale it, "
                    "or make it smaller"
                ),
                size,
            )
        if isinstance(check_files, _PictureCheck) and (message := check_files(path)):
            return path, f"{path}: {message}", size
        return path, None, size
    return path, None, 0


class _PictureCheck:
    """Reads a local picture and says why it cannot be decoded; a picture many items share is read once."""

    def __init__(self, remember: int = 256) -> None:
        self._seen: OrderedDict[str, str | None] = OrderedDict()
        self._remember = remember

    def __call__(self, path: str) -> str | None:
        if path in self._seen:
            self._seen.move_to_end(path)
            return self._seen[path]
        try:
            message = file_problem(path)
        except OSError as exc:
            message = f"cannot be read: {exc.strerror or exc}"
        self._seen[path] = message
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return message


def _template_problems(template: str) -> list[str]:
    try:
        names = template_fields(template)
    except ValueError as exc:
        return [str(exc)]
    if "id" not in names:
        return ["the output name must contain {id} so that items do not overwrite each other"]
    return []


def _plain_name_problem(name: str) -> str | None:
    """Why *name* cannot be the folder under ``output.dir`` that a run writes into, or None."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        return f"{name!r} must be a plain folder name (it goes under output.dir); use output_dir: for a path"
    if len(_key(name)) > _NAME_MAX:
        return f"{name[:40]!r}... is longer than a folder name can be ({_NAME_MAX} bytes)"
    return _text_problem(name)


def _text_problem(text: str) -> str | None:
    """Why *text* cannot go into a request or a file name, or None."""
    if "\x00" in text:
        return f"{text[:40]!r} contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"{text[:40]!r} is not valid text: character {exc.start + 1} stands for a byte that is not UTF-8 "
            "(save the source file as UTF-8)"
        )
    return None


def _name_length_problem(name: str) -> str | None:
    """Why the file system would refuse *name* (an output name before its extension), or None."""
    *folders, last = name.replace(os.sep, "/").split("/")
    for part in folders:
        if len(part.encode()) > _NAME_MAX:
            return f"the folder name {part[:40]!r}... is {len(part.encode())} bytes long: at most {_NAME_MAX}"
    size = len(last.encode())
    if size > _NAME_MAX - _SUFFIX_ROOM:
        return (
            f"the file name {last[:40]!r}... is {size} bytes long: at most {_NAME_MAX - _SUFFIX_ROOM} "
            f"({_NAME_MAX} with the extension and step number nanobatch adds)"
        )
    return None


def _output_name(template: str, item_id: str, context: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """The output name with ``{id}`` (and, for items from a CSV or JSONL source, any column) filled in."""
    problems = _template_problems(template)
    if problems:
        return None, problems[0]
    try:
        name = str(fill(template, {**(context or {}), "id": item_id}))
    except MissingPlaceholder as exc:
        if context is None:
            return None, f"unknown placeholder {{{exc.name}}}: here only {{id}} can be used (columns, in items_from)"
        if exc.name in context:
            return None, f"the output name uses {{{exc.name}}}, but this row has no value for it"
        return None, f"the output name uses {{{exc.name}}}, but this row has no such column"
    except (ValueError, TypeError) as exc:  # a format spec the value does not take, as {price:.2f} on text
        return None, f"the output name {template!r} cannot be filled: {exc}"
    if message := _text_problem(name):
        return None, f"the output name {message}"
    # os.path rather than pathlib, here and below: pathlib interns every name it parses, for good,
    # and this runs for every item of a 100,000-item catalog.
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:
        return None, f"the output name {name!r} must be relative to the output folder"
    if ".." in name.replace(os.sep, "/").split("/"):
        return None, f"the output name {name!r} must stay inside the output folder (no '..')"
    if name.endswith(("/", os.sep)) or os.path.basename(name) in ("", "."):
        return None, f"the output name {name!r} must end with a file name"
    if message := reserved_name_problem(name):
        return None, message
    return name, None
