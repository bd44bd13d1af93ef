"""``nanobatch qa``: the done items' images checked again against the manifest's current ``qa:``; nothing is sent.

For a team that tightens a threshold after a run: :func:`recheck` says which images fail now. With ``apply``, the
new verdicts are recorded as a run records its own: one new line per item whose verdict changed (results.jsonl is
append-only, the last line of an id wins), a newly failing item ``rejected`` with its images moved under
``rejected/``, a rejected one that passes now ``ok`` with its images moved back out; the folder's lock held, only
files a record names moved, none that nanobatch did not write for the item replaced. The next run then sends the
rejected items again, like failed ones, and nothing else.

>>> result = await nanobatch.recheck("jobs/example.yaml", apply=True)  # doctest: +SKIP
>>> [item.id for item in result.failing]
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeGuard

import anyio
from anyio.abc import ObjectReceiveStream

from ..config import Settings
from ..errors import InputError, ManifestError, UsageError
from ..inputs.load import InputLoader
from ..inputs.stamps import is_remote
from ..item import WorkItem
from ..job.manifest import Manifest
from ..names import REJECTED_FOLDER, RESULTS_FILE, SUMMARY_FILE
from ..output.files import Owned, fsync_dir, stamp_of
from ..output.outdir import OutDir
from ..output.record import ErrorInfo, ItemRecord, PaidIn
from ..output.record_lines import latest_records
from ..output.results import IndexEntry, ResultsIndex
from ..output.resume import outputs_there
from ..output.verdicts import check_images
from ..qa import NOT_MEASURED, QaSettings, UndecodableImage, Verdict
from .done import DoneWork
from .preflight import load_job, resolve_out_dir

__all__ = ["RecheckResult", "Rechecked", "recheck"]

logger = logging.getLogger("nanobatch")

_REJECTED = REJECTED_FOLDER + "/"  # a rejected item's images: OUT/rejected/<its output name>


@dataclass(frozen=True, slots=True, kw_only=True)
class Rechecked:
    """One done item checked again: its recorded ``status`` (ok or rejected), its images, the new verdict."""

    id: str
    status: str
    outputs: tuple[str, ...]
    verdict: Verdict
    # (name, where it is) of each file a ``qa --apply`` that died before its records moved (see _where)
    moved: tuple[tuple[str, str], ...] = ()

    @property
    def turned(self) -> bool:
        """Whether the new verdict is not what its record says: an ok item that fails, a rejected one that passes."""
        return self.verdict.passed != (self.status == "ok")

    @property
    def to_record(self) -> bool:
        """Whether ``apply`` records it: its verdict turned, or its files are not where its record says."""
        return self.turned or bool(self.moved)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "outputs": list(self.outputs), **self.verdict.to_json()}


@dataclass(frozen=True, slots=True, kw_only=True)
class RecheckResult:
    """What :func:`recheck` found (and, with ``apply``, recorded). Items are in manifest order."""

    manifest: Path
    out_dir: Path
    checked: int  # done items (ok or rejected, their images there) whose images were checked
    failing: tuple[Rechecked, ...]  # of those, the ones that fail now
    passing_again: tuple[Rechecked, ...]  # rejected items whose images pass now
    not_done: int  # the manifest's other items: never run, failed, blocked, changed since, or their images gone
    unreadable: tuple[str, ...] = ()  # done items whose images could not be read: not checked
    moved_back: tuple[Rechecked, ...] = ()  # ok items that pass, whose files a dead --apply moved (apply puts back)
    checks_on: bool = False  # whether any check is on for any item of the manifest
    applied: bool = False
    recorded: tuple[str, ...] = ()  # with apply: the items given a new record
    refused: tuple[tuple[str, str], ...] = ()  # with apply: (id, why) the items whose images could not be moved
    published: tuple[str, ...] = ()  # with apply: the object URLs of items rejected now that a run uploaded before

    @property
    def passed(self) -> int:
        return self.checked - len(self.failing)

    @property
    def newly_failing(self) -> int:
        """Failing items whose record says ok: those ``apply`` rejects."""
        return sum(1 for item in self.failing if item.status == "ok")

    @property
    def exit_code(self) -> int:
        """0 when every checked image passes (and every verdict to record was recorded), else 1."""
        return 1 if self.failing or self.unreadable or self.refused else 0

    def to_json(self) -> dict[str, Any]:
        counts = {
            "checked": self.checked, "passed": self.passed, "failed": len(self.failing),
            "newly_failed": self.newly_failing, "passing_again": len(self.passing_again), "not_done": self.not_done,
            "unreadable": len(self.unreadable), "moved_back": len(self.moved_back),
        }  # fmt: skip
        return {
            "manifest": str(self.manifest), "out_dir": str(self.out_dir), "checks_on": self.checks_on,
            "applied": self.applied, "exit_code": self.exit_code, "counts": counts,
            "failing": [item.to_json() for item in self.failing],
            "passing_again": [item.to_json() for item in self.passing_again], "unreadable": list(self.unreadable),
            "recorded": list(self.recorded), "refused": [{"id": i, "reason": why} for i, why in self.refused],
            "still_published": list(self.published),
        }  # fmt: skip


async def recheck(
    manifest: str | os.PathLike[str] | Manifest,
    *,
    settings: Settings | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    apply: bool = False,
    wait_lock: bool = False,
) -> RecheckResult:
    """Check the images of the manifest's done items (ok and rejected) again against its current ``qa:``.

    Nothing is sent. *apply* records the verdicts that changed (see the module's docstring), holding the output
    folder's lock (*wait_lock*: wait for a run that holds it, else :class:`LockHeld`). Raises
    :class:`ManifestError` for a bad manifest and :class:`UsageError` for a folder with no results.
    """
    job, settings = load_job(manifest, settings)
    target = resolve_out_dir(job, settings, out_dir)
    job = job.skipping(target)
    _check(job, target)
    if not apply:
        with ResultsIndex.load(target) as index:
            return await _recheck(job, target, index)
    out = OutDir(target, uuid.uuid4().hex[:12])
    async with out.hold(wait=wait_lock, handle_signals=False):
        with ResultsIndex.load(out.path) as index:
            out.recover(index)  # what a dead run left: its claims on files count before any is moved
            found = await _recheck(job, target, index)
            return await _apply(out, index, found)


def _check(job: Manifest, target: Path) -> None:
    """ManifestError listing every problem of the manifest, UsageError for a folder without results."""
    report = job.check(check_files=False, out_dir=target)
    if report.problems:
        raise ManifestError(report.problems)
    if not (target / RESULTS_FILE).is_file():
        raise UsageError(
            f"{target}: no {RESULTS_FILE}, so no images to check. HINT: run the job first (nanobatch run "
            f"{job.path}), or pass the folder it wrote into with --out"
        )


@dataclass(slots=True)
class _Found:
    """What the checks found so far, each item with its place in the manifest (workers finish out of order)."""

    failing: list[tuple[int, Rechecked]] = field(default_factory=list)
    passing_again: list[tuple[int, Rechecked]] = field(default_factory=list)
    moved_back: list[tuple[int, Rechecked]] = field(default_factory=list)
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    checked: int = 0
    not_done: int = 0
    checks_on: bool = False

    def add(self, place: int, item: Rechecked) -> None:
        self.checked += 1
        if not item.verdict.passed:
            self.failing.append((place, item))
        elif item.status != "ok":
            self.passing_again.append((place, item))
        elif item.moved:
            self.moved_back.append((place, item))

    def result(self, job: Manifest, target: Path) -> RecheckResult:
        return RecheckResult(
            manifest=job.path, out_dir=target, checked=self.checked, failing=_ordered(self.failing),
            passing_again=_ordered(self.passing_again), not_done=self.not_done, moved_back=_ordered(self.moved_back),
            unreadable=_ordered(self.unreadable), checks_on=self.checks_on,
        )  # fmt: skip


def _ordered(found: list[tuple[int, Any]]) -> tuple[Any, ...]:
    return tuple(value for _, value in sorted(found, key=lambda pair: pair[0]))


_Work = tuple[int, WorkItem, IndexEntry, tuple[tuple[str, str], ...]]


async def _recheck(job: Manifest, target: Path, index: ResultsIndex) -> RecheckResult:
    """Check every done item of *job* in *target*, a few at a time on worker threads (one per CPU)."""
    found = _Found()
    work = DoneWork(target, index)  # (not closed: the index is the caller's)
    workers = os.cpu_count() or 1
    send, receive = anyio.create_memory_object_stream[_Work](workers * 2)
    async with InputLoader() as loader, anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(_worker, receive.clone(), loader, target, found)
        receive.close()
        async with send:
            for place, item in enumerate(index.read_ahead(job.items(check_files=False))):
                found.checks_on = found.checks_on or item.qa is not None and item.qa.active
                entry = index.get(item.id)
                moved = None
                if _done(entry) and not _changed(work, item, entry):
                    moved = _where(entry, item.id, target, index)
                if entry is not None and moved is not None:
                    await send.send((place, item, entry, moved))
                else:
                    found.not_done += 1
    return found.result(job, target)


def _done(entry: IndexEntry | None) -> TypeGuard[IndexEntry]:
    """Whether an item's latest record is ok or rejected with images."""
    return entry is not None and entry.status in ("ok", "rejected") and bool(entry.outputs)


def _changed(work: DoneWork, item: WorkItem, entry: IndexEntry) -> bool:
    """Whether *item* is other work than its record's now (its instruction, settings or an input's bytes changed,
    as :class:`DoneWork` tells): the next run sends it again. An input gone since is no new work: its image is
    checked as far as it can be."""
    return not work.same_work(item, entry.key, entry.stamps) and all(
        os.path.exists(ref) for ref in item.inputs if not is_remote(ref)
    )


def _where(entry: IndexEntry, item_id: str, target: Path, index: ResultsIndex) -> tuple[tuple[str, str], ...] | None:
    """(name, where it is) of each of the record's files that is not at its name but where a ``qa --apply`` that
    died before its records moved it (under ``rejected/``, or back out), as nanobatch left it; None if one is
    nowhere so (the item is not done: the next run sends it)."""
    files = entry.files or entry.outputs
    if outputs_there(target, files):
        return ()
    owned, moved = index.owned(item_id, files), []
    for name in files:
        if not os.path.isfile(os.path.join(target, name)):
            there = name[len(_REJECTED) :] if name.startswith(_REJECTED) else _REJECTED + name
            if owned.get(name) is None or stamp_of(os.path.join(target, there)) != owned[name]:
                return None
            moved.append((name, there))
    return tuple(moved)


async def _worker(receive: ObjectReceiveStream[_Work], loader: InputLoader, target: Path, found: _Found) -> None:
    async with receive:
        async for place, item, entry, moved in receive:
            qa = item.qa or QaSettings()
            verdict = Verdict(passed=True)
            if qa.active:
                original, gone = await _original(item, loader) if qa.changed or qa.same_subject else (None, None)
                try:
                    at = dict(moved)
                    images = tuple(at.get(name, name) for name in entry.outputs)
                    verdict = await anyio.to_thread.run_sync(_judge, target, images, item, qa, original)
                except OSError as exc:  # read, or decoded (_judge): not checked, listed as unreadable
                    logger.warning("%s: not checked: %s", item.id, exc)
                    found.unreadable.append((place, item.id))
                    continue
                unmeasured = gone or ("it cannot be decoded" if NOT_MEASURED in verdict.values else None)
                if unmeasured is not None and verdict.passed and entry.status != "ok":
                    # Rejected, perhaps as another product: passing only the checks it could measure is no pass.
                    logger.warning("%s: not checked: it passes all but the checks that compare it with its input, "
                                   "which cannot be read now (%s): it stays rejected", item.id, unmeasured)  # fmt: skip
                    found.unreadable.append((place, item.id))
                    continue
            found.add(place, Rechecked(id=item.id, status=entry.status, outputs=entry.outputs, verdict=verdict,
                                       moved=moved))  # fmt: skip


async def _original(item: WorkItem, loader: InputLoader) -> tuple[bytes | None, InputError | None]:
    """The item's first input picture, which ``changed`` and ``same_subject`` compare with (None if it has none:
    those checks are then not measured, as at the run), and why it cannot be read now, if it cannot (then those
    checks are left out too, and a rejected item cannot pass)."""
    if not item.inputs:
        return None, None
    try:
        images = await loader.load(item.inputs[:1], resize=item.resize_inputs)
    except InputError as exc:
        logger.warning("%s: its input cannot be read now (%s): the checks comparing with it are left out", item.id,
                       exc)  # fmt: skip
        return None, exc
    return images[0].data, None


def _judge(target: Path, outputs: tuple[str, ...], item: WorkItem, qa: QaSettings, original: bytes | None) -> Verdict:
    """The verdict on an item's images (in a worker thread): each checked, failing if any fails. Raises OSError
    (or ValueError) naming the image that cannot be read or decoded."""
    paths = [os.path.join(target, name) for name in outputs]
    images = []
    for path in paths:
        with open(path, "rb") as f:
            images.append(f.read())
    try:
        return check_images(images, original=original, aspect_ratio=item.aspect_ratio, settings=qa)
    except UndecodableImage as exc:  # (named by its file: the checks see bytes)
        raise OSError(f"{', '.join(paths)}: not an image that can be decoded ({exc})") from None


async def _apply(out: OutDir, index: ResultsIndex, found: RecheckResult) -> RecheckResult:
    """Record the verdicts of *found* that changed (the folder's lock held): move each item's images, then append
    its new record; an item whose images cannot be moved keeps its record and is listed as ``refused``."""
    if not found.checks_on:  # nothing to judge by (a config file holding qa: not passed?): every image passes
        return replace(found, applied=True)
    changes = [item for item in (*found.failing, *found.passing_again, *found.moved_back) if item.to_record]
    # Still rejected, maybe for other checks now (a threshold loosened, another tightened): its verdict refreshed.
    still = [item for item in found.failing if not item.to_record]
    if not changes and not still:
        return replace(found, applied=True)
    wanted = {item.id for item in (*changes, *still)}
    records = await anyio.to_thread.run_sync(latest_records, out.path / RESULTS_FILE, wanted)
    changes += [item for item in still if _failed_of(records[item.id]) != item.verdict.failed]
    if not changes:
        return replace(found, applied=True)
    plans: list[_Plan] = []
    for item in changes:
        rejected = not item.verdict.passed
        places = _places(records[item.id], rejected=rejected)
        at = dict(item.moved)
        moves = tuple((at.get(name, name), new) for name, new in places.items() if at.get(name, name) != new)
        # Under rejected/, only an image a record of this item put there may be replaced (an earlier rejection's;
        # the index is this thread's only). Back out of it, nothing: the rejection left the names free, so what
        # is there now, nanobatch did not put there.
        # A source is moved only while it is as nanobatch left it (a retouched image is the user's now): one a
        # dead --apply moved, as it left the file it moved.
        owned = index.owned(item.id, [*places] + [new for _, new in moves if rejected])
        replaceable: Owned = {**owned, **{there: owned.get(name) for name, there in item.moved}}
        plans.append((item, records[item.id], places, moves, replaceable))
    out.open()
    try:
        out.journal.writing_many([(item.id, out.claims([], moves)) for item, _, _, moves, _ in plans])
        new_records, refused = await anyio.to_thread.run_sync(_move_and_record, out, plans)
        out.journal.withdrawn(item_id for item_id, _ in refused)  # (no record says their moves were refused)
        for record in new_records:
            index.add(record)
        _refresh_summary(out, index)
    finally:
        out.close()
    recorded = tuple(record.id for record in new_records)
    published = tuple(url for r in new_records if r.status == "rejected" for url in r.uploads or ())
    return replace(found, applied=True, recorded=recorded, refused=tuple(refused), published=published)


_Plan = tuple[Rechecked, ItemRecord, dict[str, str], tuple[tuple[str, str], ...], Owned]


def _move_and_record(out: OutDir, plans: list[_Plan]) -> tuple[list[ItemRecord], list[tuple[str, str]]]:
    """Move each planned item's images (in a worker thread), then append the records of those moved in one write."""
    new_records, refused, folders = [], [], set[str]()
    for item, record, places, moves, replaceable in plans:
        try:
            out.put([], moves, replaceable, folders)
        except OSError as exc:
            why = f"{exc.filename or out.path}: {exc.strerror or exc}"
            logger.error("%s: its images stay where they are and its record as it was: %s", item.id, why)
            refused.append((item.id, why))
            continue
        new_records.append(out.stamped(_verdict_record(record, item.verdict, places, moves, out.journal.run_id)))
    for folder in folders:  # the moves durable before the records that name the new places
        fsync_dir(folder)
    if new_records:
        out.results.append_many(new_records)
    return new_records, refused


def _failed_of(record: ItemRecord) -> tuple[str, ...] | None:
    return record.qa.failed if record.qa is not None else None


def _places(record: ItemRecord, *, rejected: bool) -> dict[str, str]:
    """Where each file of *record* goes: under ``rejected/`` for a rejected item, else out of it."""
    if rejected:
        return {name: name if name.startswith(_REJECTED) else _REJECTED + name for name in record.files}
    return {name: name.removeprefix(_REJECTED) for name in record.files}


def _verdict_record(
    record: ItemRecord, verdict: Verdict, renamed: dict[str, str], moves: tuple[tuple[str, str], ...], run: str
) -> ItemRecord:
    """*record* with the new *verdict*, its files at their new places (*renamed*, by *moves*): a move, paid for
    where *record*'s images were (``paid_in``), costing nothing itself."""
    steps = record.steps
    if steps is not None:
        steps = tuple(
            replace(s, outputs=tuple(renamed.get(n, n) for n in s.outputs)) if s.outputs else s for s in steps
        )
    payer = record.run if record.moved_from is None else (record.paid_in.run if record.paid_in else None)
    rejected = not verdict.passed
    if rejected and record.uploads:
        logger.warning("%s: rejected, but its images were uploaded before: %s stays (nanobatch deletes no object a "
                       "shop may serve; the next run's image replaces it once it passes)", record.id,
                       ", ".join(record.uploads))  # fmt: skip
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    outputs = tuple(renamed.get(n, n) for n in record.outputs)
    moved = replace(
        record, run=run, status="rejected" if rejected else "ok", outputs=outputs, steps=steps, attempts=0,
        latency_s=None, cost_usd=0.0, paid_in=PaidIn(run=payer, cost_usd=record.costs()[0]),
        moved_from=tuple(old for old, _ in moves), uploads=record.uploads, upload_stamps=record.upload_stamps,
        error=ErrorInfo(kind="qa", message=_failed_text(verdict)) if rejected else None,
        started_at=now, finished_at=now,
    )  # fmt: skip
    return replace(moved, qa=verdict)


def _failed_text(verdict: Verdict) -> str:
    return f"the image failed the output checks: {', '.join(verdict.failed)} (found by nanobatch qa --apply)"


def _refresh_summary(out: OutDir, index: ResultsIndex) -> None:
    """``summary.json``'s folder totals brought up to date with the records just added (its last run untouched)."""
    try:
        summary = json.loads((out.path / SUMMARY_FILE).read_bytes())
    except (FileNotFoundError, ValueError):
        return
    if isinstance(summary, dict) and isinstance(summary.get("last_run"), dict):
        out.write_summary({**summary, **index.totals()})
