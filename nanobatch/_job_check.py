"""What ``check_job`` works out item by item beside the manifest's own check: the cost and duration
estimate, and models that are retired, not served by the backend or not sold in the tier."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from . import models
from .config import Settings
from .errors import Problem
from .manifest import WorkItem

__all__ = ["TYPICAL_LATENCY_S", "Estimate", "LifecycleCheck"]

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

    def add(self, item: WorkItem) -> None:
        self.longest = max(self.longest, len(item.steps))
        tier = item.tier or self.settings.api.tier
        self.tiers.add(tier)
        prices = {
            name: models.pricing_for(item.model, self.settings.pricing, name) for name in (tier, "standard", "batch")
        }
        n_images = len(item.inputs)
        for instruction in item.steps:
            costs = {
                name: models.request_cost_range(
                    item.model, instruction=instruction, n_images=n_images, image_size=item.image_size, pricing=pricing
                )
                for name, pricing in prices.items()
            }
            low, high = costs[tier]
            self.likely += low
            self.worst += high
            self.standard += costs["standard"][0]
            self.batch += costs["batch"][0]
            n_images = 1  # later steps edit the previous output

    def duration_s(self, requests: int) -> float:
        limits = self.settings.limits
        # In rounds of `concurrency` requests (one request still takes a whole latency at concurrency 100), and
        # no fewer rounds than the longest item has steps.
        duration = max(math.ceil(requests / limits.concurrency), self.longest) * TYPICAL_LATENCY_S
        if limits.requests_per_minute:
            duration = max(duration, requests / limits.requests_per_minute * 60)
        return duration


class LifecycleCheck:
    """Retired models and unsold tiers, once per model: a shut-down id sent to Google is a problem (it would
    fail there), to a proxy (which maps old ids) or when deprecated, a warning naming the replacement."""

    def __init__(self, file: str, settings: Settings) -> None:
        self.file = file
        # Vertex AI is Google's own endpoint too: a shut-down id fails there, whatever api.base_url says
        self.base_url = settings.api.base_url if settings.api.backend == "gemini" else models.GOOGLE_HOST
        self.tier = settings.api.tier
        self.backend = settings.api.backend
        self.problems: list[Problem] = []
        self._seen: set[tuple[str, str]] = set()
        self._models: set[str] = set()

    def check(self, item: WorkItem) -> None:
        if item.output_format is not None and self.backend != "vertex":
            self.problems.append(Problem(
                self.file, item.id, "output_format",
                "only Vertex AI (api.backend: vertex) takes an output format; the Gemini API answers in its own",
            ))  # fmt: skip
        tier = item.tier or self.tier
        if (item.model, tier) in self._seen:
            return
        self._seen.add((item.model, tier))
        found = None if item.model in self._models else models.lifecycle_problem(item.model, self.base_url)
        self._models.add(item.model)
        if found is not None:
            level, message = found
            if level == "error":
                self.problems.append(Problem(self.file, item.id, "model", message))
            else:
                logger.warning("%s", message)
        info = models.lookup(item.model)
        if info is not None and self.backend not in info.backends:
            self.problems.append(Problem(
                self.file, item.id, "model",
                f"api.backend is {self.backend}, which does not serve {item.model}; choose one of "
                f"{', '.join(models.served_by(self.backend))}",
            ))  # fmt: skip
        if item.tier is None and info is not None and tier != "batch" and tier not in info.tiers:
            self.problems.append(Problem(
                self.file, item.id, "tier",
                f"api.tier is {tier}, but {info.id} is not sold in that tier; choose one of {', '.join(info.tiers)}",
            ))  # fmt: skip
