"""What the CLI prints after ``validate`` and ``run``: the check's estimate and the run's summary (as text,
or as one JSON log event)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..run.batch.ledger import Cancel
    from ..run.preflight import CheckResult
    from ..run.recheck import RecheckResult
    from ..run.runner import RunSummary

__all__ = ["log_summary", "print_cancelled", "print_check", "print_models", "print_recheck", "print_summary"]

logger = logging.getLogger("nanobatch")


def print_check(result: CheckResult) -> None:
    rate = f", at most {result.requests_per_minute:g} requests/min" if result.requests_per_minute else ""
    click.echo(f"{result.manifest}: OK")
    click.echo(f"  items:     {result.items}")
    if result.done_items:
        left = result.items - result.done_items
        click.echo(f"  done:      {result.done_items} already done in {result.out_dir} (a run skips them); {left} left")
        click.echo(f"  requests:  {result.left_requests} left (steps counted), of {result.requests}")
    else:
        click.echo(f"  requests:  {result.requests} (steps counted)")
    what = " for what is left" if result.done_items else ""
    click.echo(f"  cost:      about ${result.cost_likely_usd:.2f} (at most ${result.cost_worst_usd:.2f}){what}")
    click.echo(
        f"             about ${result.cost_standard_usd:.2f} at standard prices, "
        f"${result.cost_batch_usd:.2f} in the batch tier (--tier batch: half price, answers within 24 h)"
    )
    if result.duration_s is None:
        click.echo(
            f"  duration:  the batch jobs' (most within hours, at most 24 h), {result.concurrency} requests "
            "in open chunks at once; --batch-deadline sends what is not answered by then online"
        )
    else:
        click.echo(f"  duration:  about {_duration(result.duration_s)} at concurrency {result.concurrency}{rate}")
    if result.max_cost_usd is not None and result.cost_worst_usd > result.max_cost_usd:
        click.echo(f"  budget:    ${result.max_cost_usd:.2f}: the run may stop before every item is done")
    took, limit = result.duration_s, result.max_duration_s
    if took is not None and limit is not None and took > limit:
        click.echo(
            f"  time:      limit {_duration(limit)}: the run will likely stop before every item "
            "is done; the next run goes on from there"
        )
    click.echo(f"  output:    {result.out_dir}")
    if result.left_out_items:
        from ..job.check import left_out_text

        click.echo(left_out_text(result.left_out, result.left_out_items))
    click.echo("Nothing was sent.")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_summary(summary: RunSummary) -> None:
    stats = summary.stats
    last = summary.summary["last_run"]
    err = summary.exit_code != 0
    rejected = f"{stats.rejected} rejected by the output checks, " if stats.rejected else ""
    click.echo(
        f"{summary.outcome}: {stats.ok} ok, {stats.failed} failed, {stats.blocked} blocked, {rejected}"
        f"{stats.skipped} already done; {stats.requests} requests, ${stats.cost_usd:.4f}",
        err=err,
    )
    if summary.reason:
        click.echo(f"reason: {summary.reason}", err=True)
    if waiting := _waiting(summary):
        click.echo(waiting)
    tokens = last["tokens"]
    if tokens:
        click.echo(
            "tokens: prompt {p}, output {c}, thinking {t}".format(
                p=tokens.get("promptTokenCount", 0),
                c=tokens.get("candidatesTokenCount", 0),
                t=tokens.get("thoughtsTokenCount", 0),
            )
        )
    latency = last["latency_s"]
    if latency["p50"] is not None:
        click.echo(f"latency: p50 {latency['p50']:.1f} s, p95 {latency['p95']:.1f} s, max {latency['max']:.1f} s")
    if stats.retries:
        click.echo("retries: " + ", ".join(f"{k} {v}" for k, v in stats.retries.most_common()))
    for kind, count in stats.failures.most_common():
        examples = ", ".join(stats.failure_examples.get(kind, []))
        click.echo(f"  {kind}: {count} (e.g. {examples})", err=True)
    out = summary.out_dir
    click.echo(f"images and results.jsonl in {out}/, summary in {out / 'summary.json'}")


def _waiting(summary: RunSummary) -> str | None:
    """What waits in batch jobs (``--no-wait``), and how it is collected; None if nothing does."""
    waiting = summary.summary["last_run"].get("batch_waiting") or {}
    if not waiting.get("requests"):
        return None
    out, jobs = summary.out_dir, len(waiting["jobs"])
    return (
        f"{waiting['requests']} requests wait in {jobs} batch job{'s' if jobs != 1 else ''} (answered within 24 h, "
        f"billed then): a later `nanobatch run {summary.summary['manifest']}` into {out} collects them "
        f"(`nanobatch status {out}` lists the jobs)"
    )


def log_summary(summary: RunSummary) -> None:
    """The summary as one JSON event (``"event": "summary"``): stderr stays JSON lines, whatever the outcome."""
    stats = summary.stats
    last = summary.summary["last_run"]
    fields = {
        "event": "summary",
        "outcome": summary.outcome,
        "reason": summary.reason,
        "exit_code": summary.exit_code,
        "counts": {"ok": stats.ok, "failed": stats.failed, "blocked": stats.blocked, "rejected": stats.rejected,
                   "skipped": stats.skipped},  # fmt: skip
        "requests": stats.requests,
        "cost_usd": round(stats.cost_usd, 6),
        "tokens": last["tokens"],
        "latency_s": last["latency_s"],
        "retries": dict(stats.retries),
        "failures": {kind: {"count": n, "examples": stats.failure_examples.get(kind, [])}
                     for kind, n in stats.failures.most_common()},
        "out_dir": str(summary.out_dir),
    }  # fmt: skip
    if "batch_waiting" in last:
        fields["batch_waiting"] = last["batch_waiting"]
    level = logging.INFO if summary.exit_code == 0 else logging.WARNING
    waiting = _waiting(summary)
    record = logger.makeRecord(
        logger.name, level, __file__, 0,
        "%s: %d ok, %d failed, %d blocked, %d rejected, %d already done; %d requests, $%.4f%s",
        (summary.outcome, stats.ok, stats.failed, stats.blocked, stats.rejected, stats.skipped, stats.requests,
         stats.cost_usd, f"; {waiting}" if waiting else ""),
        None, extra={"fields": fields},
    )  # fmt: skip
    # To the command line's own handlers, --quiet or not: the one event a log collector keeps of a night
    for handler in logger.handlers:
        handler.handle(record)


# A table to print: its title, its column headings, its rows of cells.
_Table = tuple[str, tuple[str, ...], list[tuple[str, ...]]]


def print_models(result: dict[str, Any]) -> None:
    """``nanobatch models`` for people: the model table and the price table (rich's tables on a terminal, plain
    aligned columns when piped), then what ``--live`` found."""
    from .catalog import MODEL_COLUMNS, PRICE_COLUMNS, model_cells, price_cells

    tables: list[_Table] = [
        ("Models", MODEL_COLUMNS, model_cells(result["models"])),
        ("Price of one output image, US dollars", PRICE_COLUMNS, price_cells(result["models"])),
    ]
    _print_tables(tables)
    if "live" in result:
        found = result["live"]
        click.echo(f"endpoint lists {len(found['listed'])} models")
        click.echo("  image models the table does not know: " + (", ".join(found["unknown"]) or "none"))
        click.echo("  table models the endpoint no longer lists: " + (", ".join(found["missing"]) or "none"))
        click.echo("  support batchGenerateContent: " + (", ".join(found["batch"]) or "none"))


def _numbers(column: str) -> bool:
    """Whether *column* holds amounts, aligned to the right: the price table's sizes."""
    return column[0].isdigit()


