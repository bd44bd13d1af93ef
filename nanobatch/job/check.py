"""The check of a whole manifest: every problem of every item, and what items would clash over in the output
folder (ids, output names, inputs written over, names leading out of it)."""

from __future__ import annotations

import contextlib
import logging
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import models
from ..errors import Problem
from ..item import IMAGE_SUFFIXES, WorkItem
from ..names import SUFFIX_ROOM, FoldersIn, folds_case, image_folders, item_stems
from ..scratch import ScratchTable, scratch_db
from .build import SCHEME
from .sources import RawItem

__all__ = [
    "MAX_PROBLEMS",
    "CheckReport",
    "bad_input_hint",
    "check_items",
    "left_out_text",
    "raw_id",
    "warn_unknown_model",
]

logger = logging.getLogger("nanobatch")

# Beyond this many, check() lists no more problems (a broken template in a million-row CSV).
MAX_PROBLEMS = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    """What :meth:`Manifest.check` found: totals for estimates, and every problem. With ``skip_bad_inputs``,
    the items whose only problems are pictures that cannot be decoded are left out: counted in ``items`` (a run
    goes through them, recording each as failed) but not in ``requests``, their problems in ``left_out``."""

    items: int
    requests: int
    problems: list[Problem]
    left_out: list[Problem] = field(default_factory=list)
    left_out_items: int = 0


def left_out_text(left_out: Sequence[Problem], items: int) -> str:
    """What to tell of the *items* ``--skip-bad-inputs`` left out: a line, then one per problem (*left_out*)."""
    lines = [f"left out {items} item{'s' if items != 1 else ''} whose input pictures cannot be decoded (a run "
             "records each as failed, with the reason, and sends nothing for it):"]  # fmt: skip
    lines += [f"  {problem}" for problem in left_out]
    return "\n".join(lines)


def bad_input_hint(problems: list[Problem]) -> str | None:
    """What to tell of *problems* that are pictures which cannot be decoded: a run would not stop for them."""
    items = len({p.item for p in problems if p.bad_input})
    if not items:
        return None
    if items == 1:
        said = "1 item's input picture cannot be decoded. A run would not stop for it: it sends the other items and "
        said += "records this one as failed, sending nothing for it."
    else:
        said = f"{items} items' input pictures cannot be decoded. A run would not stop for them: it sends the other "
        said += "items and records these as failed, sending nothing for them."
    return said + " With --skip-bad-inputs, validate and run leave such items out, list them and check the rest"


