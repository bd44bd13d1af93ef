"""``check_job``: the settings checked (:mod:`.presend`), then every item, and what it works out item by item
beside the manifest's own check: the cost and duration estimate, and the models and tiers the items use
(:mod:`.lifecycle`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import costs, models
from ..api.redaction import SECRETS
from ..config import Settings, load_settings
from ..errors import ManifestError, Problem
from ..item import WorkItem
from ..job.check import CheckReport, bad_input_hint
from ..job.manifest import Manifest, load_manifest
from ..job.pictures import PictureCheck
from ..job.sources import RawItem
from ..names import RESULTS_FILE
from ..output.results import ResultsIndex
from .done import DoneWork, NewRows
from .lifecycle import LifecycleCheck
from .pasted_key import PastedKey
from .presend import check_settings
from .remote_checks import RemoteChecks
from .summary import file_stamp
from .unchanged import Held, check_basis, held_check

if TYPE_CHECKING:
    import httpx2


__all__ = [
    "TYPICAL_LATENCY_S",
    "CheckResult",
    "DoneWork",
    "Estimate",
    "check_job",
    "load_job",
    "resolve_out_dir",
]

logger = logging.getLogger("nanobatch")

# For duration estimates only: a typical generateContent image edit.
TYPICAL_LATENCY_S = 30.0


@dataclass(slots=True)
class Estimate:
    """What ``check_job`` adds up over the items: the likely and worst cost in each item's tier, the likely cost
    at standard and at batch prices (shown side by side), and how long the run takes."""

    settings: Settings
    likely: float = 0.0
    worst: float = 0.0
    standard: float = 0.0
    batch: float = 0.0
    longest: int = 0  # steps of the longest item: they go one after another
    tiers: set[str] = field(default_factory=set)
    _prices: dict[tuple[str, str], models.Pricing] = field(default_factory=dict)
    _steps: dict[tuple[str, str, str, int, str | None], tuple[float, float, float, float]] = field(default_factory=dict)

    def add(self, item: WorkItem) -> None:
        if len(item.steps) > self.longest:
            self.longest = len(item.steps)
        tier = item.tier or self.settings.api.tier
        if tier not in self.tiers:
            self.tiers.add(tier)
        n_images, high = len(item.inputs), 0.0
        for instruction in item.steps:
            low, high, standard, batch = self._step(item.model, tier, instruction, n_images, item.image_size)
            self.likely += low
            self.worst += high
            self.standard += standard
            self.batch += batch
            n_images = 1  # later steps edit the previous output
        if item.qa is not None and item.qa.retries:
            self.worst += high * item.qa.retries  # at most: every image rejected, its last step sent again each time

    def _step(
        self, model: str, tier: str, instruction: str, n_images: int, image_size: str | None
    ) -> tuple[float, float, float, float]:
        """(likely, worst, standard, batch) cost of one request, worked out once per kind of request: most
        items of a catalog send the same instruction with the same settings."""
        key = (model, tier, instruction, n_images, image_size)
        if (known := self._steps.get(key)) is not None:
            return known
        ranges = {
            name: costs.request_cost_range(
                model, instruction=instruction, n_images=n_images, image_size=image_size,
                pricing=self._pricing(model, name),
            )
            for name in {tier, "standard", "batch"}
        }  # fmt: skip
        if len(self._steps) >= 128:
            self._steps.clear()
        self._steps[key] = found = (*ranges[tier], ranges["standard"][0], ranges["batch"][0])
        return found

    def _pricing(self, model: str, tier: str) -> models.Pricing:
        """The prices of *model* in *tier*, looked up once per pair (every item asks)."""
        key = (model, tier)
        if key not in self._prices:
            self._prices[key] = costs.pricing_for(model, self.settings.pricing, tier)
        return self._prices[key]

    def duration_s(self, requests: int) -> float | None:
        """About how long the run takes online; None in the batch tier, where the jobs' time decides (most
        within hours, at most 24 h)."""
        if self.settings.api.tier == "batch":
            return None
        concurrency, rpm = self.settings.gate_limits()
        # In rounds of `concurrency` requests (one request still takes a whole latency at concurrency 100), and
        # no fewer rounds than the longest item has steps.
        duration = max(math.ceil(requests / concurrency), self.longest) * TYPICAL_LATENCY_S
        if rpm:
            duration = max(duration, requests / rpm * 60)
        return duration


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """What ``nanobatch validate`` reports: sizes and estimates; nothing was sent. It also carries the job as
    checked (*settings*, and *job*: the manifest, its globs passing over *out_dir*), which ``run_job`` runs."""

    manifest: Path
    out_dir: Path
    items: int
    requests: int
    # Of those, the items the output folder holds done (a run skips them), and the requests of the others: the
    # costs and the duration are of what is left.
    done_items: int = 0
    left_requests: int = 0
    cost_likely_usd: float
    cost_worst_usd: float
    duration_s: float | None  # None in the batch tier: the jobs' time decides
    concurrency: int
    requests_per_minute: float | None
    max_cost_usd: float | None = None
    max_duration_s: float | None = None
    tiers: frozenset[str] = frozenset()  # the tiers the items go in
    cost_standard_usd: float = 0.0  # the likely cost of the same work at standard and at batch prices
    cost_batch_usd: float = 0.0
    # --skip-bad-inputs: the problems of the items left out (pictures that cannot be decoded), and how many
    left_out: tuple[Problem, ...] = ()
    left_out_items: int = 0
    # What a later check may rest on while it holds (run.unchanged): check_basis(), items, requests, models used
    held: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    # When every item was found done from the last run's summary (run.unchanged): results.jsonl's stamp then
    done_as_of: list[int] | None = field(default=None, repr=False, compare=False)
    # And if those of rows appended since were not (done_items: the others): where those rows start
    rows_since: Mapping[str, tuple[int, int]] | None = field(default=None, repr=False, compare=False)
    settings: Settings = field(repr=False, compare=False)
    job: Manifest = field(repr=False, compare=False)


def resolve_out_dir(manifest: Manifest, settings: Settings, out_dir: str | os.PathLike[str] | None) -> Path:
    """``--out`` wins, then the manifest's ``output_dir``, then ``<output.dir>/<name>``."""
    if out_dir is not None:
        return Path(out_dir)
    if manifest.output_dir is not None:
        return manifest.output_dir
    return Path(settings.output.dir) / manifest.name


