"""The CLI's shared options: durations, and the settings and manifest every job command reads."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Duration", "Finite", "manifest_from", "settings_from", "settings_options"]


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


class Finite(click.FloatRange):
    """A :class:`click.FloatRange` that takes no ``nan`` or ``inf``: a NaN passes every range check (it compares
    false both ways), and an interval or a cap of ``inf`` is no setting at all."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def settings_options(f: Any) -> Any:
    """The options of the commands that take a manifest (``run``, ``validate``): config, output, limits."""
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
            "batch costs half through the Gemini API's Batch API (answers within 24 h; not on Vertex AI).",
        ),
        click.option("--concurrency", type=click.IntRange(1, 1000), help="Requests in flight at most."),
        click.option(
            "--workers",
            type=click.IntRange(0, 256),
            help="Processes that decode and write big answers (default: one per CPU, once needed; 0: none).",
        ),
        click.option(
            "--rpm",
            type=Finite(min=0, min_open=True),
            help="Requests per minute at most, in any 60 s (limits.rpm_burst: how many may leave at once).",
        ),
        click.option("--base-url", help="API base URL, e.g. https://generativelanguage.googleapis.com."),
        click.option(
            "--max-cost",
            type=Finite(min=0, min_open=True),
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


def settings_from(config_file: str | None, **flags: Any) -> Settings:
    """The settings from the config file and the environment, the command's *flags* over them."""
    from ..config import load_settings

    overrides = {setting: flags.get(name) for setting, name in _FLAGS.items()}
    overrides["batch.wait"] = False if flags.get("no_wait") else None
    named = {setting: "--" + name.replace("_", "-") for setting, name in {**_FLAGS, "batch.wait": "no_wait"}.items()}
    return load_settings(config_file, overrides=overrides, flags=named)


# The settings the command-line options give, and the options' names as click passes them
_FLAGS = {
    "api.model": "model",
    "api.base_url": "base_url",
    "api.tier": "tier",
    "limits.concurrency": "concurrency",
    "limits.workers": "workers",
    "limits.requests_per_minute": "rpm",
    "limits.grace_s": "grace",
    "limits.max_duration_s": "max_duration",
    "batch.deadline_s": "batch_deadline",
    "budget.max_cost_usd": "max_cost",
    "budget.max_requests": "max_requests",
    "output.metrics_file": "metrics_file",
}


def manifest_from(path: str, settings: Settings, model: str | None) -> Any:
    """The manifest at *path*, with *model* (``--model``) for the items that name none."""
    from ..job.manifest import load_manifest

    manifest = load_manifest(path, default_model=settings.api.model, qa=settings.qa, written=settings.written_at)
    return dataclasses.replace(manifest, model=model) if model else manifest