class _Claims:
    """What the items met so far have taken, in a scratch SQLite database (100,000 items do not stay in
    memory; each table's Bloom filter, 2 MiB, keeps most lookups away from it): their ids, and the output
    names they write (before the extension), so that no item overwrites another's image.

    Output names caught: the same name (``output`` templates that meet), a kept step's name
    (``shirt.step1``) that is another item's name, and a folder named like another item's image
    (``b.png/{id}`` beside item ``b``). Not caught: ``<stem>-2`` for a second image in one answer,
    which no check can foresee. Keys are bytes: text that is not valid UTF-8 is reported elsewhere.
    """

    def __init__(self, key: Callable[[str], bytes]) -> None:
        self._key = key  # of a name: _key, or _folded_key where names that differ only in case are one file
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
        self._ids = ScratchTable(self._db, "ids", "id")
        self._names = ScratchTable(self._db, "names", "name, owner, what")
        self._folders = ScratchTable(self._db, "folders", "name, owner")
        self._writes = ScratchTable(self._db, "writes", "place, owner")
        self._reads = ScratchTable(self._db, "reads", "place, owner, path")
        # How many of the last item's stems claim_outputs() put in the names table (the first, up to a clash):
        # for those right in the output folder, that table is also the writes table (see claim_places()).
        self._named = 0

    def add_id(self, item_id: str) -> bool:
        """Note *item_id*; False if it was already there."""
        return self._ids.claim((_key(item_id),)) is None

    def claim_outputs(self, item: WorkItem) -> str | None:
        """Note what *item* writes; why it cannot, if another item got there first."""
        own = item.stem
        self._named = 0
        for stem, step in item_stems(item) if item.keep_steps else ((own, None),):
            self._named += 1
            name = stem.replace(os.sep, "/")
            what = "its image" if step is None else f"its step {step}"
            key = self._key(name)
            if (taken := self._names.claim((key, item.id, what))) is not None:
                _, owner, theirs = taken
                told = "" if self._key is _key else " (this folder does not tell upper from lower case in names)"
                return (
                    f"{what} would be {name}.<type>, as is {theirs} of item {owner!r}: one would overwrite the "
                    f"other{told}"
                )
            if (row := self._folders.find(key)) is not None:
                return f"{what} would be {name}.<type>, a file where item {row[1]!r} needs a folder"
        if "/" not in own and os.sep not in own:  # most names: right in the output folder, no folder to claim
            return None
        for folder, image in image_folders(own):
            key = self._key(image)
            if (row := self._names.find(key)) is not None:
                return f"its folder {folder!r} may be the name of item {row[1]!r}'s image"
            self._folders.add((key, item.id))
        return None

    def claim_places(self, item: WorkItem, places: _Places) -> list[tuple[str, str]]:
        """The field and problem if *item* has an input where an item writes, and if it would write over an
        input of the job (its own or another item's); none if neither. A run must never write over what it
        reads. Every place of the item is noted, also after a problem: later items are checked against all."""
        if not places.exists:  # no output folder yet: no input is in it, so nothing can be written over one
            return []
        found: list[tuple[str, str]] = []
        for n, path in enumerate(item.inputs):
            for place, name in places.of_input(path):
                self._reads.claim((place, item.id, path))
                row = self._writes.find(place)
                if row is None and name is not None and (named := self._names.find(name)) and named[1] != item.id:
                    row = named
                if row is not None and not found:  # an earlier item's (its own: below)
                    where = "image" if len(item.inputs) == 1 else f"images[{n}]"
                    found.append((where, f"the image of item {row[1]!r} would be written over this input, {path}"))
        written_over = False
        for n, (stem, _) in enumerate(item_stems(item) if item.keep_steps else ((item.stem, None),)):
            # A name right in the output folder that claim_outputs() put in the names table has its place there:
            # an input in the output folder is looked for in it too (above). The others: the writes table.
            if n >= self._named or "/" in stem or os.sep in stem:
                if (spot := places.of_output(stem)) is None:
                    continue
                self._writes.claim((spot, item.id))
            elif self._reads.empty:  # no input in the output folder so far
                continue
            else:
                spot = places.of_output(stem)
            if not written_over and spot is not None and (row := self._reads.find(spot)):
                written_over = True
                whose = "its own input" if row[1] == item.id else f"an input of item {row[1]!r}"
                message = f"its image would be written over {row[2]}, {whose}: choose another output folder or name"
                found.append(("output" if item.output else "id", message))
        return found

    def close(self) -> None:
        for table in (self._ids, self._names, self._folders, self._writes, self._reads):
            table.close()
        self._db.close()


class _Places:
    """Where files really are, for :meth:`_Claims.claim_places`: the real folder (symbolic links followed) and
    the file name without an image extension (an output's extension follows the returned image's type)."""

    def __init__(self, out_dir: Path, is_link: Callable[[str], bool], key: Callable[[str], bytes]) -> None:
        self._key = key
        self.out_dir = os.path.abspath(out_dir)
        self._is_link = is_link
        self._folders = FoldersIn(out_dir)
        self.root = self._folders.root
        self._top = os.path.join(self.root, "")  # where a name right in the output folder is: the root, then "/"
        # No output folder yet: no input is in it, nor links into it (such a link would dangle: not found)
        self.exists = os.path.isdir(out_dir)

    def of_output(self, stem: str) -> bytes | None:
        if "/" not in stem and os.sep not in stem:  # most names: right in the output folder (its real path known)
            return self._key(self._top + stem)
        folder, name = os.path.split(os.path.join(self.out_dir, stem))
        return self._place(folder, name)

    def of_input(self, path: str) -> list[tuple[bytes, bytes | None]]:
        """Where a write would replace the local input *path* or its content: its name, and the file it links
        to (if it is a symbolic link); only those in the output folder with an image extension (the others are
        never written). Each with its name without the extension when it is right in the output folder (where
        an output of that name would be written: see :meth:`_Claims.claim_places`), else None."""
        if not self.exists or path[:1] != os.sep and SCHEME.match(path):
            return []
        paths = [path, os.path.realpath(path)] if self._is_link(path) else [path]
        places = []
        for each in paths:
            folder, name = os.path.split(each)
            if (found := self._folders.real(folder)) is None:  # outside the output folder: most inputs
                continue
            name, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                places.append((self._key(os.path.join(found, name)), self._key(name) if found == self.root else None))
        return places

    def _place(self, folder: str, name: str) -> bytes | None:
        found = self._folders.real(folder)
        return None if found is None else self._key(os.path.join(found, name))


