"""The command line: parse, call the library, print, and map errors to exit codes.

``main(argv) -> int`` does the work (tests call it); ``entrypoint()`` only
hands it ``sys.argv``. The library logs and never prints: what reaches the
terminal is written by this package (the commands here, ``printing``,
``progress`` and ``logs``) and by the simulator's own ``simulate`` command.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import NanobatchError, sole_error
from .logs import hand_over, install_redaction, json_logs, quiet_logs, setup_logging, show_error
from .options import Duration, Finite, manifest_from, settings_from, settings_options
from .printing import log_summary as _log_summary
from .printing import print_cancelled as _print_cancelled
from .printing import print_check as _print_check
from .printing import print_models as _print_models
from .printing import print_recheck as _print_recheck
from .printing import print_summary as _print_summary

# Each command imports what it needs when it runs: `nanobatch --help`, `status` and `validate` start without
# the HTTP stack, Pillow, rich or the simulator (uvicorn, starlette).
if TYPE_CHECKING:
    from ..config import Settings
    from ..run.recheck import RecheckResult
    from ..run.runner import RunSummary
    from .progress import LiveProgress, PlainProgress

__all__ = ["cli", "entrypoint", "main"]

logger = logging.getLogger("nanobatch")


class _Commands(click.Group):
    """The commands; ``simulate`` (the simulator's own, with its settings) is imported only when it is asked
    for or listed: a run does not pay for loading it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "simulate"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "simulate" and cmd_name not in self.commands:
            from ..simulator._cli import simulate  # the simulator ships with the package

            self.add_command(simulate)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nanobatch")
@click.option("-v", "--verbose", count=True, help="More log detail on stderr (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per event on stderr, for log collectors.",
)
def cli(verbose: int, log_format: str) -> None:
    """Bulk image edits through Google's Gemini image models (Nano Banana).

    Run `nanobatch run MANIFEST --simulate` to try a job against the built-in
    simulator: no key and no network needed.
    """
    setup_logging(verbose, False, log_format)


_skip_bad_inputs = click.option(
    "--skip-bad-inputs",
    is_flag=True,
    help="Leave out (and list) the items whose input pictures cannot be decoded, instead of refusing the job; "
    "a run reads every picture first and records those items as failed, sending nothing for them.",
)


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@settings_options
@click.option("--simulate", is_flag=True, help="Run against the built-in simulator (no key, no network).")
@click.option("--retry-failed", is_flag=True, help="Run only items whose latest result is failed, blocked or rejected.")
@click.option("--force", is_flag=True, help="Redo every item, even those already done.")
@click.option("--dry-run", is_flag=True, help="Check everything and estimate cost; send nothing.")
@click.option(
    "--grace",
    type=Finite(min=0),
    help="On Ctrl-C/SIGTERM, seconds to let requests in flight finish (default 30).",
)
@click.option("--wait-lock", is_flag=True, help="If another run holds the output folder, wait for it.")
@click.option(
    "--no-wait",
    "no_wait",
    is_flag=True,
    default=None,
    help="--tier batch: submit the batch jobs and exit; a later run of the same manifest collects them.",
)
@click.option(
    "--batch-deadline",
    type=Duration(),
    help="--tier batch: cancel what is not answered this long after the start and send it online "
    "(batch.fallback_tier), e.g. 6h.",
)
@click.option("--report", "write_html", is_flag=True, help="Write OUT_DIR/report.html at the end of the run.")
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False),
    help="Keep a Prometheus textfile (node_exporter's textfile collector; name ending in .prom) of the run's "
    "counts, cost and last success (output.metrics_file).",
)
@click.option("-q", "--quiet", is_flag=True, help="Errors only: no progress, no summary (JSON logs: its event).")
@_skip_bad_inputs
@click.option(
    "--progress-interval",
    type=Finite(min=1),
    default=30,
    show_default=True,
    help="Seconds between plain progress lines when stderr is not a terminal.",
)
def run(
    manifest: str,
    config_file: str | None,
    out_dir: str | None,
    simulate: bool,
    retry_failed: bool,
    force: bool,
    dry_run: bool,
    wait_lock: bool,
    write_html: bool,
    quiet: bool,
    progress_interval: float,
    skip_bad_inputs: bool,
    **flags: Any,
) -> None:
    """Run the job in MANIFEST: send every item not already done, write images and results."""
    from ..run.preflight import check_job

    if quiet:
        quiet_logs()  # before anything is read: a bucket's library may speak while the manifest is loaded
    settings = settings_from(config_file, **flags)
    install_redaction(settings)
    try:
        job = manifest_from(manifest, settings, flags.get("model"))
    except NanobatchError as exc:  # (a YAML error, an unknown top-level key): the webhook hears of it too
        if not dry_run:
            from ..run.observer import tell_refused_now

            tell_refused_now(settings, Path(manifest).stem, exc)
        raise
    if dry_run:  # what the run would refuse: with --simulate, no key nor Google credentials are needed
        _print_check(check_job(job, settings=settings, out_dir=out_dir, skip_bad_inputs=skip_bad_inputs,
                               simulate=simulate))  # fmt: skip
        return
    summary = _run_shown(
        _display(quiet, progress_interval), job, settings=settings, out_dir=out_dir, force=force,
        retry_failed=retry_failed, simulate=simulate, wait_lock=wait_lock, skip_bad_inputs=skip_bad_inputs,
    )  # fmt: skip
    _after_run(summary, write_html=write_html, quiet=quiet)
    raise SystemExit(summary.exit_code)


