"""Where an item's values were written: on the item (or its row), in the manifest's ``defaults:`` or at its top
level (``model:``, ``qa:``), or in the settings (a config file, the environment, the command line; or nowhere,
the built-in default).

A problem with a value the item did not write itself is told where the value was written, and once (the check
of the items keeps one of each), not once for every item that inherits it: ``m.yaml, field 'defaults.tier'``,
``nanobatch.yaml: qa.min_side``, ``--model``, as ``items_from`` tells a source's fields that read no column.

>>> manifest.problem_at(raw, "sku-1", "qa.min_side", "9999 px: ...")  # set in nanobatch.yaml alone
Problem(file='nanobatch.yaml: qa.min_side', item=None, field=None, message='9999 px: ...', bad_input=False)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import Problem
from .sources import RawItem

__all__ = ["Origins"]

# The settings that give an item's field when nothing nearer does (and each qa.<key>: the config file's qa:)
_SETTINGS = {"model": "api.model", "tier": "api.tier"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Origins:
    """The places above a manifest's items, nearest first: *defaults* (the fields ``defaults:`` sets), its own
    *model* and the keys of its own ``qa:`` (*qa*), and *settings* (``Settings.written_at``: where a setting was
    written; None, not known: a problem with a value from the settings is then told at the item)."""

    file: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    qa: frozenset[str] = frozenset()
    settings: Callable[[str], str] | None = None

    def problem(self, raw: RawItem, item: str | None, field: str, message: str, *, model: str) -> Problem:
        """The problem *message* with the value of *field* (``tier``, ``qa.min_side``, ``images[0]``) of the item
        of *raw* (its id: *item*), told where that value was written. *model*: the one the manifest gives its items
        (its own ``model:``, unless ``--model`` replaced it)."""
        name, _, key = field.partition(".")
        name = name.partition("[")[0]
        if raw.shared is not None and raw.shared.writes(field):  # the items_from: entry's own, for every row
            return Problem(self.file, None, f"{raw.shared.where}.{field}", message)
        if _sets(raw.fields, name, key):
            return Problem(raw.file, item, field, message)
        if _sets(self.defaults, name, key):
            return Problem(self.file, None, f"defaults.{field}", message)
        if name == "model" and model == self.model or name == "qa" and key in self.qa:
            return Problem(self.file, None, field, message)
        setting = field if name == "qa" else _SETTINGS.get(name)
        if setting is None or self.settings is None:
            return Problem(raw.file, item, field, message)
        return Problem(self.settings(setting), None, None, message)


def _sets(fields: Mapping[str, Any] | None, name: str, key: str) -> bool:
    """Whether *fields* give the field *name* a value (for ``qa``, its *key*)."""
    value = fields.get(name) if fields else None
    if name == "qa" and key:
        return isinstance(value, Mapping) and value.get(key) is not None
    return value is not None
