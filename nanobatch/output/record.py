"""One line of ``results.jsonl``, typed: :class:`ItemRecord` (and :class:`StepRecord` for each step).

Every record an item gets is built from what sending it gathered (:mod:`~nanobatch.output.tally`), or turned
failed here (:meth:`ItemRecord.failed_write`). :meth:`ItemRecord.to_json` writes the fields in one fixed
order, the one results.jsonl files on disk already have, so old and new lines read alike;
:meth:`ItemRecord.from_json` reads lines of other versions and hand-edited ones: a missing field takes its
default, and a field nanobatch does not know is kept in ``extra`` and written back after the known ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..names import KEPT_STEP
from .reading import UploadStamp, is_int, read_file_stamps, read_float, read_stamps, read_strs, read_upload_stamps

if TYPE_CHECKING:  # nanobatch.qa loads pydantic, which `nanobatch status` and the report do without
    from ..qa import Verdict

__all__ = [
    "TOKEN_FIELDS",
    "ErrorInfo",
    "ItemRecord",
    "PaidIn",
    "StepRecord",
    "files_of",
    "is_record",
    "line_costs",
    "read_steps",
    "usage_tokens",
]

TOKEN_FIELDS = ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "totalTokenCount")

_ITEM_FIELDS = (
    "id", "run", "status", "outputs", "finish_reason", "text", "usage", "steps", "attempts", "latency_s",
    "cost_usd", "model", "model_version", "response_id", "key", "error", "instructions", "inputs",
    "aspect_ratio", "image_size", "tier", "fallback", "started_at", "finished_at",
)  # fmt: skip
# Written only when set, in this order.
_OPTIONAL_FIELDS = (
    "input_stamps", "finish_message", "moved_from", "paid_in", "uploads", "batch", "qa", "file_stamps", "upload_stamps"
)  # fmt: skip


def is_record(value: Any) -> bool:
    """Whether a parsed line is an item record (anything else in results.jsonl is skipped)."""
    return isinstance(value, dict) and "id" in value and "status" in value


def utc(ts: float) -> str:
    """``2026-12-06T09:30:00Z``: the second of *ts* (rounded to the microsecond first, as datetime does)."""
    return _utc_second(math.floor(round(ts, 6)))


@functools.lru_cache(maxsize=8)  # two stamps per record, mostly of the same few seconds: strftime once a second
def _utc_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    """Why an item is not ok: ``kind`` (see the README's failure kinds), the HTTP status, the message, and for
    a multi-step item the step it stopped at (1-based)."""

    kind: str
    status_code: int | None = None
    message: str = ""
    step: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "status_code": self.status_code, "message": self.message}
        if self.step is not None:
            out["step"] = self.step
        return out

    @classmethod
    def from_json(cls, value: Any) -> ErrorInfo | None:
        if not isinstance(value, Mapping):
            return None
        step = value.get("step")
        return cls(
            kind=str(value.get("kind") or ""),  # "": the line did not say
            status_code=value.get("status_code") if isinstance(value.get("status_code"), int) else None,
            message=str(value.get("message") or ""),
            step=step if isinstance(step, int) else None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PaidIn:
    """Where the images of a moved record were paid for: the run that sent their requests (None: a line that
    did not say) and what it paid. A reference, not a payment: the moved record's own ``cost_usd`` is 0."""

    run: str | None
    cost_usd: float

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "cost_usd": self.cost_usd}

    @classmethod
    def from_json(cls, value: Any) -> PaidIn | None:
        if not isinstance(value, Mapping):
            return None
        run, cost = value.get("run"), read_float(value.get("cost_usd"))
        return cls(run=run if isinstance(run, str) else None, cost_usd=cost or 0.0)


