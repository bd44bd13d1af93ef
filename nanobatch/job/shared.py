"""What an ``items_from:`` entry gives every row itself (:class:`Shared`), so that a problem with one of those
values is told once, at the entry (``items_from[0].tier``), not on each row (``job.manifest``, ``job.origins``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["Shared"]


class Shared(NamedTuple):
    """The fields an ``items_from:`` entry (*where*: ``items_from[0]``) gives every row itself, reading no column
    (*fields*, as written): a problem with one of them that is the same for each row is told once, there."""

    where: str
    fields: Mapping[str, Any]

    def writes(self, field: str) -> bool:
        """Whether the entry itself gives *field* (``tier``, ``images[0]``, ``qa.min_side``) its value."""
        name, _, key = field.partition(".")
        name = name.partition("[")[0]
        if name == "qa" and key:
            qa = self.fields.get("qa")
            return isinstance(qa, Mapping) and qa.get(key) is not None
        return self.fields.get(name) is not None
