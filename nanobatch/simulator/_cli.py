"""``nanobatch simulate``: serve the simulator on loopback."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypedDict, TypeVar

import click

from ..loopback import loopback_host
from .config import BATCH_FAULT_KINDS, FAULT_KINDS, SimulatorConfig

__all__ = ["FAULT_MIX", "LatencyOptions", "parse_batch_faults", "parse_fault_rates", "parse_latency", "simulate"]

# How a bare ``--fault-rate 0.1`` is split across kinds: mostly transient
# server errors, as seen from a busy model.
FAULT_MIX: dict[str, float] = {
    "429": 0.30,
    "503": 0.30,
    "500": 0.08,
    "504": 0.07,
    "drop": 0.05,
    "image_safety": 0.08,
    "no_image": 0.06,
    "text_only": 0.04,
    "blocked": 0.02,
}
_LATENCY_HELP = "SECONDS, uniform:LOW,HIGH or lognormal:MEDIAN,SIGMA (e.g. 0.2, uniform:1,5, lognormal:40,0.5)"
_CLIENT_KEYS = ("NANOBATCH_API_KEY", "GEMINI_API_KEY")  # the variables `nanobatch run` reads a key from by default


FC = TypeVar("FC", bound=Callable[..., Any])


class LatencyOptions(TypedDict):
    """SimulatorConfig's latency fields."""

    latency: str
    latency_s: float
    latency_spread: float