def line_costs(cost_usd: float | None, paid_in: PaidIn | None, moved: bool) -> tuple[float, float]:
    """(what the requests that made a line's result cost, what its run paid) from its ``cost_usd``, ``paid_in``
    and whether it has ``moved_from``; every total of cost comes from here. A move pays nothing (lines written
    before ``paid_in`` existed repeated the moved answer's cost in their ``cost_usd``)."""
    cost = cost_usd or 0.0
    return (cost + paid_in.cost_usd if paid_in is not None else cost), (0.0 if moved else cost)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """One step of a multi-step item. ``usage`` is None for a step that got no answer (then its
    ``finish_reason`` and ``text`` are not written); ``outputs`` is None when the step kept no image."""

    step: int
    instruction: str
    finish_reason: str | None = None
    text: str | None = None
    usage: Mapping[str, Any] | None = None
    outputs: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "instruction": self.instruction}
        if self.usage is not None:
            out.update(finish_reason=self.finish_reason, text=self.text, usage=dict(self.usage))
        if self.outputs is not None:
            out["outputs"] = list(self.outputs)
        return out

    @classmethod
    def from_json(cls, value: Any) -> StepRecord | None:
        if not isinstance(value, Mapping):
            return None
        usage = value.get("usage")
        return cls(
            step=value["step"] if is_int(value.get("step")) else 0,
            instruction=str(value.get("instruction") or ""),
            finish_reason=value.get("finish_reason"),
            text=value.get("text"),
            usage=usage if isinstance(usage, Mapping) else None,
            outputs=read_strs(value["outputs"]) if "outputs" in value else None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemRecord:
    """One item's result: a line of ``results.jsonl`` (the README's "Results" section says what each field means)."""

    id: str
    status: str  # ok | failed | blocked | rejected (its image failed the output checks: see nanobatch.output.verdicts)
    run: str | None = None
    outputs: tuple[str, ...] = ()
    finish_reason: str | None = None
    text: str | None = None
    usage: Mapping[str, Any] = field(default_factory=dict)
    steps: tuple[StepRecord, ...] | None = None
    attempts: int | None = None  # None: the line did not say (an old or hand-edited one)
    latency_s: float | None = None
    cost_usd: float | None = None  # what this record's run paid for the item; None: the line did not say
    model: str | None = None
    model_version: str | None = None
    response_id: str | None = None
    key: str | None = None
    error: ErrorInfo | None = None
    instructions: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    aspect_ratio: str | None = None
    image_size: str | None = None
    tier: str | None = None
    fallback: bool = False
    started_at: str | None = None
    finished_at: str | None = None
    input_stamps: tuple[tuple[int, int, str], ...] | None = None
    finish_message: str | None = None
    moved_from: tuple[str, ...] | None = None
    paid_in: PaidIn | None = None  # a moved record's: the run that paid for its images, and what it paid
    uploads: tuple[str, ...] | None = None  # object URLs of its files (output.upload_to), in the order of files
    batch: str | None = None  # the batch job that answered (tier batch)
    qa: Verdict | None = None  # the output checks' verdict on its image (an item with qa: settings)
    # Each of :attr:`files` as the writer left it (size, mtime_ns: output.files.Stamp): only a file still so may
    # be replaced, moved over or deleted by nanobatch. None: a line from before records kept them.
    file_stamps: tuple[tuple[int, int] | None, ...] | None = None
    # Each of :attr:`uploads` as nanobatch PUT it (size, ETag/generation): only an object still so is replaced.
    upload_stamps: tuple[UploadStamp | None, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # fields of a newer or hand-edited line, kept as read

    @property
    def files(self) -> list[str]:
        """Every file this record says its item wrote: its outputs, then its kept steps' outputs."""
        return files_of(self.outputs, self.steps)

    def tokens(self) -> tuple[int, int, int, int]:
        return usage_tokens(self.usage)

    def costs(self) -> tuple[float, float]:
        """(what the requests that made its result cost, what its run paid): see :func:`line_costs`."""
        return line_costs(self.cost_usd, self.paid_in, self.moved_from is not None)

    def to_json(self) -> dict[str, Any]:
        """The line's object, fields in nanobatch's order (serialize with orjson)."""
        out: dict[str, Any] = {}
        for name in _ITEM_FIELDS:
            value = getattr(self, name)
            if name in ("outputs", "instructions", "inputs"):
                value = list(value)
            elif name == "usage":
                value = dict(value)
            elif name == "steps" and value is not None:
                value = [step.to_json() for step in value]
            elif name == "error" and value is not None:
                value = value.to_json()
            out[name] = value
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = _OPTIONAL_JSON[name](value) if name in _OPTIONAL_JSON else value
        for name, value in self.extra.items():
            out.setdefault(name, value)
        return out

    @classmethod
    def from_json(cls, line: Any) -> ItemRecord:
        """The record a parsed line holds; ValueError if it is no item record (no ``id`` or ``status``)."""
        if not isinstance(line, Mapping) or "id" not in line or "status" not in line:
            raise ValueError("not an item record")
        get = line.get
        usage, steps, stamps = get("usage"), get("steps"), get("input_stamps")
        return cls(
            id=str(line["id"]),
            status=str(line["status"] or "unknown"),
            run=get("run"),
            outputs=(outputs := read_strs(get("outputs"))),
            finish_reason=get("finish_reason"),
            text=get("text"),
            usage=usage if isinstance(usage, Mapping) else {},
            steps=(steps_read := read_steps(steps)),
            attempts=get("attempts") if is_int(get("attempts")) else None,
            latency_s=read_float(get("latency_s")),
            cost_usd=read_float(get("cost_usd")),
            model=get("model"),
            model_version=get("model_version"),
            response_id=get("response_id"),
            key=get("key"),
            error=ErrorInfo.from_json(get("error")),
            instructions=read_strs(get("instructions")),
            inputs=read_strs(get("inputs")),
            aspect_ratio=get("aspect_ratio"),
            image_size=get("image_size"),
            tier=get("tier"),
            fallback=bool(get("fallback")),
            started_at=get("started_at"),
            finished_at=get("finished_at"),
            input_stamps=read_stamps(stamps) if stamps is not None else None,
            finish_message=get("finish_message"),
            moved_from=read_strs(get("moved_from")) if "moved_from" in line else None,
            paid_in=PaidIn.from_json(get("paid_in")),
            uploads=(uploads := read_strs(get("uploads")) if "uploads" in line else None),
            batch=str(get("batch")) if get("batch") else None,
            qa=_verdict(qa) if isinstance(qa := get("qa"), Mapping) else None,
            file_stamps=read_file_stamps(get("file_stamps"), len(files_of(outputs, steps_read))),
            upload_stamps=read_upload_stamps(get("upload_stamps"), len(uploads)) if uploads else None,
            extra={} if _KNOWN.issuperset(line) else {k: v for k, v in line.items() if k not in _KNOWN},
        )

    def failed_write(self, kind: str, message: str, *, kept: Sequence[str] = ()) -> ItemRecord:
        """This record turned failed: its images could not be written (its steps keep no outputs either), but
        for *kept*: the image of the step an earlier run kept for the item to go on from, still there."""
        at: dict[int, tuple[str, ...]] = {}
        for name in kept:
            if match := KEPT_STEP.search(name):
                at[int(match[1])] = (*at.get(int(match[1]), ()), name)
        steps = None if self.steps is None else tuple(replace(step, outputs=at.get(step.step)) for step in self.steps)
        return replace(self, status="failed", outputs=(), steps=steps, error=ErrorInfo(kind=kind, message=message))


_KNOWN = frozenset((*_ITEM_FIELDS, *_OPTIONAL_FIELDS))


def _pairs_json(pairs: Iterable[tuple[Any, Any] | None]) -> list[list[Any] | None]:
    """``file_stamps`` or ``upload_stamps`` as a line holds them (reading.read_file_stamps and read_upload_stamps)."""
    return [None if pair is None else list(pair) for pair in pairs]


_OPTIONAL_JSON: dict[str, Any] = {"input_stamps": lambda v: [list(s) for s in v], "moved_from": list, "uploads": list,
                                  "paid_in": PaidIn.to_json, "qa": lambda v: v.to_json(),
                                  "file_stamps": _pairs_json, "upload_stamps": _pairs_json}  # fmt: skip


def _verdict(value: Mapping[str, Any]) -> Verdict:
    from ..qa import Verdict

    return Verdict.from_json(value)


# What ItemRecord.from_json reads a line's fields with, besides nanobatch.output.reading's; the resume index reads the
# columns it needs with the same functions, without building whole records (bench/RESULTS.md, "index load").


def read_steps(value: Any) -> tuple[StepRecord, ...] | None:
    """The steps of a line (what is not a step dropped); None if it has no list of them."""
    return tuple(s for s in map(StepRecord.from_json, value) if s) if isinstance(value, list) else None


def files_of(outputs: Sequence[str], steps: Sequence[StepRecord] | None) -> list[str]:
    """Every file a record names: its outputs, then its kept steps' outputs."""
    names = list(outputs)
    if steps:
        for step in steps:
            names += step.outputs or ()
    return names


def usage_tokens(usage: Any) -> tuple[int, int, int, int]:
    """The four token counts (:data:`TOKEN_FIELDS`) of a usage mapping; 0 for one missing or not a whole number."""
    if not isinstance(usage, Mapping):
        return 0, 0, 0, 0
    a, b, c, d = map(usage.get, TOKEN_FIELDS)
    # type() is int, not isinstance: a bool is no count (and JSON has no other int subclass)
    return (
        a if type(a) is int else 0,
        b if type(b) is int else 0,
        c if type(c) is int else 0,
        d if type(d) is int else 0,
    )
