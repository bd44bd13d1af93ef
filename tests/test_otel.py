"""OpenTelemetry's GenAI client metrics (the [otel] extra): read back with the SDK's in-memory reader, and as
an OTLP collector on loopback receives them; nothing of OpenTelemetry is loaded when it is not asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

import nanobatch.run.observer  # noqa: E402
from nanobatch.config import load_settings  # noqa: E402
from nanobatch.errors import ConfigError  # noqa: E402
from nanobatch.run.otel import meter_provider_from_environment  # noqa: E402

from .fakes import USAGE, FakeGemini, google_error, ok_body, run, run_now, write_job  # noqa: E402
from .receiver import receiver  # noqa: E402

Point = tuple[str, dict[str, Any], Any]  # metric name, attributes, data point


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryMetricReader]:
    """A MeterProvider with the SDK's in-memory reader, handed to every run as the environment's own."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(nanobatch.run.observer, "meter_provider_from_environment", lambda env: (provider, False))
    yield reader
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> list[Point]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        (metric.name, dict(point.attributes or {}), point)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    ]


def test_each_request_records_its_tokens_and_duration(tmp_path: Path, reader: InMemoryMetricReader) -> None:
    usage = {**USAGE, "thoughtsTokenCount": 200}
    job = write_job(tmp_path, [{"id": "a", "instruction": "one"}, {"id": "b", "instruction": "two"}])
    fake = FakeGemini({"one": [ok_body(usage=usage)], "two": [google_error(429, "RESOURCE_EXHAUSTED", "slow down"),
                                                               ok_body(usage=usage)]})  # fmt: skip
    assert run(job, fake).exit_code == 0
    found = points(reader)
    base = {"gen_ai.operation.name": "generate_content", "gen_ai.provider.name": "gcp.gemini",
            "gen_ai.request.model": "gemini-nano-banana-2.1"}  # fmt: skip
    tokens = {attrs["gen_ai.token.type"]: p for name, attrs, p in found if name == "gen_ai.client.token.usage"}
    assert set(tokens) == {"input", "output"}
    assert tokens["input"].count == 2 and tokens["input"].sum == 2 * USAGE["promptTokenCount"]
    assert tokens["output"].sum == 2 * (USAGE["candidatesTokenCount"] + 200)  # thinking is billed as output
    durations = {attrs.get("error.type"): (attrs, p) for name, attrs, p in found
                 if name == "gen_ai.client.operation.duration"}  # fmt: skip
    assert durations[None][1].count == 2 and durations["rate_limited"][1].count == 1
    assert {k: v for k, v in durations["rate_limited"][0].items() if k != "error.type"} == base
    assert all({k: v for k, v in attrs.items() if k != "gen_ai.token.type"} == base for name, attrs, _ in found
               if name == "gen_ai.client.token.usage")  # fmt: skip


def test_vertex_is_named_as_the_conventions_name_it() -> None:
    from nanobatch.run.otel import GenAiMetrics

    provider = MeterProvider(metric_readers=[reader := InMemoryMetricReader()])
    GenAiMetrics(provider, backend="vertex").record("gemini-3-pro-image", 3.5, {"promptTokenCount": 10}, None)
    [(_, attrs, point)] = [p for p in points(reader) if p[0] == "gen_ai.client.operation.duration"]
    assert attrs["gen_ai.provider.name"] == "gcp.vertex_ai" and point.sum == 3.5
    provider.shutdown()


@pytest.mark.parametrize(
    ("env", "configured"),
    [
        pytest.param({}, False, id="nothing-set"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True, id="endpoint"),
        pytest.param({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4318/v1/metrics"}, True, id="metrics"),
        pytest.param({"OTEL_METRICS_EXPORTER": "otlp"}, True, id="exporter"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_METRICS_EXPORTER": "none"}, False, id="none"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}, False, id="disabled"),
    ],
)
def test_the_standard_variables_turn_it_on(env: dict[str, str], configured: bool) -> None:
    found = meter_provider_from_environment(env)
    assert (found is not None) == configured
    if found is not None:
        provider, owned = found
        assert isinstance(provider, MeterProvider) and owned
        provider.shutdown(timeout_millis=100)


def test_a_protocol_it_cannot_send_is_refused() -> None:
    with pytest.raises(ConfigError, match="http/json: nanobatch sends http/protobuf or grpc"):
        meter_provider_from_environment(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )


def test_an_otlp_collector_receives_them_when_the_run_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    job = write_job(tmp_path, [{"id": "a", "instruction": "one"}])
    with receiver() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        assert run_now(job, FakeGemini(), settings=load_settings(env={})).exit_code == 0
    [body] = collector.bodies("/v1/metrics")
    export = ExportMetricsServiceRequest.FromString(body)
    [resource] = export.resource_metrics
    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
    names = {metric.name for scope in resource.scope_metrics for metric in scope.metrics}
    assert service == "nanobatch" and names == {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"}


def test_nothing_of_opentelemetry_is_loaded_unless_asked_for(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "one"}])
    probe = (
        "import anyio, sys, nanobatch\n"
        f"anyio.run(lambda: nanobatch.run_job({str(job)!r}, simulate=True, out_dir={str(tmp_path / 'out')!r}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "NANOBATCH_"))}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_batch_jobs_lines_record_their_tokens_but_no_duration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: InMemoryMetricReader
) -> None:
    from nanobatch.cli.main import main
    from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread

    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    config = tmp_path / "nanobatch.yaml"
    config.write_text("batch: {chunk_requests: 4, linger_s: 0.2, poll_initial_s: 0.05, poll_max_s: 0.2}\n")
    job = write_job(tmp_path, [{"id": f"sku-{n}", "instruction": f"edit {n}"} for n in range(3)])
    app = create_app(SimulatorConfig(batch_latency_s=0.3, seed=5))
    with run_in_thread(app=app) as url:
        argv = ["run", str(job), "--base-url", url, "--tier", "batch", "--config", str(config), "--quiet"]
        assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    found = points(reader)
    tokens = {attrs["gen_ai.token.type"]: p for name, attrs, p in found if name == "gen_ai.client.token.usage"}
    assert tokens["input"].count == 3 and tokens["output"].count == 3
    assert [name for name, _, _ in found if name == "gen_ai.client.operation.duration"] == []