def load_job(manifest: str | os.PathLike[str] | Manifest, settings: Settings | None) -> tuple[Manifest, Settings]:
    """The manifest (loaded from its path unless given loaded) and the settings (the config files' unless given),
    whose credentials :data:`~nanobatch.api.redaction.SECRETS` knows from here on (before the manifest is read)."""
    settings = settings if settings is not None else load_settings()
    SECRETS.learn(settings)
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(
            manifest, default_model=settings.api.model, qa=settings.qa, written=settings.written_at
        )
    return manifest, settings


def check_job(
    manifest: str | os.PathLike[str] | Manifest,
    *,
    settings: Settings | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    check_urls: bool = True,
    transport: httpx2.BaseTransport | None = None,
    check_pictures: bool = True,
    skip_bad_inputs: bool = False,
    count_done: bool = True,
    from_summary: bool = False,
    simulate: bool = False,
    key_needed: bool | None = None,
) -> CheckResult:
    """Resolve and check every item and estimate cost and duration; sends nothing.

    With *check_urls*, image URLs are asked for their headers (*transport* replaces the network in tests). With
    *check_pictures*, every local picture is read and checked to be decodable (a run leaves that to dispatch, so
    that a re-run over finished work reads no picture); *skip_bad_inputs* leaves out the items whose pictures
    are not (``left_out``). With *count_done*, the items the output folder holds done (as a run would skip
    them) are counted, and the estimates are of the rest; their pictures are not read again while unchanged.
    With it or *from_summary* (a run's), a done folder that nothing has changed in since its last run is
    answered from that run's summary (``done_as_of``). The settings are checked first, as a run checks them
    (:mod:`.presend`): the API key is needed (*key_needed*, by default unless *simulate*: the built-in simulator
    takes no key, nor Google credentials). Raises :class:`ConfigError` for a setting that cannot be used, then
    :class:`ManifestError` listing every problem of the items.
    """
    manifest, settings = load_job(manifest, settings)
    target = resolve_out_dir(manifest, settings, out_dir)
    PastedKey.of(settings).check_job(manifest, target, out_given=out_dir is not None)  # before either is used
    needed = not simulate if key_needed is None else key_needed
    check_settings(settings, target, manifest.name, simulate=simulate, key_needed=needed)
    manifest = manifest.skipping(target)
    how = _How(check_urls=check_urls, transport=transport, check_pictures=check_pictures,
               skip_bad_inputs=skip_bad_inputs, count_done=count_done, from_summary=from_summary)  # fmt: skip
    with _warnings_held() as warnings:
        result = _check(manifest, settings, target, how, grown=True)
        if result is None:  # a row appended since the last run may clash with a done item: the whole check says
            warnings.clear()  # (and gives them again)
    if result is None:
        result = _check(manifest, settings, target, how, grown=False)
        assert result is not None
    return result


