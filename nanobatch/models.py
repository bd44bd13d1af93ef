"""Per-model facts: aspect ratios, image sizes, output tokens, limits and prices.

One table, used by manifest validation, cost estimates, budgets and the
simulator. ``-preview`` ids share the facts of their base model but keep
their own lifecycle (see ALIASES).

Every fact about the API lives here with its source and the date it was read:
model ids, lifecycle, limits, and prices per service tier (:mod:`nanobatch.costs` computes with them).

>>> info = lookup("gemini-nano-banana-2.1")
>>> info.output_tokens("2K")
1680
"""

from __future__ import annotations

import functools
import math
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

__all__ = [
    "ALIASES",
    "ASPECT_RATIOS",
    "ANSWER_TYPES",
    "DEFAULT_MODEL",
    "LOG_RETENTION_DAYS",
    "MODELS",
    "MONEY_ERRORS",
    "STORE_DEFAULT_SINCE",
    "STORE_SOURCES",
    "TIERS",
    "ErrorShape",
    "Lifecycle",
    "ModelInfo",
    "Pricing",
    "lifecycle",
    "lifecycle_problem",
    "live_replacement",
    "lookup",
    "model_id_problem",
    "not_in_url_path",
    "pixel_size",
    "served_by",
    "today",
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
class Lifecycle:
    """Where one model id stands: GA, deprecated (with its replacement), shut down (with the date)."""

    ga: date | None = None
    deprecated: date | None = None
    shutdown: date | None = None
    replacement: str | None = None
    # Known proxies (APIYI) still accept the id after Google shut it down, and map it to a live model.
    proxies_map: bool = False

    def status(self, day: date | None = None) -> str:
        """``preview``, ``GA``, ``deprecated`` or ``shut down``, as of *day* (default: :func:`today`)."""
        day = day or today()
        if self.shutdown is not None and day >= self.shutdown:
            return "shut down"
        if self.deprecated is not None and day >= self.deprecated:
            return "deprecated"
        return "GA" if self.ga is not None and day >= self.ga else "preview"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """What one model accepts, what it costs, where it stands, and where those facts come from."""

    id: str
    aspect_ratios: tuple[str, ...]
    # Empty when the model refuses ``imageConfig.imageSize`` altogether.
    image_sizes: tuple[str, ...]
    default_size: str
    tokens_per_image: dict[str, int] = field(hash=False)
    max_input_images: int
    pricing: Pricing  # the standard tier; other tiers scale it (TIER_PRICE_FACTORS)
    supports_thinking: bool
    thinking_levels: tuple[str, ...] = ()
    lifecycle: Lifecycle = Lifecycle()
    # The synchronous tiers Google sells this model in (batch is asynchronous, and priced for every model).
    tiers: tuple[str, ...] = ("standard", "flex", "priority")
    # Where it is served: the Gemini API (AI Studio, and proxies) and/or Vertex AI (api.backend).
    backends: tuple[str, ...] = ("gemini", "vertex")
    sources: tuple[str, ...] = ()  # "URL (date read)" for the facts above

    def output_tokens(self, image_size: str | None) -> int:
        """Output tokens one image costs at *image_size* (the default size when None)."""
        return self.tokens_per_image.get(image_size or self.default_size, max(self.tokens_per_image.values()))


# Where the facts below come from. Dates are when the page was read (or the issue filed).
_ISSUE = "issue 14 (2026-11-29)"
_SRC_MODELS = "https://ai.google.dev/gemini-api/docs/models (2026-11-29)"
_SRC_DEPRECATIONS = "https://ai.google.dev/gemini-api/docs/deprecations (2026-11-29)"
_SRC_CHANGELOG = "https://ai.google.dev/gemini-api/docs/changelog (2026-11-29)"
_SRC_LITE = "https://ai.google.dev/gemini-api/docs/models/gemini-3.1-flash-lite-image (2026-11-29)"
_SRC_NB21_PRICE = "https://github.com/BerriAI/litellm/discussions/44983 (2026-11-29)"
# 4K: the pricing page's $0.113 (3,780 tokens at $30/M), quoted by code citing it (read there 2026-10-07)
_SRC_NB21_4K = "https://ai.google.dev/gemini-api/docs/pricing, 4K at $0.113, as quoted by code citing it (2026-12-07)"
_SRC_FLASH_TOKENS = (
    "https://docs.cloud.google.com/vertex-ai/generative-ai/docs/models/gemini/3-1-flash-image (2026-11-29)"
)
_SRC_FLASH_PRICE = "https://lumenfall.ai/models/google/gemini-3.1-flash-image-preview/providers (2026-11-29)"
_SRC_PRO_PRICE = "https://blog.laozhang.ai/ru/posts/nano-banana-pro-api-guide (2026-11-29)"
SRC_TIERS = "https://ai.google.dev/gemini-api/docs/optimization (2026-11-29)"
SRC_FLEX = "https://ai.google.dev/gemini-api/docs/flex-inference (2026-11-29)"
# Vertex AI's list of Google models and their endpoints; the two ids it does not list are Gemini API only.
_SRC_VERTEX = "https://docs.cloud.google.com/vertex-ai/generative-ai/docs/learn/locations (2026-11-29)"
_GEMINI_ONLY = ("gemini",)

_WIDE = (*ASPECT_RATIOS, "1:4", "4:1", "1:8", "8:1")  # the 14 ratios of the 3.1 flash line

MODELS: dict[str, ModelInfo] = {
    m.id: m
    for m in (
        ModelInfo(
            id="gemini-nano-banana-2.1",
            aspect_ratios=_WIDE,
            image_sizes=("1K", "2K", "4K"),  # 512 is refused with a 400
            default_size="1K",
            tokens_per_image={"1K": 1120, "2K": 1680, "4K": 3780},
            max_input_images=14,
            pricing=Pricing(input=1.50, output_image=30.0, output_text=7.50),
            supports_thinking=True,
            thinking_levels=("minimal", "medium", "high"),
            lifecycle=Lifecycle(ga=date(2026, 10, 6)),
            backends=_GEMINI_ONLY,
            sources=(_ISSUE, _SRC_MODELS, _SRC_NB21_PRICE, _SRC_NB21_4K, _SRC_VERTEX),
        ),
        ModelInfo(
            id="gemini-3.1-flash-image",
            aspect_ratios=_WIDE,
            image_sizes=("512", "1K", "2K", "4K"),
            default_size="1K",
            tokens_per_image={"512": 747, "1K": 1120, "2K": 1680, "4K": 2520},
            max_input_images=14,
            pricing=Pricing(input=0.50, output_image=60.0, output_text=3.0),
            supports_thinking=True,
            thinking_levels=("minimal", "high"),
            # Third-party pages (LiteLLM #44983) name a shutdown on 2026-10-29; Google's pages do not (yet).
            lifecycle=Lifecycle(
                ga=date(2026, 5, 28), deprecated=date(2026, 10, 6), replacement="gemini-nano-banana-2.1"
            ),
            sources=(_ISSUE, _SRC_CHANGELOG, _SRC_DEPRECATIONS, _SRC_FLASH_TOKENS, _SRC_FLASH_PRICE, _SRC_VERTEX),
        ),
        ModelInfo(
            id="gemini-3.1-flash-lite-image",
            aspect_ratios=_WIDE,
            image_sizes=("1K",),  # 2K and 4K are not supported
            default_size="1K",
            tokens_per_image={"1K": 1120},
            max_input_images=14,
            pricing=Pricing(input=0.25, output_image=30.0, output_text=1.50),
            supports_thinking=True,
            thinking_levels=("minimal", "high"),
            lifecycle=Lifecycle(ga=date(2026, 6, 30)),
            tiers=("standard",),  # its model page: Flex and Priority inference not supported
            backends=_GEMINI_ONLY,
            sources=(_ISSUE, _SRC_LITE, _SRC_VERTEX),
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
            thinking_levels=("low", "high"),
            lifecycle=Lifecycle(ga=date(2026, 5, 28)),
            sources=(_ISSUE, _SRC_CHANGELOG, _SRC_DEPRECATIONS, _SRC_PRO_PRICE, _SRC_VERTEX),
        ),
        ModelInfo(
            id="gemini-2.5-flash-image",
            aspect_ratios=ASPECT_RATIOS,
            image_sizes=(),
            default_size="1K",
            tokens_per_image={"1K": 1290},
            max_input_images=3,
            pricing=Pricing(input=0.30, output_image=30.0, output_text=2.50),
            supports_thinking=False,
            lifecycle=Lifecycle(
                ga=date(2025, 10, 2),
                # (its release: the deprecations page does not say when the shutdown was announced)
                deprecated=date(2025, 10, 2),
                shutdown=date(2026, 10, 2),
                replacement="gemini-nano-banana-2.1",
            ),  # fmt: skip
            sources=(_ISSUE, _SRC_DEPRECATIONS, _SRC_VERTEX),
        ),
    )
}

# Ids with a lifecycle of their own that share a model's facts: ``-preview`` ids.
ALIASES: dict[str, tuple[str, Lifecycle]] = {
    "gemini-3.1-flash-image-preview": (
        "gemini-3.1-flash-image",
        Lifecycle(
            deprecated=date(2026, 5, 28),
            shutdown=date(2026, 6, 25),
            replacement="gemini-3.1-flash-image",
            proxies_map=True,
        ),
    ),  # fmt: skip
    "gemini-3-pro-image-preview": (
        "gemini-3-pro-image",
        Lifecycle(
            deprecated=date(2026, 5, 28), shutdown=date(2026, 6, 25), replacement="gemini-3-pro-image", proxies_map=True
        ),
    ),  # fmt: skip
}
ALIAS_SOURCES = (_ISSUE, _SRC_CHANGELOG, _SRC_DEPRECATIONS)

# What each tier costs, as a share of the standard price. Priority is "75% to 100% more": the upper end,
# so budgets stay on the safe side (set exact prices under ``pricing:`` per tier).
TIERS = ("standard", "flex", "priority", "batch")
TIER_PRICE_FACTORS = {"standard": 1.0, "flex": 0.5, "priority": 2.0, "batch": 0.5}
# Flex answers take 1-15 minutes; its requests get at least this long.
FLEX_TIMEOUT_S = 900.0
DEFAULT_MODEL = "gemini-nano-banana-2.1"
GOOGLE_HOST = "generativelanguage.googleapis.com"


# -- Privacy: the request's "store" field --------------------------------------------------------------------
# Paid Gemini API projects made on or after 2026-10-26 store generateContent, streamGenerateContent and
# batchGenerateContent requests (prompts, pictures, answers) by default, unless a request says store=false;
# older projects keep their setting (usually off). Free-tier projects have no logs. Logs expire after 55 days (by
# default) unless put in a dataset; a dataset shared with Google may be used to improve its models. google-genai 3.6.1
# sends GenerateContentConfig.store as the request's top-level "store" (in a batch, inside each line's
# request; the job itself has no such field) and raises ValueError for it on Vertex AI.
LOG_RETENTION_DAYS = 55
STORE_DEFAULT_SINCE = date(2026, 10, 26)
STORE_SOURCES = (
    "https://ai.google.dev/gemini-api/docs/changelog, entry of 2026-10-26 (read 2026-12-06)",
    "https://ai.google.dev/gemini-api/docs/logs-datasets (read 2026-12-06)",
    "https://ai.google.dev/gemini-api/docs/logs-policy: by default, logs expire after 55 days (read 2026-12-06)",
    "google-genai 3.6.1 models.py _GenerateContentConfig_to_mldev / _to_vertex, batches.py "
    "_InlinedRequest_to_mldev (read 2026-12-06)",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorShape:
    """One answer that says money, not speed, stopped a request: how it looks, and where that was read."""

    kind: str  # the ApiError kind nanobatch gives it (FatalApiError: the run stops, exit 3)
    status: int  # HTTP status
    status_word: str | None  # the body's error.status (Google's) or error.code (a one-api/new-api proxy's)
    message: str
    sources: tuple[str, ...]


# Money-stopped answers: each stops the run at once (exit 3), like a spent per-day quota, with a reason that
# names it. The simulator answers its fault kinds of the same names with these bodies.
MONEY_ERRORS: dict[str, ErrorShape] = {
    "spend_cap": ErrorShape(
        kind="spend_cap", status=429, status_word="RESOURCE_EXHAUSTED",
        # The first sentence as users quote it; Google points at https://ai.studio/spend to raise the cap.
        message="Your project has exceeded its monthly spending cap. Please go to AI Studio at "
        "https://ai.studio/spend to manage your project spend cap.",
        sources=(
            "https://ai.google.dev/gemini-api/docs/billing#project-spend-caps (GA 2026-06-26; read 2026-12-06)",
            "users' logs quoting the 429, public repositories via code search (read 2026-12-06)",
        ),
    ),
    "spend_rate": ErrorShape(
        kind="spend_rate", status=429, status_word="RESOURCE_EXHAUSTED",
        message="You exceeded your spend-based rate limit. Your spending rate has exceeded the allowed limit "
        "for your account's billing history and tier.",
        sources=(
            "https://ai.google.dev/gemini-api/docs/rate-limits, spend-based rate limits: a rolling 10-minute "
            "window per usage tier (section added 2026-06-23; read 2026-12-06)",
            "a real body quoted in a public repository's test, via code search (read 2026-12-06)",
        ),
    ),
    "no_credit": ErrorShape(
        kind="no_credit", status=402, status_word="RESOURCE_EXHAUSTED",
        message="Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to "
        "manage your project and billing. Learn more at https://ai.google.dev/gemini-api/docs/billing#prepay.",
        sources=(
            "https://discuss.ai.google.dev/t/api-update-depleted-prepay-credits-now-return-http-402-instead-of-"
            "429/183654 (read 2026-12-06)",
        ),
    ),
    "no_credit_429": ErrorShape(
        kind="no_credit", status=429, status_word="RESOURCE_EXHAUSTED",
        message="Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to "
        "manage your project and billing.",
        sources=(
            "the same message as a 429 before that change: https://github.com/dyad-sh/dyad/issues/3626 "
            "(2026-06-10), https://github.com/JeffOtano/roni/pull/125 (2026-04-14) (read 2026-12-06)",
        ),
    ),
    "proxy_no_credit": ErrorShape(
        kind="no_credit", status=403, status_word="insufficient_user_quota",
        message="user quota is not enough",
        sources=(
            "one-api/new-api relay source (the {status_code, error: {message, type, code}} body APIYI answers "
            "with): 403, code insufficient_user_quota or pre_consume_token_quota_failed (read 2026-12-06)",
            "https://docs.apiyi.com/en/faq/balance-insufficient: requests fail when the balance cannot cover "
            "the pre-deducted cost (read 2026-12-06)",
        ),
    ),
}  # fmt: skip
# The image type each model answers with (the output checks decode JPEG at 1/8 scale, PNG in full; docs/qa.md).
# Users see the 3.x models answer JPEG, gemini-2.5-flash-image PNG; Vertex AI's output_format can ask for either.
_SRC_ANSWER_TYPES = (
    "https://github.com/iBUHub/AIStudioToAPI/issues/220 (2026-12-06)",
    "https://github.com/googleapis/python-genai/issues/1824 (2026-12-06)",
)
ANSWER_TYPES = {m: "image/png" if m == "gemini-2.5-flash-image" else "image/jpeg" for m in MODELS}


def today() -> date:
    """The date lifecycle checks use: the one place tests set (``monkeypatch.setattr(models, "today", ...)``)."""
    return datetime.now(UTC).date()


def lookup(model: str) -> ModelInfo | None:
    """The facts for *model* (``-preview`` and ``models/`` forms included), or None if unknown."""
    name = model.removeprefix("models/")
    if name in ALIASES:
        return MODELS[ALIASES[name][0]]
    return MODELS.get(name.removesuffix("-preview"))


def not_in_url_path(text: str) -> str | None:
    """The first character of *text* that cannot stand in a request's URL path as it is, or None: a control
    character cannot (the request could not be built), and a space, "?" or "#" would ask another URL."""
    return next((char for char in text if char in " ?#" or not char.isprintable()), None)


@functools.lru_cache(maxsize=64)  # asked for every item: a catalog names a few models
def model_id_problem(model: str) -> str | None:
    """Why *model* cannot be a model id, or None. An id goes into the request's URL path ({model}:generateContent)."""
    if (char := not_in_url_path(model)) is not None:
        return f"{model[:60]!r} is not a model id: it holds {char!r}; model ids look like {DEFAULT_MODEL!r}"
    if model.startswith("models/"):  # the API's resource name, as a model listing shows it: the path has it already
        return f"write {model.removeprefix('models/')[:60]!r}, without 'models/' (the request's path adds it)"
    return None if model.strip() else "a model id cannot be empty"


def lifecycle(model: str) -> Lifecycle | None:
    """The lifecycle of this exact id (a ``-preview`` id has its own), or None if unknown. A ``-preview`` id the
    table does not list lives no longer than its model's id: a preview is never served past its GA model."""
    name = model.removeprefix("models/")
    if name in ALIASES:
        return ALIASES[name][1]
    info = MODELS.get(name) or MODELS.get(name.removesuffix("-preview"))
    return info.lifecycle if info is not None else None


def live_replacement(model: str, day: date | None = None, backend: str | None = None) -> str | None:
    """The model to use instead of *model*: its replacement, followed while that is itself retired; None if that
    is not served by *backend* (``vertex``: some models are the Gemini API's alone)."""
    current, seen = model, {model}
    while (
        (life := lifecycle(current)) is not None
        and life.replacement
        and life.status(day) in _RETIRED
        and life.replacement not in seen
    ):
        current = life.replacement
        seen.add(current)
    info = lookup(current)
    return None if current == model or backend and info is not None and backend not in info.backends else current


_RETIRED = ("deprecated", "shut down")


def lifecycle_problem(
    model: str, base_url: str, day: date | None = None, backend: str | None = None
) -> tuple[str, str] | None:
    """``("error"|"warning", message)`` for a retired *model* sent to *base_url*, or None.

    A shut-down id sent to Google's own endpoint fails there (an error before anything is sent); a
    proxy maps old ids, so it only gets a warning.
    """
    life = lifecycle(model)
    if life is None:
        return None
    status = life.status(day)
    if status not in ("deprecated", "shut down"):
        return None
    use = live_replacement(model, day, backend)
    hint = f"; use {use}" if use else ""
    if status == "deprecated":
        return "warning", f"{model} is deprecated since {life.deprecated}{hint}"
    # The URL's host, not a substring: hosts are case-insensitive, and a proxy's path may mention Google's.
    host = urllib.parse.urlsplit(base_url if "://" in base_url else f"//{base_url}").hostname
    if host == GOOGLE_HOST:
        return "error", f"{model} was shut down at Google on {life.shutdown}{hint}"
    mapped = " (known proxies still map it)" if life.proxies_map else ""
    return "warning", f"{model} was shut down at Google on {life.shutdown}{mapped}{hint}"


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


def served_by(backend: str) -> list[str]:
    """The ids of the live models *backend* (``gemini`` or ``vertex``) serves."""
    return [m.id for m in MODELS.values() if backend in m.backends and m.lifecycle.status() != "shut down"]
