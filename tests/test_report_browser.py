"""report.html in a real headless Chromium: it renders, filters work, nothing remote loads.

Needs the ``playwright`` Python package and Debian's Chromium at /usr/bin/chromium
(Playwright's own browser download is never used). CI installs both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from nanobatch.cli.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.browser
STATUSES = {"sku-1": "ok", "sku-2": "ok", "sku-3": "failed", "sku-4": "blocked", "sku-5": "ok", "sku-6": "rejected"}
VERDICT = {"passed": False, "failed": ["background"], "values": {"background": 0.81, "width": 480, "height": 640}}

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright is not importable (CI installs it: pip install playwright)",
    exc_type=ImportError,  # a broken install skips too, not only a missing one
)
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (CI installs it: apt-get install chromium)", allow_module_level=True)


def _record(item_id: str, status: str, n: int, images: Path) -> dict[str, Any]:
    ok = status == "ok"
    if status == "rejected":  # its image set aside under rejected/, its verdict in its record
        return {"id": item_id, "status": status, "outputs": [f"rejected/{item_id}.png"], "qa": VERDICT,
                "inputs": [str(images / f"{item_id}.jpg")], "latency_s": 30.0, "cost_usd": 0.1, "attempts": 2,
                "key": None, "started_at": None}  # fmt: skip
    return {
        "id": item_id,
        "status": status,
        "outputs": [f"{item_id}.png"] if ok else [],
        "inputs": [str(images / f"{item_id}.jpg")],
        "instructions": ["Replace the background with pure white <b>keep</b> the product"],
        "usage": {"promptTokenCount": 1312, "candidatesTokenCount": 1680 if ok else 0, "totalTokenCount": 2992},
        "attempts": 1 + n % 3,
        "key": None,
        "started_at": None,
        "latency_s": 20.0 + 17 * n,
        "cost_usd": 0.1 if ok else 0.0,
        "text": None if ok else "I can't help with editing this image.",
        "error": None if ok else {"kind": status, "status_code": 503 if status == "failed" else None, "message": "no"},
    }


@pytest.fixture
def report_path(tmp_path: Path) -> Path:
    images, out = tmp_path / "images", tmp_path / "catalog"
    images.mkdir()
    (out / "rejected").mkdir(parents=True)
    lines = []
    for n, (item_id, status) in enumerate(STATUSES.items()):
        Image.linear_gradient("L").resize((640, 480)).convert("RGB").save(images / f"{item_id}.jpg")
        if status in ("ok", "rejected"):
            folder = out / "rejected" if status == "rejected" else out
            Image.new("RGB", (480, 640), (250, 250, 250)).save(folder / f"{item_id}.png")
        lines.append(json.dumps(_record(item_id, status, n, images)))
    (out / "results.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return write_report(out)


def test_report_in_chromium(report_path: Path, tmp_path: Path) -> None:
    requests: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(20_000)
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(report_path.as_uri())

            assert page.title() == "nanobatch report — catalog"
            cards = page.locator("article.card")
            assert cards.count() == len(STATUSES)
            assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator("img").count() == 2 * 4 + 2  # ok and rejected items: before + after; others: before
            assert "Failed the output checks" in page.locator('article[data-id="sku-6"]').inner_text()

            for status in ("failed", "blocked", "rejected", "ok", "all"):
                page.locator(f'button[data-filter="{status}"]').click()
                visible = page.locator("article.card:visible")
                expected = sorted(i for i, s in STATUSES.items() if status in ("all", s))
                assert sorted(visible.evaluate_all("cs => cs.map(c => c.dataset.id)")) == expected
                pressed = page.locator('button[aria-pressed="true"]')
                assert pressed.get_attribute("data-filter") == status

            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
    assert errors == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
