"""Field templates of item sources and output names: ``"photos/{sku}.jpg"`` filled from a row's values.

``{{`` and ``}}`` are literal braces; a template that is one placeholder alone keeps a list or boolean value.
Only the standard library is imported here, so that filling an output name stays cheap to load.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

__all__ = ["BRACES_HINT", "MissingPlaceholder", "Values", "fill", "template_fields"]

_SOLE = re.compile(r"\{([^{}]+)\}")
_NUMBER = re.compile(r"\d+")
BRACES_HINT = "write {{ and }} for literal braces"


class MissingPlaceholder(KeyError):
    """A template names a column the row does not have (or has empty)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Values(dict[str, Any]):
    """A row's values: a name it lacks raises :class:`MissingPlaceholder`."""

    def __missing__(self, key: str) -> Any:
        raise MissingPlaceholder(key)


def template_fields(template: str) -> list[str]:
    """The placeholder names in *template*; ValueError, with a hint, when it is malformed.

    >>> template_fields("photos/{sku}.jpg")
    ['sku']
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}; {BRACES_HINT}") from None
    names = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or any(c in name for c in ".[]"):
            hint = f"name a column, as in {{sku}}; {BRACES_HINT}"
            raise ValueError(f"bad placeholder {{{name}}} in {template!r}: {hint}")
        if spec and ("{" in spec or any(len(number) > 4 for number in _NUMBER.findall(spec))):
            # A width of a billion would fill memory; one taken from a column ({sku:{width}}) could be anything.
            raise ValueError(
                f"bad format {{{name}:{spec}}} in {template!r}: a width or precision is a number up to 9999; "
                + BRACES_HINT
            )
        names.append(name)
    return names


def fill(template: Any, values: Mapping[str, Any]) -> Any:
    """*template* with its placeholders filled from *values* (strings, and lists of them, recursively).

    A template that is one placeholder alone keeps a list, boolean or mapping value as is (JSONL rows).
    Raises :class:`MissingPlaceholder` for a name *values* lacks or holds as None or "".
    """
    if not isinstance(values, Values):
        values = Values({k: v for k, v in values.items() if v not in (None, "")})
    return _fill(template, values)


def _fill(template: Any, present: Values) -> Any:
    if isinstance(template, list):
        return [_fill(part, present) for part in template]
    if not isinstance(template, str) or ("{" not in template and "}" not in template):
        return template
    if template not in _SOLES:
        if len(_SOLES) >= 4096:
            _SOLES.clear()
        sole = _SOLE.fullmatch(template)
        name = sole.group(1) if sole else None
        plain = name is not None and not any(c in name for c in ":!.[]")
        _SOLES[template] = (name if plain else None, plain)  # "{n:>10}" alone is formatted, as in a sentence
    name, plain = _SOLES[template]
    if name is not None:
        value = present[name]
        if isinstance(value, (list, bool, dict)):
            return value
        if plain and type(value) is str:  # "{name}": what format_map would make of it
            return value
    try:
        return template.format_map(present)
    except OverflowError as exc:  # {price:.2f} with an integer of 400 digits, {n:c} with 10**9
        raise ValueError(str(exc)) from None


# Each template met: the name of its sole placeholder (None: not one plain placeholder alone: no conversion, format
# spec, attribute or index), and whether it is one. A catalog's rows fill the same few templates.
_SOLES: dict[str, tuple[str | None, bool]] = {}
