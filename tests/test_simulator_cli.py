"""Settings and ``nanobatch simulate``: config checks, option parsing, the command, real loopback sockets."""

from __future__ import annotations

import base64
import io
import random
import statistics
from typing import Any

import click
import httpx2
import pytest
from click.testing import CliRunner
from PIL import Image

from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread
from nanobatch.simulator._cli import FAULT_MIX, parse_batch_faults, parse_fault_rates, parse_latency, simulate
from nanobatch.simulator.faults import sample_latency

PATH = "/v1beta/models/gemini-3.1-flash-image:generateContent"


def payload() -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 200)).save(buffer, "PNG")
    image = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(buffer.getvalue()).decode()}}
    return {
        "contents": [{"parts": [{"text": "Make it black and white"}, image]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "1:1", "imageSize": "512"},
        },
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.2", {"latency": "fixed", "latency_s": 0.2, "latency_spread": 0.0}),
        ("fixed:3", {"latency": "fixed", "latency_s": 3.0, "latency_spread": 0.0}),
        ("uniform:1,5", {"latency": "uniform", "latency_s": 3.0, "latency_spread": 2.0}),
        ("lognormal:40,0.5", {"latency": "lognormal", "latency_s": 40.0, "latency_spread": 0.5}),
    ],
)
def test_parse_latency(text: str, expected: dict[str, Any]) -> None:
    assert parse_latency(text) == expected
    SimulatorConfig(**parse_latency(text))  # and the config takes it


@pytest.mark.parametrize("text", ["", "fast", "-1", "uniform:5,1", "uniform:1", "lognormal:0,0.5", "gauss:1,2"])
def test_parse_latency_rejects_nonsense(text: str) -> None:
    with pytest.raises(click.BadParameter, match="expected|negative"):
        parse_latency(text)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], {}),
        (["429=0.1", "drop=0.01"], {"rate_429": 0.1, "rate_drop": 0.01}),
        (["503=0.05,image-safety=0.02"], {"rate_503": 0.05, "rate_image_safety": 0.02}),
        (["NO_IMAGE=0.02", "text_only=0.01"], {"rate_no_image": 0.02, "rate_text_only": 0.01}),
        (["qa_grey=0.1,qa-wrong-shape=0.2"], {"rate_qa_grey": 0.1, "rate_qa_wrong_shape": 0.2}),
    ],
)
def test_parse_fault_rates(values: list[str], expected: dict[str, float]) -> None:
    assert parse_fault_rates(values) == expected


def test_a_bare_fault_rate_is_split_into_a_mix_that_explicit_kinds_override() -> None:
    rates: dict[str, Any] = parse_fault_rates(["0.1", "drop=0.03"])
    assert rates["rate_drop"] == 0.03
    assert rates["rate_503"] == pytest.approx(0.1 * FAULT_MIX["503"])
    assert sum(rates.values()) == pytest.approx(0.1 - 0.1 * FAULT_MIX["drop"] + 0.03)
    assert sum(FAULT_MIX.values()) == pytest.approx(1.0)
    assert not any(name.startswith("rate_qa_") for name in rates)  # bad images for the checks only when asked
    SimulatorConfig(**rates)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["timeout=0.1"], "unknown fault kind"),
        (["429=lots"], "expected a rate"),
        (["1.5"], "between 0 and 1"),
        (["429=0.7", "503=0.7"], "at most 1"),
    ],
)
def test_parse_fault_rates_rejects_nonsense(values: list[str], message: str) -> None:
    with pytest.raises(click.BadParameter, match=message):
        parse_fault_rates(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["failed"], "KIND=RATE"),
        (["slow=0.1"], "KIND=RATE"),
        (["expired=2"], "between 0 and 1"),
        (["failed=0.6", "expired=0.6"], "at most 1"),
    ],
)
def test_parse_batch_faults_rejects_nonsense(values: list[str], message: str) -> None:
    with pytest.raises(click.BadParameter, match=message):
        parse_batch_faults(values)


def test_latency_models_sample_where_they_should() -> None:
    rng = random.Random(0)
    uniform = SimulatorConfig(latency="uniform", latency_s=3, latency_spread=2)
    assert all(1 <= sample_latency(uniform, rng) <= 5 for _ in range(200))
    lognormal = SimulatorConfig(latency="lognormal", latency_s=40, latency_spread=0.5)
    samples = [sample_latency(lognormal, rng) for _ in range(2000)]
    assert 36 < statistics.median(samples) < 44 and max(samples) > 80
    assert sample_latency(SimulatorConfig(latency_s=7), rng) == 7


