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
and ``build.py`` checks the rest. In templates ``{id}`` is the item's id (outside the
``id`` template itself), and ``{{``/``}}`` are literal braces. The entries
above are checked and turned into sources in :mod:`nanobatch.job.items_from`.
"""

from __future__ import annotations

import collections
import csv
import glob
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from ..api import storage
from ..config import did_you_mean
from ..errors import Problem, StorageError
from ..item import looks_like_picture
from ..templates import BRACES_HINT, MissingPlaceholder, Values, fill, template_fields
from .fields import PICTURE_FIELDS, ItemFields
from .lines import NotUtf8Line, Utf8Lines, file_stamp, json_line
from .yaml_stream import stream_items

if TYPE_CHECKING:
    from .shared import Shared

__all__ = [
    "COUNTERPART", "GlobSource", "InlineSource", "RawItem", "Source", "TableSource", "open_text", "placeholders",
]  # fmt: skip

# Catalog exports carry long descriptions; the csv module's default cap is 128 KB per field.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def open_text(path: Path | str) -> Utf8Lines:
    """Open a source file (or bucket object) for reading, row by row (tests wrap this to see how much is read)."""
    return Utf8Lines(path)


@dataclass(slots=True, kw_only=True)  # not frozen: one is made per row, and a frozen one costs twice as much
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
    shared: Shared | None = None  # its source's own fields that read no column (one object for all its rows)


class Source(Protocol):
    def raw_items(self) -> Iterator[RawItem]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class InlineSource:
    """The manifest's own ``items:`` list, read from the file one item at a time (:func:`yaml_stream.stream_items`)
    each time the items are wanted. *stamp* is the file's (size, mtime) when its top level was read: a file
    changed since (edited during a run) is a problem, not a different job half-way."""

    path: str
    file: str
    stamp: tuple[int, int]

    def raw_items(self) -> Iterator[RawItem]:
        index = 0
        try:
            if file_stamp(self.path) != self.stamp:
                yield _broken(self.file, None, "the manifest changed since it was read: run again")
                return
            for index, found in enumerate(stream_items(self.path), 1):  # noqa: B007 (index: for the error below)
                label = f"#{index}"
                if found.error is not None:
                    where = found.id if found.id is not None else label
                    problem = Problem(self.file, where, None, f"not valid YAML (line {found.line}): {found.error}")
                    yield RawItem(fields=None, file=self.file, label=where, problems=(problem,))
                elif not isinstance(found.value, dict):
                    problem = Problem(self.file, label, None, "an item must be a mapping with at least an id")
                    yield RawItem(fields=None, file=self.file, label=label, problems=(problem,))
                else:
                    yield RawItem(fields=found.value, file=self.file, label=str(found.value.get("id", label)))
        except yaml.YAMLError as exc:
            where = f"after item #{index}" if index else "at or before the first item"
            yield _broken(self.file, None, f"not valid YAML {where}: {exc}")
        except UnicodeDecodeError:
            yield _broken(self.file, None, "not UTF-8 text: save it as UTF-8")
        except OSError as exc:
            yield _broken(self.file, None, f"cannot read the manifest: {exc.strerror or exc}")


_ALL_FIELDS = frozenset(ItemFields.model_fields)
MISNAMED_CUTOFF = 0.8  # "imgae", "Image", "instrction", "aspectratio" are taken for fields; "name", "title" not
# The fields whose loss changes what is sent (and paid for): a column like one of them is most likely it. ("Tier"
# or "QA" columns are a catalog's own data as often as not: renamed to the field, they would change the run.)
COUNTERPART = {"image": "images", "images": "image", "instruction": "steps", "steps": "instruction"}
_SENT_FIELDS = frozenset({"image", "images", "instruction", "steps", "aspect_ratio", "image_size"})


@dataclass(frozen=True, slots=True, kw_only=True)
class TableSource:
    """A CSV (one item per row, first row the header) or JSONL file (one JSON object per line)."""

    kind: str
    path: Path | str  # a str is a bucket URL
    templates: dict[str, Any]
    delimiter: str = ","
    # The defaults' templates (fields that read columns) for the fields the source has no template for: a row fills
    # each one for which it gives no value (nor for its counterpart: images for image, steps for instruction).
    defaults: dict[str, Any] = field(default_factory=dict)
    # Item fields a column (or JSONL key) of the same name gives, where the source has no template for them.
    columns_as_fields: frozenset[str] = frozenset()
    read_columns: frozenset[str] = frozenset()  # the columns the templates (and the default output name) read
    unpictured: bool = False  # no template nor default gives a picture: a row's only one is an image(s) column
    # Rows from this byte on (a local file's), the *lines* before it passed over (a CSV's header still read):
    # those appended since a run's check (Manifest.since).
    start: int = 0
    lines: int = 0
    shared: Shared | None = None

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

    def _csv_rows(self, stream: Utf8Lines) -> Iterator[RawItem]:
        # csv.reader, each row zipped with the header, as csv.DictReader makes it (a blank line passed over, a
        # short row's missing cells None; a long one is a problem) at less cost per row
        reader = csv.reader(stream, delimiter=self.delimiter)
        file = str(self.path)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            yield _broken(file, None, f"not a readable CSV file: {exc}")
            return
        if not header:
            yield _broken(file, "id", "the CSV file is empty: its first row must name the columns")
            return
        missing = self._repeated(header, f"{file}:1") or self._absent_columns(header)
        missing += self._misnamed(header, f"{file}:1")
        if missing:
            yield RawItem(fields=None, file=f"{file}:1", label=None, problems=tuple(missing))
            return
        width, first_column = len(header), header[0]
        skipped = 0  # lines passed over: a row's number is the reader's line number and these
        if self.start:
            stream.skip_to(self.start, self.lines)
            skipped = self.lines - reader.line_num
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                number = reader.line_num + skipped
                yield _broken(f"{file}:{number}", None, f"row {number} is not valid CSV: {exc}")
                return
            if not cells:
                continue
            row: dict[str, Any] = dict(zip(header, cells, strict=False))  # a short row: filled below
            number = reader.line_num + skipped
            where = f"{file}:{number}"
            if len(cells) != width:
                if len(cells) > width:
                    extra = len(cells) - width
                    message = f"row {number} has {extra} more value(s) than the header has columns"
                    yield _broken(where, None, message)
                    continue
                row.update(dict.fromkeys(header[len(cells) :]))
            first = row.get(first_column)  # most rows: a value in the first column, and nothing more to look at
            if not (isinstance(first, str) and first.strip()) and not any(
                value and value.strip() for value in row.values() if isinstance(value, str)
            ):
                continue  # an empty row (",,", as Excel saves one): skipped like a blank line
            yield self._row(row, where, f"row {number}")

    def _jsonl_rows(self, stream: Utf8Lines) -> Iterator[RawItem]:
        file = str(self.path)
        seen: dict[tuple[str, ...], list[Problem]] = {}  # the misnamed keys of each set of keys met
        if self.start:
            stream.skip_to(self.start, self.lines)
        for number, line in enumerate(stream, self.lines + 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                row = json_line(line)
            except ValueError as exc:
                yield _broken(where, None, f"line {number} is not valid JSON: {exc}")
                continue
            if not isinstance(row, dict):
                yield _broken(where, None, f"line {number} is not a JSON object")
                continue
            keys = tuple(row)
            if (misnamed := seen.get(keys)) is None:
                misnamed = seen[keys] = self._misnamed(keys, where)
            if misnamed:
                yield RawItem(
                    fields=None, file=where, label=None, problems=tuple(replace(p, file=where) for p in misnamed)
                )
                continue
            yield self._row(row, where, f"line {number}")

    def _absent_columns(self, header: Sequence[str]) -> list[Problem]:
        """Columns the templates use that the header lacks: reported once, not once per row."""
        problems = []
        columns = f"(columns: {', '.join(header)}){self._delimiter_hint(header)}"
        if "id" not in self.templates and "id" not in header:
            message = f"the header (row 1) has no column 'id' {columns}: add one, or write a template: id: \"{{sku}}\""
            problems.append(Problem(f"{self.path}:1", None, "id", message))
        # The defaults' templates too, for a field no column may give (a row that gives it does not fill them)
        unread = {k: v for k, v in self.defaults.items() if k not in header and COUNTERPART.get(k) not in header}
        for name, template in {**unread, **self.templates}.items():
            for column in placeholders(template, own_id=name == "id"):
                if column not in header:
                    who = "the template" if name in self.templates else f"the defaults' {name}"
                    message = (
                        f"{who} uses {{{column}}}, but the header (row 1) has no column {column!r} "
                        f"{columns}{did_you_mean(column, list(header))}; {BRACES_HINT}"
                    )
                    problems.append(Problem(f"{self.path}:1", None, name, message))
        return problems

    def _repeated(self, header: Sequence[str], where: str) -> list[Problem]:
        """Columns the items read (a field, or read by a template) that the header names twice: a row would keep
        the last one's value only (its other picture lost). Others may repeat (Excel's empty names, two notes)."""
        used = self.columns_as_fields | self.read_columns
        twice = sorted(name for name, times in collections.Counter(header).items() if times > 1 and name in used)
        return [Problem(where, None, name, f"the header (row 1) names the column {name!r} twice") for name in twice]

    def _misnamed(self, columns: Sequence[str], where: str) -> list[Problem]:
        """Columns (JSONL keys) that look like a misspelt item field ("imgae", "Image", "instrction") where that
        field is not given: each would be passed over as data, and the item sent without it (paid for, and
        wrong). A column a template reads is data, whatever its name."""
        import difflib  # (only for a name that is not a field)

        problems = []
        fields = sorted(self.columns_as_fields & _SENT_FIELDS)
        for column in columns:
            if column in self.columns_as_fields or column in self.read_columns or column in _ALL_FIELDS:
                continue
            close = difflib.get_close_matches(column.lower(), fields, n=1, cutoff=MISNAMED_CUTOFF)
            if close and close[0] not in columns:
                message = (f"{column!r} is not an item field and no template reads it: did you mean {close[0]!r}? "
                           f"Rename it (or read it in a template, as \"{{{column}}}\", if it is data)")  # fmt: skip
                problems.append(Problem(where, None, column, message))
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
        given = [name for name in self.columns_as_fields.intersection(row) if row[name] not in (None, "")]
        if self.defaults:
            taken = {*given, *(COUNTERPART.get(name) for name in given)}
            templates = {**{k: v for k, v in self.defaults.items() if k not in taken}, **templates}
        if given:
            # An "image" or "instruction" column is that field, as "{image}" would be (a JSONL list stays a list).
            templates = {**templates, **{name: f"{{{name}}}" for name in given}}
        raw = _fill_fields(templates, row, where, row_name, default_id="{id}", shared=self.shared)
        if raw.fields is not None:
            for name in ("image", "images"):  # an empty cell where the pictures go: said (Manifest._resolve)
                if name in self.columns_as_fields and row.get(name, 0) in (None, "") and name not in raw.fields:
                    raw.fields[name] = None  # (a picture that is not there, not passed over)
            if self.unpictured and not raw.fields.keys() & PICTURE_FIELDS and (column := self._pictures_in(row)):
                return RawItem(fields=None, file=where, label=raw.label, problems=(Problem(where, raw.label, column, (
                    f"the column {column!r} names a picture ({str(row[column])[:80]!r}), but no field reads it: the "
                    f"row would go out without it, as a paid text-to-image request; name the column image, or write "
                    f'image: "{{{column}}}" (or read it in a template, if it is data)'
                )),))  # fmt: skip
        return raw

    def _pictures_in(self, row: Mapping[str, Any]) -> str | None:
        """The first column of *row* no template reads whose value is a picture's name or URL (``img``,
        ``photo_url``): what a table meant as its pictures, under a name that is not a field's."""
        for name, value in row.items():
            if type(value) is str and name not in self.read_columns and looks_like_picture(value):
                return name
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobSource:
    """One item per file matching a pattern: ``{path}``, ``{name}`` and ``{stem}`` describe the file."""

    pattern: str
    base_dir: Path
    file: str
    templates: dict[str, Any]
    skip_dir: str | None = None  # the run's output folder (absolute): its images are results, not inputs
    shared: Shared | None = None

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
            yield _fill_fields(templates, values, self.file, f"file {match}", default_id="{stem}", shared=self.shared)

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
                where = f"object {url}"
                yield _fill_fields(templates, values, self.file, where, default_id="{stem}", shared=self.shared)
        except StorageError as exc:
            yield _broken(self.file, "glob", str(exc))
            return
        if not found:
            yield _broken(self.file, "glob", f"{self.pattern!r} matches no objects")


