"""The model table for people: ``nanobatch models``, its ``--live`` comparison, and README's tables.

Everything here is drawn from :mod:`nanobatch.models`, so the README (a test checks it) and the
command say what the code does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from typing import TYPE_CHECKING, Any

from .. import costs, models

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "MODEL_COLUMNS",
    "PRICE_COLUMNS",
    "compare_live",
    "list_live",
    "model_cells",
    "model_rows",
    "model_table_markdown",
    "price_cells",
    "price_table_markdown",
    "status_text",
]

_SIZES = ("512", "1K", "2K", "4K")
# The two tables ``nanobatch models`` prints and README shows, cell by cell (model_cells, price_cells).
MODEL_COLUMNS = ("id", "status", "aspect ratios", "sizes", "max references", "backends")
PRICE_COLUMNS = ("model", "tier", *_SIZES)


def model_rows(day: date | None = None) -> list[dict[str, Any]]:
    """One row per model id (``-preview`` aliases included): status, limits, and one image's price per tier."""
    rows = []
    for info in models.MODELS.values():
        rows.append(_row(info.id, info, info.lifecycle, day))
    for alias, (base, life) in models.ALIASES.items():
        rows.append(_row(alias, models.MODELS[base], life, day))
    return rows


def _row(model_id: str, info: models.ModelInfo, life: models.Lifecycle, day: date | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "status": life.status(day),
        "ga": str(life.ga) if life.ga else None,
        "deprecated": str(life.deprecated) if life.deprecated else None,
        "shutdown": str(life.shutdown) if life.shutdown else None,
        "replacement": models.live_replacement(model_id, day),
        "proxies_map": life.proxies_map,
        "aspect_ratios": list(info.aspect_ratios),
        "image_sizes": list(info.image_sizes) or [info.default_size],
        "max_input_images": info.max_input_images,
        "thinking_levels": list(info.thinking_levels),
        "tiers": [*info.tiers, "batch"],
        "backends": list(info.backends),  # api.backend values that serve it
        "image_price_usd": {
            tier: {size: round(costs.image_price(info, size, tier), 4) for size in info.image_sizes or ("1K",)}
            for tier in models.TIERS
            if tier in info.tiers or tier == "batch"
        },
        "sources": list(info.sources if model_id == info.id else models.ALIAS_SOURCES),
    }


def status_text(row: Mapping[str, Any], *, cell: bool = False) -> str:
    """A model's status with its dates and replacement, as ``nanobatch models`` says it ("shut down at Google
    since 2025-10-31, use X") or, as a *cell* of README's table, shorter ("shut down 2025-10-31 → X")."""
    since, use = (" ", " → ") if cell else (" since ", ", use ")
    status = str(row["status"])
    if row["status"] == "shut down":
        status += ("" if cell else " at Google") + f"{since}{row['shutdown']}"
        status += " (proxies map it)" if row["proxies_map"] else ""
    elif row["status"] == "deprecated":
        status += f"{since}{row['deprecated']}"
    if row["replacement"] and row["status"] in ("deprecated", "shut down"):
        status += f"{use}{row['replacement']}"
    return status


def model_cells(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """The model table's cells (:data:`MODEL_COLUMNS`), a tuple per row of :func:`model_rows`."""
    cells: list[tuple[str, ...]] = []
    for row in rows:
        ratios = f"{len(row['aspect_ratios'])}" + (" (incl. 1:4 4:1 1:8 8:1)" if "1:8" in row["aspect_ratios"] else "")
        cells.append((
            row["id"], status_text(row, cell=True), ratios, " ".join(row["image_sizes"]),
            str(row["max_input_images"]), " ".join(row["backends"]),
        ))  # fmt: skip
    return cells


def price_cells(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """The price table's cells (:data:`PRICE_COLUMNS`): US dollars for one output image, by size and tier, of
    the models still served under their own id."""
    cells: list[tuple[str, ...]] = []
    for row in rows:
        if row["status"] == "shut down" or row["id"] not in models.MODELS:
            continue
        for tier, prices in row["image_price_usd"].items():
            cells.append((row["id"], tier, *(f"${prices[s]:.4f}" if s in prices else "–" for s in _SIZES)))
    return cells


def model_table_markdown(day: date | None = None) -> str:
    """README's model table."""
    return _markdown(MODEL_COLUMNS, model_cells(model_rows(day)))


def price_table_markdown(day: date | None = None) -> str:
    """README's price table: US dollars for one output image, by size and tier (live models only)."""
    return _markdown(PRICE_COLUMNS, price_cells(model_rows(day)))


def _markdown(columns: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [f"| `{first}` | " + " | ".join(rest) + " |" for first, *rest in cells]
    return "\n".join(lines)


def compare_live(entries: Iterable[Mapping[str, Any]], day: date | None = None) -> dict[str, Any]:
    """Compare an endpoint's ``GET /models`` entries with the table.

    ``unknown``: image models the endpoint lists that the table does not know; ``missing``: table models
    (not shut down) the endpoint no longer lists; ``batch``: listed models that support batchGenerateContent.
    """
    listed: dict[str, list[str]] = {}
    for entry in entries:
        name = str(entry.get("name", "")).removeprefix("models/")
        if name:
            listed[name] = [str(m) for m in entry.get("supportedGenerationMethods") or []]
    known = {row["id"]: row for row in model_rows(day)}
    return {
        "listed": sorted(listed),
        "unknown": sorted(n for n in listed if n not in known and ("image" in n or "nano-banana" in n)),
        "missing": sorted(n for n, row in known.items() if n not in listed and row["status"] != "shut down"),
        "batch": sorted(n for n, methods in listed.items() if "batchGenerateContent" in methods and n in known),
    }


async def list_live(settings: Settings) -> list[dict[str, Any]]:
    """What the configured endpoint lists (``GET /{version}/models``, every page), for ``models --live``;
    ConfigError on Vertex AI, which has no such list."""
    from ..api.connect import connect
    from ..api.credentials import api_key_for, check_offered

    check_offered(settings, "models")
    async with connect(settings, api_key=api_key_for(settings, needed=False)) as connection:
        async with connection.gemini() as client:
            return await client.list_models()
