"""The models and tiers of a job's items, checked against the settings as ``check_job`` goes through them:
models that are retired or not served by the backend, tiers in which a model is not sold or that the backend
does not offer (the batch tier on Vertex AI)."""

from __future__ import annotations

import functools
import logging

from .. import models
from ..api.credentials import not_offered
from ..config import Settings
from ..errors import Problem
from ..item import WorkItem
from ..job.check import warn_unknown_model
from ..job.manifest import Manifest
from ..job.sources import RawItem

__all__ = ["LifecycleCheck"]

logger = logging.getLogger("nanobatch")


class LifecycleCheck:
    """Retired models, models the backend does not serve, tiers a model is not sold in or the backend does not
    offer; each problem told once, where the value at fault was written (:meth:`Manifest.problem_at`: the item,
    the manifest's ``defaults:`` or top level, or the settings). A shut-down id sent to Google is a problem (it
    would fail there); sent to a proxy (which maps old ids) or when deprecated, a warning naming the replacement,
    once per model."""

    def __init__(self, manifest: Manifest, settings: Settings) -> None:
        self._at = manifest.problem_at
        self.tier = settings.api.tier
        self.backend = settings.api.backend
        # A retired model's problem where it goes (Vertex AI is Google's own, whatever api.base_url says)
        base_url = settings.api.base_url if settings.api.backend == "gemini" else models.GOOGLE_HOST
        self._problem = functools.partial(models.lifecycle_problem, base_url=base_url, backend=self.backend)
        self._found: dict[Problem, None] = {}  # in the order found, each once
        self._seen: set[tuple[str, str, bool, bool]] = set()  # model, tier, and whether the item set each itself
        self._retired: dict[str, str | None] = {}  # model: its lifecycle's error, if any
        self._models: set[str] = set()  # whose warnings were given
        self.models: set[str] = set()  # every model the items use

    @property
    def problems(self) -> list[Problem]:
        return list(self._found)

    def still_held(self, used: list[str]) -> bool:
        """For a check answered from the last run's (:mod:`~nanobatch.run.unchanged`): False if one of the models
        *used* is now a problem (shut down since), for the whole check to name it where it was written; else
        True, the warnings :meth:`check` and ``check_items`` give for them given."""
        found = [self._problem(model) for model in used]
        if any(each is not None and each[0] == "error" for each in found):
            return False
        for model, each in zip(used, found, strict=True):
            if models.lookup(model) is None:
                warn_unknown_model(model)
            if each is not None:
                logger.warning("%s", each[1])
        self._models.update(used)  # told of: the items of rows appended since are not told again
        return True

    def check(self, item: WorkItem, raw: RawItem) -> None:
        """The problems of *item* (as the source gave it: *raw*) with its model and tier."""
        if item.output_format is not None and self.backend != "vertex":
            why = "only Vertex AI (api.backend: vertex) takes an output format; the Gemini API answers in its own"
            self._add(raw, item, "output_format", why)
        tier, own = item.tier or self.tier, raw.fields or {}
        seen = (item.model, tier, own.get("model") is not None, own.get("tier") is not None)
        if seen in self._seen:
            return
        self._seen.add(seen)
        self.models.add(item.model)
        if (retired := self._lifecycle(item.model)) is not None:
            self._add(raw, item, "model", retired)
        info = models.lookup(item.model)
        if info is not None and self.backend not in info.backends:
            self._add(raw, item, "model", f"api.backend is {self.backend}, which does not serve {item.model}; "
                                          f"choose one of {', '.join(models.served_by(self.backend))}")  # fmt: skip
        if tier == "batch" and (refused := not_offered(self.backend, "batch")) is not None:
            self._add(raw, item, "tier", refused)
        elif item.tier is None and info is not None and tier != "batch" and tier not in info.tiers:
            # The settings' tier: the item's own model is at fault, else the tier where it was written
            at = "model" if seen[2] else "tier"
            self._add(raw, item, at, f"{info.id} is not sold in the {tier} tier; choose one of {', '.join(info.tiers)}")

    def _add(self, raw: RawItem, item: WorkItem, field: str, message: str) -> None:
        self._found.setdefault(self._at(raw, item.id, field, message))

    def _lifecycle(self, model: str) -> str | None:
        """The error of *model*'s lifecycle where it goes, if any; a warning is logged instead, once a model."""
        if model not in self._retired:
            found = self._problem(model)
            error = found is not None and found[0] == "error"
            self._retired[model] = found[1] if found is not None and error else None
            if found is not None and not error and model not in self._models:
                logger.warning("%s", found[1])
            self._models.add(model)
        return self._retired[model]