def _run_shown(
    display: LiveProgress | PlainProgress | None,
    job: Any,
    *,
    settings: Settings,
    out_dir: str | None,
    force: bool,
    retry_failed: bool,
    simulate: bool,
    wait_lock: bool,
    skip_bad_inputs: bool,
) -> RunSummary:
    """Run *job* to its end (Ctrl-C stops it gracefully), *display* showing its counters meanwhile."""
    import gc

    import anyio

    from ..run.runner import run_job
    from ..run.stats import RunStats

    stats = RunStats()

    async def go() -> RunSummary:
        async with anyio.create_task_group() as tg:
            if display is not None:
                tg.start_soon(display.run, stats)
            try:
                summary = await run_job(
                    job, settings=settings, out_dir=out_dir, force=force, retry_failed=retry_failed,
                    simulate=simulate, wait_lock=wait_lock, handle_signals=True, stats=stats,
                    skip_bad_inputs=skip_bad_inputs,
                )  # fmt: skip
            finally:
                tg.cancel_scope.cancel()
        return summary

    # What start-up made (modules, settings, the manifest) lives as long as the run: frozen, the collector's
    # full passes stop walking it again and again (a third of its time in a run of small answers).
    gc.freeze()
    return anyio.run(go)


def _after_run(summary: RunSummary, *, write_html: bool, quiet: bool) -> None:
    """Write the report if asked, then say how the run went and where the report is (only why it stopped early,
    with --quiet)."""
    written = None
    if write_html:
        from .report import write_report

        written = write_report(summary.out_dir)
    if json_logs():  # the summary event, --quiet or not: what a log collector keeps of the night
        _log_summary(summary)
        if written is not None:
            logger.info("wrote %s", written)
    if quiet and summary.reason:  # --quiet still says why a run stopped early: that is an error for cron mail
        show_error(f"run {summary.outcome}: {summary.reason}")
    elif not quiet and not json_logs():
        _print_summary(summary)
        if written is not None:
            click.echo(f"report: {written}")


def _display(quiet: bool, interval_s: float) -> LiveProgress | PlainProgress | None:
    """A live display on a terminal, plain lines in logs and cron mail, nothing with --quiet."""
    from .progress import LiveProgress, PlainProgress

    if quiet:
        return None
    logging.getLogger("nanobatch.progress").setLevel(logging.INFO)
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb" and not json_logs():
        live = LiveProgress()
        hand_over(live.log_handler())
        return live
    return PlainProgress(interval_s)


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@settings_options
@_skip_bad_inputs
def validate(manifest: str, config_file: str | None, out_dir: str | None, skip_bad_inputs: bool, **flags: Any) -> None:
    """Resolve and check every item, estimate cost and duration; send nothing."""
    from ..run.preflight import check_job

    settings = settings_from(config_file, **flags)
    install_redaction(settings)
    job = manifest_from(manifest, settings, flags.get("model"))
    _print_check(check_job(job, settings=settings, out_dir=out_dir, skip_bad_inputs=skip_bad_inputs))


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON, for scripts.")
def status(out_dir: str, as_json: bool) -> None:
    """Summarize the results in OUT_DIR: counts, tokens, cost, failures."""
    from .status import folder_status

    info = folder_status(Path(out_dir))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    counts = info["counts"]
    rejected = f", {counts['rejected']} rejected by the output checks" if counts.get("rejected") else ""
    click.echo(f"{out_dir}: {info['items']} items: {counts['ok']} ok, {counts['failed']} failed, "
               f"{counts['blocked']} blocked{rejected}")  # fmt: skip
    tokens = info["tokens"]
    click.echo(
        f"tokens: prompt {tokens['promptTokenCount']}, output {tokens['candidatesTokenCount']}, "
        f"thinking {tokens['thoughtsTokenCount']}"
    )
    click.echo(f"cost: ${info['cost_usd']:.4f} for the results held now; ${info['paid_usd']:.4f} paid by all runs")
    for kind, count in info["failures_by_kind"].items():
        click.echo(f"  {kind}: {count}")
    if info["steps_kept"]:  # (multi-step items cut off between steps: see output/carried.py)
        click.echo(f"  {info['steps_kept']} of them go on from a step already paid for (its image kept)")
    for job in info.get("batch_jobs", []):
        counts = ", ".join(f"{job[name]} {name}" for name in ("succeeded", "failed", "pending") if name in job)
        click.echo(f"batch job {job['job'] or '(not created yet)'}: {job['state']}, {job['requests']} requests"
                   + (f" ({counts})" if counts else ""))  # fmt: skip
    if info.get("running"):
        click.echo(f"a run is in progress ({info['running']}): {info['in_flight']} requests in flight")
    if info.get("batch_answers_kept") and not info.get("running"):
        click.echo(f"batch answers collected (paid) and not written yet: {info['batch_answers_kept']}; "
                   "a run that asks for them writes them without paying again (kept up to 14 days; those of items "
                   "changed since are not asked for)")  # fmt: skip
    if info.get("possibly_charged"):
        click.echo(f"sent by a run that ended without saving their results (may have been charged): "
                   f"{info['possibly_charged']} requests")  # fmt: skip
    last = info.get("last_run")
    if last:
        when = f"{last['started_at']} .. {last['finished_at']}" if last.get("finished_at") else (
            f"started {last.get('started_at')}")  # fmt: skip
        click.echo(f"last run: {last['outcome']}, {when}")
        if last.get("reason"):
            click.echo(f"  reason: {last['reason']}")
    if info.get("left") is not None:
        click.echo(
            f"left: {info['left']} of {info['manifest_items']} items in {info['manifest']} not done "
            "(new, failed, blocked, rejected, or output missing)"
        )


