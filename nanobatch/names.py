"""Where output names are decided: an item's files in the output folder, and nanobatch's own.

An item writes ``<stem>.<ext>`` (``<stem>-1.<ext>``, ``<stem>-2.<ext>``, ... when an answer holds several
images) and, with ``keep_steps``, ``<stem>.step<n>.<ext>`` for each step before the last. The stem is the
item's id, or its filled ``output`` template without an image extension; the extension follows the type of
the image returned. The manifest's check and the engine both name files through this module, so that what
is checked is what is written.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .item import IMAGE_SUFFIXES
from .templates import MissingPlaceholder, fill, template_fields

if TYPE_CHECKING:
    from .item import WorkItem

__all__ = [
    "FoldersIn",
    "JOURNAL_FILE",
    "KEPT_STEP",
    "LEDGER_FILE",
    "LOCK_FILE",
    "REPORT_FILE",
    "RESERVED_FILES",
    "RESERVED_PREFIX",
    "REJECTED_FOLDER",
    "RESULTS_FILE",
    "STEPS_FOLDER",
    "SUFFIX_ROOM",
    "SUMMARY_FILE",
    "folds_case",
    "is_kept_step",
    "item_stems",
    "output_name",
    "output_names",
    "plain_path",
    "rejected_name",
    "reserved_name_problem",
]

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".nanobatch.lock"  # one run at a time: see output/lock.py
SUMMARY_FILE = "summary.json"
JOURNAL_FILE = "journal.jsonl"
REPORT_FILE = "report.html"
# nanobatch's own files at the top of the output folder: no output name may use them, as a file or a folder.
RESERVED_FILES = frozenset({RESULTS_FILE, SUMMARY_FILE, JOURNAL_FILE, REPORT_FILE, LOCK_FILE})
# Names starting with this are nanobatch's anywhere in the output folder (its lock, its temporary files).
RESERVED_PREFIX = ".nanobatch"
# Where the images of an item whose answer failed its output checks (``qa:``) go: never at the folder's top.
REJECTED_FOLDER = "rejected"
BATCH_FOLDER = RESERVED_PREFIX + "-batches"  # the batch tier's chunks, results files and ledger
STEPS_FOLDER = RESERVED_PREFIX + "-steps"  # a stopped item's latest step's image (nanobatch.output.carried)
LEDGER_FILE = "batches.jsonl"  # the batch tier's ledger, in BATCH_FOLDER (nanobatch.run.batch.ledger)

# File systems take names of up to 255 bytes. What output_names() adds to a stem, ".step12-3.webp" at its
# longest, fits in SUFFIX_ROOM bytes: caught at the check, a name too long costs nothing; at the write, a paid
# request.
NAME_MAX = 255
SUFFIX_ROOM = 16


def rejected_name(name: str) -> str:
    """Where the output name *name* goes when its item is rejected: ``sku-1.png`` -> ``rejected/sku-1.png``."""
    return f"{REJECTED_FOLDER}/{name}"


def step_stem(stem: str, step: int) -> str:
    """The stem of a kept step's image."""
    return f"{stem}.step{step}"


def is_kept_step(name: str) -> bool:
    """Whether the file *name* is a kept step's image (:func:`step_stem`'s, numbered if several, and a type)."""
    return KEPT_STEP.search(name) is not None


KEPT_STEP = re.compile(r"\.step([0-9]+)(?:-[0-9]+)?\.[^./]+$")  # what output_names adds to a kept step's stem


def item_stems(item: WorkItem) -> list[tuple[str, int | None]]:
    """The stems *item* writes, each with its step (None: the final image): its image, then each kept step."""
    stem = item.stem
    kept = range(1, len(item.steps)) if item.keep_steps else range(0)
    return [(stem, None), *((step_stem(stem, n), n) for n in kept)]


def output_names(item: WorkItem, extensions: Sequence[str], *, step: int | None = None) -> list[str]:
    """The file names of *item*'s images (of *step*'s, for a kept step), one per extension returned."""
    stem = item.stem if step is None else step_stem(item.stem, step)
    if len(extensions) == 1:
        return [f"{stem}.{extensions[0]}"]
    return [f"{stem}-{n}.{ext}" for n, ext in enumerate(extensions, 1)]


def reserved_name_problem(name: str) -> str | None:
    """Why the output name *name* (relative to the output folder) would fall on nanobatch's own files, or None."""
    # "./results.jsonl/x" and "a//b" name the same files as "results.jsonl/x" and "a/b".
    parts = plain_path(name).split("/")
    if len(parts) > 1 and parts[0].casefold() in RESERVED_FILES:
        return f"the output name {name!r} would put a folder where nanobatch keeps its own file {parts[0]}"
    if len(parts) > 1 and parts[0].casefold() == REJECTED_FOLDER:
        return f"the output name {name!r} is in {REJECTED_FOLDER}/, where nanobatch sets aside what fails the checks"
    if any(part.casefold().startswith(RESERVED_PREFIX) for part in parts):
        return f"the output name {name!r} has a name starting with {RESERVED_PREFIX!r}: nanobatch's own files"
    return None


