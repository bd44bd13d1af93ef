"""Settings of the simulator: latency, faults, quotas, auth."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["BATCH_FAULT_KINDS", "FAULT_KINDS", "LATENCY_MODELS", "SimulatorConfig"]

LATENCY_MODELS = ("fixed", "uniform", "lognormal")

# Fault kind (as written on the command line) -> SimulatorConfig field.
FAULT_KINDS: dict[str, str] = {
    "429": "rate_429",
    "503": "rate_503",
    "500": "rate_500",
    "504": "rate_504",
    "drop": "rate_drop",
    "image_safety": "rate_image_safety",
    "no_image": "rate_no_image",
    "text_only": "rate_text_only",
    "blocked": "rate_blocked",
    "bad_image": "rate_bad_image",
    "spend_cap": "rate_spend_cap",
    "spend_rate": "rate_spend_rate",
    "no_credit": "rate_no_credit",
    "no_credit_429": "rate_no_credit_429",
    # A priority request served at standard (priority's limit passed), as its x-gemini-service-tier header says.
    "priority_standard": "rate_priority_standard",
    # A 200 with a bad image for the output checks (see simulator/flaws.py).
    "qa_grey": "rate_qa_grey",
    "qa_small_subject": "rate_qa_small_subject",
    "qa_unchanged": "rate_qa_unchanged",
    "qa_other_product": "rate_qa_other_product",
    "qa_small_output": "rate_qa_small_output",
    "qa_wrong_shape": "rate_qa_wrong_shape",
}

# Batch faults (``--batch-fault KIND=RATE``): per job, except line_error (per line of a job's input).
BATCH_FAULT_KINDS = ("failed", "expired", "line_error", "lost_create")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorConfig:
    """How the simulator behaves. The defaults give a fast, fault-free server.

    Every duration is simulated time: real sleeps, the per-minute window and
    ``retryDelay`` values are multiplied by ``time_scale`` (0 = never wait; the
    window is then empty too, so ``rpm_limit`` needs a time_scale above 0).
    ``daily_limit`` counts HTTP 200 answers. Fault rates are per request and
    add up to at most 1.

    >>> SimulatorConfig(latency="lognormal", latency_s=40, latency_spread=0.5, rate_503=0.05)  # doctest: +ELLIPSIS
    SimulatorConfig(seed=0, latency='lognormal', ...)
    """

    seed: int = 0
    latency: str = "fixed"
    # fixed: the latency; uniform: the middle; lognormal: the median. Seconds.
    latency_s: float = 0.0
    # uniform: +/- this many seconds; lognormal: sigma of the underlying normal.
    latency_spread: float = 0.0
    time_scale: float = 1.0
    rate_429: float = 0.0
    rate_503: float = 0.0
    rate_500: float = 0.0
    rate_504: float = 0.0
    rate_drop: float = 0.0
    rate_image_safety: float = 0.0
    rate_no_image: float = 0.0
    rate_text_only: float = 0.0
    # 200 with promptFeedback.blockReason and no candidates.
    rate_blocked: float = 0.0
    # 200 whose image is cut off half way, as a proxy that truncates answers sends it.
    rate_bad_image: float = 0.0
    # Money, not speed (shapes in nanobatch.models.MONEY_ERRORS): a 429 for the project's spend cap, a 429 for
    # the spend-based rate limit, a 402 for prepaid credit used up, and the 429 that said so before the 402.
    rate_spend_cap: float = 0.0
    rate_spend_rate: float = 0.0
    rate_no_credit: float = 0.0
    rate_no_credit_429: float = 0.0
    rate_priority_standard: float = 0.0
    # 200s whose image fails an output check (grey background, small subject, ...: simulator/flaws.py).
    rate_qa_grey: float = 0.0
    rate_qa_small_subject: float = 0.0
    rate_qa_unchanged: float = 0.0
    rate_qa_other_product: float = 0.0
    rate_qa_small_output: float = 0.0
    rate_qa_wrong_shape: float = 0.0
    rpm_limit: int | None = None
    daily_limit: int | None = None
    api_key: str | None = None
    image_format: str = "png"
    # An image file to answer every image request with (read once), instead of editing the
    # input with Pillow: for benchmarks, where the simulator's CPU must not be the bottleneck.
    canned: str | None = None
    # Batch API: a job is pending for its first tenth, then running, then done after this many
    # simulated seconds (times time_scale). The batch_rate_* chances are drawn per job
    # (failed, expired, a create whose reply is lost after the job was made) or per line.
    batch_latency_s: float = 60.0
    batch_rate_failed: float = 0.0
    batch_rate_expired: float = 0.0
    batch_rate_line_error: float = 0.0
    batch_rate_lost_create: float = 0.0
    # Share of flex requests shed with a 503 UNAVAILABLE, as Google sheds flex traffic under load.
    flex_shed: float = 0.0

    def __post_init__(self) -> None:
        if self.latency not in LATENCY_MODELS:
            raise ValueError(f"latency must be one of {', '.join(LATENCY_MODELS)}, not {self.latency!r}")
        if self.latency_s < 0 or self.latency_spread < 0 or self.time_scale < 0:
            raise ValueError("latency_s, latency_spread and time_scale must not be negative")
        for name, rate in self.fault_rates().items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {rate}")
        if not 0.0 <= self.flex_shed <= 1.0:
            raise ValueError(f"flex_shed must be between 0 and 1, not {self.flex_shed}")
        if sum(self.fault_rates().values()) > 1.0 + 1e-9:
            raise ValueError("fault rates must add up to at most 1")
        if self.batch_latency_s < 0:
            raise ValueError("batch_latency_s must not be negative")
        for kind, rate in self.batch_fault_rates().items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"batch_rate_{kind} must be between 0 and 1, not {rate}")
        if self.batch_rate_failed + self.batch_rate_expired > 1.0 + 1e-9:
            raise ValueError("batch_rate_failed and batch_rate_expired must add up to at most 1")
        for name in ("rpm_limit", "daily_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for no limit)")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', not {self.image_format!r}")

    def fault_rates(self) -> dict[str, float]:
        """Each fault kind's rate, keyed like FAULT_KINDS."""
        return {kind: float(getattr(self, name)) for kind, name in FAULT_KINDS.items()}

    def batch_fault_rates(self) -> dict[str, float]:
        """Each batch fault kind's rate, keyed like BATCH_FAULT_KINDS."""
        return {kind: float(getattr(self, f"batch_rate_{kind}")) for kind in BATCH_FAULT_KINDS}

    def __repr__(self) -> str:
        # Never show the API key, even in a traceback.
        shown = ", ".join(
            f"{f.name}={'***' if f.name == 'api_key' and self.api_key else repr(getattr(self, f.name))}"
            for f in fields(self)
        )
        return f"SimulatorConfig({shown})"