def test_simulate_builds_the_config_and_never_prints_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[str, Any] = {}

    def fake_serve(config: SimulatorConfig, host: str, port: int, **kwargs: Any) -> None:
        served.update(config=config, host=host, port=port)
        kwargs["on_ready"](f"http://{host}:{port}")

    monkeypatch.setattr("nanobatch.simulator.server.serve", fake_serve)  # imported by the command when it runs
    monkeypatch.setenv("SIM_KEY", "very-secret-key")
    args = [
        "--port",
        "8123",
        "--latency",
        "uniform:1,5",
        "--time-scale",
        "0.01",
        "--fault-rate",
        "503=0.1",
        "--rpm-limit",
        "10",
        "--daily-limit",
        "100",
        "--seed",
        "7",
        "--api-key-env",
        "SIM_KEY",
        "--batch-latency",
        "120",
        "--batch-fault",
        "failed=0.2,line_error=0.05",
        "--batch-fault",
        "lost-create=1",
    ]
    result = CliRunner().invoke(simulate, args)
    assert result.exit_code == 0, result.output
    config = served["config"]
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    assert (config.latency, config.latency_s, config.latency_spread) == ("uniform", 3.0, 2.0)
    assert (config.time_scale, config.rate_503, config.rpm_limit, config.daily_limit, config.seed) == (
        0.01,
        0.1,
        10,
        100,
        7,
    )
    assert (config.batch_latency_s, config.batch_rate_failed, config.batch_rate_expired) == (120.0, 0.2, 0.0)
    assert (config.batch_rate_line_error, config.batch_rate_lost_create) == (0.05, 1.0)
    assert config.api_key == "very-secret-key"
    assert "--base-url http://127.0.0.1:8123" in result.output
    assert "very-secret-key" not in result.output


def test_simulate_refuses_an_unset_key_variable() -> None:
    result = CliRunner().invoke(simulate, ["--api-key-env", "NO_SUCH_VARIABLE_SET"])
    assert result.exit_code == 2 and "NO_SUCH_VARIABLE_SET is not set" in result.output


def test_serves_over_loopback_and_drops_connections_for_real() -> None:
    app = create_app(SimulatorConfig(seed=1, rate_drop=0.5))
    with run_in_thread(app=app, port=0) as base_url:
        assert base_url.startswith("http://127.0.0.1:") and not base_url.endswith(":0")
        outcomes = []
        with httpx2.Client(base_url=base_url, timeout=10) as client:
            for _ in range(6):
                try:
                    response = client.post(PATH, json=payload())
                except httpx2.RemoteProtocolError:
                    outcomes.append("drop")
                    continue
                assert response.status_code == 200
                image = response.json()["candidates"][0]["content"]["parts"][-1]["inlineData"]["data"]
                assert Image.open(io.BytesIO(base64.b64decode(image))).size == (512, 512)
                outcomes.append("ok")
    assert {"ok", "drop"} <= set(outcomes)
    stats = app.state.stats
    assert (
        stats.received == 6 and stats.dropped == outcomes.count("drop") and stats.by_status[200] == outcomes.count("ok")
    )
    with pytest.raises(httpx2.ConnectError):  # shut down on exit
        httpx2.post(base_url + PATH, json=payload(), timeout=2)


def test_run_in_thread_reports_a_port_it_cannot_take() -> None:
    with run_in_thread(SimulatorConfig()) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        with pytest.raises(OSError, match="could not listen"), run_in_thread(SimulatorConfig(), port=port):
            pass


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_503": 1.5},
        {"rate_503": 0.6, "rate_429": 0.6},
        {"latency": "gaussian"},
        {"rpm_limit": 0},
        {"time_scale": -1},
        {"image_format": "gif"},
        {"batch_latency_s": -1},
        {"batch_rate_line_error": 1.5},
        {"batch_rate_failed": 0.6, "batch_rate_expired": 0.6},
    ],
)
def test_config_rejects_impossible_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulatorConfig(**kwargs)


def test_config_repr_hides_the_api_key() -> None:
    assert "hunter2" not in repr(SimulatorConfig(api_key="hunter2"))
