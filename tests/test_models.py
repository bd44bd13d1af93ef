"""The model table: which ids are known, what they accept, and what an answer costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nanobatch.config import PriceOverride, load_settings
from nanobatch.costs import pricing_for, request_cost_range, usage_cost, usage_problem
from nanobatch.models import ASPECT_RATIOS, MODELS, Pricing, lookup, pixel_size


@pytest.mark.parametrize(
    ("model", "base"),
    [
        pytest.param("gemini-2.5-flash-image", "gemini-2.5-flash-image", id="2.5-flash"),
        pytest.param("gemini-2.5-flash-image-preview", "gemini-2.5-flash-image", id="2.5-flash-preview"),
        pytest.param("gemini-3-pro-image-preview", "gemini-3-pro-image", id="3-pro-preview"),
        pytest.param("gemini-3.1-flash-image-preview", "gemini-3.1-flash-image", id="3.1-flash-preview"),
        pytest.param("models/gemini-3-pro-image-preview", "gemini-3-pro-image", id="models-prefix"),
    ],
)
def test_lookup_known_ids(model: str, base: str) -> None:
    info = lookup(model)
    assert info is not None and info.id == base


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("gemini-9-image", id="unknown"),
        pytest.param("gemini-2.5-flash", id="text-model"),
        pytest.param("gemini-3-pro-image-preview-extra", id="suffix-after-preview"),
        pytest.param("", id="empty"),
    ],
)
def test_lookup_unknown_is_none(model: str) -> None:
    assert lookup(model) is None


def test_per_model_facts_match_the_published_limits() -> None:
    flash25, pro3, flash31 = (MODELS[m] for m in ("gemini-2.5-flash-image", "gemini-3-pro-image",
                                                  "gemini-3.1-flash-image"))  # fmt: skip
    assert flash25.image_sizes == ()  # sending imageSize to 2.5 flash image fails
    assert pro3.image_sizes == ("1K", "2K", "4K")
    assert flash31.image_sizes == ("512", "1K", "2K", "4K")
    assert set(flash25.aspect_ratios) == set(pro3.aspect_ratios) == set(ASPECT_RATIOS)
    assert set(flash31.aspect_ratios) == set(ASPECT_RATIOS) | {"1:4", "4:1", "1:8", "8:1"}
    assert flash25.output_tokens(None) == 1290
    assert [pro3.output_tokens(s) for s in ("1K", "2K", "4K")] == [1120, 1120, 2000]
    assert [flash31.output_tokens(s) for s in ("512", "1K", "2K", "4K")] == [747, 1120, 1680, 2520]
    # 2.1's 4K image is $0.113 at $30 per million tokens: 3,780 tokens, half as many again as 3.1 flash's
    assert [MODELS["gemini-nano-banana-2.1"].output_tokens(s) for s in ("1K", "2K", "4K")] == [1120, 1680, 3780]
    assert flash31.output_tokens(None) == flash31.output_tokens(flash31.default_size)


@pytest.mark.parametrize(
    ("ratio", "size", "expected"),
    [
        pytest.param("1:1", "1K", (1024, 1024), id="1:1-1K"),
        pytest.param("1:1", "512", (512, 512), id="1:1-512"),
        pytest.param("1:1", "4K", (4096, 4096), id="1:1-4K"),
        pytest.param(None, None, (1024, 1024), id="defaults"),
    ],
)
def test_pixel_size_of_squares(ratio: str | None, size: str | None, expected: tuple[int, int]) -> None:
    assert pixel_size(ratio, size) == expected


@pytest.mark.parametrize("ratio", [*ASPECT_RATIOS, "1:4", "4:1", "1:8", "8:1"])
@pytest.mark.parametrize("size", ["512", "1K", "2K", "4K"])
def test_pixel_size_keeps_shape_and_area(ratio: str, size: str) -> None:
    width, height = pixel_size(ratio, size)
    w, h = (int(x) for x in ratio.split(":"))
    edge = {"512": 512, "1K": 1024, "2K": 2048, "4K": 4096}[size]
    assert width % 16 == 0 and height % 16 == 0
    assert (width > height) == (w > h) and (width < height) == (w < h)
    assert width / height == pytest.approx(w / h, rel=0.05)
    assert width * height == pytest.approx(edge * edge, rel=0.05)


FLASH31 = Pricing(input=0.50, output_image=60.0, output_text=3.0)


def test_usage_cost_without_details_prices_all_output_as_image() -> None:
    usage = {"promptTokenCount": 1312, "candidatesTokenCount": 1680, "totalTokenCount": 2992}
    assert usage_cost(usage, FLASH31) == pytest.approx((1312 * 0.5 + 1680 * 60.0) / 1e6)


def test_usage_cost_with_details_splits_image_and_text_and_bills_thinking_as_text() -> None:
    usage = {
        "promptTokenCount": 1312,
        "candidatesTokenCount": 1700,
        "thoughtsTokenCount": 100,
        "totalTokenCount": 3112,
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1680}, {"modality": "TEXT", "tokenCount": 20}],
    }
    expected = (1312 * 0.5 + 1680 * 60.0 + (20 + 100) * 3.0) / 1e6
    assert usage_cost(usage, FLASH31) == pytest.approx(expected)
    no_details = {k: v for k, v in usage.items() if k != "candidatesTokensDetails"}
    assert usage_cost(no_details, FLASH31) > usage_cost(usage, FLASH31)  # unknown split: assume the dearer kind


def test_usage_cost_of_an_empty_usage_is_zero() -> None:
    assert usage_cost({}, FLASH31) == 0.0


@pytest.mark.parametrize(
    ("usage", "said"),
    [
        pytest.param({}, "no usageMetadata", id="stripped by a proxy"),
        pytest.param({"totalTokenCount": 2992}, "promptTokenCount is missing", id="partial"),
        pytest.param({"promptTokenCount": 1312, "candidatesTokenCount": -1680}, "-1680", id="negative"),
        pytest.param({"promptTokenCount": "1312", "candidatesTokenCount": 1680}, "'1312'", id="a string"),
        pytest.param({"promptTokenCount": 1312, "candidatesTokenCount": True}, "True", id="a bool"),
        pytest.param(
            {"promptTokenCount": 1, "candidatesTokenCount": 1, "thoughtsTokenCount": -5}, "-5", id="negative thoughts"
        ),
        pytest.param(
            {"promptTokenCount": 1, "candidatesTokenCount": 1, "candidatesTokensDetails": [{"tokenCount": -9}]},
            "candidatesTokensDetails",
            id="negative details",
        ),
    ],
)
def test_usage_that_cannot_be_priced_is_told(usage: dict[str, Any], said: str) -> None:
    problem = usage_problem(usage)
    assert problem is not None and said in problem


def test_usage_that_can_be_priced_has_no_problem() -> None:
    assert usage_problem({"promptTokenCount": 0, "candidatesTokenCount": 1680, "totalTokenCount": 1680}) is None


def test_pricing_for_known_and_unknown_models() -> None:
    assert pricing_for("gemini-3.1-flash-image-preview") == FLASH31
    assert pricing_for("gemini-3-pro-image-preview") == MODELS["gemini-3-pro-image"].pricing
    dearest = max((m.pricing for m in MODELS.values()), key=lambda p: p.output_image)
    assert pricing_for("gemini-9-image") == dearest  # unknown: budgets stay on the safe side


def test_an_unknown_models_worst_case_covers_the_dearest_image_any_known_model_makes() -> None:
    # A proxy's own id is reserved for as the most a known model's image can cost: its largest image in tokens
    # (2.1's 4K, 3,780) at the dearest rate, not a smaller model's 4K.
    _, worst = request_cost_range("my-proxy-image", instruction="white background", n_images=1, image_size="4K",
                                  pricing=pricing_for("my-proxy-image"))  # fmt: skip
    known = [pricing_for(m.id).cost(prompt=0, image_out=m.output_tokens(s), text_out=0)
             for m in MODELS.values() for s in m.tokens_per_image]  # fmt: skip
    biggest = max(t for m in MODELS.values() for t in m.tokens_per_image.values())
    assert worst >= max(known) and worst >= pricing_for("my-proxy-image").cost(prompt=0, image_out=biggest, text_out=0)


@pytest.mark.parametrize(
    ("key", "model"),
    [
        pytest.param("gemini-3-pro-image", "gemini-3-pro-image-preview", id="base-key-preview-model"),
        pytest.param("gemini-3-pro-image-preview", "gemini-3-pro-image-preview", id="exact-key"),
        pytest.param("gemini-3-pro-image", "models/gemini-3-pro-image", id="models-prefix"),
    ],
)
def test_pricing_overrides_from_config_replace_only_what_they_set(key: str, model: str) -> None:
    settings = load_settings(env={})
    overrides = {**settings.pricing, key: PriceOverride(output_image=100.0)}
    pricing = pricing_for(model, overrides)
    assert pricing.output_image == 100.0
    assert pricing.input == MODELS["gemini-3-pro-image"].pricing.input
    assert pricing.output_text == MODELS["gemini-3-pro-image"].pricing.output_text


def test_pricing_overrides_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("pricing:\n  gemini-3.1-flash-image:\n    input: 1.0\n    output_image: 90\n")
    settings = load_settings(config, env={})
    pricing = pricing_for("gemini-3.1-flash-image-preview", settings.pricing)
    assert pricing == Pricing(input=1.0, output_image=90.0, output_text=3.0)
    assert pricing_for("gemini-3-pro-image", settings.pricing) == MODELS["gemini-3-pro-image"].pricing


def test_pricing_override_for_another_model_does_not_apply() -> None:
    assert pricing_for("gemini-2.5-flash-image", {"gemini-3-pro-image": {"input": 9.0}}) == (
        MODELS["gemini-2.5-flash-image"].pricing
    )


def test_pricing_override_for_an_unknown_model() -> None:
    pricing = pricing_for("my-proxy-image-model", {"my-proxy-image-model": {"output_image": 10.0}})
    assert pricing.output_image == 10.0


@pytest.mark.parametrize(
    ("model", "size", "n_images"),
    [
        pytest.param("gemini-3.1-flash-image-preview", "2K", 1, id="3.1-flash-2K"),
        pytest.param("gemini-3-pro-image-preview", "4K", 3, id="3-pro-4K"),
        pytest.param("gemini-2.5-flash-image", None, 0, id="2.5-flash-text-to-image"),
    ],
)
def test_worst_case_estimate_covers_a_typical_answer(model: str, size: str | None, n_images: int) -> None:
    pricing = pricing_for(model)
    instruction = "Replace the background with pure white; keep the product unchanged"
    likely, worst = request_cost_range(model, instruction=instruction, n_images=n_images, image_size=size,
                                       pricing=pricing)  # fmt: skip
    info = lookup(model)
    assert info is not None
    typical = {
        "promptTokenCount": 20 + n_images * 1290,
        "candidatesTokenCount": info.output_tokens(size) + 30,
        "thoughtsTokenCount": 300,
        "candidatesTokensDetails": [
            {"modality": "IMAGE", "tokenCount": info.output_tokens(size)},
            {"modality": "TEXT", "tokenCount": 30},
        ],
    }
    assert 0 < likely < worst
    assert usage_cost(typical, pricing) <= worst
