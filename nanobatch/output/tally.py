"""What sending an item gathered (:class:`Tally`), and the record built from it: :func:`build_record` for an
item that was sent (or failed before it was), :func:`moved_record` for done work whose files move to new names."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..api.redaction import public_url
from ..names import step_stem
from .record import TOKEN_FIELDS, ErrorInfo, ItemRecord, PaidIn, StepRecord, utc

if TYPE_CHECKING:
    from ..api.gemini import FileRef, Image, Reply
    from ..item import WorkItem

__all__ = ["Carried", "Tally", "build_record", "moved_record"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Carried:
    """Steps 1 to *step* of an item, answered by earlier runs: their last image is in *files*; *cost_usd* and
    *tokens* are what those runs paid for them, and *run* the latest of those runs."""

    step: int
    files: tuple[str, ...]
    run: str | None
    cost_usd: float
    tokens: tuple[int, int, int, int]


@dataclass(slots=True)
class Tally:
    """What preparing and sending an item gathered so far, for its record: filled in by the engine and the
    route, turned into an :class:`ItemRecord` by :func:`build_record`."""

    tier: str
    started: float = field(default_factory=time.time)
    key: str | None = None
    input_stamps: tuple[tuple[int, int, str], ...] | None = None
    attempts: int = 0
    cost_usd: float = 0.0
    fallback_tier: str | None = None  # where the item's steps go after a fallback (flex shed, batch deadline)
    fallback_requests: int = 0  # those of its requests sent there
    batch: str | None = None  # the batch job that answered the latest step
    answered_in_batch: bool = False  # the latest answer came from a batch job (kept there for the next run)
    last: Reply | None = None  # the latest answer (also one without an image)
    model_version: str | None = None
    finish_message: str | None = None
    steps: list[StepRecord] = field(default_factory=list)
    usages: list[Mapping[str, Any]] = field(default_factory=list)  # of the answers the item is billed for
    api_s: list[float] = field(default_factory=list)  # per step: from its first request to its last answer
    # What of its cost a record of an earlier run counted already (a batch answer kept, its image not written
    # then), and that run: this record refers to it (``paid_in``) rather than count it again.
    paid_in_usd: float = 0.0
    paid_by: str | None = None
    # The latest step before the last that answered with images (its number, its images): kept on disk if the
    # item is cut off before its last step (nanobatch.output.carried).
    carried: tuple[int, list[Image | FileRef]] | None = None
    # The steps earlier runs answered and kept, which the item goes on from: their cost and tokens are not in
    # this tally's, and its record refers to them (paid_in, and its usage adds theirs).
    kept: Carried | None = None
    # With keep_steps: each step's images, written with the record (outputs it names) however the item ends.
    step_files: list[tuple[str, Image]] = field(default_factory=list)

    def counted_before(self, run: str | None, cost_usd: float) -> None:
        """An answer costing *cost_usd* that the record of *run* counted already (None: none did)."""
        if run is not None:
            self.paid_in_usd += cost_usd
            self.paid_by = run

    @property
    def earlier(self) -> dict[str, int] | None:
        """The usage of the steps an earlier run answered and kept (:attr:`kept`), or None."""
        if self.kept is None:
            return None
        return {name: n for name, n in zip(TOKEN_FIELDS, self.kept.tokens, strict=True) if n}

    def paid_before(self) -> PaidIn | None:
        """What of the item's cost earlier runs' records paid, referred to (``paid_in``), not paid again: answers
        they counted (a batch answer kept, its image not written then), and the steps they kept, which it went on
        from; with the latest of those runs."""
        kept = self.kept
        run = self.paid_by or (kept.run if kept is not None else None)
        usd = self.paid_in_usd + (kept.cost_usd if kept is not None else 0.0)
        return PaidIn(run=run, cost_usd=round(usd, 6)) if run else None

    def paid_now(self) -> bool:
        """Whether this run paid for any of the item's answers (an answer without an image is billed too)."""
        return bool(self.usages) or self.cost_usd > self.paid_in_usd

    def sending(self) -> None:
        """Count a request of the item about to go out (in its fallback tier, once it has one)."""
        self.attempts += 1
        if self.fallback_tier is not None:
            self.fallback_requests += 1

    def answered(self, reply: Reply) -> None:
        """Keep what the latest answer said (also when it has no image): its words, not its images, which the
        next step or the writer holds (a batch step waiting for its job holds none)."""
        self.last = replace(reply, images=()) if reply.images else reply
        self.model_version = reply.model_version or self.model_version
        if reply.finish_message:
            self.finish_message = reply.finish_message
        if self.steps:
            self.steps[-1] = replace(
                self.steps[-1], finish_reason=reply.finish_reason or reply.block_reason, text=reply.text,
                usage=reply.usage,
            )  # fmt: skip


