"""The output checks on a card of ``report.html`` (see ``nanobatch.cli.report``): a rejected item's failed checks,
each with what it measured, and the other measurements; a line of measurements for an item that passed."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from ..names import REJECTED_FOLDER
from ..output.record import ItemRecord
from ..qa import QA_CHECKS

__all__ = ["render_verdict"]

_e = html.escape
# What each check measures, as a reader of the report knows it (docs/qa.md says how).
_MEASURES = {
    "background": "white share of the border",
    "min_fill": "share of the frame the subject spans",
    "min_side": "longest side, px",
    "aspect": "width / height",
    "changed": "share of pixels changed from the input",
    "same_subject": "resemblance to the input's subject",
}


def render_verdict(rec: ItemRecord) -> str:
    """The card's part about the output checks: for a rejected item, which failed and what they measured; for one
    that passed, what they measured; "" for a record without a verdict."""
    verdict = rec.qa
    if verdict is None:
        return ""
    if verdict.passed:
        measured = _values(verdict.values, skip=())
        return f'<div class="qa passed">Passed the output checks{": " + measured if measured else ""}</div>'
    failed = "".join(
        f"<li><b>{_e(check)}</b> {_e(_value(verdict.values.get(check)))}"
        f"<small>{_e(_MEASURES.get(check, ''))}</small></li>"
        for check in verdict.failed
    )
    rest = _values(verdict.values, skip=verdict.failed)
    where = ""
    if rec.status == "rejected":
        where = f"Set aside under {REJECTED_FOLDER}/, never uploaded; the next run sends it again."
    if rec.status == "rejected" and rec.uploads:  # uploaded by a run, rejected since by nanobatch qa --apply
        where = (f"Set aside under {REJECTED_FOLDER}/; uploaded before it was rejected, still at "
                 f"{', '.join(rec.uploads)} until the next run's image passes.")  # fmt: skip
    return (
        f'<div class="qa rejected"><b>Failed the output checks</b><ul class="failed-checks">{failed}</ul>'
        + (f'<p class="measured">also measured: {rest}</p>' if rest else "")
        + (f'<p class="where">{_e(where)}</p>' if where else "")
        + "</div>"
    )


def _values(values: Mapping[str, Any], *, skip: tuple[str, ...]) -> str:
    """The measurements not in *skip*, the checks' own first (in their order), then the rest (width, height...)."""
    names = [c for c in QA_CHECKS if c in values] + [n for n in values if n not in QA_CHECKS]
    return " · ".join(f"{_e(name)} {_e(_value(values[name]))}" for name in names if name not in skip)


def _value(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
