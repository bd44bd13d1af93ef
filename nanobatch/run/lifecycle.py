"""The models and tiers of a job's items, checked against the settings as ``check_job`` goes through them:
models that are retired or not served by the backend, tiers in which a model is not sold."""

from __future__ import annotations

import functools
import logging

from .. import models
from ..config import Settings
from ..errors import Problem
from ..item import WorkItem
from ..job.check import warn_unknown_model

__all__ = ["LifecycleCheck"]

logger = logging.getLogger("nanobatch")


class LifecycleCheck:
    """Retired models and unsold tiers, once per model: a shut-down id sent to Google is a problem (it would
    fail there), to a proxy (which maps old ids) or when deprecated, a warning naming the replacement."""

    def __init__(self, file: str, settings: Settings) -> None:
        self.file = file
        self.tier = settings.api.tier
        self.backend = settings.api.backend
        # A retired model's problem where it goes (Vertex AI is Google's own, whatever api.base_url says)
        base_url = settings.api.base_url if settings.api.backend == "gemini" else models.GOOGLE_HOST
        self._problem = functools.partial(models.lifecycle_problem, base_url=base_url, backend=self.backend)
        self.problems: list[Problem] = []
        self._seen: set[tuple[str, str]] = set()
        self._models: set[str] = set()
        self.models: set[str] = set()  # every model the items use

    def still_held(self, used: list[str]) -> bool:
        """For a check answered from the last run's (:mod:`~nanobatch.run.unchanged`): False if one of the models
        *used* is now a problem (shut down since), for the whole check to name it with an item; else True, the
        warnings :meth:`check` and ``check_items`` give for them given."""
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

    def check(self, item: WorkItem) -> None:
        if item.output_format is not None and self.backend != "vertex":
            why = "only Vertex AI (api.backend: vertex) takes an output format; the Gemini API answers in its own"
            self.problems.append(Problem(self.file, item.id, "output_format", why))
        tier = item.tier or self.tier
        if (item.model, tier) in self._seen:
            return
        self._seen.add((item.model, tier))
        found = None if item.model in self._models else self._problem(item.model)
        self._models.add(item.model)
        self.models.add(item.model)
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
