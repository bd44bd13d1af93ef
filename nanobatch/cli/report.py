"""Write ``report.html``: a self-contained before/after gallery of one output folder.

The page embeds small JPEG thumbnails as data URIs plus inline CSS, JS and SVG,
so it opens from disk, can be mailed around, and never loads anything remote.

>>> write_report("out/spring-catalog")  # doctest: +SKIP
PosixPath('out/spring-catalog/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from ..api.redaction import public_url
from ..inputs.stamps import is_remote
from ..names import REPORT_FILE
from ..output.outdir import write_report_file
from ..output.record import TOKEN_FIELDS, ItemRecord
from ..output.record_lines import read_records
from ..output.results import ResultsIndex
from ..percentiles import percentile
from .report_page import PAGE
from .report_qa import render_verdict

__all__ = ["write_report"]

log = logging.getLogger("nanobatch.report")

Record = ItemRecord
STATUSES = ("ok", "rejected", "failed", "blocked")
# Labels of the usage fields, in TOKEN_FIELDS' order.
_TOKEN_FIELDS = tuple(zip(("prompt", "output", "thoughts", "total"), TOKEN_FIELDS, strict=True))
_MAX_TEXT = 4000  # characters of model text / error message shown per card
_JPEG_QUALITY = 80
_e = html.escape


@dataclass(frozen=True, slots=True)
class _Thumb:
    uri: str
    width: int
    height: int


# --------------------------------------------------------------------------- public


def write_report(out_dir: str | os.PathLike[str], *, thumb_px: int = 256) -> Path:
    """Write ``out_dir/report.html`` from ``results.jsonl`` and return its path.

    The latest record per id wins; ``summary.json`` is optional. Raises
    ``FileNotFoundError`` when the folder has no ``results.jsonl``.
    """
    if thumb_px < 16:
        raise ValueError(f"thumb_px must be at least 16, got {thumb_px}")
    folder = Path(out_dir)
    results = folder / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(
            f"{results}: no results.jsonl here. HINT: pass the output folder of a "
            "`nanobatch run` (the one holding results.jsonl)."
        )
    summary = _load_summary(folder / "summary.json")
    latest, totals = _load_records(results)
    records = _in_manifest_order(latest, summary)
    thumbs = _make_thumbs(_image_paths(folder, records), thumb_px)
    page = _render_page(folder, records, totals, summary, thumbs)
    target = folder / REPORT_FILE
    write_report_file(target, page.encode("utf-8"))
    log.info("wrote %s (%d items)", target, len(records))
    return target


# --------------------------------------------------------------------------- reading


def _load_records(path: Path) -> tuple[list[Record], dict[str, Any]]:
    """Latest item record per id, in order of each id's first appearance; and the folder's totals as
    ``status`` and ``summary.json`` give them (:meth:`ResultsIndex.totals`)."""
    latest: dict[str, Record] = {}
    with ResultsIndex() as index:
        for rec in read_records(path):
            latest[rec.id] = rec
            index.add(rec)
        return list(latest.values()), index.totals()


def _in_manifest_order(records: list[Record], summary: Mapping[str, Any]) -> list[Record]:
    """*records* in the order of the manifest named in ``summary.json`` (items it no longer has go last,
    in results order); unchanged when there is no readable manifest."""
    from ..errors import NanobatchError
    from ..job.manifest import load_manifest

    path = summary.get("manifest")
    if not isinstance(path, str) or not records:
        return records
    try:
        manifest = load_manifest(path, default_model="gemini-3.1-flash-image")
        place = {item.id: n for n, item in enumerate(manifest.items(check_files=False, on_problem=lambda _: None))}
    except (NanobatchError, OSError) as exc:
        log.info("cards in results order: cannot read the manifest %s (%s)", path, exc)
        return records
    last = len(place)
    return sorted(records, key=lambda rec: place.get(rec.id, last))  # stable: the rest keep their order


def _load_summary(path: Path) -> Mapping[str, Any]:
    """summary.json as a dict, or {} when absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s: ignoring unreadable summary (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _num(value: Any) -> float | None:
    """A finite number, or None for anything else (bools, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _strs(value: Any) -> list[str]:
    """A list of strings from a string, a list, or nothing."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _status(rec: Record) -> str:
    return rec.status or "unknown"


def _local(folder: Path, ref: str) -> Path:
    path = Path(ref)
    return path if path.is_absolute() else folder / path


# --------------------------------------------------------------------------- thumbnails


def _image_paths(folder: Path, records: Iterable[Record]) -> list[Path]:
    """Every distinct local image the cards show (inputs and outputs)."""
    refs = (r for rec in records for r in [*rec.inputs, *rec.outputs])
    return list(dict.fromkeys(_local(folder, r) for r in refs if not is_remote(r)))


def _make_thumbs(paths: list[Path], px: int) -> dict[Path, _Thumb | str]:
    """Thumbnail every path in threads (Pillow decodes without the GIL)."""
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        thumbs = dict(zip(paths, pool.map(partial(_try_thumb, px=px), paths), strict=True))
    bad = [p for p, t in thumbs.items() if isinstance(t, str)]
    if bad:
        log.warning("%d of %d images missing or unreadable, e.g. %s", len(bad), len(paths), bad[0])
    return thumbs


def _try_thumb(path: Path, *, px: int) -> _Thumb | str:
    """A thumbnail, or the reason there is none ("missing" / "unreadable")."""
    try:
        return _thumb(path, px)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.debug("cannot thumbnail %s: %s", path, exc)
        return "unreadable"


def _thumb(path: Path, px: int) -> _Thumb:
    """A JPEG data URI at most ``px`` on the long side."""
    with Image.open(path) as im:
        # thumbnail() calls draft() first, so JPEGs decode at 1/2..1/8 scale.
        im.thumbnail((px, px))
        small = ImageOps.exif_transpose(im)
    small = _flatten(small)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=_JPEG_QUALITY, optimize=True)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return _Thumb(uri, small.width, small.height)


