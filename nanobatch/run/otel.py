"""OpenTelemetry's GenAI client metrics, with the ``[otel]`` extra (docs/observability.md).

Recorded when an OTLP exporter is configured the standard way (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``, or ``OTEL_METRICS_EXPORTER=otlp``), or when the program running the
job has set an SDK MeterProvider as the global one (``opentelemetry-instrument`` does): per request,
``gen_ai.client.token.usage`` (input and output tokens) and ``gen_ai.client.operation.duration``, as the
semantic conventions for GenAI metrics name them. Nothing of OpenTelemetry is imported otherwise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["GenAiMetrics", "meter_provider_from_environment"]

logger = logging.getLogger("nanobatch")

# The semantic conventions' advised bucket boundaries for each histogram.
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
# usageMetadata's counts of each token type; thinking is billed as output.
_TOKEN_TYPES = {"input": ("promptTokenCount",), "output": ("candidatesTokenCount", "thoughtsTokenCount")}


class GenAiMetrics:
    """The two GenAI client histograms, recorded through *provider* (an SDK MeterProvider); *owned*: built by
    nanobatch from the environment, and shut down (its last figures sent) when the run ends."""

    def __init__(self, provider: Any, *, backend: str, owned: bool = False) -> None:
        from importlib.metadata import PackageNotFoundError, version

        self.provider = provider
        self.owned = owned
        try:
            release: str | None = version("nanobatch")
        except PackageNotFoundError:  # run from a source tree that was never installed
            release = None
        meter = provider.get_meter("nanobatch", release)
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )  # fmt: skip
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )  # fmt: skip
        self.provider_name = "gcp.vertex_ai" if backend == "vertex" else "gcp.gemini"

    def record(self, model: str, seconds: float | None, usage: Mapping[str, Any] | None, error: str | None) -> None:
        """One request to *model*: its duration (None: not timed, a batch job's line), the tokens of its answer
        (*usage*, usageMetadata), and the kind of error it ended in (None: answered)."""
        attributes: dict[str, str] = {
            "gen_ai.operation.name": "generate_content",
            "gen_ai.provider.name": self.provider_name,
            "gen_ai.request.model": model,
        }
        if usage:
            for token_type, names in _TOKEN_TYPES.items():
                counts = [usage[name] for name in names if isinstance(usage.get(name), int)]
                if counts:
                    self.tokens.record(sum(counts), {**attributes, "gen_ai.token.type": token_type})
        if error is not None:
            attributes["error.type"] = error
        if seconds is not None:
            self.duration.record(seconds, attributes)

    def close(self) -> None:
        """Send what is recorded and stop, if nanobatch built the provider (blocking: at most a few seconds)."""
        if not self.owned:
            return  # the program's own provider: it sends and stops it
        try:
            self.provider.shutdown(timeout_millis=10_000)
        except Exception as exc:  # the exporters log their own failures; a metrics backend never fails a run
            logger.warning("OpenTelemetry metrics: the last export failed: %s", exc)


def meter_provider_from_environment(env: Mapping[str, str]) -> tuple[Any, bool] | None:
    """The MeterProvider to record into, and whether nanobatch built it; None when OpenTelemetry is not asked
    for (or the ``[otel]`` extra is not installed: then said once, at INFO)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if "opentelemetry.sdk.metrics" in sys.modules:  # the program may have set up its own (never imported here)
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider

        if isinstance(current := metrics.get_meter_provider(), MeterProvider):
            return current, False
    exporters = {name.strip().lower() for name in env.get("OTEL_METRICS_EXPORTER", "").split(",") if name.strip()}
    endpoint = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if "none" in exporters or not (endpoint or "otlp" in exporters):
        return None
    if exporters - {"otlp"}:
        logger.warning("OTEL_METRICS_EXPORTER: nanobatch sends its metrics by OTLP only, not to %s",
                       ", ".join(sorted(exporters - {"otlp"})))  # fmt: skip
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    except ImportError:
        logger.info("an OTLP endpoint is set, but nanobatch sends no OpenTelemetry metrics without its extra: "
                    'pip install "nanobatch[otel]"')  # fmt: skip
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):  # no OTEL_SERVICE_NAME
        resource = resource.merge(Resource({SERVICE_NAME: "nanobatch"}))
    # It sends every OTEL_METRIC_EXPORT_INTERVAL (60 s by default), and once more when the run ends.
    reader = PeriodicExportingMetricReader(_exporter(env) or OTLPMetricExporter())
    return MeterProvider(metric_readers=[reader], resource=resource, shutdown_on_exit=False), True


def _exporter(env: Mapping[str, str]) -> Any:
    """The gRPC OTLP metric exporter if the environment asks for grpc; None for http/protobuf (the default).
    Each exporter reads its endpoint, headers and timeout from the environment itself."""
    protocol = (env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()  # fmt: skip
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPMetricExporter,
            )
        except ImportError:
            raise ConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL is grpc: pip install opentelemetry-exporter-otlp-proto-grpc, "
                "or send http/protobuf (the [otel] extra's)"
            ) from None
        return OTLPMetricExporter()
    if protocol != "http/protobuf":
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol}: nanobatch sends http/protobuf or grpc")
    return None