def build_record(
    item: WorkItem,
    tally: Tally,
    *,
    run: str,
    status: str = "ok",
    outputs: Sequence[str] = (),
    error: ErrorInfo | None = None,
) -> ItemRecord:
    """The record of an item that was sent (or failed before it was): *tally* says what happened."""
    from ..api.gemini import sum_usage

    last = tally.last
    usages = [earlier, *tally.usages] if (earlier := tally.earlier) else tally.usages
    return ItemRecord(
        id=item.id,
        run=run,
        status=status,
        outputs=tuple(outputs),
        finish_reason=(last.finish_reason or last.block_reason) if last else None,
        text=last.text if last else None,
        usage=sum_usage(usages) if usages else {},
        steps=tuple(tally.steps) if len(item.steps) > 1 else None,
        attempts=tally.attempts,
        # The API's time: retries count, waiting for a slot, the rate limit, the inputs or between steps does
        # not (that is queueing). None: nothing was sent.
        latency_s=round(sum(tally.api_s), 3) if tally.api_s else None,
        cost_usd=max(0.0, round(tally.cost_usd - tally.paid_in_usd, 6)),
        paid_in=tally.paid_before(),
        model=item.model,
        model_version=tally.model_version,
        response_id=last.response_id if last else None,
        key=tally.key,
        error=error,
        instructions=tuple(item.steps),
        inputs=tuple(public_url(ref) if "://" in ref else ref for ref in item.inputs),  # no URL's signature
        aspect_ratio=item.aspect_ratio,
        image_size=item.image_size,
        tier=tally.tier,
        fallback=tally.fallback_requests > 0,  # sent there, not only decided (the run may stop first)
        started_at=utc(tally.started),
        finished_at=utc(time.time()),
        input_stamps=tally.input_stamps,
        finish_message=tally.finish_message,
        batch=tally.batch,
    )


def moved_record(
    item: WorkItem, tally: Tally, *, run: str, outputs: Sequence[str], tokens: Sequence[int], cost_usd: float,
    paid_in: str | None, moves: Sequence[tuple[str, str]],
) -> ItemRecord:  # fmt: skip
    """The record of done work whose files move to new names: nothing sent, so it costs nothing; *cost_usd* is
    what the run *paid_in* paid for its images, kept as a reference (``paid_in``)."""
    steps = None
    if len(item.steps) > 1:
        steps = []
        for number, text in enumerate(item.steps, 1):
            mark = step_stem(item.stem, number)
            names = tuple(new for _, new in moves if new.startswith((mark + ".", mark + "-")))
            steps.append(StepRecord(step=number, instruction=text, outputs=names or None))
    base = build_record(item, tally, run=run, outputs=outputs)
    return replace(
        base,
        usage={name: n for name, n in zip(TOKEN_FIELDS, tokens, strict=True) if n},
        cost_usd=0.0,
        paid_in=PaidIn(run=paid_in, cost_usd=cost_usd),
        steps=tuple(steps) if steps is not None else None,
        moved_from=tuple(old for old, _ in moves),
    )