def _print_rich_tables(tables: list[_Table]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, columns, cells in tables:
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column, justify="right" if _numbers(column) else "left")
        for row in cells:
            table.add_row(*row)
        console.print(table)


def _aligned(columns: tuple[str, ...], cells: list[tuple[str, ...]]) -> list[str]:
    """*cells* under *columns* as lines of text, each column as wide as its widest cell."""
    rows = [columns, *cells]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for row in rows:
        padded = [
            cell.rjust(width) if _numbers(column) else cell.ljust(width)
            for column, cell, width in zip(columns, row, widths, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    return lines


def print_recheck(result: RecheckResult) -> None:
    """``nanobatch qa`` for people: each failing item with its failed checks and what they measured (a rich table
    on a terminal, aligned columns when piped), then the counts and what was (or would be) recorded."""
    if result.failing:
        columns: tuple[str, ...] = ("item", "recorded", "failed checks", "measured")
        rows: list[tuple[str, ...]] = [
            (item.id, item.status, ", ".join(item.verdict.failed), _measured(item.verdict.values))
            for item in result.failing
        ]
        _print_tables([("Images that fail the checks now", columns, rows)])
    if not result.checks_on:
        click.echo("no check is on: neither the manifest's qa: nor the config file's turns one on")
    counts = f"{result.checked} checked: {result.passed} pass, {len(result.failing)} fail"
    if result.newly_failing:
        counts += f" ({result.newly_failing} of them recorded ok until now)"
    if result.passing_again:
        counts += f"; {len(result.passing_again)} rejected before pass now ({_ids(result.passing_again)})"
    if result.not_done:
        counts += f"; {result.not_done} not done (the next run sends them)"
    click.echo(counts)
    if result.unreadable:
        click.echo(f"{len(result.unreadable)} items not checked (an image or its input cannot be read): "
                   f"{', '.join(result.unreadable)}")  # fmt: skip
    _print_recorded(result)


def _print_recorded(result: RecheckResult) -> None:
    """What ``--apply`` recorded, or what it would."""
    from ..names import REJECTED_FOLDER

    turned = result.newly_failing + len(result.passing_again)
    if not result.applied:
        if turned:
            click.echo(f"nothing recorded: --apply records these {turned} new verdicts (the next run then sends "
                       "the failing items again)")  # fmt: skip
        return
    if not result.checks_on:
        click.echo("nothing recorded: with no check on, --apply would pass every image (and put back those set "
                   "aside); turn a check on, or pass the config file that holds qa: (--config)")  # fmt: skip
    elif not result.recorded and not result.refused:
        click.echo("nothing to record: every verdict is the one recorded")
    elif result.recorded:
        rejected = sum(1 for item in result.failing if item.id in result.recorded and item.status == "ok")
        still = sum(1 for item in result.failing if item.id in result.recorded and item.status != "ok")
        parts = [f"{rejected} rejected (images moved under {result.out_dir / REJECTED_FOLDER}/)"] if rejected else []
        parts += [f"{still} still rejected, for the checks they fail now"] if still else []
        back = sum(1 for item in result.moved_back if item.id in result.recorded)
        again = len(result.recorded) - rejected - still - back
        parts += [f"{again} ok again"] if again else []
        parts += [f"{back} ok, put back where a qa --apply that did not finish had moved them"] if back else []
        tail = "; the next run sends the rejected items again" if rejected or still else ""
        click.echo(f"recorded {len(result.recorded)} new verdicts: {', '.join(parts)}{tail}")
    if result.published:
        click.echo(f"{len(result.published)} objects of items rejected now were uploaded before and stay in "
                   f"output.upload_to until the next run's image passes: {', '.join(result.published)}")  # fmt: skip
    for item_id, why in result.refused:
        click.echo(f"  {item_id}: not recorded: {why}", err=True)


def _ids(items: Sequence[Any], most: int = 10) -> str:
    """The ids of *items*, the first *most* of them."""
    shown = ", ".join(item.id for item in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _measured(values: dict[str, Any]) -> str:
    """A verdict's values in a line: ``min_side 512, width 512, height 512``."""
    return ", ".join(f"{name} {f'{v:.3g}' if isinstance(v, float) else v}" for name, v in values.items())


def _print_tables(tables: list[_Table]) -> None:
    """*tables* as rich's tables on a terminal, as aligned columns when piped."""
    if sys.stdout.isatty() and os.environ.get("TERM") != "dumb":
        _print_rich_tables(tables)
        return
    for n, (title, columns, cells) in enumerate(tables):
        click.echo(("\n" if n else "") + f"{title}:")
        for line in _aligned(columns, cells):
            click.echo(line)


def print_cancelled(found: list[Cancel]) -> bool:
    """What ``nanobatch cancel`` did with each job: whether every one still running was cancelled."""
    ended = [job for job in found if job.ended_before or job.state in ("succeeded", "failed", "expired")]
    names = [job.name for job in found if job.refused is None and job not in ended]
    click.echo(f"cancelled {len(names)} batch jobs" + (f": {', '.join(names)}" if names else ""))
    if ended:
        said = ", ".join(f"{job.name} ({job.state})" for job in ended)
        click.echo(f"{len(ended)} had already ended: {said}; the next run collects their answers")
    refused = [job for job in found if job.refused is not None]
    for job in refused:
        assert job.refused is not None
        click.echo(f"error: batch job {job.name} ({job.state}) was not cancelled: {job.refused.message}", err=True)
    return not refused