@contextlib.contextmanager
def _warnings_held() -> Iterator[list[logging.LogRecord]]:
    """What is logged meanwhile, held, and told at the end unless the list is emptied."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)


@dataclass(frozen=True, slots=True, kw_only=True)
class _How:
    """How :func:`check_job` was asked to check."""

    check_urls: bool
    transport: httpx2.BaseTransport | None
    check_pictures: bool
    skip_bad_inputs: bool
    count_done: bool
    from_summary: bool


def _check(manifest: Manifest, settings: Settings, target: Path, how: _How, *, grown: bool) -> CheckResult | None:
    """:func:`check_job` of *manifest* into *target*. With *grown*, rows appended to its catalog since the last
    run's check, which holds for the rest (:mod:`.unchanged`), are checked alone: None if one may clash with a
    done item (:class:`~.done.NewRows`)."""
    basis = check_basis(manifest, settings, target)  # before the files are read
    lifecycle = LifecycleCheck(manifest, settings)
    pictures = PictureCheck() if how.check_pictures else None
    done, held = _done(target, basis, lifecycle, pictures, count=how.count_done, from_summary=how.from_summary,
                       grown=grown, upload_to=settings.output.upload_to)  # fmt: skip
    if held is not None and not held.starts:
        report = CheckReport(items=held.items, requests=held.requests, problems=[])
        return _result(manifest, target, settings, report, Estimate(settings), None, basis, lifecycle, held=held)
    remote = RemoteChecks(str(manifest.path), check_urls=how.check_urls)
    estimate, pasted = Estimate(settings), PastedKey.of(settings)
    new = NewRows(done) if held is not None and done is not None else None

    def visit(item: WorkItem, raw: RawItem) -> None:
        lifecycle.check(item, raw)
        pasted.check(item, raw.file)
        remote.add(item)
        if new is not None:
            new.add(item)
        if new is not None or done is None or not done.add(item):
            estimate.add(item)

    with contextlib.closing(done) if done is not None else contextlib.nullcontext():
        if new is None or held is None:
            report = manifest.check(visit=visit, out_dir=target, decode=how.check_pictures,
                                    skip_bad_inputs=how.skip_bad_inputs, trusted=done.stamps if done else None,
                                    ahead=done.ahead if done else None, pictures=pictures)  # fmt: skip
        else:
            report = manifest.since(held.starts).check(visit=visit, out_dir=target, decode=how.check_pictures,
                                                       skip_bad_inputs=how.skip_bad_inputs, pictures=pictures,
                                                       told=held.models)  # fmt: skip
    if new is not None and new.may_clash:
        return None
    problems = report.problems + lifecycle.problems + pasted.problems + remote.problems(how.transport)
    if problems:
        raise ManifestError(problems, hint=None if how.skip_bad_inputs else bad_input_hint(problems))
    return _result(manifest, target, settings, report, estimate, done, basis, lifecycle, held=held)


def _done(
    target: Path, basis: Mapping[str, Any] | None, lifecycle: LifecycleCheck, pictures: PictureCheck | None, *,
    count: bool, from_summary: bool, grown: bool, upload_to: str | None,
) -> tuple[DoneWork | None, Held | None]:  # fmt: skip
    """The folder's done work to count the items against (*count*; None for a run's check), and the check as
    its last run's summary holds it, if it does: every item done, counted without going through them, but for
    the rows appended since, if *grown* allows them (then the done work is given, its items those held, for its
    index). A run's check (*from_summary* alone) loads the folder's index only once the summary itself holds."""
    if not count:
        loaded: list[ResultsIndex] = []  # the index, once the summary held far enough for its entries to be read
        held = _held(target, basis, lifecycle, _entries(target, loaded), grown) if from_summary else None
        done = DoneWork(target, loaded[0]) if loaded else None
        kept = held is not None and bool(held.starts)  # a run's check counts no done work but for a grown catalog
    else:
        done = DoneWork.of(target, pictures, upload_to)
        held = _held(target, basis, lifecycle, done.index.every_entry(), grown) if done is not None else None
        kept = held is None or bool(held.starts)
    if done is not None and not kept:
        done.close()
        return None, held
    if held is not None and done is not None:  # a grown catalog: its held items are done
        done.items, done.requests = held.items, held.requests
    return done, held


def _entries(target: Path, loaded: list[ResultsIndex]) -> Iterator[tuple[str, tuple[str, ...], Mapping[str, Any]]]:
    """The entries of *target*'s index, loaded (into *loaded*, for the caller to close) once the first is asked."""
    loaded.append(index := ResultsIndex.load(target))
    yield from index.every_entry()


