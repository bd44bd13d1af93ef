"""A multi-step item cut off between its steps keeps its latest step's image, and the next run goes on from there.

A night stopped by ``--max-cost``, ``--max-duration``, a signal or an error between an item's steps has paid for
the steps that answered. Their images were the input of the next step: the image of the latest one is written
under ``.nanobatch-steps/`` (nanobatch's own folder: never an output, never uploaded) and named in the step's
``outputs`` of the item's failed record. The next run with the same work (``key``) reads it back and sends only
the steps after it (:class:`Carried`, found by :func:`carried_step`); the record it writes refers to what the
earlier runs paid (``paid_in``), so ``paid_usd`` counts each step once. The file is deleted once the item has a
newer one, or a record that names none (:func:`~nanobatch.output.verdicts.out_of_date`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import anyio.to_thread

from ..api.gemini import Image, type_of
from ..names import KEPT_STEP, STEPS_FOLDER, output_names
from ..pictures import sniff_mime
from .files import Owned, is_ours
from .record import ItemRecord, StepRecord
from .tally import Carried, Tally

if TYPE_CHECKING:
    from ..item import WorkItem
    from .outdir import OutDir
    from .results import IndexEntry

__all__ = ["carried_step", "carry", "go_on", "is_carried", "keep_known", "let_go", "take_over", "taken_in"]

logger = logging.getLogger("nanobatch")


def is_carried(name: str) -> bool:
    """Whether the file *name* (relative to the output folder) is a stopped item's step image."""
    return name.startswith(STEPS_FOLDER + "/")


def carried_step(item: WorkItem, entry: IndexEntry | None, key: str, owned: Owned, out: OutDir) -> Carried | None:
    """The steps of *item* its latest record (*entry*) kept for this work *key*, if their image is on disk as
    nanobatch left it (*owned*: those of the record's files a record of the item says nanobatch wrote); else None
    (sent from step 1). A kept image is not an output: its name need not follow the item's output name."""
    if entry is None or entry.status == "ok" or entry.key != key or len(item.steps) < 2 or item.keep_steps:
        return None
    files = tuple(name for name in entry.files if is_carried(name))
    steps = {int(match[1]) for name in files if (match := KEPT_STEP.search(name))}
    if len(steps) != 1 or not 0 < (step := steps.pop()) < len(item.steps):
        return None
    if not all(is_ours(owned, name, out.file(name)) for name in files):
        logger.warning("%s: the image of its step %d was changed since nanobatch kept it: sent from its first "
                       "step", item.id, step)  # fmt: skip
        return None
    return Carried(step=step, files=files, run=entry.paid_in or entry.run, cost_usd=entry.cost_usd, tokens=entry.tokens)


def take_over(item: WorkItem, tally: Tally, carried: Carried) -> None:
    """*tally* told what the earlier runs answered and paid for *item*, as soon as its run means to go on from
    there: any record of it from here on (a failure before a request, too) names the kept image and what it cost."""
    tally.steps = [StepRecord(step=n, instruction=text) for n, text in enumerate(item.steps[: carried.step], 1)]
    tally.kept = carried


def keep_known(item: WorkItem, tally: Tally, entry: IndexEntry | None, owned: Owned, out: OutDir) -> None:
    """*item* failed before its work was known (an input that could not be read): the step its latest record
    (*entry*) kept stays named, with what it cost, and the record keeps that record's work key, so a later run
    whose inputs turn out the same goes on from there (one whose inputs changed does not)."""
    if entry is not None and entry.key is not None and tally.key is None and tally.kept is None:
        if (carried := carried_step(item, entry, entry.key, owned, out)) is not None:
            take_over(item, tally, carried)
            tally.key = entry.key


def let_go(tally: Tally) -> None:
    """Undo :func:`take_over`: the item is sent from its first step."""
    tally.steps, tally.kept = [], None


async def go_on(item: WorkItem, tally: Tally, carried: Carried, out: OutDir) -> list[Image] | None:
    """The images *item* goes on from (its step ``carried.step + 1`` edits them); None, with *tally* as if it had
    kept nothing, if they cannot be read."""

    def read() -> list[Image]:
        images = []
        for name in carried.files:
            with open(out.file(name), "rb") as handle:
                data = handle.read()
            images.append(Image(sniff_mime(data) or type_of(name.rpartition(".")[2]), data))
        return images

    try:
        images = await anyio.to_thread.run_sync(read)
    except OSError as exc:
        logger.warning("%s: the image of its step %d could not be read (%s): sent from its first step",
                       item.id, carried.step, exc)  # fmt: skip
        let_go(tally)
        return None
    logger.info("%s: goes on from its step %d, answered by run %s", item.id, carried.step, carried.run)
    return images


def carry(
    item: WorkItem, tally: Tally, record: ItemRecord, *, taken: Callable[[str], bool] = lambda name: False
) -> tuple[ItemRecord, list[tuple[str, Image]]]:  # fmt: skip
    """*record* (of *item*, cut off before its last step answered) naming the image of its latest step answered,
    and that image under :data:`STEPS_FOLDER`, to be written with it if this run answered it (one an earlier run
    kept is named where it is); *record* alone if no step before the last answered. A name *taken* (a file there
    nanobatch may not replace: a retouch left where it is) gives way to ``<stem>~1.step<n>.<ext>``, ..."""
    if item.keep_steps or not record.steps:
        return record, []
    files: list[tuple[str, Image]] = []
    if tally.carried is not None and tally.carried[1]:  # (a batch step emptied its list: its answer is in the job)
        step, images = tally.carried[0], [image for image in tally.carried[1] if isinstance(image, Image)]
        plain = output_names(item, [image.extension for image in images], step=step)
        names = next(n for k in itertools.count() if not any(map(taken, n := _kept_names(plain, k))))
        files = list(zip(names, images, strict=True))
    elif tally.kept is not None:
        step, names = tally.kept.step, tally.kept.files
    else:
        return record, []
    steps = tuple(replace(s, outputs=names) if s.step == step else s for s in record.steps)
    return replace(record, steps=steps), files


def _kept_names(names: list[str], k: int) -> tuple[str, ...]:
    """*names* (a step's output names) under :data:`STEPS_FOLDER`, the *k*-th free ones (0: as they are)."""
    kept = []
    for name in names:
        at = match.start() if (match := KEPT_STEP.search(name)) else len(name)
        kept.append(f"{STEPS_FOLDER}/{name[:at]}{f'~{k}' if k else ''}{name[at:]}")
    return tuple(kept)


def taken_in(out: OutDir, replaceable: Owned) -> Callable[[str], bool]:
    """Whether a kept image's name in *out* holds a file nanobatch may not replace for the item (*replaceable*)."""
    return lambda name: os.path.lexists(path := out.file(name)) and not is_ours(replaceable, name, path)
