"""What a run does with an item its output folder may already hold: skip it, move its files, or send it.

:meth:`Resume.decide` is the one place that reads an item's latest record (its :class:`IndexEntry`) against
the work key of its inputs and the run's flags (``--force``, ``--retry-failed``, ``output.upload_to``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

from ..api.gemini import OUTPUT_EXTENSIONS, extension_of
from ..item import WorkItem
from ..models import ANSWER_TYPES
from ..names import REJECTED_FOLDER, STEPS_FOLDER, item_stems, rejected_name
from .carried import carried_step, is_carried
from .files import Owned, is_ours, stamp_of
from .outdir import OutDir
from .results import IndexEntry, ResultsIndex
from .tally import Carried
from .upload import Uploads

__all__ = ["SKIP", "Move", "Resume", "Send", "Skip", "is_done", "outputs_there", "renamed_files"]

logger = logging.getLogger("nanobatch")


@dataclass(frozen=True, slots=True)
class Skip:
    """Nothing to do: done already for these inputs (or, with ``--retry-failed``, not a failure and not waiting in
    a batch job)."""


SKIP = Skip()


@dataclass(frozen=True, slots=True, kw_only=True)
class Move:
    """Done for these inputs, under names its ``output`` template no longer gives: its files move, nothing is sent."""

    moves: tuple[tuple[str, str], ...]  # (old, new): the record's name, the one the item's files now take
    replaceable: Owned  # of the new names, those a record of the item says nanobatch wrote
    # Where a file is now, if not under its old name: moved by a run that died before its record (see _moved_to).
    at: Mapping[str, str] = field(default_factory=dict)

    @property
    def paths(self) -> tuple[tuple[str, str], ...]:
        """The moves to make on disk: (where the file is, its new name); the same name twice if it is there."""
        return tuple((self.at.get(old, old), new) for old, new in self.moves)


@dataclass(frozen=True, slots=True, kw_only=True)
class Send:
    """To be sent; its answer may replace only *replaceable*: files under its names that a record of the item
    says nanobatch wrote, while they are as it left them."""

    replaceable: Owned
    # The path of a place its image or a kept step would go, taken by a file nanobatch did not write for it.
    taken: str | None = None
    why: str | None = None  # why it is taken, if not a file there (a folder on the way that leads out of the folder)
    uploads: tuple[str, ...] = ()  # with output.upload_to: the names its images would be uploaded under
    carried: Carried | None = None  # the steps earlier runs answered, which it goes on from


class Resume:
    """The run's flags and its output folder, asked once per item whether to skip, move or send it."""

    def __init__(
        self,
        *,
        out: OutDir,
        index: ResultsIndex,
        uploads: Uploads | None,
        force: bool,
        retry_failed: bool,
        in_batch: Callable[[WorkItem, str], bool] | None = None,
    ) -> None:
        self.out = out
        self.index = index
        self.uploads = uploads  # the objects are the outputs that count; their check was batched (find_gone)
        self.force = force
        self.retry_failed = retry_failed
        # Whether a request of the item's work (its key) waits in the folder's batch jobs, or its answer on disk.
        self.in_batch = in_batch

    def decide(self, item: WorkItem, entry: IndexEntry | None, key: str) -> Skip | Move | Send:
        """What to do with *item*, whose inputs have the work key *key* and whose latest record is *entry*."""
        wanted = self._wanted(item, entry, key)
        if self.force or not _ok(entry, key):
            return self._send(item, entry, key) if wanted else SKIP
        renamed = dict(renamed_files(entry, item.stem))
        # Done files a run moved, dying before its record, are looked for only where one is missing.
        look = wanted or not all(os.path.isfile(self.out.file(old)) for old in renamed)
        at = self._moved_to(item, entry, renamed) if look else {}
        if wanted and not at:
            return self._send(item, entry, key)
        at = at or {}
        moves = tuple((old, new) for old, new in renamed.items() if os.path.isfile(self.out.file(at.get(old, old))))
        moves += tuple((old, old) for old in at if old not in renamed)  # back from rejected/
        if not moves:
            return SKIP
        owned = self.index.owned(item.id, [old for old, _ in moves])
        if changed := [old for old, _ in moves if not is_ours(owned, old, self.out.file(at.get(old, old)))]:
            logger.warning("%s: its files keep their old names: %s was changed since nanobatch wrote it (or is not "
                           "nanobatch's)", item.id, self.out.file(at.get(changed[0], changed[0])))  # fmt: skip
            return SKIP
        new_names = self.index.owned(item.id, (new for _, new in moves))
        return Move(moves=moves, replaceable={**owned, **new_names}, at=at)

    def _moved_to(self, item: WorkItem, entry: IndexEntry, renamed: Mapping[str, str]) -> dict[str, str] | None:
        """Where the files of *entry* (an ok record) that are not under its names are, each as nanobatch left it,
        when a run that moved them died before its record: under the names the item's ``output`` template gives
        now, or under ``rejected/`` (a ``nanobatch qa --apply``). None if one is nowhere so (the item is sent)."""
        if all(os.path.isfile(self.out.file(name)) for name in entry.files):
            return {}
        owned, at = self.index.owned(item.id, entry.files), {}
        for name in entry.files:
            if not os.path.isfile(self.out.file(name)):
                places = [place for place in (renamed.get(name), rejected_name(name)) if place is not None]
                found = [p for p in places if owned.get(name) and stamp_of(self.out.file(p)) == owned[name]]
                if not found:
                    return None
                at[name] = found[0]
        return at

    def _wanted(self, item: WorkItem, entry: IndexEntry | None, key: str) -> bool:
        if self.retry_failed:
            if entry is not None and entry.status in ("failed", "blocked", "rejected"):
                return True
            # Not done, and paid for in a batch job: collected, or its answer would be thrown away with the job's.
            return self.in_batch is not None and not is_done(entry, key, self.out.path) and self.in_batch(item, key)
        if self.uploads is not None:
            done = _ok(entry, key) and item.id not in self.uploads.gone
            return self.force or not done
        return self.force or not is_done(entry, key, self.out.path)

    def _send(self, item: WorkItem, entry: IndexEntry | None, key: str) -> Send:
        # Looked for before paying: an answer that could not be saved (the writer refuses it the same way). An
        # item with output checks may write under rejected/ instead (nanobatch.output.verdicts); what an earlier
        # run set aside there for it is replaceable too (an answer that passes deletes it), and so is the image
        # of a step it was stopped after (nanobatch.output.carried).
        kept = self.index.owned_under(item.id, f"{STEPS_FOLDER}/{item.stem}")  # and where the latest record kept
        kept.update(self.index.owned(item.id, [name for name in entry.files if is_carried(name)] if entry else []))
        replaceable = {
            **self.index.owned_under(item.id, item.stem), **self.index.owned_under(item.id, rejected_name(item.stem)),
            **kept,
        }  # fmt: skip
        carried = None if self.force else carried_step(item, entry, key, kept, self.out)
        names = [f"{stem}.{ext}" for stem, _ in item_stems(item) for ext in OUTPUT_EXTENSIONS]
        numbered: list[str] = []
        if entry is not None and entry.error_kind in ("output_exists", "upload"):
            # Its last answer could not be saved, perhaps under the name of a second image (<stem>-1, -2, ...), of any
            # type: its failed record names no file, so those are looked at too, or each night pays to be refused
            numbered = [f"{s}-{n}.{ext}" for s, _ in item_stems(item) for n in _NUMBERED for ext in OUTPUT_EXTENSIONS]
        uploads = (*_upload_names(item, entry, names), *numbered) if self.uploads is not None else ()
        names += numbered
        if item.qa is not None and item.qa.active:
            folder = self.out.file(REJECTED_FOLDER)
            if os.path.islink(folder) or os.path.lexists(folder) and not os.path.isdir(folder):
                return Send(replaceable=replaceable, taken=folder, uploads=uploads, carried=carried)  # not through it
            names += [rejected_name(name) for name in names]
        # A folder on the way that leads out of the output folder (looked at once per folder); or a file, a folder
        # or a link there that is not the item's as nanobatch left it.
        escapes = {
            folder: self.out.escapes(os.path.join(folder, "x")) for folder in {os.path.dirname(n) for n in names}
        }
        outside = [name for name in names if escapes[os.path.dirname(name)]]
        there = [name for name in names if os.path.lexists(self.out.file(name))]  # a file, a folder, a link
        foreign = outside + sorted(n for n in there if not is_ours(replaceable, n, self.out.file(n)))
        why = "is in a folder that leads out of the output folder through a symbolic link" if outside else None
        taken = self.out.file(foreign[0]) if foreign else None
        return Send(replaceable=replaceable, taken=taken, why=why, uploads=uploads, carried=carried)