@cli.command("qa")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Config file (default: $NANOBATCH_CONFIG, else ./nanobatch.yaml if present): its qa: is under the manifest's.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Output folder (default: the manifest's output_dir, else <output.dir>/<name>).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON, for scripts.")
@click.option(
    "--apply",
    is_flag=True,
    help="Record the new verdicts: failing items become rejected (images moved under rejected/), rejected ones "
    "that pass become ok again; the next run sends the rejected items again.",
)
@click.option("--wait-lock", is_flag=True, help="--apply: if a run holds the output folder, wait for it.")
def qa_command(
    manifest: str, config_file: str | None, out_dir: str | None, as_json: bool, apply: bool, wait_lock: bool
) -> None:
    """Check the done items' images again against the manifest's current qa: settings; nothing is sent.

    Exit 0 when every image passes, 1 when some fail.
    """
    import anyio

    from ..run.recheck import recheck

    settings = settings_from(config_file)
    install_redaction(settings)

    async def go() -> RecheckResult:
        return await recheck(manifest, settings=settings, out_dir=out_dir, apply=apply, wait_lock=wait_lock)

    result = anyio.run(go)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        _print_recheck(result)
    raise SystemExit(result.exit_code)


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Config file (for the endpoint).")
@click.option("--base-url", help="API base URL (default: api.base_url).")
def cancel(out_dir: str, config_file: str | None, base_url: str | None) -> None:
    """Cancel the open batch jobs of OUT_DIR; the next run sends their unanswered items again."""
    import anyio

    from ..api.connect import connect
    from ..api.credentials import api_key_for, check_offered
    from ..run.batch.ledger import Cancel, cancel_jobs

    settings = settings_from(config_file, base_url=base_url)
    install_redaction(settings)
    check_offered(settings, "cancel")  # before any credential is looked for: Vertex has no batch jobs

    async def go() -> list[Cancel]:
        async with connect(settings, api_key=api_key_for(settings, needed=False)) as connection:
            async with connection.batches() as client:
                return await cancel_jobs(Path(out_dir), client)

    if not _print_cancelled(anyio.run(go)):
        raise SystemExit(1)  # like a run whose items did not all succeed: the rest was done


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
def report(out_dir: str) -> None:
    """Write OUT_DIR/report.html: a before/after gallery of every item."""
    from .report import write_report

    try:
        written = write_report(out_dir)
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"wrote {written}")


@cli.command("models")
@click.option(
    "--live",
    is_flag=True,
    help="Also list what the configured endpoint serves, and compare (not on Vertex AI, which lists none).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON, for scripts.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Config file (for --live).")
@click.option("--base-url", help="API base URL (for --live).")
def models_command(live: bool, as_json: bool, config_file: str | None, base_url: str | None) -> None:
    """The model table: status, limits, and the price of one image per size and tier."""
    from .catalog import compare_live, list_live, model_rows

    result: dict[str, Any] = {"models": model_rows()}
    if live:
        settings = settings_from(config_file, base_url=base_url)
        install_redaction(settings)
        import anyio

        result["live"] = compare_live(anyio.run(list_live, settings))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_models(result)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with *argv*; return the exit code instead of exiting."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="nanobatch", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except (click.exceptions.Abort, KeyboardInterrupt):
        show_error("interrupted", prefix="")
        return 130
    except click.ClickException as exc:
        if json_logs():
            show_error(exc.format_message())
        else:
            exc.show()
        return 2
    except NanobatchError as exc:
        show_error(str(exc))
        return exc.exit_code
    except BaseExceptionGroup as group:  # from a task group: report our error; anything else is a bug
        if (error := sole_error(group)) is None:
            raise
        show_error(str(error))
        return error.exit_code
    return 0


def entrypoint() -> None:
    sys.exit(main(sys.argv[1:]))