def _held(
    target: Path, basis: Mapping[str, Any] | None, lifecycle: LifecycleCheck,
    entries: Iterable[tuple[str, tuple[str, ...], Mapping[str, Any]]], grown: bool,
) -> Held | None:  # fmt: skip
    """The check of a done folder as the last run's summary holds it, every item done but those of rows
    appended since, if *grown* allows any (:mod:`.unchanged`; its *entries*: the records' status, outputs and
    stamps, read only once the rest holds); else None."""
    held = held_check(target, basis, entries) if basis is not None else None
    if held is None or held.starts and not grown or not lifecycle.still_held(held.models):
        return None
    lifecycle.models.update(held.models)
    return held


def _result(
    manifest: Manifest, target: Path, settings: Settings, report: CheckReport, estimate: Estimate,
    done: DoneWork | None, basis: Mapping[str, Any] | None, lifecycle: LifecycleCheck, *, held: Held | None = None,
) -> CheckResult:  # fmt: skip
    """The result of the check; with *held*, the last run's summary held for every item (*report* counts them),
    or for all but those of rows appended since (*report* counts those, *done* the rest)."""
    concurrency, rpm = settings.gate_limits()
    done_items, done_requests = (done.items, done.requests) if done is not None else (0, 0)
    if held is not None and not held.starts:  # every item done, as the last run's summary holds
        done_items, done_requests = report.items, report.requests
    elif held is not None:  # and the rows appended since
        report = dataclasses.replace(report, items=report.items + held.items, requests=report.requests + held.requests)
    left = report.requests - done_requests
    rests_on = None if basis is None else {
        **basis, "items": report.items, "requests": report.requests, "models": sorted(lifecycle.models)
    }  # fmt: skip
    return CheckResult(
        manifest=manifest.path, out_dir=target, items=report.items, requests=report.requests,
        done_items=done_items, left_requests=left,
        cost_likely_usd=estimate.likely, cost_worst_usd=estimate.worst, duration_s=estimate.duration_s(left),
        concurrency=concurrency, requests_per_minute=rpm,
        max_cost_usd=settings.budget.max_cost_usd, max_duration_s=settings.limits.max_duration_s,
        tiers=frozenset(estimate.tiers), cost_standard_usd=estimate.standard, cost_batch_usd=estimate.batch,
        left_out=tuple(report.left_out), left_out_items=report.left_out_items, held=rests_on, settings=settings,
        job=manifest, done_as_of=file_stamp(str(target / RESULTS_FILE)) if held is not None else None,
        rows_since=held.starts if held is not None else None,
    )  # fmt: skip
