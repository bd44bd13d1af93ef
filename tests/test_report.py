"""nanobatch.cli.report: report.html from results.jsonl (no browser; see test_report_browser.py)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from nanobatch.cli.report import write_report

CARD_RE = re.compile(r'<article class="card [^"]*" data-status="([^"]*)" data-id="([^"]*)">')
DATA_URI_RE = re.compile(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')
XSS = "<script>alert(1)</script>"


def _photo(path: Path, size: tuple[int, int], fmt: str, mode: str = "RGB") -> Path:
    """A noisy image (noise defeats compression, so the file is realistically large)."""
    bands = [Image.effect_noise(size, 60).point(lambda v, k=k: (v + 40 * k) % 256) for k in range(len(mode))]
    Image.merge(mode, bands).save(path, fmt)
    return path


def _usage(prompt: int, out: int, thoughts: int) -> dict[str, int]:
    return {
        "promptTokenCount": prompt,
        "candidatesTokenCount": out,
        "thoughtsTokenCount": thoughts,
        "totalTokenCount": prompt + out + thoughts,
    }


def _records(images: Path) -> list[dict[str, Any]]:
    # The fields nanobatch writes on every record (another tool's lines get no card: own.is_own_record).
    base = {"model": "gemini-3.1-flash-image", "aspect_ratio": "1:1", "image_size": "2K", "key": None,
            "started_at": None}  # fmt: skip
    # fmt: off
    return [
        {  # superseded by the later sku-1001 line
            **base, "id": "sku-1001", "status": "failed", "outputs": [], "attempts": 6, "latency_s": 300.0,
            "cost_usd": 0.5, "usage": _usage(9999, 0, 0), "instructions": ["Replace the background with pure white"],
            "inputs": [str(images / "sku-1001.jpg")],
            "error": {"kind": "timeout", "status_code": None, "message": "read timeout"},
        },
        {"event": "dispatched", "id": "sku-1002", "at": "2026-11-25T10:00:00Z"},
        {
            **base, "id": "sku-1001", "status": "ok", "outputs": ["sku-1001.png"], "finish_reason": "STOP",
            "text": None, "usage": _usage(1312, 1680, 120), "steps": None, "attempts": 1, "latency_s": 41.7,
            "cost_usd": 0.1015, "error": None, "instructions": ["Replace the background with pure white"],
            "inputs": [str(images / "sku-1001.jpg")],
            "started_at": "2026-11-25T10:00:00Z", "finished_at": "2026-11-25T10:00:41Z",
        },
        {
            **base, "id": "sku-1002", "status": "failed", "outputs": [], "finish_reason": None, "text": None,
            "usage": None, "attempts": 6, "latency_s": 12.5, "cost_usd": 0.0, "instructions": [XSS],
            "inputs": ["../images/broken.jpg", str(images / "moved-away.jpg")],
            "error": {"kind": "server_error", "status_code": 502, "message": "<html><body>Bad Gateway</body></html>"},
        },
        {
            **base, "id": "sku-1003", "status": "blocked", "outputs": [], "finish_reason": "IMAGE_SAFETY",
            "text": "I can't edit this image: it shows a real person.", "usage": _usage(1300, 0, 80),
            "attempts": 2, "latency_s": 8.0, "cost_usd": 0.002, "instructions": ["Swap the face"],
            "inputs": ["https://cdn.example.com/photos/sku-1003.jpg"],
            "error": {"kind": "blocked", "status_code": None, "message": "finishReason IMAGE_SAFETY"},
        },
        {
            **base, "id": "hero", "status": "ok", "outputs": ["hero.png"], "finish_reason": "STOP",
            "usage": _usage(2600, 3360, 0), "attempts": 1, "latency_s": 95.0, "cost_usd": 0.2,
            "inputs": ["../images/logo.png", str(images / "model.jpg")],
            "steps": [
                {"instruction": "Put the logo on the t-shirt", "finish_reason": "STOP", "outputs": ["hero-1.png"]},
                {"instruction": "Make the light warmer", "finish_reason": "STOP", "outputs": ["hero.png"]},
            ],
        },
        {"id": "legacy", "status": "ok", "attempts": 1, "key": None, "started_at": None},  # almost nothing in it
    ]
    # fmt: on


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real images, made once: noisy ones are slow to encode."""
    root = tmp_path_factory.mktemp("pictures")
    (root / "images").mkdir()
    (root / "spring-catalog").mkdir()
    _photo(root / "images" / "sku-1001.jpg", (1600, 1200), "JPEG")
    _photo(root / "images" / "logo.png", (400, 300), "PNG", mode="RGBA")
    (root / "images" / "broken.jpg").write_bytes(b"this is not a JPEG")
    _photo(root / "spring-catalog" / "sku-1001.png", (1200, 1600), "PNG")
    return root


