"""Per-model facts: aspect ratios, image sizes, output tokens, limits and prices.

One table, used by manifest validation, cost estimates, budgets and the
simulator. ``-preview`` ids share the entry of their base model.

>>> info = lookup("gemini-3.1-flash-image-preview")
>>> info.output_tokens("2K")
1680
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "ASPECT_RATIOS",
    "MODELS",
    "ModelInfo",
    "Pricing",
    "lookup",
    "pixel_size",
    "pricing_for",
    "request_cost_range",
    "usage_cost",
]

ASPECT_RATIOS: tuple[str, ...] = (
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9",
)  # fmt: skip

# Long side of a square image at each size; other ratios keep the same area.
_SIZE_EDGE = {"512": 512, "1K": 1024, "2K": 2048, "4K": 4096}

# Roughly how many prompt tokens one input image costs (Gemini tiles images;
# 258 tokens per tile is Google's figure, and an input image is a few tiles).
INPUT_IMAGE_TOKENS = 1290

MB = 1024 * 1024
# Gemini takes at most 20 MB of inline data per request, and base64 adds a third:
# one picture may be 7 MB raw, and all of one request's pictures 14 MB (~18.7 MB encoded).
MAX_INPUT_BYTES = 7 * MB
MAX_TOTAL_INPUT_BYTES = 14 * MB


@dataclass(frozen=True, slots=True, kw_only=True)
class Pricing:
    """US dollars per million tokens."""

    input: float
    output_image: float
    output_text: float

    def cost(self, *, prompt: int, image_out: int, text_out: int) -> float:
        return (prompt * self.input + image_out * self.output_image + text_out * self.output_text) / 1e6


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """What one model accepts and what it costs."""

    id: str
    aspect_ratios: tuple[str, ...]
    # Empty when the model refuses ``imageConfig.imageSize`` altogether.
    image_sizes: tuple[str, ...]
    default_size: str
    tokens_per_image: dict[str, int] = field(hash=False)
    max_input_images: int
    pricing: Pricing
    supports_thinking: bool

    def output_tokens(self, image_size: str | None) -> int:
        """Output tokens one image costs at *image_size* (the default size when None)."""
        return self.tokens_per_image.get(image_size or self.default_size, max(self.tokens_per_image.values()))


MODELS: dict[str, ModelInfo] = {
    m.id: m
    for m in (
        ModelInfo(
            id="gemini-2.5-flash-image",
            aspect_ratios=ASPECT_RATIOS,
            image_sizes=(),
            default_size="1K",
            tokens_per_image={"1K": 1290},
            max_input_images=3,
            pricing=Pricing(input=0.30, output_image=30.0, output_text=2.50),
            supports_thinking=False,
        ),
        ModelInfo(
            id="gemini-3-pro-image",
            aspect_ratios=ASPECT_RATIOS,
            image_sizes=("1K", "2K", "4K"),
            default_size="1K",
            tokens_per_image={"1K": 1120, "2K": 1120, "4K": 2000},
            max_input_images=14,
            pricing=Pricing(input=2.0, output_image=120.0, output_text=12.0),
            supports_thinking=True,
        ),
        ModelInfo(
            id="gemini-3.1-flash-image",
            aspect_ratios=(*ASPECT_RATIOS, "1:4", "4:1", "1:8", "8:1"),
            image_sizes=("512", "1K", "2K", "4K"),
            default_size="1K",
            tokens_per_image={"512": 747, "1K": 1120, "2K": 1680, "4K": 2520},
            max_input_images=14,
            pricing=Pricing(input=0.50, output_image=60.0, output_text=3.0),
            supports_thinking=True,
        ),
    )
}


def lookup(model: str) -> ModelInfo | None:
    """The facts for *model* (``-preview`` and ``models/`` forms included), or None if unknown."""
    name = model.removeprefix("models/").removesuffix("-preview")
    return MODELS.get(name)


def pixel_size(aspect_ratio: str | None, image_size: str | None) -> tuple[int, int]:
    """Width and height of an output image, rounded to multiples of 16.

    >>> pixel_size("1:1", "1K")
    (1024, 1024)
    """
    edge = _SIZE_EDGE.get(image_size or "1K", 1024)
    w_ratio, h_ratio = (int(x) for x in (aspect_ratio or "1:1").split(":"))
    scale = math.sqrt(w_ratio / h_ratio)
    width = max(16, round(edge * scale / 16) * 16)
    height = max(16, round(edge / scale / 16) * 16)
    return width, height


_UNKNOWN_PRICING = Pricing(input=2.0, output_image=120.0, output_text=12.0)  # the dearest known model


def pricing_for(model: str, overrides: Mapping[str, Any] | None = None) -> Pricing:
    """Prices for *model*: the built-in table, with any ``pricing:`` override from the config applied.

    Unknown models are priced like the dearest known one, so budgets stay on the safe side.
    """
    info = lookup(model)
    base = info.pricing if info is not None else _UNKNOWN_PRICING
    override = None
    if overrides:
        name = model.removeprefix("models/")
        override = overrides.get(name) or overrides.get(name.removesuffix("-preview"))
        if override is None and info is not None:
            override = overrides.get(info.id)
    if override is None:
        return base
    values = override if isinstance(override, Mapping) else override.model_dump()
    return replace(base, **{k: v for k, v in values.items() if v is not None})


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


# Allowance for the model's own text and thinking in a worst-case estimate.
_TEXT_ALLOWANCE_TOKENS = 1000


def request_cost_range(
    model: str, *, instruction: str, n_images: int, image_size: str | None, pricing: Pricing
) -> tuple[float, float]:
    """(likely, worst case) US dollars for one request; the worst case is what a budget reserves."""
    prompt = len(instruction) // 4 + 8 + n_images * INPUT_IMAGE_TOKENS
    info = lookup(model)
    image_tokens = info.output_tokens(image_size) if info is not None else 2520
    likely = pricing.cost(prompt=prompt, image_out=image_tokens, text_out=0)
    worst = pricing.cost(prompt=prompt * 2, image_out=image_tokens, text_out=_TEXT_ALLOWANCE_TOKENS)
    return likely, worst
