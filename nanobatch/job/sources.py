"""Item sources: where a manifest's items come from, besides ``items:``.

::

    items_from:
      - csv: catalog.csv              # one item per row; any field may use {column}
        id: "{sku}"
        image: "photos/{sku}.jpg"
        instruction: "Replace the background with {background}"
      - jsonl: more.jsonl             # one JSON object per line, the same templates
      - glob: "photos/extra/*.jpg"    # one item per file: id "{stem}", image "{path}"

Every source is a stream: a CSV is read row by row through ``csv.DictReader``
and a JSONL file line by line, so a million-row catalog is never held in
memory. Each row becomes a :class:`RawItem`: item fields with the placeholders
filled in, plus any problem met on the way; ``manifest.py`` merges the defaults
and validates the rest. In templates ``{id}`` is the item's id (outside the
``id`` template itself), and ``{{``/``}}`` are literal braces.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..api import storage
from ..config import did_you_mean
from ..errors import Problem, StorageError
from ..templates import BRACES_HINT, MissingPlaceholder, Values, fill, template_fields
from .lines import NotUtf8Line, Utf8Lines

__all__ = [
    "GlobSource",
    "InlineSource",
    "MissingPlaceholder",
    "RawItem",
    "Source",
    "TableSource",
    "fill",
    "open_text",
    "parse_sources",
    "template_fields",
]

SOURCE_KINDS = ("csv", "jsonl", "glob")
_OPTIONS: dict[str, tuple[str, ...]] = {"csv": ("delimiter",), "jsonl": (), "glob": ()}

# Catalog exports carry long descriptions; the csv module's default cap is 128 KB per field.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def open_text(path: Path | str) -> Utf8Lines:
    """Open a source file (or bucket object) for reading, row by row (tests wrap this to see how much is read)."""
    return Utf8Lines(path)


@dataclass(frozen=True, slots=True, kw_only=True)
class RawItem:
    """One item as a source produced it, before defaults and validation.

    ``file`` is where problems point (the manifest, or ``catalog.csv:12`` for a row);
    ``label`` names the item until its id is known; ``context`` holds the row's
    values for the ``output`` template. ``fields`` is None when the row was unusable.
    """

    fields: dict[str, Any] | None
    file: str
    label: str | None
    context: Mapping[str, Any] | None = None
    problems: tuple[Problem, ...] = ()


class Source(Protocol):
    def raw_items(self) -> Iterator[RawItem]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class InlineSource:
    """The manifest's own ``items:`` list."""

    items: list[Any] = field(repr=False)
    file: str

    def raw_items(self) -> Iterator[RawItem]:
        for index, raw in enumerate(self.items):
            label = f"#{index + 1}"
            if not isinstance(raw, dict):
                problem = Problem(self.file, label, None, "an item must be a mapping with at least an id")
                yield RawItem(fields=None, file=self.file, label=label, problems=(problem,))
                continue
            yield RawItem(fields=raw, file=self.file, label=str(raw.get("id", label)))


