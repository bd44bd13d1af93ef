"""Today's models: lifecycle warnings and problems, the simulator's model list, ``nanobatch models``, README."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from nanobatch import costs, models
from nanobatch.api.client import GeminiClient
from nanobatch.cli.catalog import compare_live, model_rows, model_table_markdown, price_table_markdown
from nanobatch.cli.main import main
from nanobatch.simulator import create_app

from .fakes import write_job

GOOGLE = "https://generativelanguage.googleapis.com"
APIYI = "https://api.apiyi.com"
README = Path(__file__).parent.parent / "README.md"


def validate(tmp_path: Path, model: str, base_url: str) -> int:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}], model=model)
    return main(["validate", str(job), "--base-url", base_url])


@pytest.mark.parametrize(
    ("model", "day", "status"),
    [
        pytest.param("gemini-nano-banana-2.1", None, "GA", id="nano-banana-2.1"),
        pytest.param("gemini-3.1-flash-image", None, "deprecated", id="3.1-flash"),
        pytest.param("gemini-3.1-flash-image", datetime.date(2026, 10, 5), "GA", id="3.1-flash-before-deprecation"),
        pytest.param("gemini-2.5-flash-image", None, "shut down", id="2.5-flash"),
        pytest.param("gemini-3.1-flash-image-preview", None, "shut down", id="preview"),
        pytest.param("gemini-3.1-flash-image-preview", datetime.date(2026, 6, 24), "deprecated", id="preview-earlier"),
    ],
)
def test_status_follows_the_dates(model: str, day: datetime.date | None, status: str) -> None:
    life = models.lifecycle(model)
    assert life is not None and life.status(day or datetime.date(2026, 11, 29)) == status


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_deprecated_model_warns_and_names_its_replacement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    if command == "validate":
        assert validate(tmp_path, "gemini-3.1-flash-image", GOOGLE) == 0
    else:
        job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}], model="gemini-3.1-flash-image")
        assert main(["run", str(job), "--simulate", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "gemini-3.1-flash-image is deprecated since 2026-10-06; use gemini-nano-banana-2.1" in err


@pytest.mark.parametrize(
    ("model", "base_url", "said"),
    [
        ("gemini-3.1-flash-image-preview", GOOGLE, "2026-06-25"),
        ("gemini-2.5-flash-image", GOOGLE + "/v1beta/", "2026-10-02"),
        ("gemini-3.1-flash-image-preview", "https://GenerativeLanguage.googleapis.com", "2026-06-25"),
        ("gemini-2.5-flash-image-preview", GOOGLE, "2026-10-02"),  # not listed: no longer served than its model
    ],
    ids=["preview", "2.5-flash-with-a-path", "host-in-capitals", "unlisted-preview-of-a-shut-down-model"],
)
def test_a_shut_down_id_sent_to_google_is_a_problem_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, base_url: str, said: str
) -> None:
    assert validate(tmp_path, model, base_url) == 2
    err = capsys.readouterr().err
    assert f"shut down at Google on {said}" in err and "use gemini-nano-banana-2.1" in err


def test_a_url_that_only_mentions_googles_host_is_a_proxy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate(tmp_path, "gemini-3-pro-image-preview", "https://proxy.test/generativelanguage.googleapis.com") == 0
    assert "known proxies still map it" in capsys.readouterr().err


def test_a_shut_down_id_sent_to_a_proxy_only_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate(tmp_path, "gemini-3-pro-image-preview", APIYI) == 0
    err = capsys.readouterr().err
    assert "shut down at Google on 2026-06-25 (known proxies still map it); use gemini-3-pro-image" in err


def test_today_comes_from_one_place_tests_can_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "today", lambda: datetime.date(2026, 6, 1))
    assert validate(tmp_path, "gemini-3.1-flash-image-preview", GOOGLE) == 0  # before its shutdown


def test_the_default_model_is_live_at_google() -> None:
    from nanobatch.config import ApiSettings

    life = models.lifecycle(ApiSettings().model)
    assert life is not None and life.status(datetime.date(2026, 11, 29)) == "GA"


async def _sim(method: str, path: str, body: dict[str, Any] | None = None) -> httpx2.Response:
    transport = httpx2.ASGITransport(app=create_app())
    async with httpx2.AsyncClient(transport=transport, base_url="http://sim") as client:
        return await client.request(method, path, json=body)


def _edit(size: str, ratio: str | None = None) -> dict[str, Any]:
    config = {"imageSize": size, **({"aspectRatio": ratio} if ratio else {})}
    return {"contents": [{"parts": [{"text": "a lemon"}]}],
            "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": config}}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "size", "code"),
    [
        pytest.param("gemini-nano-banana-2.1", "512", 400, id="512-on-nano-banana-2.1"),
        pytest.param("gemini-nano-banana-2.1", "1K", 200, id="1K-on-nano-banana-2.1"),
        pytest.param("gemini-3.1-flash-lite-image", "2K", 400, id="2K-on-lite"),
        pytest.param("gemini-3.1-flash-lite-image", "1K", 200, id="1K-on-lite"),
        pytest.param("gemini-3.1-flash-image-preview", "1K", 404, id="shut-down-preview"),
        pytest.param("gemini-2.5-flash-image", "1K", 404, id="shut-down-2.5-flash"),
        pytest.param("gemini-3.1-flash-lite-image", "4K", 400, id="4K-on-lite"),
        pytest.param("gemini-nano-banana-2.1", "1K:8:1", 200, id="8:1-on-nano-banana-2.1"),
        pytest.param("gemini-3-pro-image", "1K:8:1", 400, id="8:1-on-pro"),
    ],
)
def test_the_simulator_knows_each_models_limits(model: str, size: str, code: int) -> None:
    size, _, ratio = size.partition(":")
    response = anyio.run(_sim, "POST", f"/v1beta/models/{model}:generateContent", _edit(size, ratio or None))
    assert response.status_code == code
    if code == 404:
        assert response.json()["error"]["status"] == "NOT_FOUND"


def test_listing_models_follows_every_page() -> None:
    async def listing() -> list[dict[str, Any]]:
        transport = httpx2.ASGITransport(app=create_app())
        async with GeminiClient(base_url="http://sim", api_key=None, transport=transport) as client:
            return await client.list_models(page_size=2)

    entries = anyio.run(listing)
    names = {e["name"] for e in entries}
    assert "models/gemini-nano-banana-2.1" in names and "models/gemini-3.1-flash-image-preview" not in names
    assert all("batchGenerateContent" in e["supportedGenerationMethods"] for e in entries)
    found = compare_live(entries)
    assert found["missing"] == [] and "gemini-nano-banana-2.1" in found["batch"]


def test_compare_live_names_unknown_image_models_and_missing_table_models() -> None:
    listed = [{"name": "models/gemini-9-flash-image", "supportedGenerationMethods": ["generateContent"]},
              {"name": "models/gemini-nano-banana-2.1", "supportedGenerationMethods": ["generateContent"]}]  # fmt: skip
    found = compare_live(listed)
    assert found["unknown"] == ["gemini-9-flash-image"]
    assert "gemini-3-pro-image" in found["missing"] and "gemini-2.5-flash-image" not in found["missing"]
    assert found["batch"] == []


def test_models_json_has_every_tiers_price(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)["models"]}
    nb = rows["gemini-nano-banana-2.1"]["image_price_usd"]
    assert nb["standard"]["1K"] == pytest.approx(0.0336)
    assert nb["flex"]["1K"] == nb["batch"]["1K"] == pytest.approx(0.0168)
    assert nb["priority"]["1K"] == pytest.approx(0.0672)
    assert set(rows["gemini-3.1-flash-lite-image"]["image_price_usd"]) == {"standard", "batch"}
    assert rows["gemini-2.5-flash-image"]["replacement"] == "gemini-nano-banana-2.1"


def test_models_piped_prints_the_readme_tables_as_aligned_columns(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[lines.index("Models:") + 1]
    assert re.split(r"\s{2,}", header) == ["id", "status", "aspect ratios", "sizes", "max references", "backends"]
    table = lines[lines.index("Models:") + 2 : lines.index("")]
    by_id = {line.split()[0]: line for line in table}
    assert set(by_id) >= {row["id"] for row in model_rows()}
    pro = by_id["gemini-3-pro-image"]
    assert re.split(r"\s{2,}", pro) == ["gemini-3-pro-image", "GA", "10", "1K 2K 4K", "14", "gemini vertex"]
    for column in ("status", "sizes", "backends"):  # every cell starts under its heading
        assert all(line[header.index(column) - 2 : header.index(column)] == "  " for line in by_id.values())
    prices = lines[lines.index("Price of one output image, US dollars:") + 1 :]
    assert re.split(r"\s{2,}", prices[0].strip()) == ["model", "tier", "512", "1K", "2K", "4K"]
    flex = next(line for line in prices if line.startswith("gemini-nano-banana-2.1") and " flex " in line)
    assert flex.split()[2:] == ["–", "$0.0168", "$0.0252", "$0.0567"]
    assert len({len(line) for line in prices}) == 1  # amounts aligned to the right, in columns


def test_models_on_a_terminal_prints_tables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERM", "xterm")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "gemini-3-pro-image " in line and "GA" in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == [
        "gemini-3-pro-image", "GA", "10", "1K 2K 4K", "14", "gemini vertex"
    ]  # fmt: skip
    assert "Price of one output image" in out and "$0.0168" in out


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_models_live_compares_with_the_endpoint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    from nanobatch.simulator import SimulatorConfig, run_in_thread

    monkeypatch.setenv("NANOBATCH_API_KEY", "k-0123456789")  # an endpoint that wants a key gets it
    with run_in_thread(SimulatorConfig(api_key="k-0123456789")) as url:
        assert main(["models", "--live", "--base-url", url, *(["--json"] if as_json else [])]) == 0
    out = capsys.readouterr().out
    if as_json:
        live = json.loads(out)["live"]
        assert live["missing"] == [] and live["unknown"] == [] and "gemini-nano-banana-2.1" in live["batch"]
        return
    assert "table models the endpoint no longer lists: none" in out
    assert "support batchGenerateContent: " in out and "gemini-nano-banana-2.1" in out


def test_readme_tables_are_the_codes_tables() -> None:
    text = README.read_text()
    day = datetime.date(2026, 11, 29)
    assert model_table_markdown(day) in text
    assert price_table_markdown(day) in text


def test_every_row_cites_its_sources() -> None:
    assert all(row["sources"] and all("(20" in s for s in row["sources"]) for row in model_rows())


def test_every_example_to_copy_names_a_model_google_still_serves() -> None:
    import re

    repo = README.parent
    blocks = README.read_text().split("\n```")[1::2]  # what is between a line opening a fence and its closing line
    texts = {"README code blocks": "\n".join(blocks), "config.example.yaml": (repo / "config.example.yaml").read_text()}
    texts.update({str(p.relative_to(repo)): p.read_text() for p in sorted((repo / "jobs").glob("*.yaml"))})
    day = datetime.date(2026, 11, 29)
    model_id = re.compile(r"gemini-(?:nano-banana-\d+(?:\.\d+)*|[0-9a-z.-]*image(?:-preview)?)\b")
    named = {where: set(model_id.findall(text)) for where, text in texts.items()}
    assert named["README code blocks"] and named["jobs/example.yaml"]  # the scan sees the examples' models
    for where, found in named.items():
        for model in found:
            life = models.lifecycle(model)
            assert life is not None and life.status(day) != "shut down", (where, model)


def test_readme_token_prices_are_the_codes_prices() -> None:
    table = README.read_text().split("| model | input | output image | output text/thinking |\n|---|---|---|---|\n")[1]
    rows = [line.strip("|").split("|") for line in table.split("\n\n", 1)[0].splitlines()]
    assert {r[0].strip() for r in rows} == {m for m in models.MODELS if not m.endswith("-preview")}
    for model, *prices in rows:
        pricing = costs.pricing_for(model.strip())
        assert [float(p) for p in prices] == [pricing.input, pricing.output_image, pricing.output_text], model
