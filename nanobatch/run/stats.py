"""A run's live counters: what the progress line, the summary and the run's outcome are read from."""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..output.record import ItemRecord
from ..output.tally import Tally

__all__ = ["RunStats"]


@dataclass(slots=True)
class RunStats:
    """Live counters of a run, for progress displays and the summary."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    blocked: int = 0
    rejected: int = 0  # images that failed the output checks (qa:), after their retries
    skipped: int = 0
    requests: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    failure_examples: dict[str, list[str]] = field(default_factory=dict)
    tokens: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0
    latencies: array[float] = field(default_factory=lambda: array("d"))  # 8 bytes per item, for percentiles
    in_flight: int = 0
    concurrency: float = 0.0  # the adaptive window: lower than the limit while the server pushes back
    rpm_limit: float | None = None
    fallbacks: int = 0  # items with a request sent in a fallback tier (flex shed it, or the batch deadline came)
    fallback_requests: int = 0  # the requests sent in a fallback tier
    # The batch tier's jobs not collected yet: chunk -> (state, requests answered, requests), kept by BatchRoute.
    batch_jobs: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.blocked + self.rejected + self.skipped

    def sent(self, tally: Tally) -> None:
        """Count a request going out now for the item *tally* follows (after :meth:`Tally.sending`)."""
        self.requests += 1
        if tally.fallback_tier is not None:
            self.fallback_requests += 1
            self.fallbacks += tally.fallback_requests == 1  # the item's first one

    def count(self, record: ItemRecord, earlier: Mapping[str, Any] | None = None) -> None:
        """Count *record*, less the tokens of *earlier*: steps an earlier run answered, which its usage holds."""
        setattr(self, record.status, getattr(self, record.status) + 1)
        for name, value in record.usage.items():
            if isinstance(value, int):
                self.tokens[name] += value - (earlier or {}).get(name, 0)
        self.cost_usd += record.cost_usd or 0.0
        if record.latency_s is not None:
            self.latencies.append(record.latency_s)
        if record.error is not None:
            self.failure(record.error.kind, record.id)

    def failure(self, kind: str, item_id: str) -> None:
        """Count a failure of *kind*, naming *item_id* among its first five examples."""
        self.failures[kind] += 1
        examples = self.failure_examples.setdefault(kind, [])
        if len(examples) < 5:
            examples.append(item_id)