def parse_latency(text: str) -> LatencyOptions:
    """Parse a ``--latency`` value.

    >>> parse_latency("uniform:1,5")
    {'latency': 'uniform', 'latency_s': 3.0, 'latency_spread': 2.0}
    """
    kind, _, args = text.strip().partition(":") if ":" in text else ("fixed", "", text.strip())
    try:
        numbers = [float(x) for x in args.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected {_LATENCY_HELP}; got {text!r}") from None
    if any(n < 0 for n in numbers):
        raise click.BadParameter(f"latency values must not be negative; got {text!r}")
    if kind == "fixed" and len(numbers) == 1:
        return LatencyOptions(latency="fixed", latency_s=numbers[0], latency_spread=0.0)
    if kind == "uniform" and len(numbers) == 2 and numbers[0] <= numbers[1]:
        low, high = numbers
        return LatencyOptions(latency="uniform", latency_s=(low + high) / 2, latency_spread=(high - low) / 2)
    if kind == "lognormal" and len(numbers) == 2 and numbers[0] > 0:
        return LatencyOptions(latency="lognormal", latency_s=numbers[0], latency_spread=numbers[1])
    raise click.BadParameter(f"expected {_LATENCY_HELP} (LOW <= HIGH, MEDIAN > 0); got {text!r}")


def parse_fault_rates(values: Iterable[str]) -> dict[str, float]:
    """Parse ``--fault-rate`` values into SimulatorConfig field names (``rate_429``...).

    A bare number is a total rate split by FAULT_MIX; ``KIND=RATE`` sets one
    kind (and wins over the mix). Values may also be comma-separated.

    >>> parse_fault_rates(["0.1", "drop=0.02"])["rate_drop"]
    0.02
    """
    rates: dict[str, float] = {}
    for item, kind, sep, number in _items(values):
        if not sep:
            total = _rate(item, item)
            for mix_kind, share in FAULT_MIX.items():
                rates.setdefault(FAULT_KINDS[mix_kind], total * share)
            continue
        name = FAULT_KINDS.get(kind.strip().lower().replace("-", "_"))
        if name is None:
            raise click.BadParameter(f"unknown fault kind {kind!r}; choose from {', '.join(FAULT_KINDS)}")
        rates[name] = _rate(number, item)
    if sum(rates.values()) > 1.0 + 1e-9:
        raise click.BadParameter(f"fault rates add up to {sum(rates.values()):g}; they must total at most 1")
    return rates


def parse_batch_faults(values: Iterable[str]) -> dict[str, float]:
    """Parse ``--batch-fault KIND=RATE`` values into SimulatorConfig field names (``batch_rate_failed``...).

    >>> parse_batch_faults(["failed=0.1,lost_create=0.5"])
    {'batch_rate_failed': 0.1, 'batch_rate_lost_create': 0.5}
    """
    rates: dict[str, float] = {}
    for item, kind, sep, number in _items(values):
        kind = kind.strip().lower().replace("-", "_")
        if not sep or kind not in BATCH_FAULT_KINDS:
            kinds = ", ".join(BATCH_FAULT_KINDS)
            raise click.BadParameter(f"expected KIND=RATE with KIND one of {kinds}; got {item!r}")
        rates[f"batch_rate_{kind}"] = _rate(number, item)
    if rates.get("batch_rate_failed", 0.0) + rates.get("batch_rate_expired", 0.0) > 1.0 + 1e-9:
        raise click.BadParameter("failed and expired rates must total at most 1: a job ends one way")
    return rates


def _items(values: Iterable[str]) -> Iterator[tuple[str, str, str, str]]:
    """Each comma-separated ``KIND=RATE`` (or bare ``RATE``) of *values*: the item, and its parts around ``=``."""
    for item in (part.strip() for value in values for part in value.split(",")):
        if item:
            yield item, *item.partition("=")


def _rate(number: str, item: str) -> float:
    try:
        rate = float(number)
    except ValueError:
        raise click.BadParameter(f"expected a rate between 0 and 1, or KIND=RATE; got {item!r}") from None
    if not 0.0 <= rate <= 1.0:
        raise click.BadParameter(f"a rate must be between 0 and 1; got {item!r}")
    return rate


def _rates_option(
    flag: str, name: str, metavar: str, parse: Callable[[Iterable[str]], dict[str, float]], help_text: str
) -> Callable[[FC], FC]:
    """A repeatable option of rates, parsed into SimulatorConfig fields by *parse*."""
    return click.option(
        flag, name, multiple=True, metavar=metavar, callback=lambda _ctx, _param, value: parse(value), help=help_text
    )


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (keep it loopback).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option(
    "--latency",
    default="0",
    show_default=True,
    callback=lambda _ctx, _param, value: parse_latency(value),
    help=f"Simulated latency: {_LATENCY_HELP}.",
)
@click.option(
    "--time-scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Multiply every wait, quota window and retryDelay (0.01 turns 40 s into 0.4 s).",
)
@_rates_option(
    "--fault-rate",
    "fault_rates",
    "RATE|KIND=RATE",
    parse_fault_rates,
    f"A total rate (split in a realistic mix) or KIND=RATE; repeatable. KIND: {', '.join(FAULT_KINDS)}.",
)
@click.option(
    "--batch-latency",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="How long a batch job takes (times --time-scale): pending for a tenth of it, then running, then done.",
)
@_rates_option(
    "--batch-fault",
    "batch_faults",
    "KIND=RATE",
    parse_batch_faults,
    f"Batch API faults, per job (per line for line_error); repeatable. KIND: {', '.join(BATCH_FAULT_KINDS)}.",
)
@click.option("--rpm-limit", type=click.IntRange(min=1), help="Requests per minute before 429 (sliding window).")
@click.option("--daily-limit", type=click.IntRange(min=1), help="Successful (HTTP 200) requests before a per-day 429.")
@click.option("--seed", default=0, show_default=True, help="Seed for latencies and faults (same seed, same run).")
@click.option("--api-key-env", metavar="NAME", help="Require the API key held by this environment variable.")
@click.option("--image-format", type=click.Choice(["png", "jpeg"]), default="png", show_default=True)
@click.option(
    "--canned",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="Answer every image request with this image file (read once) instead of editing the input: for benchmarks.",
)
@click.option(
    "--flex-shed",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of flex-tier requests shed with a 503, as Google sheds flex traffic under load.",
)
@click.option("--verbose", is_flag=True, help="Log every request (uvicorn access log).")
def simulate(
    *,
    host: str,
    port: int,
    latency: LatencyOptions,
    time_scale: float,
    fault_rates: dict[str, float],
    batch_latency: float,
    batch_faults: dict[str, float],
    rpm_limit: int | None,
    daily_limit: int | None,
    seed: int,
    api_key_env: str | None,
    image_format: str,
    canned: str | None,
    flex_shed: float,
    verbose: bool,
) -> None:
    """Serve the built-in Gemini simulator (no key, no network, real edited images)."""
    api_key = _required_key(api_key_env)
    rates: dict[str, Any] = {**fault_rates, **batch_faults}
    config = SimulatorConfig(
        seed=seed,
        time_scale=time_scale,
        rpm_limit=rpm_limit,
        daily_limit=daily_limit,
        api_key=api_key,
        image_format=image_format,
        canned=canned,
        batch_latency_s=batch_latency,
        flex_shed=flex_shed,
        **latency,
        **rates,
    )
    if not loopback_host(host):
        click.echo(f"warning: {host} is reachable from other machines; the simulator is meant for loopback", err=True)
    use_key = _key_setting(api_key_env, host)

    def ready(url: str) -> None:
        command = f"{use_key}nanobatch run MANIFEST --base-url {url}"
        click.echo(f"Simulator listening on {url}; run: {command} (Ctrl-C stops)")

    from .server import serve  # uvicorn and starlette: loaded only when the simulator really starts

    try:
        serve(config, host, port, verbose=verbose, on_ready=ready)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


def _required_key(api_key_env: str | None) -> str | None:
    """The key requests must carry: the value of *api_key_env*, which must then be set; None: any key."""
    if not api_key_env:
        return None
    api_key = os.environ.get(api_key_env)
    if not api_key:
        raise click.BadParameter(f"environment variable {api_key_env} is not set", param_hint="--api-key-env")
    return api_key


def _key_setting(api_key_env: str | None, host: str) -> str:
    """What to put before ``nanobatch run`` in the command the banner shows, for it to work as typed."""
    # `nanobatch run` reads the key from api.api_key_env (NANOBATCH_API_KEY), else GEMINI_API_KEY; a loopback
    # base URL needs none, and without --api-key-env any key will do.
    if api_key_env and api_key_env not in _CLIENT_KEYS:
        return f"NANOBATCH_API_API_KEY_ENV={api_key_env} "
    if not api_key_env and not loopback_host(host):
        return "NANOBATCH_API_KEY=any "
    return ""
