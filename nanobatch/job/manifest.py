"""Job manifests: a YAML file -> a validated stream of :class:`WorkItem`.

Loading reads the YAML document's top level only (``items:`` may come before or
after ``defaults:``; see :mod:`nanobatch.safe_yaml`). Items are read and resolved
one at a time as they are consumed, from ``items:`` (the file read again, event by
event) and then from each ``items_from:`` source (CSV, JSONL, glob; see
:mod:`nanobatch.job.sources`), all read as streams: no image is read, no request
is built and no catalog is loaded whole here. A
run first walks the whole stream with :meth:`Manifest.check` (which stats each
input file and collects every problem, not just the first, keeping only the set
of ids) and sends nothing unless it is clean.

Here: reading the file and its top level, and the stream of items. An item's fields and :class:`WorkItem`
are in :mod:`nanobatch.job.fields`, building one item in :mod:`nanobatch.job.build`, the whole check in
:mod:`nanobatch.job.check`, and output names in :mod:`nanobatch.names`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ManifestError, Problem, not_utf8
from ..item import WorkItem
from ..models import model_id_problem
from ..names import plain_name_problem, template_problems
from ..qa import QaFields
from .build import Shapes, build_item, build_plain, local_paths
from .check import CheckReport, check_items, raw_id
from .fields import ItemFields, ManifestFields, Merged, from_pydantic, merge_given, parse_fields, plain_fields
from .fields import without_empty_pictures as without_empty
from .items_from import parse_sources
from .lines import file_stamp
from .origins import Origins
from .pictures import PictureCheck, looked_ahead
from .shared import Shared
from .sources import GlobSource, InlineSource, RawItem, Source, TableSource
from .yaml_stream import ItemsFound, read_top

__all__ = ["Manifest", "load_manifest"]

TOLD_AHEAD = 256  # items whose ids check(ahead=...) is told of together


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A loaded manifest. Iterate :meth:`items` for the work, :meth:`check` to validate it all."""

    path: Path
    name: str
    model: str
    output_dir: Path | None
    defaults: ItemFields
    sources: tuple[Source, ...] = field(default=(), repr=False)
    # The ``qa:`` layers under the defaults' and the items' own, farthest first: the config file's, the manifest's.
    qa_layers: tuple[QaFields, ...] = ()
    # Where the values its items do not set themselves were written (see problem_at)
    origins: Origins = field(repr=False, compare=False)
    # Worked out once, not once per item: the absolute folder inputs resolve against, the defaults as a dict.
    _base: str = field(init=False, repr=False, compare=False)
    _defaults: dict[str, Any] = field(init=False, repr=False, compare=False)
    _plain: dict[str, Any] = field(init=False, repr=False, compare=False)  # the same, qa: as QaFields
    _shapes: Shapes = field(init=False, repr=False, compare=False)  # what most items share, checked once
    _inherited: frozenset[tuple[str, str]] = field(init=False, repr=False, compare=False)  # (see _inherited_problems)
    _shared: dict[str, frozenset[tuple[str, str]]] = field(init=False, repr=False, compare=False)  # per entry

    def __post_init__(self) -> None:
        object.__setattr__(self, "_base", os.path.abspath(self.path.parent))
        object.__setattr__(self, "_defaults", _given(self.defaults))
        object.__setattr__(self, "_plain", {name: getattr(self.defaults, name) for name in self._defaults})
        object.__setattr__(self, "_shapes", Shapes(self.model, self.qa_layers))
        object.__setattr__(self, "_inherited", self._inherited_problems())
        object.__setattr__(self, "_shared", {})

    def problem_at(self, raw: RawItem, item: str | None, field: str, message: str) -> Problem:
        """The problem *message* with the value of the item's *field*, told where that value was written: on the
        item (*raw*, its id *item*), in ``defaults:``, at the top level, or in the settings (:mod:`.origins`)."""
        return self.origins.problem(raw, item, field, message, model=self.model)

    def skipping(self, out_dir: Path) -> Manifest:
        """This manifest with its globs blind to *out_dir*: a run's results are not the next run's inputs."""
        folder = os.path.abspath(out_dir)
        sources = tuple(
            dataclasses.replace(s, skip_dir=folder) if isinstance(s, GlobSource) else s for s in self.sources
        )
        return dataclasses.replace(self, sources=sources)

    def since(self, starts: Mapping[str, tuple[int, int]]) -> Manifest:
        """This manifest with only the rows appended to its CSV and JSONL sources since a run's check: each
        source named in *starts* (by absolute path: the byte and the line its new rows start at) read from there
        on, and no other source, nor ``items:``."""
        sources = tuple(
            dataclasses.replace(source, start=starts[path][0], lines=starts[path][1])
            for source in self.sources
            if isinstance(source, TableSource) and (path := os.path.abspath(source.path)) in starts
        )
        return dataclasses.replace(self, sources=sources)

    def files(self) -> list[str] | None:
        """The local files its items are read from (the manifest, its CSV and JSONL sources), absolute; None when a
        glob or a bucket object gives items too (what they give is not told by files' stamps)."""
        found = [os.path.abspath(self.path)]
        for source in self.sources:
            if isinstance(source, GlobSource) or isinstance(source, TableSource) and isinstance(source.path, str):
                return None
            if isinstance(source, TableSource):
                found.append(os.path.abspath(source.path))
        return found

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
        visit: Callable[[WorkItem, RawItem], None] | None = None,
        out_dir: Path | None = None,
        decode: bool = False,
        skip_bad_inputs: bool = False,
        trusted: Callable[[str | None], Mapping[str, tuple[int, int, str]]] | None = None,
        ahead: Callable[[list[str | None]], Mapping[str, list[str]]] | None = None,
        pictures: PictureCheck | None = None,
        told: Iterable[str] | None = None,
    ) -> CheckReport:
        """Resolve every item, collecting all problems (duplicate ids, missing files, model limits, ...).

        Items are not kept: only their ids, to find duplicates, and those on disk. With *out_dir*,
        output names are also checked not to lead out of it through a symbolic link, nor onto an input. With
        *decode*, every local picture is read and checked to be decodable (headers and sizes, no full decode);
        *skip_bad_inputs* leaves out the items whose pictures are not, instead of calling them problems;
        *trusted* gives, for an item's id, the stamps of inputs known to decode (sent and answered before):
        those still the same are not read again; *ahead* is told the ids of the next few hundred items, a few
        thousand items before they are resolved (so that *trusted* may read their stamps together), and gives the
        paths of other files to stat with an item's pictures (a done item's outputs); *pictures*: the picture
        check *decode* reads them with, if the caller keeps it (to ask which trusted ones it found unchanged);
        *told*: of rows appended since a run's check (no item is no problem), the models it told of, not again.
        """
        # Not decoding, the pictures are still stat-ed through one: its lstat also tells which are links
        files = ((pictures or PictureCheck()) if decode else PictureCheck(read=False)) if check_files else False

        also: dict[str | None, list[str]] = {}  # by item id, as *ahead* gave them, until looked at or resolved

        def resolve(raw: RawItem) -> tuple[WorkItem | None, list[Problem]]:
            also.pop(raw_id(raw), None)
            if trusted is not None and isinstance(files, PictureCheck) and files.read:
                files.trust(trusted(raw_id(raw)))
            return self._resolve(raw, check_files=files)

        def paths_of(raw: RawItem) -> list[str]:
            return local_paths(raw.fields, self._plain, self._base) + also.pop(raw_id(raw), [])

        raws = self._raw_items()
        if ahead is not None:  # told first: its files are looked at with the pictures
            raws = _told_ahead(raws, lambda ids: also.update(ahead(ids)))
        if isinstance(files, PictureCheck) and files.read:
            # In a done folder most pictures are trusted as sent and answered: only stat-ed ahead, not read
            raws = looked_ahead(raws, paths_of, files, read=trusted is None)
        is_link = files.is_link if isinstance(files, PictureCheck) else os.path.islink
        return check_items(self.path, raws, resolve, visit=visit, out_dir=out_dir, skip_bad_inputs=skip_bad_inputs,
                           is_link=is_link, empty_ok=told is not None, models_told=told or ())  # fmt: skip

    def _raw_items(self) -> Iterator[RawItem]:
        for source in self.sources:
            yield from source.raw_items()

    def _resolve(
        self, raw: RawItem, *, check_files: bool | PictureCheck = True
    ) -> tuple[WorkItem | None, list[Problem]]:
        if raw.problems or raw.fields is None:
            return None, list(raw.problems)
        given = raw.fields
        if "image" in given or "images" in given:
            given, empty = without_empty(given, self._defaults)
            if empty is not None:
                return None, [Problem(raw.file, raw.label, empty, (
                    f"no picture: {empty} is empty (and the defaults give none), so the item would be sent as a "
                    "text-to-image request, paid for a new picture made from the instruction alone; give its "
                    f"picture, or leave {empty} out for text-to-image"
                ))]  # fmt: skip
        own = plain_fields(given)
        if own is not None:  # the usual item: texts where texts go, checked without pydantic
            values = merge_given(self._plain, own)
            item = build_plain(values, raw, self._shapes, base=self._base, check_files=check_files, own=own)
            if item is not None:
                return item, []
        else:
            fields, problems = parse_fields(given, raw.file, raw.label)
            if fields is None:
                return None, problems
            merged = ItemFields.model_validate(merge_given(self._defaults, _given(fields)))
            values = {name: getattr(merged, name) for name in _given(merged)}
        item, problems = build_item(
            Merged(**values), values, raw, model=self.model, base=self._base, check_files=check_files,
            qa=self.qa_layers,
        )  # fmt: skip
        return item, [self._placed(raw, problem) for problem in problems]

    def _inherited_problems(self) -> frozenset[tuple[str, str]]:
        """The problems (field, message) of an item that sets nothing of its own (but an id and, if the defaults
        give none, an instruction): those of the values every item inherits, which only those items have whose
        own fields leave them as they are (an item's image_size may make the config's qa.min_side reachable)."""
        values = {"id": "item", **self._plain}
        if "instruction" not in values and "steps" not in values:
            values["instruction"] = "edit"
        raw = RawItem(fields={}, file=str(self.path), label=None)
        _, problems = build_item(Merged(**values), values, raw, model=self.model, base=self._base, check_files=False,
                                 qa=self.qa_layers)  # fmt: skip
        return frozenset((problem.field, problem.message) for problem in problems if problem.field)

    def _placed(self, raw: RawItem, problem: Problem) -> Problem:
        """*problem*, told where the value it is about was written when it is one of the inherited values', or one
        its ``items_from:`` entry gives every row itself and every row has (``items_from[0].tier``)."""
        if problem.field is None:
            return problem
        about, shared = (problem.field, problem.message), raw.shared
        # The entry's own value, a problem an item of its fields alone has, and a row that adds no setting of its
        # own (a column's image_size or model may be what the value does not fit: then it is told at the row).
        if shared is not None and shared.writes(problem.field) and about in self._shared_problems(shared):
            if raw.fields is not None and all(k in _ROW_OWN or k in shared.fields for k in raw.fields):
                return Problem(str(self.path), None, f"{shared.where}.{problem.field}", problem.message)
        if about not in self._inherited:
            return problem
        return self.problem_at(raw, problem.item, problem.field, problem.message)

    def _shared_problems(self, shared: Shared) -> frozenset[tuple[str, str]]:
        """The problems (field, message) of a row that an ``items_from:`` entry gives nothing but its own fields
        that read no column: those every row of it has (a problem that depends on a row's own values is not)."""
        if (found := self._shared.get(shared.where)) is None:
            fields = {"id": "item", **shared.fields}
            if not {"instruction", "steps"} & {*fields, *self._plain}:
                fields["instruction"] = "edit"
            raw = RawItem(fields=fields, file=str(self.path), label=None)
            _, problems = self._resolve(raw, check_files=False)
            found = self._shared[shared.where] = frozenset((p.field, p.message) for p in problems if p.field)
        return found