_NUMBERED = range(1, 5)  # an answer's images looked at, by number, for an item whose last answer was refused


def _upload_names(item: WorkItem, entry: IndexEntry | None, names: list[str]) -> tuple[str, ...]:
    """Of *names*, those its images will most likely be uploaded under, by the type its model answers with (PNG
    or JPEG for a model the facts table does not know) and the types of its last answer: one HEAD each before
    paying. An answer of another type is never PUT over an object (a conditional create), though it was paid
    for; its record keeps its names, so the next run looks there too and does not pay again."""
    mime = f"image/{item.output_format}" if item.output_format else ANSWER_TYPES.get(item.model)
    expected = {extension_of(mime)} if mime else {"png", "jpg"}
    expected.update(name.rpartition(".")[2] for name in (entry.outputs if entry is not None else ()))
    return tuple(name for name in names if name.rpartition(".")[2] in expected)


def is_done(entry: IndexEntry | None, key: str, out_dir: Path) -> bool:
    """True when *entry* (an item's latest record) is ``ok`` for exactly this *key* and its files exist."""
    return _ok(entry, key) and outputs_there(out_dir, entry.outputs)


def outputs_there(out_dir: str | Path, outputs: Iterable[str]) -> bool:
    """Whether each of a record's *outputs* is a file in *out_dir* (a deleted one makes its item work again)."""
    return all(os.path.isfile(os.path.join(out_dir, name)) for name in outputs)


def _ok(entry: IndexEntry | None, key: str) -> TypeGuard[IndexEntry]:
    """Whether *entry* (an item's latest record) is ``ok`` for exactly this work *key*."""
    return entry is not None and entry.status == "ok" and entry.key == key


def renamed_files(entry: IndexEntry, stem: str) -> list[tuple[str, str]]:
    """(old, new) for each file of *entry* (an ok record) whose name follows from an output name other than
    *stem*: ``<old>.png`` -> ``<stem>.png``, ``<old>-2.png`` -> ``<stem>-2.png``, ``<old>.step1.png`` -> ..."""
    if not entry.outputs:
        return []
    old = os.path.splitext(entry.outputs[0])[0]
    if len(entry.outputs) > 1:
        if not old.endswith("-1"):
            return []  # not a name nanobatch made: leave it be
        old = old[:-2]
    if old == stem:
        return []
    return [(name, stem + name[len(old) :]) for name in entry.files if name[: len(old) + 1] in (old + ".", old + "-")]
