"""Service tiers: serviceTier in the body, tier prices in records and budgets, flex shedding and its fallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest

from nanobatch import costs, models
from nanobatch.api.gemini import build_request
from nanobatch.cli.main import main
from nanobatch.config import load_settings
from nanobatch.simulator import SimulatorConfig, run_in_thread

from .fakes import manifest_problems, records, write_job

CONFIG = """
limits: {concurrency: 4, breaker_threshold: 1000}
retry: {max_attempts: 3, backoff_initial_s: 0.01, backoff_max_s: 0.02, no_image_attempts: 1}
"""


@pytest.mark.parametrize(
    ("tier", "wire"),
    [
        pytest.param(None, None, id="none"),
        pytest.param("standard", None, id="standard-left-out"),
        pytest.param("flex", "flex", id="flex"),
        pytest.param("priority", "priority", id="priority"),
    ],
)
def test_the_tier_is_the_bodys_top_level_service_tier(tier: str | None, wire: str | None) -> None:
    body = build_request("make it white", service_tier=tier)
    assert body.get("serviceTier") == wire
    assert "serviceTier" not in body["generationConfig"]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")


def run(
    tmp_path: Path, config: SimulatorConfig, *args: str, fallback: bool = True, items: Any = None
) -> tuple[int, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "nanobatch.yaml").write_text(CONFIG.replace("}", f", flex_fallback: {str(fallback).lower()}}}", 1))
    items = items or [{"id": f"sku-{n}", "image": "images/p.png"} for n in range(4)]
    job = write_job(tmp_path, items, model="gemini-nano-banana-2.1")
    out = tmp_path / "out"
    with run_in_thread(config) as url:
        code = main(["run", str(job), "--base-url", url, "--out", str(out), "--config",
                     str(tmp_path / "nanobatch.yaml"), "--quiet", *args])  # fmt: skip
    return code, out


def test_flex_costs_half_of_standard_and_is_recorded(tmp_path: Path) -> None:
    code, standard_out = run(tmp_path / "a", SimulatorConfig())
    assert code == 0
    code, flex_out = run(tmp_path / "b", SimulatorConfig(), "--tier", "flex")
    assert code == 0
    standard, flex = records(standard_out), records(flex_out)
    assert {r["tier"] for r in standard} == {"standard"} and {r["tier"] for r in flex} == {"flex"}
    assert not any(r["fallback"] for r in flex)
    assert sum(r["cost_usd"] for r in flex) == pytest.approx(sum(r["cost_usd"] for r in standard) / 2, rel=0.01)


def test_shed_flex_requests_fall_back_to_standard_visibly(tmp_path: Path) -> None:
    code, out = run(tmp_path, SimulatorConfig(flex_shed=1.0), "--tier", "flex")
    assert code == 0
    found = records(out)
    assert {r["status"] for r in found} == {"ok"}
    assert {(r["tier"], r["fallback"]) for r in found} == {("standard", True)}
    assert all(r["attempts"] == 4 for r in found)  # three tries on flex, then one at standard price
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_run"]["fallbacks"] == 4 and summary["last_run"]["tier"] == "flex"


def test_without_fallback_a_shed_flex_request_fails_and_nothing_is_paid_at_standard(tmp_path: Path) -> None:
    code, out = run(tmp_path, SimulatorConfig(flex_shed=1.0), "--tier", "flex", fallback=False)
    assert code == 1
    found = records(out)
    assert {r["status"] for r in found} == {"failed"} and {r["error"]["kind"] for r in found} == {"overloaded"}
    assert {(r["tier"], r["fallback"]) for r in found} == {("flex", False)}
    assert json.loads((out / "summary.json").read_text())["last_run"]["fallbacks"] == 0


def test_an_items_tier_wins_over_the_configured_one(tmp_path: Path) -> None:
    items = [{"id": "plain", "image": "images/p.png"}, {"id": "rush", "image": "images/p.png", "tier": "priority"}]
    code, out = run(tmp_path, SimulatorConfig(), "--tier", "flex", items=items)
    assert code == 0
    by_id = {r["id"]: r for r in records(out)}
    assert by_id["plain"]["tier"] == "flex" and by_id["rush"]["tier"] == "priority"
    assert by_id["rush"]["cost_usd"] > 3 * by_id["plain"]["cost_usd"]  # 2x standard against 0.5x


def test_a_tier_the_model_is_not_sold_in_is_a_manifest_problem(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "tier": "flex"}, {"id": "b", "tier": "cheap"}],
                    model="gemini-3.1-flash-lite-image")  # fmt: skip
    problems = {(p.item, p.field): p.message for p in manifest_problems(job)}
    assert "not sold in the flex tier" in problems[("a", "tier")]
    assert "not a service tier" in problems[("b", "tier")]


def test_pricing_overrides_can_be_set_per_tier(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "pricing:\n  gemini-nano-banana-2.1: {output_image: 40, flex: {output_image: 12}}\n"
    )
    pricing = load_settings(tmp_path / "c.yaml", env={}).pricing
    assert costs.pricing_for("gemini-nano-banana-2.1", pricing).output_image == 40
    assert costs.pricing_for("gemini-nano-banana-2.1", pricing, "flex").output_image == 12
    assert costs.pricing_for("gemini-nano-banana-2.1", pricing, "priority").output_image == 80  # scaled standard
    assert costs.pricing_for("gemini-nano-banana-2.1", pricing, "batch").output_image == 20


@pytest.mark.parametrize(
    ("usage", "tier"),
    [
        pytest.param({"serviceTier": "FLEX"}, "flex", id="flex"),
        pytest.param({"serviceTier": "standard"}, "standard", id="lower-case"),
        pytest.param({"serviceTier": "SERVICE_TIER_PRIORITY"}, "priority", id="enum-prefix"),
        pytest.param({}, None, id="not-said"),
        pytest.param({"serviceTier": "gold"}, None, id="unknown"),
    ],
)
def test_the_reported_tier_is_read_from_usage_metadata(usage: dict[str, Any], tier: str | None) -> None:
    assert costs.reported_tier(usage) == tier


def test_a_header_naming_no_tier_leaves_the_usage_to_say() -> None:
    assert costs.reported_tier({"serviceTier": "FLEX"}, "paid") == "flex"  # a proxy's own header value
    assert costs.reported_tier({}, "PRIORITY") == "priority" and costs.reported_tier({}, None) is None


def test_priority_requests_served_at_standard_are_recorded_and_priced_at_standard(tmp_path: Path) -> None:
    # Past the project's priority limit the Gemini API serves a priority request at standard, and says so only in
    # its x-gemini-service-tier header: priced at priority, each image would be recorded at twice what it cost.
    code, priority_out = run(tmp_path / "a", SimulatorConfig(), "--tier", "priority")
    assert code == 0
    code, served_out = run(tmp_path / "b", SimulatorConfig(rate_priority_standard=1.0), "--tier", "priority")
    assert code == 0
    priority, served = records(priority_out), records(served_out)
    assert {r["tier"] for r in priority} == {"priority"} and {r["tier"] for r in served} == {"standard"}
    assert sum(r["cost_usd"] for r in served) == pytest.approx(sum(r["cost_usd"] for r in priority) / 2, rel=0.01)


@pytest.mark.parametrize(
    ("usage", "headers"),
    [
        pytest.param({"serviceTier": "STANDARD"}, {}, id="a proxy's usageMetadata"),
        pytest.param({}, {"x-gemini-service-tier": "standard"}, id="the Gemini API's header"),
        pytest.param({"serviceTier": "FLEX"}, {"x-gemini-service-tier": "standard"}, id="the header wins"),
    ],
)
def test_cost_follows_the_tier_the_answer_reports(
    tmp_path: Path, usage: dict[str, str], headers: dict[str, str]
) -> None:
    """Asked for flex, served (and billed) at standard: the record says so and costs standard price."""
    import nanobatch

    from .conftest import run_virtual
    from .fakes import USAGE, FakeGemini, ok_body

    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "tier": "flex"}], model="gemini-nano-banana-2.1")
    answer = httpx2.Response(200, json=ok_body(usage={**USAGE, **usage}), headers=headers)
    served = FakeGemini({"make the background white": [answer]})
    run_virtual(lambda: nanobatch.run_job(job, transport=served.transport, out_dir=tmp_path / "out"))
    asked = FakeGemini()
    run_virtual(lambda: nanobatch.run_job(job, transport=asked.transport, out_dir=tmp_path / "out2"))
    (billed,), (flex,) = records(tmp_path / "out"), records(tmp_path / "out2")
    assert json.loads(served.requests[0].content)["serviceTier"] == "flex"
    assert billed["tier"] == "standard" and flex["tier"] == "flex"
    assert billed["cost_usd"] == pytest.approx(2 * flex["cost_usd"])


def test_flex_requests_wait_long_enough_for_a_flex_answer(tmp_path: Path) -> None:
    """Flex answers take 1-15 minutes: its requests get a read timeout that fits, standard ones keep theirs."""
    import nanobatch

    from .conftest import run_virtual
    from .fakes import FakeGemini

    items = [{"id": "a", "image": "images/a.png", "tier": "flex"}, {"id": "b", "image": "images/a.png"}]
    job = write_job(tmp_path, items, model="gemini-nano-banana-2.1")
    fake = FakeGemini()
    run_virtual(lambda: nanobatch.run_job(job, transport=fake.transport, out_dir=tmp_path / "out"))
    read = {json.loads(r.content).get("serviceTier", "standard"): r.extensions["timeout"]["read"]
            for r in fake.requests}  # fmt: skip
    assert read == {"flex": models.FLEX_TIMEOUT_S, "standard": 300}


def test_a_partly_shed_flex_run_counts_exactly_the_items_sent_at_standard_price(tmp_path: Path) -> None:
    items = [{"id": f"sku-{n}", "image": "images/p.png"} for n in range(12)]
    code, out = run(tmp_path, SimulatorConfig(flex_shed=0.6, seed=7), "--tier", "flex", items=items)
    assert code == 0
    found = records(out)
    fell_back = [r for r in found if r["fallback"]]
    assert 0 < len(fell_back) < 12 and {r["tier"] for r in fell_back} == {"standard"}
    assert {r["tier"] for r in found if not r["fallback"]} == {"flex"}
    assert json.loads((out / "summary.json").read_text())["last_run"]["fallbacks"] == len(fell_back)


def test_google_genai_reads_the_tier_that_served_it_where_google_documents_it() -> None:
    """The official SDK (code we did not write) asks for priority, and reads a downgrade to standard as Google's
    priority-inference page shows: in the answer's x-gemini-service-tier header, which the simulator sends."""
    genai = pytest.importorskip("google.genai")
    types = pytest.importorskip("google.genai.types")
    from .fakes import image_bytes

    said = []
    for rate in (0.0, 1.0):
        with run_in_thread(SimulatorConfig(seed=6, rate_priority_standard=rate)) as url:
            client = genai.Client(api_key="sim-key", http_options=types.HttpOptions(base_url=url))
            answer = client.models.generate_content(
                model="gemini-nano-banana-2.1",
                contents=[types.Part.from_bytes(data=image_bytes(), mime_type="image/png"), "make the sky purple"],
                config=types.GenerateContentConfig(response_modalities=["IMAGE"], service_tier="priority"),
            )
        said.append(answer.sdk_http_response.headers.get("x-gemini-service-tier"))
    assert said == ["priority", "standard"]
