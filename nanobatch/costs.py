"""What a request costs: prices per model and tier (with the config's ``pricing:`` overrides), an answer's
price from its ``usageMetadata``, and the worst case a budget reserves before sending.

The prices themselves are facts, in :mod:`nanobatch.models`' table with their sources; this module only
computes with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .models import INPUT_IMAGE_TOKENS, MODELS, TIER_PRICE_FACTORS, TIERS, ModelInfo, Pricing, lookup

__all__ = ["image_price", "pricing_for", "reported_tier", "request_cost_range", "usage_cost", "usage_problem"]

_UNKNOWN_PRICING = Pricing(input=2.0, output_image=120.0, output_text=12.0)  # the dearest known model


def pricing_for(model: str, overrides: Mapping[str, Any] | None = None, tier: str = "standard") -> Pricing:
    """Prices for *model* in *tier*: the built-in table, with any ``pricing:`` override from the config applied.

    An override's top-level prices are the standard tier's (other tiers scale them by TIER_PRICE_FACTORS);
    its ``flex:`` / ``priority:`` / ``batch:`` entries set that tier's prices outright. Unknown models
    are priced like the dearest known one, so budgets stay on the safe side.

    >>> pricing_for("gemini-3-pro-image", tier="flex").output_image
    60.0
    """
    info = lookup(model)
    base = info.pricing if info is not None else _UNKNOWN_PRICING
    override = None
    if overrides:
        name = model.removeprefix("models/")
        override = overrides.get(name) or overrides.get(name.removesuffix("-preview"))
        if override is None and info is not None:
            override = overrides.get(info.id)
    values: Mapping[str, Any] = {}
    if override is not None:
        values = override if isinstance(override, Mapping) else override.model_dump()
        base = replace(
            base, **{k: values[k] for k in ("input", "output_image", "output_text") if values.get(k) is not None}
        )
    factor = TIER_PRICE_FACTORS.get(tier, 1.0)
    priced = Pricing(input=base.input * factor, output_image=base.output_image * factor,
                     output_text=base.output_text * factor)  # fmt: skip
    own = values.get(tier) if tier != "standard" else None
    if own:
        own = own if isinstance(own, Mapping) else own.model_dump()
        priced = replace(priced, **{k: v for k, v in own.items() if v is not None})
    return priced


def image_price(info: ModelInfo, size: str, tier: str = "standard") -> float:
    """US dollars for the output tokens of one image of *size* in *tier* (no input or text)."""
    return pricing_for(info.id, tier=tier).cost(prompt=0, image_out=info.output_tokens(size), text_out=0)


# Vertex AI's usageMetadata.trafficType (kept verbatim in records), as a tier. PROVISIONED_THROUGHPUT is
# prepaid capacity: no tier of its own, priced as the tier asked for.
_TRAFFIC_TIERS = {"ON_DEMAND": "standard", "ON_DEMAND_FLEX": "flex", "ON_DEMAND_PRIORITY": "priority"}


def reported_tier(usage: Mapping[str, Any], header: str | None = None) -> str | None:
    """The tier the answer says the request ran in, lower case; None if not said: the Gemini API's
    ``x-gemini-service-tier`` *header*, else ``usageMetadata.serviceTier`` (a proxy's), else Vertex AI's
    ``trafficType``. A value that names no tier (a proxy's "paid") says nothing."""
    for value in (header, usage.get("serviceTier")):
        if isinstance(value, str) and (tier := value.lower().removeprefix("service_tier_")) in TIERS:
            return tier
    traffic = usage.get("trafficType")
    return _TRAFFIC_TIERS.get(traffic) if isinstance(traffic, str) else None


def usage_cost(usage: Mapping[str, Any], pricing: Pricing) -> float:
    """US dollars for one response's ``usageMetadata``.

    Output tokens are split by modality when ``candidatesTokensDetails`` says how;
    otherwise they are all priced as image tokens (the dearer kind). Thinking is billed as text.
    """
    prompt = int(usage.get("promptTokenCount") or 0)
    candidates = int(usage.get("candidatesTokenCount") or 0)
    thoughts = int(usage.get("thoughtsTokenCount") or 0)
    image_out, text_out = candidates, 0
    details = usage.get("candidatesTokensDetails")
    if isinstance(details, list) and details:
        by_kind = {str(d.get("modality")): int(d.get("tokenCount") or 0) for d in details if isinstance(d, dict)}
        image_out = by_kind.get("IMAGE", 0)
        text_out = max(0, candidates - image_out)
    return pricing.cost(prompt=prompt, image_out=image_out, text_out=text_out + thoughts)


_REQUIRED_COUNTS = ("promptTokenCount", "candidatesTokenCount")
_OPTIONAL_COUNTS = ("thoughtsTokenCount", "totalTokenCount")


def usage_problem(usage: Mapping[str, Any], *, imaged: bool = True) -> str | None:
    """Why *usage* cannot be priced (missing, partial or invalid token counts), or None if it can.

    A proxy may strip ``usageMetadata`` or send nonsense; an answer priced from it would cost $0 (or less)
    and let a budget through, so the engine prices such an answer at the request's worst case instead. Google
    leaves a count of 0 out: an answer with no image (*imaged* False: blocked, refused, text only) may have no
    ``candidatesTokenCount``, and is priced from its prompt; one with an image must have a count above 0.
    """
    if not usage:
        return "the answer carries no usageMetadata"
    for name in _REQUIRED_COUNTS + _OPTIONAL_COUNTS:
        value = usage.get(name)
        if value is None and (name in _OPTIONAL_COUNTS or name == "candidatesTokenCount" and not imaged):
            continue
        if not _is_count(value):
            return f"usageMetadata.{name} is {'missing' if value is None else repr(value)}"
    if imaged and usage.get("candidatesTokenCount") == 0:
        return "usageMetadata.candidatesTokenCount is 0 for an answer with an image"
    details = usage.get("candidatesTokensDetails")
    counts = [d.get("tokenCount", 0) for d in details if isinstance(d, dict)] if isinstance(details, list) else []
    if not all(map(_is_count, counts)):
        return "usageMetadata.candidatesTokensDetails holds an invalid tokenCount"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# A model the table does not know (a proxy's id) is estimated at the most any known model's image costs in tokens.
_MOST_IMAGE_TOKENS = max(t for m in MODELS.values() for t in m.tokens_per_image.values())
# Allowance for the model's own text and thinking in a worst-case estimate.
_TEXT_ALLOWANCE_TOKENS = 1000


def request_cost_range(
    model: str, *, instruction: str, n_images: int, image_size: str | None, pricing: Pricing
) -> tuple[float, float]:
    """(likely, worst case) US dollars for one request; the worst case is what a budget reserves."""
    prompt = len(instruction) // 4 + 8 + n_images * INPUT_IMAGE_TOKENS
    info = lookup(model)
    image_tokens = info.output_tokens(image_size) if info is not None else _MOST_IMAGE_TOKENS
    likely = pricing.cost(prompt=prompt, image_out=image_tokens, text_out=0)
    worst = pricing.cost(prompt=prompt * 2, image_out=image_tokens, text_out=_TEXT_ALLOWANCE_TOKENS)
    return likely, worst
