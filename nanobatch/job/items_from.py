"""A manifest's ``items_from:`` entries -> item sources, and every problem with how they are written.

Unknown keys, templates a source cannot fill and missing files are all found here, before any row is
read; the rows themselves are read in :mod:`nanobatch.job.sources`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ..api import storage
from ..config import did_you_mean
from ..errors import Problem, StorageError
from .fields import parse_fields
from .shared import Shared
from .sources import COUNTERPART, GlobSource, Source, TableSource, placeholders

__all__ = ["parse_sources"]

SOURCE_KINDS = ("csv", "jsonl", "glob")
_OPTIONS: dict[str, tuple[str, ...]] = {"csv": ("delimiter",), "jsonl": (), "glob": ()}

# Never taken from a column of the same name: "id" (the default id template is "{id}" already), "output"
# (a template that must contain {id}), "model" (in a catalog, more often the product's than Gemini's).
_NOT_FROM_COLUMNS = frozenset({"id", "output", "model"})
_EITHER_OR = (("image", "images"), ("instruction", "steps"))
_GLOB_NAMES = frozenset({"path", "name", "stem"})

_ProblemAt = Callable[[str | None, str], Problem]


def parse_sources(
    entries: list[Any],
    *,
    manifest_file: str,
    base_dir: Path,
    item_fields: Collection[str],
    defaults: Mapping[str, Any] | None = None,
) -> tuple[list[Source], list[Problem]]:
    """The ``items_from:`` entries as sources, and every problem with them (unknown keys, bad templates, ...).

    *defaults* are the fields ``defaults:`` sets: its ``output`` template, which rows fill too (its columns stay
    data), and any other field that reads columns, which a row fills for a field it gives no value."""
    given = _Defaults.of(defaults or {})
    sources: list[Source] = []
    problems: list[Problem] = []
    for index, entry in enumerate(entries):
        where = f"items_from[{index}]"
        source, found = _parse_entry(entry, where, manifest_file, base_dir, item_fields, given)
        problems += found
        if source is not None and not found:
            sources.append(source)
    return sources, problems


class _Defaults(NamedTuple):
    """What a source needs of ``defaults:``."""

    output: str | None  # its output template
    templates: dict[str, Any]  # its other fields that read columns
    pictures: bool  # whether it gives every item a picture

    @classmethod
    def of(cls, defaults: Mapping[str, Any]) -> _Defaults:
        templates = {}
        for name, value in defaults.items():
            if name not in ("id", "output", "qa"):
                with contextlib.suppress(ValueError):  # a malformed one is plain text (as under items:)
                    if placeholders(value, own_id=False):
                        templates[name] = value
        return cls(defaults.get("output"), templates, bool(defaults.keys() & {"image", "images"}))


def _parse_entry(
    entry: Any,
    where: str,
    manifest_file: str,
    base_dir: Path,
    item_fields: Collection[str],
    given: _Defaults,
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
    problems = _key_problems(entry, kind, item_fields, problem)
    target = entry[kind]
    if not isinstance(target, str) or not target.strip():
        problems.append(problem(kind, f"{kind}: must be a file name or pattern, relative to the manifest"))
        return None, problems
    templates = {k: v for k, v in entry.items() if k in item_fields}
    delimiter = entry.get("delimiter", ",")
    problems += _entry_template_problems(kind, templates, problem)
    if wrong := _shared_problems(templates, manifest_file, where):
        return None, problems + wrong
    if kind == "csv" and (not isinstance(delimiter, str) or len(delimiter) != 1):
        problems.append(problem("delimiter", "the delimiter must be one character, such as ',' or ';'"))
    defaults, unfilled = _defaults_for(kind, templates, given.templates, problem)
    problems += unfilled
    shared = Shared(where, _constant(templates))
    if kind == "glob":
        templates = {**defaults, **templates}
        return GlobSource(pattern=target, base_dir=base_dir, file=manifest_file, templates=templates, shared=shared), (
            problems
        )  # fmt: skip
    path, missing = _table_path(kind, target, base_dir, problem)
    source = _table_source(kind, path, templates, defaults, str(delimiter), item_fields, given, shared)
    return source, problems + missing


def _table_source(
    kind: str, path: Path | str, templates: dict[str, Any], defaults: dict[str, Any], delimiter: str,
    item_fields: Collection[str], given: _Defaults, shared: Shared,
) -> TableSource:  # fmt: skip
    return TableSource(
        kind=kind,
        path=path,
        templates=templates,
        defaults=defaults,
        delimiter=delimiter,
        columns_as_fields=_from_columns(templates, item_fields, given.output, defaults),
        read_columns=frozenset(_used_by({**defaults, **templates, "output": templates.get("output", given.output)})),
        # No template and no default gives a picture: only an image (or images) column may
        unpictured=not given.pictures and not templates.keys() & {"image", "images"},
        shared=shared,
    )


def _shared_problems(templates: Mapping[str, Any], manifest_file: str, where: str) -> list[Problem]:
    """What is wrong with the source's fields that read no column: the same for every row, so told once, here
    (``items_from[0].qa.min_fil``), not row after row."""
    return parse_fields(_constant(templates), manifest_file, None, where=where)[1]


def _constant(templates: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a source gives each row itself, reading no column (not its id: each row's own)."""
    return {k: v for k, v in templates.items() if k != "id" and not _reads_columns(v)}


