"""Output checks: the ``qa:`` settings (config file, manifest, ``defaults:``, item; the nearest wins, key by key)
and a check's verdict on one image (:func:`nanobatch.checks.check_image` measures it).

The contract between the settings, the checks and the run (DESIGN.md's contract additions); every key, its
default and how each check measures are described in docs/qa.md.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

__all__ = [
    "MARKETPLACE_RULES",
    "NOT_MEASURED",
    "QA_CHECKS",
    "ImageRules",
    "QaFields",
    "QaSettings",
    "UndecodableImage",
    "Verdict",
]

# Every check, in the order verdicts list them.
QA_CHECKS = ("background", "min_fill", "min_side", "aspect", "changed", "same_subject")


def no_bool_numbers(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """For a before-validator of *model*'s fields: ``true``/``false`` (``yes``/``no`` in a config file) where a
    number goes is refused, not read as 1 or 0 (``concurrency: yes`` was 1 at night, ``min_fill: true`` 100%)."""
    if type(value) is bool and info.field_name is not None:
        kinds = typing.get_args(annotation := model.model_fields[info.field_name].annotation) or (annotation,)
        if bool not in kinds and (int in kinds or float in kinds):
            raise ValueError(f"a number, not {str(value).lower()}")
    return value


def yes_or_no(value: Any) -> Any:
    """For a before-validator of the checks' on/off fields: a number or any other word is refused as such
    (``aspect: "16:9"``, ``changed: 1``), the words of an environment variable (``true``, ``yes``, ``on``, ``1``
    and their opposites) aside: the checks are new, and no file that loaded before is refused by it."""
    if value is None or type(value) is bool or isinstance(value, str) and value.lower() in _YES_NO:
        return value
    raise ValueError(f"true or false, not {value!r}")


_YES_NO = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})  # as an environment variable says it


class QaFields(BaseModel):
    """A ``qa:`` mapping as written: every key optional (None: not set here, a farther layer decides)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    _numbers = field_validator("*", mode="before")(classmethod(no_bool_numbers))
    _yes_no = field_validator("aspect", "changed", "same_subject", mode="before")(staticmethod(yes_or_no))

    background: Literal["white", "any"] | None = None
    min_fill: float | None = None  # 0..1, checked below
    min_side: int | None = Field(default=None, ge=1, le=16384)
    aspect: bool | None = None
    changed: bool | None = None
    same_subject: bool | None = None
    retries: int | None = Field(default=None, ge=0, le=10)

    @field_validator("min_fill")
    @classmethod
    def _a_share(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            hint = f": write {value / 100:g} for {value:g}%" if 1 < value <= 100 else ""
            raise ValueError(f"min_fill is a share of the frame, from 0 to 1{hint}")
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class QaSettings:
    """The checks one item's final image must pass, resolved."""

    background: str = "any"
    min_fill: float | None = None
    min_side: int | None = None
    aspect: bool = False
    changed: bool = False
    same_subject: bool = False
    retries: int = 1  # new requests for an image that fails, each paid

    @property
    def active(self) -> bool:
        """Whether any check is on."""
        return (
            self.background != "any"
            or self.min_fill is not None
            or self.min_side is not None
            or self.aspect
            or self.changed
            or self.same_subject
        )

    def reads_pixels(self, *, compares: bool) -> bool:
        """Whether a check needs the image's pixels (decoded, ~10 ms of CPU for a 2K answer); ``min_side`` and
        ``aspect`` read its header only (~0.05 ms). *compares*: whether there is an input to compare with (without
        one, ``changed`` and ``same_subject`` are not measured)."""
        compared = compares and (self.changed or self.same_subject)
        return self.background != "any" or self.min_fill is not None or compared

    @classmethod
    def layered(cls, *layers: QaFields | Mapping[str, Any] | None) -> QaSettings:
        """The settings from *layers*, farthest first: a later layer's keys win, key by key."""
        settings = cls()
        names = {f.name for f in fields(cls)}
        for layer in layers:
            if layer is None:
                continue
            values = layer.model_dump() if isinstance(layer, QaFields) else dict(layer)
            settings = replace(settings, **{k: v for k, v in values.items() if k in names and v is not None})
        return settings


# A verdict's value naming the checks that compare with the input, left out when the input cannot be decoded here
# (a HEIC photo the API takes, Pillow not): a rejected item must not pass on the others (nanobatch qa).
NOT_MEASURED = "not_measured"


class UndecodableImage(ValueError):
    """An answer's image the checks cannot decode (the answer is then no usable image: ``bad_image``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What the checks found: ``failed`` names the checks the image failed, ``values`` what each measured."""

    passed: bool
    failed: tuple[str, ...] = ()
    values: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "failed": list(self.failed), "values": dict(self.values)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verdict:
        return cls(
            passed=bool(data.get("passed")),
            failed=tuple(map(str, data.get("failed") or ())),
            values=dict(data.get("values") or {}),
        )


# -- What marketplaces ask of a main image: the figures the checks' thresholds come from ------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class ImageRules:
    """What one marketplace asks of a product's main image (None: it sets no such rule), and where it says so.

    ``min_fill`` is the share of the frame the product must span (nanobatch.checks measures the larger of its
    width's and height's share); ``zoom_long_side`` the long side from which shoppers can zoom."""

    marketplace: str
    min_long_side: int
    zoom_long_side: int | None = None
    white_background: bool = False  # pure white, RGB 255, 255, 255
    min_fill: float | None = None
    sources: tuple[str, ...] = ()


# Amazon's own page (Seller Central help G1881) needs a seller login to read; its rules are quoted the same by
# the pages below. eBay's and Google's are their own help pages.
MARKETPLACE_RULES: dict[str, ImageRules] = {
    r.marketplace: r
    for r in (
        ImageRules(
            marketplace="amazon",
            min_long_side=500,
            zoom_long_side=1000,
            white_background=True,
            min_fill=0.85,
            sources=(
                "https://sellercentral.amazon.com/help/hub/reference/external/G1881 (quoted by the two below)",
                "https://help.e-tailize.com/en/expanding-the-checklist-to-amazon-nl-1 (2026-12-06)",
                "https://www.mercatuslab.com/blog/amazon-product-image-requirements/ (2026-12-06)",
            ),
        ),
        ImageRules(
            marketplace="ebay",
            min_long_side=500,
            sources=("https://www.ebay.com/help/policies/listing-policies/picture-policy?id=4370 (2026-12-06)",),
        ),
        ImageRules(
            marketplace="google_merchant",
            # 500 x 500 (both sides) from 2027-01-31, announced 2026-04-14 with warnings since; until then 100 x 100,
            # 250 x 250 for apparel. A white or transparent background is advised, not required.
            min_long_side=500,
            sources=(
                "https://support.google.com/merchants/answer/6324350 (2026-12-06)",
                "https://sharpfeed.io/docs/fields/image-link (2026-12-06)",
                "https://emberfeed.com/specs/google-merchant-image-requirements-2026 (2026-12-07)",
                "https://noticemesenpai.com/news/google-merchant-center-500x500-image-rule-ai-upscale-2027/"
                " (2026-12-07)",
            ),
        ),
    )
}