@dataclass(frozen=True, slots=True, kw_only=True)
class TableSource:
    """A CSV (one item per row, first row the header) or JSONL file (one JSON object per line)."""

    kind: str
    path: Path | str  # a str is a bucket URL
    templates: dict[str, Any]
    delimiter: str = ","
    # Item fields a column (or JSONL key) of the same name gives, where the source has no template for them.
    columns_as_fields: frozenset[str] = frozenset()

    def raw_items(self) -> Iterator[RawItem]:
        try:
            stream = open_text(self.path)
        except OSError as exc:
            yield _broken(str(self.path), None, f"cannot read the {self.kind} file: {exc.strerror or exc}")
            return
        with stream:
            rows = self._csv_rows(stream) if self.kind == "csv" else self._jsonl_rows(stream)
            try:
                yield from rows
            except NotUtf8Line as exc:
                message = f'{exc}: save the file as UTF-8 (in Excel: "CSV UTF-8")'
                yield _broken(f"{self.path}:{exc.line}", None, message)
            except RecursionError:
                yield _broken(str(self.path), None, "a line is nested too deeply to read")
            except OSError as exc:  # the disk or share failed mid-file
                yield _broken(str(self.path), None, f"cannot read the {self.kind} file: {exc.strerror or exc}")

    def _csv_rows(self, stream: Iterable[str]) -> Iterator[RawItem]:
        reader = csv.DictReader(stream, delimiter=self.delimiter)
        file = str(self.path)
        try:
            header = reader.fieldnames
        except csv.Error as exc:
            yield _broken(file, None, f"not a readable CSV file: {exc}")
            return
        if not header:
            yield _broken(file, "id", "the CSV file is empty: its first row must name the columns")
            return
        missing = self._absent_columns(header)
        if missing:
            yield RawItem(fields=None, file=f"{file}:1", label=None, problems=tuple(missing))
            return
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield _broken(f"{file}:{reader.line_num}", None, f"row {reader.line_num} is not valid CSV: {exc}")
                return
            where = f"{file}:{reader.line_num}"
            if not any(value and value.strip() for value in row.values() if isinstance(value, str)) and None not in row:
                continue  # an empty row (",,", as Excel saves one): skipped like a blank line
            if None in row:
                extra = len(row[None])
                message = f"row {reader.line_num} has {extra} more value(s) than the header has columns"
                yield _broken(where, None, message)
                continue
            yield self._row(row, where, f"row {reader.line_num}")

    def _jsonl_rows(self, stream: Iterable[str]) -> Iterator[RawItem]:
        file = str(self.path)
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                yield _broken(where, None, f"line {number} is not valid JSON: {exc}")
                continue
            if not isinstance(row, dict):
                yield _broken(where, None, f"line {number} is not a JSON object")
                continue
            yield self._row(row, where, f"line {number}")

    def _absent_columns(self, header: Sequence[str]) -> list[Problem]:
        """Columns the templates use that the header lacks: reported once, not once per row."""
        problems = []
        columns = f"(columns: {', '.join(header)}){self._delimiter_hint(header)}"
        if "id" not in self.templates and "id" not in header:
            message = f"the header (row 1) has no column 'id' {columns}: add one, or write a template: id: \"{{sku}}\""
            problems.append(Problem(f"{self.path}:1", None, "id", message))
        for name, template in self.templates.items():
            for column in _placeholders(template, own_id=name == "id"):
                if column not in header:
                    message = (
                        f"the template uses {{{column}}}, but the header (row 1) has no column {column!r} "
                        f"{columns}{did_you_mean(column, list(header))}; {BRACES_HINT}"
                    )
                    problems.append(Problem(f"{self.path}:1", None, name, message))
        return problems

    def _delimiter_hint(self, header: Sequence[str]) -> str:
        """For a header read as one column that another delimiter would split: 'did you mean ...'."""
        if self.kind != "csv" or len(header) != 1:
            return ""
        for candidate in (",", ";", "\t", "|"):
            if candidate != self.delimiter and candidate in header[0]:
                shown = "\\t" if candidate == "\t" else candidate
                return f'; the header is one column: did you mean `delimiter: "{shown}"`?'
        return ""

    def _row(self, row: Mapping[str, Any], where: str, row_name: str) -> RawItem:
        templates = self.templates
        given = [name for name in self.columns_as_fields if name in row and row[name] not in (None, "")]
        if given:
            # An "image" or "instruction" column is that field, as "{image}" would be (a JSONL list stays a list).
            templates = {**templates, **{name: f"{{{name}}}" for name in given}}
        return _fill_fields(templates, row, where, row_name, default_id="{id}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobSource:
    """One item per file matching a pattern: ``{path}``, ``{name}`` and ``{stem}`` describe the file."""

    pattern: str
    base_dir: Path
    file: str
    templates: dict[str, Any]
    skip_dir: str | None = None  # the run's output folder (absolute): its images are results, not inputs

    def raw_items(self) -> Iterator[RawItem]:
        if storage.is_bucket_url(self.pattern):
            yield from self._bucket_items()
            return
        skip = None if self.skip_dir is None else self.skip_dir.rstrip(os.sep) + os.sep
        matches, results = [], 0
        for match in glob.iglob(self.pattern, root_dir=self.base_dir, recursive=True):
            path = os.path.join(self.base_dir, match)
            if not os.path.isfile(path):
                continue
            if skip is not None and os.path.abspath(path).startswith(skip):
                results += 1
            else:
                matches.append(match)
        matches.sort()  # so that the order (and the run's log) is the same every time
        if not matches:
            message = f"{self.pattern!r} matches no files (relative to {self.base_dir})"
            if results:
                message = (
                    f"{self.pattern!r} matches only files inside the output folder {self.skip_dir}: "
                    "those are results, not inputs"
                )
            yield _broken(self.file, "glob", message)
            return
        templates = self._templates()
        for match in matches:
            name = os.path.basename(match)  # os.path, not pathlib: pathlib interns every name for good
            values = {"path": match.replace(os.sep, "/"), "name": name, "stem": os.path.splitext(name)[0]}
            yield _fill_fields(templates, values, self.file, f"file {match}", default_id="{stem}")

    def _templates(self) -> dict[str, Any]:
        templates = dict(self.templates)
        if "image" not in templates and "images" not in templates:
            templates["image"] = "{path}"
        return templates

    def _bucket_items(self) -> Iterator[RawItem]:
        """One item per object matching a bucket pattern, listed page by page as the items are consumed;
        ``{path}`` is the object's URL."""
        templates, found = self._templates(), 0
        try:
            for url in storage.iter_glob(self.pattern):
                found += 1
                name = url.rsplit("/", 1)[-1]
                values = {"path": url, "name": name, "stem": os.path.splitext(name)[0]}
                yield _fill_fields(templates, values, self.file, f"object {url}", default_id="{stem}")
        except StorageError as exc:
            yield _broken(self.file, "glob", str(exc))
            return
        if not found:
            yield _broken(self.file, "glob", f"{self.pattern!r} matches no objects")


# Never taken from a column of the same name: "id" (the default id template is "{id}" already), "output"
# (a template that must contain {id}), "model" (in a catalog, more often the product's than Gemini's).
_NOT_FROM_COLUMNS = frozenset({"id", "output", "model"})
_EITHER_OR = (("image", "images"), ("instruction", "steps"))


def _used_by(templates: Mapping[str, Any]) -> set[str]:
    """The columns the templates read: data for them, not settings of their own."""
    used: set[str] = set()
    for name, template in templates.items():
        try:
            used.update(_placeholders(template, own_id=name == "id"))
        except ValueError:
            continue  # reported with the source's problems
    return used


def _broken(file: str, fld: str | None, message: str) -> RawItem:
    return RawItem(fields=None, file=file, label=None, problems=(Problem(file, None, fld, message),))


def _placeholders(template: Any, *, own_id: bool) -> list[str]:
    """Column names a template needs; outside the id template, {id} is the item's id, not a column."""
    if isinstance(template, list):
        return [name for part in template for name in _placeholders(part, own_id=own_id)]
    if not isinstance(template, str):
        return []
    return [name for name in template_fields(template) if own_id or name != "id"]


def _fill_fields(
    templates: Mapping[str, Any], row: Mapping[str, Any], where: str, row_name: str, *, default_id: str
) -> RawItem:
    problems: list[Problem] = []

    def missing(fld: str, name: str) -> None:
        what = f"no value for column {name!r}" if name in row else f"no column {name!r}"
        problems.append(Problem(where, item_id, fld, f"{row_name} has {what}"))

    item_id: Any = None
    # An empty cell is no value: a template that needs it is a problem, not an instruction cut short.
    present = Values({k: v for k, v in row.items() if v not in (None, "")})
    try:
        item_id = fill(templates.get("id", default_id), present)
    except MissingPlaceholder as exc:
        missing("id", exc.name)
    except (ValueError, TypeError) as exc:
        problems.append(Problem(where, None, "id", f"{row_name}: {exc}"))
    if item_id is not None:
        item_id = str(item_id)
    present["id"] = item_id
    fields: dict[str, Any] = {"id": item_id}
    for name, template in templates.items():
        if name in ("id", "output"):
            continue  # the output template is filled last, with the defaults' one (see manifest.py)
        try:
            fields[name] = fill(template, present)
        except MissingPlaceholder as exc:
            missing(name, exc.name)
        except (ValueError, TypeError) as exc:
            problems.append(Problem(where, item_id, name, f"{row_name}: {exc}"))
    if "output" in templates:
        fields["output"] = templates["output"]
    if problems:
        return RawItem(fields=None, file=where, label=item_id, problems=tuple(problems))
    return RawItem(fields=fields, file=where, label=item_id, context=row)


def parse_sources(
    entries: list[Any],
    *,
    manifest_file: str,
    base_dir: Path,
    item_fields: Collection[str],
    default_output: str | None = None,
) -> tuple[list[Source], list[Problem]]:
    """The ``items_from:`` entries as sources, and every problem with them (unknown keys, bad templates, ...).

    *default_output* is the ``defaults:`` output template, which rows fill too (its columns stay data)."""
    sources: list[Source] = []
    problems: list[Problem] = []
    for index, entry in enumerate(entries):
        where = f"items_from[{index}]"
        source, found = _parse_entry(entry, where, manifest_file, base_dir, item_fields, default_output)
        problems += found
        if source is not None and not found:
            sources.append(source)
    return sources, problems


def _parse_entry(
    entry: Any,
    where: str,
    manifest_file: str,
    base_dir: Path,
    item_fields: Collection[str],
    default_output: str | None,
) -> tuple[Source | None, list[Problem]]:
    def problem(fld: str | None, message: str) -> Problem:
        return Problem(manifest_file, None, f"{where}.{fld}" if fld else where, message)

    if not isinstance(entry, dict):
        return None, [problem(None, "each source must be a mapping with one of csv:, jsonl: or glob:")]
    kinds = [k for k in SOURCE_KINDS if k in entry]
    if len(kinds) != 1:
        found = f"not {', '.join(kinds)} together" if kinds else "none was given"
        return None, [problem(None, f"give exactly one of csv:, jsonl: or glob: ({found})")]
    kind = kinds[0]
    allowed = [*SOURCE_KINDS, *_OPTIONS[kind], *item_fields]
    problems = []
    for key in entry:
        if key not in allowed:
            problems.append(problem(str(key), "unknown key" + did_you_mean(str(key), allowed)))
        elif key in SOURCE_KINDS and key != kind:
            problems.append(problem(str(key), f"a source reads one thing: {key}: cannot go with {kind}:"))
    target = entry[kind]
    if not isinstance(target, str) or not target.strip():
        problems.append(problem(kind, f"{kind}: must be a file name or pattern, relative to the manifest"))
        return None, problems
    templates = {k: v for k, v in entry.items() if k in item_fields}
    delimiter = entry.get("delimiter", ",")
    problems += _entry_template_problems(kind, templates, problem)
    if kind == "csv" and (not isinstance(delimiter, str) or len(delimiter) != 1):
        problems.append(problem("delimiter", "the delimiter must be one character, such as ',' or ';'"))
    if kind == "glob":
        return GlobSource(pattern=target, base_dir=base_dir, file=manifest_file, templates=templates), problems
    path: Path | str = base_dir / target
    if storage.is_bucket_url(target):
        path = target
        try:
            storage.stat(target)  # one request: a missing bucket, object or extra is named before anything runs
        except StorageError as exc:
            problems.append(problem(kind, str(exc)))
    elif not isinstance(path, Path) or not path.is_file():
        problems.append(problem(kind, f"{kind} file not found: {path}"))
    source = TableSource(
        kind=kind,
        path=path,
        templates=templates,
        delimiter=str(delimiter),
        columns_as_fields=_from_columns(templates, item_fields, default_output),
    )
    return source, problems


def _entry_template_problems(
    kind: str, templates: Mapping[str, Any], problem: Callable[[str | None, str], Problem]
) -> list[Problem]:
    """What is wrong with a source's field templates: their placeholders, and for a glob, ones it cannot fill."""
    problems = []
    for name, template in templates.items():
        try:
            _placeholders(template, own_id=True)
        except ValueError as exc:
            problems.append(problem(name, str(exc)))
    if kind != "glob":
        return problems
    for name, template in templates.items():
        try:
            unknown = set(_placeholders(template, own_id=name == "id")) - {"path", "name", "stem"}
        except ValueError:
            continue
        if unknown:
            message = f"a glob source knows {{path}}, {{name}}, {{stem}} and {{id}}, not {{{min(unknown)}}}"
            problems.append(problem(name, message))
    return problems


def _from_columns(
    templates: Mapping[str, Any], item_fields: Collection[str], default_output: str | None
) -> frozenset[str]:
    """The item fields a table's columns set: those no template sets, nor a template (or the default output
    name) reads as data."""
    read = {**templates, "output": templates.get("output", default_output)}  # the output template used
    from_columns = frozenset(item_fields) - _NOT_FROM_COLUMNS - set(templates) - _used_by(read)
    for one, other in _EITHER_OR:  # a template for images rules out an "image" column, and so on
        if one in templates or other in templates:
            from_columns -= {one, other}
    return from_columns