def _reads_columns(template: Any) -> bool:
    with contextlib.suppress(ValueError):  # a malformed template is reported as such
        return bool(placeholders(template, own_id=True))
    return True


def _defaults_for(
    kind: str, templates: Mapping[str, Any], default_templates: Mapping[str, Any], problem: _ProblemAt
) -> tuple[dict[str, Any], list[Problem]]:
    """The defaults' templates a source of *kind* fills: for the fields (and their counterparts) it has none for
    (of a glob, no picture: it gives its own); and, for a glob, one that reads what a file cannot fill."""
    defaults = {
        k: v for k, v in default_templates.items() if k not in templates and COUNTERPART.get(k) not in templates
    }
    if kind != "glob":
        return defaults, []
    defaults = {k: v for k, v in defaults.items() if k not in ("image", "images")}
    problems = []
    for name, template in defaults.items():
        if unknown := set(placeholders(template, own_id=False)) - _GLOB_NAMES:
            problems.append(problem(name, (
                f"the defaults' {name} reads {{{min(unknown)}}}, which a glob source cannot fill (it knows {{path}}, "
                f"{{name}}, {{stem}} and {{id}}): give this source its own {name}"
            )))  # fmt: skip
    return defaults, problems


def _key_problems(entry: dict[Any, Any], kind: str, item_fields: Collection[str], problem: _ProblemAt) -> list[Problem]:
    """The entry's keys that are neither a field nor an option of its *kind*, or name a second kind."""
    allowed = [*SOURCE_KINDS, *_OPTIONS[kind], *item_fields]
    problems = []
    for key in entry:
        if key not in allowed:
            problems.append(problem(str(key), "unknown key" + did_you_mean(str(key), allowed)))
        elif key in SOURCE_KINDS and key != kind:
            problems.append(problem(str(key), f"a source reads one thing: {key}: cannot go with {kind}:"))
    return problems


def _table_path(kind: str, target: str, base_dir: Path, problem: _ProblemAt) -> tuple[Path | str, list[Problem]]:
    """Where a CSV or JSONL source's file is (a str: a bucket URL), and the problem if it is not there."""
    if storage.is_bucket_url(target):
        try:
            storage.stat(target)  # one request: a missing bucket, object or extra is named before anything runs
        except StorageError as exc:
            return target, [problem(kind, str(exc))]
        return target, []
    path = base_dir / target
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long for the file system, among others
        return path, [problem(kind, f"cannot read the {kind} file {str(path)[:200]!r}: {exc.strerror or exc}")]
    if not found:
        return path, [problem(kind, f"{kind} file not found: {path}")]
    return path, []


def _entry_template_problems(kind: str, templates: Mapping[str, Any], problem: _ProblemAt) -> list[Problem]:
    """What is wrong with a source's field templates: their placeholders, and for a glob, ones it cannot fill."""
    problems = []
    for name, template in templates.items():
        try:
            placeholders(template, own_id=True)
        except ValueError as exc:
            problems.append(problem(name, str(exc)))
    if kind != "glob":
        return problems
    for name, template in templates.items():
        try:
            unknown = set(placeholders(template, own_id=name == "id")) - {"path", "name", "stem"}
        except ValueError:
            continue
        if unknown:
            message = f"a glob source knows {{path}}, {{name}}, {{stem}} and {{id}}, not {{{min(unknown)}}}"
            problems.append(problem(name, message))
    return problems


def _from_columns(
    templates: Mapping[str, Any], item_fields: Collection[str], default_output: str | None,
    defaults: Mapping[str, Any],
) -> frozenset[str]:  # fmt: skip
    """The item fields a table's columns set: those no template sets, nor a template (or the default output
    name, or another of the defaults' templates) reads as data."""
    read = {**defaults, **templates, "output": templates.get("output", default_output)}  # the templates used
    from_columns = frozenset(item_fields) - _NOT_FROM_COLUMNS - set(templates) - _used_by(read)
    for one, other in _EITHER_OR:  # a template for images rules out an "image" column, and so on
        if one in templates or other in templates:
            from_columns -= {one, other}
    return from_columns


def _used_by(templates: Mapping[str, Any]) -> set[str]:
    """The columns the templates read: data for them, not settings of their own."""
    used: set[str] = set()
    for name, template in templates.items():
        try:
            used.update(placeholders(template, own_id=name == "id"))
        except ValueError:
            continue  # reported with the source's problems
    return used
