"""The command line: parse, call the library, print, and map errors to exit codes.

``main(argv) -> int`` does the work (tests call it); ``entrypoint()`` only
hands it ``sys.argv``. This is the only module that writes to the terminal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import NanobatchError, sole_error
from .printing import log_summary as _log_summary
from .printing import print_check as _print_check
from .printing import print_models as _print_models
from .printing import print_summary as _print_summary

# Each command imports what it needs when it runs: `nanobatch --help`, `status` and `validate` start without
# the HTTP stack, Pillow, rich or the simulator (uvicorn, starlette).
if TYPE_CHECKING:
    from ..config import Settings
    from ..run.runner import RunSummary
    from .progress import LiveProgress, PlainProgress

__all__ = ["cli", "entrypoint", "main"]

logger = logging.getLogger("nanobatch")


class _Redact(logging.Filter):
    """Defence in depth: no log line may carry the API key, whoever wrote it."""

    def __init__(self, secret: str | None) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secret and self.secret in record.getMessage():
            record.msg = record.getMessage().replace(self.secret, "[redacted]")
            record.args = ()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
                **getattr(record, "fields", {}),  # logger.info(..., extra={"fields": {...}}): structured data
            }
        )


def _json_logs() -> bool:
    """Whether stderr is for JSON lines only (``--log-format json``)."""
    return any(isinstance(h.formatter, _JsonFormatter) for h in logging.getLogger("nanobatch").handlers)


def _error(text: str, *, prefix: str = "error: ") -> None:
    """Tell the operator of an error on stderr: ``error: ...``, or one JSON event with ``--log-format json``."""
    if _json_logs():
        logger.error("%s", text)
    else:
        click.echo(f"{prefix}{text}", err=True)


def _setup_logging(verbose: int, quiet: bool, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("nanobatch: %(levelname)s: %(message)s"))
    root = logging.getLogger("nanobatch")
    root.handlers[:] = [handler]
    root.propagate = False
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    root.setLevel(level)
    if log_format == "json" and not quiet:
        root.setLevel(min(level, logging.INFO))  # machines want every event


def _install_redaction(settings: Settings) -> None:
    from ..config import read_api_key

    secret = read_api_key(settings)
    for handler in logging.getLogger("nanobatch").handlers:
        handler.filters[:] = [_Redact(secret)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    _setup_logging(verbose, False, log_format)


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click (we allow 8.1)
    """Seconds, or hours, minutes and seconds: ``5400``, ``90m``, ``1h30m``, ``1.5h``, ``45s``."""

    name = "duration"
    _FORM = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            text = str(value).strip().lower()
            match = self._FORM.fullmatch(text)
            try:
                seconds = float(text)
            except ValueError:
                if not text or match is None:
                    self.fail(f"{value!r} is not a duration: give seconds, or e.g. 90m, 4h, 1h30m", param, ctx)
                hours, minutes, secs = (float(group) if group else 0.0 for group in match.groups())
                seconds = hours * 3600 + minutes * 60 + secs
        if not 0 < seconds < math.inf:
            self.fail(f"{value!r}: the duration must be more than 0 and finite", param, ctx)
        return seconds


def _settings_options(f: Any) -> Any:
    options = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="Config file (default: $NANOBATCH_CONFIG, else ./nanobatch.yaml if present).",
        ),
        click.option(
            "--out",
            "out_dir",
            type=click.Path(file_okay=False),
            help="Output folder (default: the manifest's output_dir, else <output.dir>/<name>).",
        ),
        click.option("--model", help="Model id for items that do not name one (overrides the manifest)."),
        click.option(
            "--tier",
            type=click.Choice(["standard", "flex", "priority", "batch"]),
            help="Service tier for items that do not name one: flex costs half (and may be shed), priority more; "
            "batch costs half through the Batch API (answers within 24 h).",
        ),
        click.option("--concurrency", type=click.IntRange(1, 1000), help="Requests in flight at most."),
        click.option(
            "--rpm",
            type=click.FloatRange(min=0, min_open=True),
            help="Requests per minute at most, in any 60 s (limits.rpm_burst: how many may leave at once).",
        ),
        click.option("--base-url", help="API base URL, e.g. https://generativelanguage.googleapis.com."),
        click.option(
            "--max-cost",
            type=click.FloatRange(min=0, min_open=True),
            help="Stop before the run could spend more than this many US dollars.",
        ),
        click.option("--max-requests", type=click.IntRange(min=1), help="Send at most this many requests."),
        click.option(
            "--max-duration",
            type=Duration(),
            help="Start no request later than this after the start (e.g. 3600, 90m, 4h, 1h30m); "
            "requests in flight then get --grace to finish.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _settings(config_file: str | None, **flags: Any) -> Settings:
    from ..config import load_settings

    return load_settings(
        config_file,
        overrides={
            "api.model": flags.get("model"),
            "api.base_url": flags.get("base_url"),
            "api.tier": flags.get("tier"),
            "limits.concurrency": flags.get("concurrency"),
            "limits.requests_per_minute": flags.get("rpm"),
            "limits.grace_s": flags.get("grace"),
            "limits.max_duration_s": flags.get("max_duration"),
            "batch.wait": False if flags.get("no_wait") else None,
            "batch.deadline_s": flags.get("batch_deadline"),
            "budget.max_cost_usd": flags.get("max_cost"),
            "budget.max_requests": flags.get("max_requests"),
        },
    )


def _manifest(path: str, settings: Settings, model: str | None) -> Any:
    from ..job.manifest import load_manifest

    manifest = load_manifest(path, default_model=settings.api.model)
    return dataclasses.replace(manifest, model=model) if model else manifest


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@_settings_options
@click.option("--simulate", is_flag=True, help="Run against the built-in simulator (no key, no network).")
@click.option("--retry-failed", is_flag=True, help="Run only items whose latest result is failed or blocked.")
@click.option("--force", is_flag=True, help="Redo every item, even those already done.")
@click.option("--dry-run", is_flag=True, help="Check everything and estimate cost; send nothing.")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
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
@click.option("-q", "--quiet", is_flag=True, help="No progress display and no summary; errors only.")
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=1),
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
    **flags: Any,
) -> None:
    """Run the job in MANIFEST: send every item not already done, write images and results."""
    import anyio

    from ..run.preflight import check_job
    from ..run.runner import run_job
    from ..run.stats import RunStats

    settings = _settings(config_file, **flags)
    _install_redaction(settings)
    job = _manifest(manifest, settings, flags.get("model"))
    if dry_run:
        _print_check(check_job(job, settings=settings, out_dir=out_dir))
        return
    display = _display(quiet, progress_interval)
    stats = RunStats()

    async def go() -> RunSummary:
        async with anyio.create_task_group() as tg:
            if display is not None:
                tg.start_soon(display.run, stats)
            try:
                summary = await run_job(
                    job,
                    settings=settings,
                    out_dir=out_dir,
                    force=force,
                    retry_failed=retry_failed,
                    simulate=simulate,
                    wait_lock=wait_lock,
                    handle_signals=True,
                    stats=stats,
                )
            finally:
                tg.cancel_scope.cancel()
        return summary

    summary = anyio.run(go)
    _after_run(summary, write_html=write_html, quiet=quiet)
    raise SystemExit(summary.exit_code)


def _after_run(summary: RunSummary, *, write_html: bool, quiet: bool) -> None:
    """Write the report if asked, then say how the run went (only why it stopped early, with --quiet)."""
    if write_html:
        from .report import write_report

        logger.info("wrote %s", write_report(summary.out_dir))
    if quiet:
        if summary.reason:  # --quiet still says why a run stopped early: that is an error for cron mail
            _error(f"run {summary.outcome}: {summary.reason}")
    elif _json_logs():
        _log_summary(summary)
    else:
        _print_summary(summary)


def _display(quiet: bool, interval_s: float) -> LiveProgress | PlainProgress | None:
    """A live display on a terminal, plain lines in logs and cron mail, nothing with --quiet."""
    from .progress import LiveProgress, PlainProgress

    if quiet:
        logging.getLogger("nanobatch").setLevel(logging.ERROR)
        return None
    logging.getLogger("nanobatch.progress").setLevel(logging.INFO)
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb" and not _json_logs():
        live = LiveProgress()
        root = logging.getLogger("nanobatch")
        handler = live.log_handler()
        handler.filters[:] = [f for h in root.handlers for f in h.filters]
        root.handlers[:] = [handler]
        return live
    return PlainProgress(interval_s)


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@_settings_options
def validate(manifest: str, config_file: str | None, out_dir: str | None, **flags: Any) -> None:
    """Resolve and check every item, estimate cost and duration; send nothing."""
    from ..run.preflight import check_job

    settings = _settings(config_file, **flags)
    _print_check(check_job(_manifest(manifest, settings, flags.get("model")), settings=settings, out_dir=out_dir))


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
    click.echo(
        f"{out_dir}: {info['items']} items: {counts['ok']} ok, {counts['failed']} failed, {counts['blocked']} blocked"
    )
    tokens = info["tokens"]
    click.echo(
        f"tokens: prompt {tokens['promptTokenCount']}, output {tokens['candidatesTokenCount']}, "
        f"thinking {tokens['thoughtsTokenCount']}; cost ${info['cost_usd']:.4f}"
    )
    for kind, count in info["failures_by_kind"].items():
        click.echo(f"  {kind}: {count}")
    for job in info.get("batch_jobs", []):
        counts = ", ".join(f"{job[name]} {name}" for name in ("succeeded", "failed", "pending") if name in job)
        click.echo(f"batch job {job['job'] or '(not created yet)'}: {job['state']}, {job['requests']} requests"
                   + (f" ({counts})" if counts else ""))  # fmt: skip
    if info.get("running"):
        click.echo(f"a run is in progress ({info['running']}): {info['in_flight']} requests in flight")
    if info.get("possibly_charged"):
        click.echo(f"in flight when a run died (may have been charged, no result saved): {info['possibly_charged']}")
    last = info.get("last_run")
    if last:
        click.echo(f"last run: {last['outcome']}, {last['started_at']} .. {last['finished_at']}")
        if last.get("reason"):
            click.echo(f"  reason: {last['reason']}")
    if info.get("left") is not None:
        click.echo(
            f"left: {info['left']} of {info['manifest_items']} items in {info['manifest']} not done "
            "(new, failed, blocked, or output missing)"
        )


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Config file (for the endpoint).")
@click.option("--base-url", help="API base URL (default: api.base_url).")
def cancel(out_dir: str, config_file: str | None, base_url: str | None) -> None:
    """Cancel the open batch jobs of OUT_DIR; the next run sends their unanswered items again."""
    import anyio

    from ..api.batch_api import BatchClient
    from ..config import read_api_key
    from ..run.batch.ledger import cancel_jobs

    settings = _settings(config_file, base_url=base_url)
    _install_redaction(settings)
    api_key = read_api_key(settings)

    async def go() -> list[str]:
        async with BatchClient(base_url=settings.api.base_url, api_key=api_key, auth=settings.api.auth,
                               api_version=settings.api.api_version) as client:  # fmt: skip
            return await cancel_jobs(Path(out_dir), client)

    names = anyio.run(go)
    click.echo(f"cancelled {len(names)} batch jobs" + (f": {', '.join(names)}" if names else ""))


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
@click.option("--live", is_flag=True, help="Also list what the configured endpoint serves, and compare.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON, for scripts.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Config file (for --live).")
@click.option("--base-url", help="API base URL (for --live).")
def models_command(live: bool, as_json: bool, config_file: str | None, base_url: str | None) -> None:
    """The model table: status, limits, and the price of one image per size and tier."""
    from .catalog import compare_live, list_live, model_rows

    result: dict[str, Any] = {"models": model_rows()}
    if live:
        settings = _settings(config_file, base_url=base_url)
        _install_redaction(settings)
        import anyio

        result["live"] = compare_live(anyio.run(list_live, settings))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_models(result)


def _add_simulate() -> None:
    from ..simulator._cli import simulate  # the simulator ships with the package

    cli.add_command(simulate)


_add_simulate()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with *argv*; return the exit code instead of exiting."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="nanobatch", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except (click.exceptions.Abort, KeyboardInterrupt):
        _error("interrupted", prefix="")
        return 130
    except click.ClickException as exc:
        if _json_logs():
            _error(exc.format_message())
        else:
            exc.show()
        return 2
    except NanobatchError as exc:
        _error(str(exc))
        return exc.exit_code
    except BaseExceptionGroup as group:  # from a task group: report our error; anything else is a bug
        if (error := sole_error(group)) is None:
            raise
        _error(str(error))
        return error.exit_code
    return 0


def entrypoint() -> None:
    sys.exit(main(sys.argv[1:]))