# A row's own fields, not settings: a problem with a setting an items_from: entry gives is every row's only when
# the row adds no setting of its own.
_ROW_OWN = frozenset({"id", "image", "images", "instruction", "steps", "output"})


def _told_ahead(raws: Iterator[RawItem], tell: Callable[[list[str | None]], object]) -> Iterator[RawItem]:
    """*raws*, a few hundred at a time, *tell* given their ids before they are handed on."""
    while chunk := list(itertools.islice(raws, TOLD_AHEAD)):
        tell([raw_id(raw) for raw in chunk])
        yield from chunk


def load_manifest(
    path: str | os.PathLike[str], *, default_model: str, qa: QaFields | None = None,
    written: Callable[[str], str] | None = None,
) -> Manifest:  # fmt: skip
    """Read and check the top level of a manifest and its sources; items are resolved later, one by one.

    *qa* is the config file's ``qa:`` section: the manifest's, its defaults' and each item's own keys win over it.
    *written* tells where a setting was written (``Settings.written_at``), for a problem with *default_model* or
    *qa* to be told there (:meth:`Manifest.problem_at`).
    """
    path = Path(path)
    file = str(path)
    top, listed, data_stamp = _read_top(path)
    defaults, problems = parse_fields(top.defaults, file, None, where="defaults")
    for name, value, problem_of in (("name", top.name, plain_name_problem), ("model", top.model, model_id_problem)):
        if value is not None and (message := problem_of(value)):
            problems.append(Problem(file, None, name, message))
    if defaults is not None and defaults.id is not None:
        problems.append(Problem(file, None, "defaults.id", "defaults cannot set an id"))
    if defaults is not None and defaults.output is not None:
        problems += [Problem(file, None, "defaults.output", m) for m in template_problems(defaults.output)]
    has_items = isinstance(listed, ItemsFound) and listed.count != 0
    sources: list[Source] = [InlineSource(path=file, file=file, stamp=data_stamp)] if has_items else []
    if top.items_from:
        found, source_problems = parse_sources(
            top.items_from,
            manifest_file=file,
            base_dir=path.parent,
            item_fields=list(ItemFields.model_fields),
            defaults=_given(defaults) if defaults is not None else None,
        )
        sources += found
        problems += source_problems
    if not has_items and not top.items_from:
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
        qa_layers=tuple(layer for layer in (qa, top.qa) if layer is not None),
        origins=Origins(
            file=file, defaults=_given(defaults), model=top.model, settings=written, qa=frozenset(_given_qa(top.qa))
        ),  # fmt: skip
    )