@pytest.fixture
def out_dir(tmp_path: Path, pictures: Path) -> Path:
    """A run's output folder: real images, a results.jsonl with history and a torn last line."""
    shutil.copytree(pictures, tmp_path, dirs_exist_ok=True)
    images, out = tmp_path / "images", tmp_path / "spring-catalog"
    # hero.png was deleted and images/model.jpg was moved away: placeholders, not crashes.
    lines = [json.dumps(r) for r in _records(images)]
    (out / "results.jsonl").write_text("\n".join(lines) + '\n{"id": "sku-9999", "status": "o', encoding="utf-8")
    return out


def _card(page: str, item_id: str) -> str:
    match = re.search(rf'<article [^>]*data-id="{re.escape(item_id)}">.*?</article>', page, re.S)
    assert match, f"no card for {item_id}"
    return match.group(0)


def test_one_card_per_item_with_latest_status(out_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nanobatch.report"):
        path = write_report(out_dir)
    assert path == out_dir / "report.html"
    cards = CARD_RE.findall(path.read_text(encoding="utf-8"))
    assert [(i, s) for s, i in cards] == [
        ("sku-1001", "ok"),
        ("sku-1002", "failed"),
        ("sku-1003", "blocked"),
        ("hero", "ok"),
        ("legacy", "ok"),
    ]
    assert any("torn" in r.getMessage() for r in caplog.records)


def test_totals_come_from_latest_records_not_summary(out_dir: Path) -> None:
    (out_dir / "summary.json").write_text(
        json.dumps({"name": "spring-catalog-nightly", "counts": {"ok": 99}, "cost_usd": 42.0, "wall_s": 61.0})
    )
    page = write_report(out_dir).read_text(encoding="utf-8")
    panel = page.split('<dl class="totals">')[1].split("</dl>")[0]
    totals = dict(re.findall(r"<dt>([^<]*)</dt><dd[^>]*>([^<]*)</dd>", panel))
    assert (totals["items"], totals["ok"], totals["failed"], totals["blocked"]) == ("5", "3", "1", "1")
    assert totals["cost"] == "$0.3035"  # the superseded $0.50 attempt is not counted
    assert totals["prompt tokens"] == f"{1312 + 1300 + 2600:,}"
    assert totals["output tokens"] == f"{1680 + 3360:,}"
    assert totals["thoughts tokens"] == "200"
    assert (totals["latency p50"], totals["latency p95"], totals["latency max"]) == ("12.5 s", "95.0 s", "95.0 s")
    assert totals["last run wall time"] == "61.0 s"
    assert "<title>nanobatch report — spring-catalog-nightly</title>" in page
    assert re.search(r'data-filter="failed"[^>]*>failed \(1\)</button>', page)
    assert re.search(r'data-filter="all"[^>]*>All \(5\)</button>', page)


def test_title_falls_back_to_folder_name(out_dir: Path) -> None:
    page = write_report(out_dir).read_text(encoding="utf-8")
    assert "<title>nanobatch report — spring-catalog</title>" in page


def test_thumbnails_are_small_embedded_jpegs(out_dir: Path) -> None:
    page = write_report(out_dir, thumb_px=128).read_text(encoding="utf-8")
    assert re.findall(r'<img src="([a-z]+):', page) == ["data"] * 3  # sku-1001 in/out, hero's logo
    payloads = DATA_URI_RE.findall(page)
    assert len(payloads) == 3
    original = (out_dir / "sku-1001.png").stat().st_size
    for payload in payloads:
        raw = base64.b64decode(payload)
        assert len(raw) < original / 20
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == "JPEG"
            assert max(im.size) <= 128
    with Image.open(io.BytesIO(base64.b64decode(_first_src(_card(page, "sku-1001"))))) as im:
        assert im.size == (128, 96)  # aspect ratio of the 1600x1200 input kept


def _first_src(card: str) -> str:
    match = DATA_URI_RE.search(card)
    assert match
    return match.group(1)


def test_no_remote_resources(out_dir: Path) -> None:
    page = write_report(out_dir).read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"url\(|@import|<link\b|<iframe\b", page, re.I)
    assert page.count("<script") == 1  # our inline filter script, nothing else
    # A URL input shows as text only, never as something the browser would load.
    assert "https://cdn.example.com/photos/sku-1003.jpg" in _card(page, "sku-1003")