def _key(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _folded_key(text: str) -> bytes:
    """*text*'s key where names that differ only in case (or in how an accent is encoded: macOS) are one file."""
    folded = text.lower() if text.isascii() else unicodedata.normalize("NFC", text).casefold()
    return folded.encode("utf-8", "surrogatepass")


def warn_unknown_model(model: str) -> None:
    logger.warning("unknown model %r: sent as is, without local checks of ratios and sizes", model)


def raw_id(raw: RawItem) -> str | None:
    """The id a source gave an item, if it is one (before the item is checked)."""
    value = raw.fields.get("id") if raw.fields is not None else None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


class _Problems:
    """Every problem up to :data:`MAX_PROBLEMS`, then only a count; one with a value many items inherit (told
    where it was written, no item named: see ``job.origins``) once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kept: list[Problem] = []
        self.found = 0
        self._shared: set[Problem] = set()

    def add(self, problem: Problem) -> None:
        if problem.item is None:
            if problem in self._shared:
                return
            self._shared.add(problem)
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
        self.path_max = _path_max(self.root)

    def check(self, name: str) -> str | None:
        parent = os.path.dirname(name)
        if not parent:
            return None
        # Each name fits (name_length_problem), but together they may not: the write would fail, after paying
        if len(name) > 200 and len(os.fsencode(os.path.join(self.root, name))) + SUFFIX_ROOM >= self.path_max:
            return f"its path would be longer than the {self.path_max} bytes this file system takes in a path"
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


def _path_max(folder: Path) -> int:
    """The longest path the file system of *folder* (or of the nearest folder above it that exists) takes."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_PATH_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return 4096


def check_items(
    path: Path,
    raw_items: Iterator[RawItem],
    resolve: Callable[[RawItem], tuple[WorkItem | None, list[Problem]]],
    *,
    visit: Callable[[WorkItem, RawItem], None] | None = None,
    out_dir: Path | None = None,
    skip_bad_inputs: bool = False,
    is_link: Callable[[str], bool] = os.path.islink,
    empty_ok: bool = False,
    models_told: Iterable[str] = (),
) -> CheckReport:
    """Resolve each of *raw_items* (of the manifest at *path*) with *resolve*, collecting every problem: each
    item's own, and what items clash over. Only ids and output names are kept, in a scratch database.
    *skip_bad_inputs*: an item whose only problems are pictures that cannot be decoded is left out instead.
    *is_link*: whether a local input is a symbolic link (the check of what writes could replace asks it).
    *empty_ok*: yielding no item is no problem. *models_told*: models already told of (not warned of again)."""
    problems, left_out, key = _Problems(path), _Problems(path), _folded_key if out_dir and folds_case(out_dir) else _key
    with contextlib.closing(_Claims(key)) as claims:
        count = requests = left_items = 0
        looked: set[str] = set(models_told)  # the models looked up
        confine = _Confinement(out_dir) if out_dir is not None else None
        places = _Places(out_dir, is_link, key) if out_dir is not None else None
        for raw in raw_items:
            item, found = resolve(raw)
            skipped = skip_bad_inputs and bool(found) and all(p.bad_input for p in found)
            (left_out if skipped else problems).extend(found)
            left_items += skipped
            # A bad item's id still counts: its duplicate is a problem of its own.
            item_id = item.id if item is not None else raw_id(raw)
            if item_id is not None and not claims.add_id(item_id):
                problems.add(Problem(raw.file, item_id, "id", f"duplicate id {item_id!r}: ids must be unique"))
                continue
            if item is None:
                continue
            problems.extend(_clashes(item, raw.file, claims, confine, places))
            if item.model not in looked:
                looked.add(item.model)
                if models.lookup(item.model) is None:
                    warn_unknown_model(item.model)
            if visit is not None:
                visit(item, raw)
            count += 1
            requests += len(item.steps)
    if count + left_items == 0 and not problems.found and not empty_ok:
        problems.add(Problem(str(path), None, "items", "the manifest and its sources yield no items"))
    return CheckReport(
        items=count + left_items, requests=requests, problems=problems.listed(), left_out=left_out.kept,
        left_out_items=left_items,
    )  # fmt: skip


def _clashes(
    item: WorkItem, file: str, claims: _Claims, confine: _Confinement | None, places: _Places | None
) -> list[Problem]:
    """What is wrong with where *item* writes: over another item's output, out of the folder, over an input."""
    found = []
    if message := claims.claim_outputs(item):
        found.append(Problem(file, item.id, "output" if item.output else "id", message))
    if confine is not None and item.output is not None and (message := confine.check(item.output)):
        found.append(Problem(file, item.id, "output", message))
    if places is not None:
        found += [Problem(file, item.id, fld, message) for fld, message in claims.claim_places(item, places)]
    return found