def text_problem(text: str) -> str | None:
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


@functools.lru_cache(maxsize=256)  # asked for every item's name: a catalog has a few templates, not one per item
def template_problems(template: str) -> tuple[str, ...]:
    """Why *template* cannot be an ``output`` name template."""
    try:
        names = template_fields(template)
    except ValueError as exc:
        return (str(exc),)
    if "id" not in names:
        return ("the output name must contain {id} so that items do not overwrite each other",)
    return ()


def plain_name_problem(name: str) -> str | None:
    """Why *name* cannot be the folder under ``output.dir`` that a run writes into, or None."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        return f"{name!r} must be a plain folder name (it goes under output.dir); use output_dir: for a path"
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        return f"{name[:40]!r}... is longer than a folder name can be ({NAME_MAX} bytes)"
    return text_problem(name)


def name_length_problem(name: str) -> str | None:
    """Why the file system would refuse *name* (an output name before its extension), or None."""
    if len(name) <= (NAME_MAX - SUFFIX_ROOM) // 4:  # most names: too short to be too long, in any encoding
        return None
    *folders, last = name.replace(os.sep, "/").split("/")
    for part in folders:
        if len(part.encode()) > NAME_MAX:
            return f"the folder name {part[:40]!r}... is {len(part.encode())} bytes long: at most {NAME_MAX}"
    size = len(last.encode())
    if size > NAME_MAX - SUFFIX_ROOM:
        return (
            f"the file name {last[:40]!r}... is {size} bytes long: at most {NAME_MAX - SUFFIX_ROOM} "
            f"({NAME_MAX} with the extension and step number nanobatch adds)"
        )
    return None


def output_name(template: str, item_id: str, context: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """The output name with ``{id}`` (and, for items from a CSV or JSONL source, any column) filled in."""
    problems = template_problems(template)
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
    return _placed(name)


def _placed(name: str) -> tuple[str | None, str | None]:
    """*name*, if it can be a path in the output folder; else why not."""
    if message := text_problem(name):
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
    return plain_path(name), None  # one name for one file: else two items naming it would not be seen to clash


def plain_path(name: str) -> str:
    """*name* (a path in the output folder) with "/" between its parts and no empty or "." part: "a/./x.png" and
    "a//x.png" are "a/x.png", as the file system finds them."""
    name = name.replace(os.sep, "/")
    if "//" not in name and "./" not in name:
        return name
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def image_folders(stem: str) -> Iterable[tuple[str, str]]:
    """Each folder on *stem*'s path whose name ends in an image extension, with that name without it: a
    folder ``b.png/`` may be where item ``b`` writes its image."""
    if "/" not in stem and os.sep not in stem:  # most stems: a name right in the output folder
        return
    parts = stem.replace(os.sep, "/").split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        folder = "/".join(parts[:depth])
        suffix = os.path.splitext(folder)[1]
        if suffix.lower() in IMAGE_SUFFIXES:
            yield folder, folder[: -len(suffix)]


class FoldersIn:
    """Which folders are the output folder *out_dir* or in it, symbolic links followed: :meth:`real` gives such a
    folder's real path, None for one outside (each folder's answer remembered: most items share a handful)."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(out_dir)
        self._inside = self.root.rstrip(os.sep) + os.sep
        self._real: dict[str, str | None] = {}

    def real(self, folder: str) -> str | None:
        if folder not in self._real:
            if len(self._real) > 10_000:
                self._real.clear()
            real = os.path.realpath(folder)
            self._real[folder] = real if real == self.root or real.startswith(self._inside) else None
        return self._real[folder]


def folds_case(folder: str | os.PathLike[str]) -> bool:
    """Whether names that differ only in case are one file in *folder* (or, while it does not exist, in the
    nearest folder above it), as on macOS and Windows by default: there ``SKU-1.png`` is ``sku-1.png``.

    Told by a name already there whose other case is looked up (one stat; on a file system that tells case, no
    file answers to it, or another does); in a folder with no such name, by a file of nanobatch's own made
    and removed at once. A folder nanobatch may not write to tells nothing: False."""
    path = os.path.abspath(folder)
    while not os.path.isdir(path):
        if (parent := os.path.dirname(path)) == path:
            return False
        path = parent
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for n, entry in enumerate(entries):
            # ASCII only: every such file system folds A-Z (not all fold the rest alike: "ß" and "SS")
            if entry.name.isascii() and (other := entry.name.swapcase()) != entry.name:
                try:
                    return os.path.samestat(os.lstat(entry.path), os.lstat(os.path.join(path, other)))
                except OSError:
                    return False  # no file answers to the other case
            if n >= 100:
                break
    try:
        with tempfile.NamedTemporaryFile(prefix=f"{RESERVED_PREFIX}-case-", suffix=".tmp", dir=path) as probe:
            return os.path.exists(os.path.join(path, os.path.basename(probe.name).upper()))
    except OSError:
        return False