def test_user_strings_are_escaped(out_dir: Path) -> None:
    page = write_report(out_dir).read_text(encoding="utf-8")
    assert XSS not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in _card(page, "sku-1002")
    assert "<html><body>" not in page
    assert "&lt;html&gt;&lt;body&gt;Bad Gateway" in page


def test_failed_and_blocked_cards_say_why(out_dir: Path) -> None:
    page = write_report(out_dir).read_text(encoding="utf-8")
    failed, blocked = _card(page, "sku-1002"), _card(page, "sku-1003")
    assert 'class="problem"' in failed and "server_error (HTTP 502)" in failed
    assert 'class="problem"' in blocked
    assert "blocked" in blocked and "finishReason IMAGE_SAFETY" in blocked
    assert "I can&#x27;t edit this image: it shows a real person." in blocked
    assert 'class="problem"' not in _card(page, "sku-1001")


def test_steps_and_metadata_on_card(out_dir: Path) -> None:
    page = write_report(out_dir).read_text(encoding="utf-8")
    hero, ok = _card(page, "hero"), _card(page, "sku-1001")
    assert re.search(r"<li>Put the logo on the t-shirt.*</li><li>Make the light warmer", hero)
    assert "<li>Replace the background with pure white</li>" in ok
    for text in ("1,312", "1,680", "120", "$0.1015", "41.7 s", "<dt>attempts</dt><dd>1</dd>"):
        assert text in ok


def test_missing_and_unreadable_images_get_placeholders(out_dir: Path) -> None:
    page = write_report(out_dir).read_text(encoding="utf-8")
    hero, failed = _card(page, "hero"), _card(page, "sku-1002")
    assert '<div class="ph">missing image<small>hero.png</small></div>' in hero
    assert "moved-away.jpg" in failed and "missing image" in failed
    assert '<div class="ph">unreadable image<small>../images/broken.jpg</small></div>' in failed
    assert "no output image" in failed
    legacy = _card(page, "legacy")
    assert "no input" in legacy and "<img" not in legacy


def test_missing_results_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_bad_thumb_size_raises(out_dir: Path) -> None:
    with pytest.raises(ValueError, match="thumb_px"):
        write_report(out_dir, thumb_px=0)