def _broken(file: str, fld: str | None, message: str) -> RawItem:
    return RawItem(fields=None, file=file, label=None, problems=(Problem(file, None, fld, message),))


def placeholders(template: Any, *, own_id: bool) -> list[str]:
    """Column names a template needs; outside the id template, {id} is the item's id, not a column."""
    if isinstance(template, list):
        return [name for part in template for name in placeholders(part, own_id=own_id)]
    if not isinstance(template, str):
        return []
    return [name for name in template_fields(template) if own_id or name != "id"]


def _fill_fields(
    templates: Mapping[str, Any], row: Mapping[str, Any], where: str, row_name: str, *, default_id: str,
    shared: Shared | None = None,
) -> RawItem:  # fmt: skip
    problems: list[Problem] = []

    def missing(fld: str, name: str) -> None:
        what = f"no value for column {name!r}" if name in row else f"no column {name!r}"
        problems.append(Problem(where, item_id, fld, f"{row_name} has {what}"))

    item_id: Any = None
    # An empty cell is no value: a template that needs it is a problem, not an instruction cut short.
    values = row.values()
    present = Values(
        row if None not in values and "" not in values else {k: v for k, v in row.items() if v not in (None, "")}
    )
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
            continue  # the output template is filled last, with the defaults' one (see build.py)
        try:
            fields[name] = fill(template, present)
        except MissingPlaceholder as exc:
            missing(name, exc.name)
        except (ValueError, TypeError) as exc:
            problems.append(Problem(where, item_id, name, f"{row_name}: {exc}"))
    if "output" in templates:
        fields["output"] = templates["output"]
    if problems:
        return RawItem(fields=None, file=where, label=item_id, problems=tuple(problems), shared=shared)
    return RawItem(fields=fields, file=where, label=item_id, context=row, shared=shared)