def _flatten(im: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")


# --------------------------------------------------------------------------- totals


def _latencies(records: Iterable[Record]) -> list[tuple[float, str]]:
    pairs = ((_num(r.latency_s), _status(r)) for r in records)
    return [(lat, st) for lat, st in pairs if lat is not None and lat >= 0]


def _render_totals(records: list[Record], totals: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """The panel above the cards: *records*' counts and latencies, the folder's *totals* of cost and tokens."""
    counts = Counter(_status(r) for r in records)
    lats = sorted(lat for lat, _ in _latencies(records))
    cells: list[tuple[str, str, str]] = [("items", f"{len(records):,}", "")]
    cells += [(s, f"{counts.get(s, 0):,}", s) for s in STATUSES]
    cells += [(s, f"{n:,}", "") for s, n in sorted(counts.items()) if s not in STATUSES]
    said = any(r.cost_usd is not None or r.paid_in is not None for r in records)
    cells.append(("cost", _money(totals["cost_usd"]) if said else "—", ""))
    cells.append(("paid by all runs", _money(totals["paid_usd"]) if said else "—", ""))
    cells += [(f"{name} tokens", f"{totals['tokens'][key]:,}", "") for name, key in _TOKEN_FIELDS]
    for label, value in (("p50", 50), ("p95", 95), ("max", 100)):
        cells.append((f"latency {label}", _secs(percentile(lats, value / 100)) if lats else "—", ""))
    wall = _num(summary.get("wall_s"))
    if wall is not None:
        cells.append(("last run wall time", _secs(wall), ""))
    body = "".join(f'<div><dt>{_e(k)}</dt><dd class="{_e(c)}">{_e(v)}</dd></div>' for k, v, c in cells)
    return f'<dl class="totals">{body}</dl>'


def _money(usd: float) -> str:
    return f"${usd:,.2f}" if usd >= 10 else f"${usd:.4f}"


def _secs(seconds: float) -> str:
    return f"{seconds:,.1f} s"


# --------------------------------------------------------------------------- histogram


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is at least ``raw``."""
    exp = 10.0 ** math.floor(math.log10(raw))
    return next(m * exp for m in (1, 2, 2.5, 5, 10) if m * exp >= raw)


def _render_histogram(records: list[Record]) -> str:
    """Latency histogram as inline SVG: 10-20 round-numbered bins, stacked by status, p50/p95 marked."""
    points = _latencies(records)
    if not points:
        return '<p class="empty">No latency data.</p>'
    top = max(lat for lat, _ in points) or 1.0
    step = _nice_step(top / 20)
    n_bins = max(1, math.ceil(top / step))  # the last bin is closed: it holds the maximum
    bins = [Counter[str]() for _ in range(n_bins)]
    for lat, status in points:
        bins[min(n_bins - 1, int(lat / step))][status if status in STATUSES else "other"] += 1
    peak = max(sum(b.values()) for b in bins)
    width, height, left, base, top_pad = 600, 196, 34, 172, 24
    bar_w = (width - left - 10) / n_bins
    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="Latency histogram">']
    for i, counts in enumerate(bins):
        y, tip = float(base), f"{i * step:g}–{(i + 1) * step:g} s: {sum(counts.values())} items"
        for status in (s for s in (*STATUSES, "other") if counts[s]):
            h = counts[status] / peak * (base - top_pad)
            y -= h
            parts.append(
                f'<rect class="{status}" x="{left + i * bar_w + 1:.1f}" y="{y:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                f'height="{h:.1f}"><title>{_e(tip)} ({counts[status]} {status})</title></rect>'
            )
    lats = sorted(lat for lat, _ in points)
    x50, x95 = (left + min(percentile(lats, p / 100) / step, n_bins) * bar_w for p in (50, 95))
    parts += [f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="4" y2="{base}"/>' for x in (x50, x95)]
    labels = [("p50", x50, "end"), ("p95", x95, "start")] if x95 - x50 >= 30 else [("p50/p95", x95, "start")]
    for label, x, anchor in labels:  # labels sit in a band above the bars, flipped inward at the edges
        anchor = "end" if x > width - 50 else "start" if x < left + 30 else anchor
        dx = -3 if anchor == "end" else 3
        parts.append(f'<text class="axis" x="{x + dx:.1f}" y="12" text-anchor="{anchor}">{label}</text>')
    for i in range(0, n_bins + 1, math.ceil(n_bins / 6)):
        anchor = "end" if i == n_bins else "middle"
        parts.append(
            f'<text class="axis" x="{left + i * bar_w:.1f}" y="{height - 6}" text-anchor="{anchor}">{i * step:g}</text>'
        )
    parts.append(
        f'<text class="axis" x="{left - 6}" y="{top_pad + 8}" text-anchor="end">{peak}</text>'
        f'<text class="axis" x="{left - 6}" y="{base}" text-anchor="end">0</text>'
        f'<line class="base" x1="{left}" x2="{width - 10}" y1="{base + 0.5}" y2="{base + 0.5}"/></svg>'
    )
    return "".join(parts)


# --------------------------------------------------------------------------- cards


def _render_filters(records: list[Record]) -> str:
    counts = Counter(_status(r) for r in records)
    extra = sorted(s for s in counts if s not in STATUSES)
    buttons = [("all", "All", len(records))] + [(s, s, counts.get(s, 0)) for s in (*STATUSES, *extra)]
    return "".join(
        f'<button type="button" data-filter="{_e(key)}" aria-pressed="{str(key == "all").lower()}">'
        f"{_e(label)} ({n:,})</button>"
        for key, label, n in buttons
    )


def _render_image(folder: Path, ref: str, thumbs: Mapping[Path, _Thumb | str]) -> str:
    if is_remote(ref):  # an http(s) or bucket URL: not read for the report, nor shown with a signature
        return f'<div class="ph">remote image<small>{_e(public_url(ref))}</small></div>'
    thumb = thumbs.get(_local(folder, ref), "missing")
    if isinstance(thumb, str):
        return f'<div class="ph">{_e(thumb)} image<small>{_e(ref)}</small></div>'
    return (
        f'<img src="{thumb.uri}" width="{thumb.width}" height="{thumb.height}" '
        f'alt="{_e(Path(ref).name)}" title="{_e(ref)}" loading="lazy">'
    )


def _render_figure(folder: Path, label: str, refs: list[str], none: str, thumbs: Mapping[Path, _Thumb | str]) -> str:
    inner = "".join(_render_image(folder, r, thumbs) for r in refs) or f'<div class="ph">{_e(none)}</div>'
    many = " many" if len(refs) > 1 else ""
    return f'<figure><figcaption>{_e(label)}</figcaption><div class="thumbs{many}">{inner}</div></figure>'


def _render_instructions(rec: Record) -> str:
    if rec.steps:
        items = []
        for step in rec.steps:
            reason = step.finish_reason
            tail = f' <span class="fr">({_e(str(reason))})</span>' if reason else ""
            items.append(f"<li>{_e(step.instruction)}{tail}</li>")
    else:
        texts = list(rec.instructions) or _strs(rec.extra.get("instruction"))  # an old record's one instruction
        items = [f"<li>{_e(t)}</li>" for t in texts]
    return f'<ol class="instr">{"".join(items)}</ol>' if items else ""


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + " …"


def _render_problem(rec: Record) -> str:
    """Error kind/code/message and the model's text; the 'why' of failed and blocked items."""
    error, text = rec.error, rec.text
    text_html = f"<pre>{_e(_clip(text))}</pre>" if isinstance(text, str) and text.strip() else ""
    if _status(rec) == "ok" and not error:
        return f'<div class="text">Model text:{text_html}</div>' if text_html else ""
    kind = str((error.kind if error else None) or rec.finish_reason or _status(rec))
    code = error.status_code if error else None
    head = f"{kind} (HTTP {code})" if code is not None else kind
    message = error.message if error else None
    msg_html = f"<pre>{_e(_clip(str(message)))}</pre>" if message else ""
    text_part = f"<b>Model text:</b>{text_html}" if text_html else ""
    return f'<div class="problem"><b>{_e(head)}</b>{msg_html}{text_part}</div>'


def _render_meta(rec: Record) -> str:
    usage = rec.usage
    cells = [(name, _num(usage.get(key))) for name, key in _TOKEN_FIELDS[:3]]
    rows = [(f"{name} tok", f"{int(v):,}") for name, v in cells if v is not None]
    latency, attempts = _num(rec.latency_s), _num(rec.attempts)
    if rec.cost_usd is not None or rec.paid_in is not None:
        rows.append(("cost", _money(rec.costs()[0])))
    if rec.moved_from is not None:  # its images were moved, not made, by this record's run
        run = rec.paid_in.run if rec.paid_in is not None else None
        rows.append(("paid in", f"run {run}" if run else "an earlier run"))
    rows += [("latency", _secs(latency))] if latency is not None else []
    rows += [("attempts", f"{int(attempts)}")] if attempts is not None else []
    for value, label in ((rec.finish_reason, "finish"), (rec.image_size, "size"), (rec.aspect_ratio, "ratio")):
        if value:
            rows.append((label, str(value)))
    body = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in rows)
    return f'<dl class="meta">{body}</dl>' if body else ""


def _render_card(folder: Path, rec: Record, thumbs: Mapping[Path, _Thumb | str]) -> str:
    item_id, status = rec.id, _status(rec)
    css = status if status in STATUSES else "other"
    before = _render_figure(folder, "before", list(rec.inputs), "no input (text to image)", thumbs)
    label = "after (rejected)" if status == "rejected" else "after"
    after = _render_figure(folder, label, list(rec.outputs), "no output image", thumbs)
    qa = render_verdict(rec)  # a rejected item's failed checks say why, instead of its error
    model = f' title="{_e(str(rec.model))}"' if rec.model else ""
    return (
        f'<article class="card {css}" data-status="{_e(status)}" data-id="{_e(item_id)}">'
        f'<header><h3{model}>{_e(item_id)}</h3><span class="badge {css}">{_e(status)}</span></header>'
        f'<div class="pair">{before}{after}</div>'
        f"{_render_instructions(rec)}{qa if qa and status == 'rejected' else _render_problem(rec) + qa}"
        f"{_render_meta(rec)}</article>"
    )


# --------------------------------------------------------------------------- page


def _job_name(folder: Path, summary: Mapping[str, Any]) -> str:
    for key in ("name", "job"):
        if isinstance(summary.get(key), str) and summary[key]:
            return str(summary[key])
    return folder.resolve().name or str(folder)


def _subtitle(folder: Path, records: list[Record]) -> str:
    models = sorted({str(r.model) for r in records if r.model})
    starts = sorted(str(r.started_at) for r in records if r.started_at)
    ends = sorted(str(r.finished_at) for r in records if r.finished_at)
    parts = [str(folder.resolve()), f"{len(records):,} items"]
    parts += [", ".join(models)] if models else []
    parts += [f"{starts[0] if starts else '?'} → {ends[-1]}"] if ends else []
    return " · ".join(parts)


def _render_page(
    folder: Path,
    records: list[Record],
    totals: Mapping[str, Any],
    summary: Mapping[str, Any],
    thumbs: Mapping[Path, _Thumb | str],
) -> str:
    cards = "\n".join(_render_card(folder, r, thumbs) for r in records)
    return PAGE.substitute(
        title=_e(f"nanobatch report — {_job_name(folder, summary)}"),
        subtitle=_e(_subtitle(folder, records)),
        totals=_render_totals(records, totals, summary),
        histogram=_render_histogram(records),
        filters=_render_filters(records),
        cards=cards or '<p class="empty">No items in results.jsonl yet.</p>',
        generated=_e(datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
    )