def test_written_atomically(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_report(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html", "results.jsonl", "sku-1001.png"]
    previous = '<meta name="generator" content="nanobatch">previous report'  # nanobatch's: the run may replace it
    (out_dir / "report.html").write_text(previous)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(out_dir)
    assert (out_dir / "report.html").read_text() == previous  # never half-written
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html", "results.jsonl", "sku-1001.png"]


def test_histogram_bins_every_item(tmp_path: Path) -> None:
    own = {"attempts": 1, "key": None, "started_at": None}  # the fields nanobatch writes on every record
    lines = [
        json.dumps({"id": f"i{n}", "status": ("ok", "failed", "blocked")[n % 3], "latency_s": n * 1.5, **own})
        for n in range(200)
    ]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    svg = page[page.index("<svg") : page.index("</svg>")]
    bars = re.findall(r"<title>([\d.]+)–([\d.]+) s: (\d+) items \((\d+) (ok|failed|blocked)\)</title>", svg)
    assert sum(int(b[3]) for b in bars) == 200
    assert 10 <= len({b[0] for b in bars}) <= 20
    assert max(float(b[1]) for b in bars) >= 199 * 1.5


def test_empty_results_still_renders(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text('{"event": "started"}\n')
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "No items in results.jsonl yet." in page
    assert "No latency data." in page


def test_cards_follow_the_manifest_order_not_the_order_items_finished(tmp_path: Path) -> None:
    from nanobatch.cli.main import main

    (tmp_path / "job.yaml").write_text(
        "defaults:\n  instruction: a poster of a lemon\nitems:\n"
        + "".join(f"  - id: {name}\n" for name in ("zeta", "alpha", "mid", "beta"))
    )
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "job.yaml"), "--simulate", "--out", str(out), "--quiet"]) == 0
    # Make them finish in another order: the results file lists them as they were written.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(sorted(lines, key=lambda line: json.loads(line)["id"])) + "\n")
    page = write_report(out).read_text(encoding="utf-8")
    assert [i for _, i in CARD_RE.findall(page)] == ["zeta", "alpha", "mid", "beta"]


def _checked(tmp_path: Path, pictures: Path) -> Path:
    """A folder with a rejected item (its image under rejected/, its verdict in its record) and one that passed."""
    out = tmp_path / "out"
    (out / "rejected").mkdir(parents=True)
    shutil.copy(pictures / "spring-catalog" / "sku-1001.png", out / "rejected" / "sku-1.png")
    shutil.copy(pictures / "spring-catalog" / "sku-1001.png", out / "sku-2.png")
    source = str(pictures / "images" / "sku-1001.jpg")
    base = {
        "attempts": 2,
        "cost_usd": 0.08,
        "inputs": [source],
        "instructions": ["Make the background white"],
        "key": None,
        "started_at": None,
    }  # the fields nanobatch writes on every record
    lines = [
        {**base, "id": "sku-1", "status": "rejected", "outputs": ["rejected/sku-1.png"],
         "error": {"kind": "qa", "status_code": None, "message": "failed the output checks background, min_fill"},
         "qa": {"passed": False, "failed": ["background", "min_fill"],
                "values": {"width": 1200, "height": 1600, "background": 0.812, "min_fill": 0.41}}},
        {**base, "id": "sku-2", "status": "ok", "outputs": ["sku-2.png"],
         "qa": {"passed": True, "failed": [], "values": {"background": 1.0, "min_fill": 0.93}}},
    ]  # fmt: skip
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def test_a_rejected_item_shows_its_failed_checks_and_measures_beside_its_input(tmp_path: Path, pictures: Path) -> None:
    page = write_report(_checked(tmp_path, pictures)).read_text(encoding="utf-8")
    card = _card(page, "sku-1")
    assert 'data-status="rejected"' in card and '<span class="badge rejected">rejected</span>' in card
    # The failed checks, each with what it measured; then the other measurements.
    assert "Failed the output checks" in card
    assert "<li><b>background</b> 0.812" in card and "<li><b>min_fill</b> 0.41" in card
    assert "also measured: width 1200 · height 1600" in card
    assert "Set aside under rejected/" in card
    # Beside its input: both pictures are there, the rejected one from rejected/.
    assert card.count("<img ") == 2 and "after (rejected)" in card and 'title="rejected/sku-1.png"' in card
    # Its verdict says why: no error box repeating it.
    assert 'class="problem"' not in card
    assert "Passed the output checks: background 1 · min_fill 0.93" in _card(page, "sku-2")


def test_rejected_items_have_a_filter_and_a_count(tmp_path: Path, pictures: Path) -> None:
    page = write_report(_checked(tmp_path, pictures)).read_text(encoding="utf-8")
    assert re.search(r'data-filter="rejected"[^>]*>rejected \(1\)</button>', page)
    assert '<dt>rejected</dt><dd class="rejected">1</dd>' in page