def _read_top(path: Path) -> tuple[ManifestFields, Any, tuple[int, int]]:
    """The manifest's top level as its fields, what its ``items:`` holds (:class:`ItemsFound` for a list), and the
    file's stamp as read; raises :class:`ManifestError` if it is not a manifest's."""
    data, stamp = _read_mapping(path)
    listed = data.get("items")
    if isinstance(listed, ItemsFound):  # a list, its items read one by one later
        data = {**data, "items": []}
    if isinstance(data.get("items_from"), dict):
        data = {**data, "items_from": [data["items_from"]]}  # one source, written without the list dash
    try:
        return ManifestFields.model_validate(data), listed, stamp
    except ValidationError as exc:
        raise ManifestError([from_pydantic(str(path), None, err, ManifestFields) for err in exc.errors()]) from None


def _read_mapping(path: Path) -> tuple[dict[Any, Any], tuple[int, int]]:
    """The manifest's top level, which must be a mapping (``items:`` as :class:`ItemsFound`), and the file's
    stamp as read; raises :class:`ManifestError` if it is not."""
    file = str(path)
    try:
        stamp = file_stamp(file)
        if not os.path.isfile(file):  # read more than once, and to its end: /dev/urandom would be read for ever
            raise ManifestError([Problem(file, None, None, "the manifest must be a file, not a pipe or device")])
        data = read_top(file)
    except OSError as exc:
        raise ManifestError([Problem(file, None, None, f"cannot read the manifest: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        try:  # the offset in the whole file, not in the block being read
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError([Problem(file, None, None, not_utf8(exc))]) from None
        raise
    except yaml.YAMLError as exc:
        raise ManifestError([Problem(file, None, None, f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ManifestError([Problem(file, None, None, "a manifest must be a mapping with items: or items_from:")])
    return data, stamp


def _given(fields: ItemFields | QaFields) -> dict[str, Any]:
    return fields.model_dump(exclude_none=True)


def _given_qa(qa: QaFields | None) -> dict[str, Any]:
    return _given(qa) if qa is not None else {}
