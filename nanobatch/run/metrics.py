"""The run's Prometheus textfile (``--metrics-file``, ``output.metrics_file``; docs/observability.md).

node_exporter's textfile collector reads every ``*.prom`` file of its folder each time Prometheus scrapes it, so
the file is replaced whole, never written in place: a temporary file in the same folder (in nanobatch's reserved
``.nanobatch-*.tmp`` names, which the collector does not read), renamed over it. A run writes it when it starts,
every few seconds while it goes and when it ends, however it ends.

The counters are the job's, over its runs: each run adds its own to what the file the previous run left says
(a run shorter than a scrape interval, its counters restarted from 0, would otherwise look like no run at all to
``increase()``, a night's spend lost). ``nanobatch_last_*`` hold across runs too:
``nanobatch_last_success_timestamp_seconds`` is taken over, so that a failed run does not hide the last good one.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..output.files import atomic_write

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["Counts", "Ending", "MetricsFile", "metrics_file", "render", "token_kind"]

logger = logging.getLogger("nanobatch")

# The first line of every file nanobatch writes: a file at the path without it is not ours to replace.
_HEADER = "# nanobatch metrics of job "

# How usageMetadata's token counts are named in the ``kind`` label (others: their name, in snake case).
_TOKEN_KINDS = {"promptTokenCount": "input", "candidatesTokenCount": "output", "thoughtsTokenCount": "thinking",
                "cachedContentTokenCount": "cached", "toolUsePromptTokenCount": "tool_use_prompt"}  # fmt: skip

_HELP = {
    "nanobatch_run_items": ("gauge", "Items of the job this run goes through (those its check passed)."),
    "nanobatch_items_total": (
        "counter",
        "Items the job's runs finished, by status (skipped: done before, nothing sent).",
    ),
    "nanobatch_requests_total": (
        "counter",
        "Requests of the job's runs that ended, by outcome: ok, or the error's kind.",
    ),
    "nanobatch_tokens_total": (
        "counter",
        "Tokens of the items the job's runs finished, by kind (input, output, thinking).",
    ),
    "nanobatch_cost_usd_total": ("counter", "What the items the job's runs finished cost, in US dollars."),
    "nanobatch_run_in_progress": ("gauge", "1 while the run goes, 0 once it has ended."),
    "nanobatch_run_start_timestamp_seconds": ("gauge", "When this run started (Unix time)."),
    "nanobatch_run_duration_seconds": ("gauge", "How long this run has gone, or went."),
    "nanobatch_last_run_timestamp_seconds": ("gauge", "When the last run that ended, ended (Unix time)."),
    "nanobatch_last_run_exit_code": ("gauge", "The last ended run's exit code (0 all ok, 1 some items not ok, ...)."),
    "nanobatch_last_success_timestamp_seconds": (
        "gauge",
        "When the last run with exit code 0 and nothing left in batch jobs ended (Unix time).",
    ),
}


def token_kind(name: str) -> str:
    """The ``kind`` label of a usageMetadata count: ``promptTokenCount`` -> ``input``."""
    if name in _TOKEN_KINDS:
        return _TOKEN_KINDS[name]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("TokenCount")).lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class Ending:
    """How a run ended, for the ``nanobatch_last_*`` metrics."""

    exit_code: int
    at: float  # Unix time
    waiting: bool = False  # requests left waiting in batch jobs (--no-wait): no success yet, whatever the exit code


@dataclass(frozen=True, slots=True, kw_only=True)
class Counts:
    """A run's figures at one moment, as the metrics file shows them."""

    items: int
    statuses: Mapping[str, int]
    requests: Mapping[str, int]
    tokens: Mapping[str, int]
    cost_usd: float
    started_at: float  # Unix time
    duration_s: float


def metrics_file(setting: str | None, job: str) -> MetricsFile | None:
    """The run's metrics file (``{job}`` in *setting* is the manifest's name), checked before anything is
    sent: ConfigError if the collector would not read it, its folder is missing, or a file nanobatch did not
    write, or another job's, is there."""
    if not setting:
        return None
    path = setting.replace("{job}", job)
    where = f"the metrics file {path} (output.metrics_file, --metrics-file)"
    if not path.endswith(".prom"):
        raise ConfigError(f"{where}: its name must end in .prom, the only files node_exporter's textfile "
                          "collector reads")  # fmt: skip
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.islink(path):  # each write replaces the file: it would replace the link, not write where it points
        raise ConfigError(f"{where}: it is a link, which nanobatch would replace with a file: give the path it "
                          f"points to ({os.path.realpath(path)})")  # fmt: skip
    if not os.path.isdir(folder):
        raise ConfigError(f"{where}: the folder {folder} does not exist; make it, or give another path")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            before = f.read()
    except FileNotFoundError:
        before = None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if before is not None and not before.startswith(f"{_HEADER}{_quoted(job)}\n"):
        whose = "another job's" if before.startswith(_HEADER) else "not written by nanobatch"
        raise ConfigError(f"{where}: the file there is {whose}, and is left as it is: give each job its own "
                          "file (a {job} in the path stands for the job's name)")  # fmt: skip
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{where}: the folder {folder} is not writable by this user")
    return MetricsFile(path, job)


class MetricsFile:
    """One job's textfile, rewritten whole at each :meth:`write`; what the file said of earlier runs
    (``nanobatch_last_*``) when this run first writes it is carried over until this run ends."""

    def __init__(self, path: str, job: str) -> None:
        self.path = path
        self.job = job
        self.last: dict[str, float] | None = None  # read at the first write: the folder is this run's by then
        self.before: dict[_Sample, float] = {}  # the counters as the earlier runs left them, then
        self._failing = False
        self._theirs = False  # another job's run took the file since the check

    def write(self, counts: Counts, ending: Ending | None = None) -> None:
        """Replace the file with *counts* (and *ending*, once the run has ended). A failure is logged (once
        while it lasts), never raised: the run goes on without its metrics."""
        if not self._still_ours():
            return
        if self.last is None:  # not before: a run that waited for the folder's lock takes what the last one left
            self.last, self.before = _earlier_runs(self.path)
        if ending is not None:
            self.last["nanobatch_last_run_timestamp_seconds"] = ending.at
            self.last["nanobatch_last_run_exit_code"] = ending.exit_code
            if ending.exit_code == 0 and not ending.waiting:
                self.last["nanobatch_last_success_timestamp_seconds"] = ending.at
        text = render(self.job, counts, self.last, running=ending is None, before=self.before)
        try:
            atomic_write(self.path, text.encode(), mode=0o644)  # node_exporter reads it as another user
        except OSError as exc:
            if not self._failing:
                logger.warning("cannot write the metrics file %s: %s", self.path, exc.strerror or exc)
            self._failing = True
            return
        self._failing = False

    def _still_ours(self) -> bool:
        """Whether the file is this job's, or none is there: another job's run that started with this one, given
        the same file, may have written it since the check (which found none); it is left as it is, and this run
        goes on without its metrics, said once."""
        try:
            with open(self.path, "rb") as f:
                head = f.readline()
        except OSError:
            return True  # none there (or unreadable: the write says why)
        if head.decode("utf-8", "replace") == f"{_HEADER}{_quoted(self.job)}\n":
            return True
        if not self._theirs:
            logger.warning("the metrics file %s is another job's now (a run of it started with this one): it is "
                           "left as it is, and this run writes none: give each job a file", self.path)  # fmt: skip
        self._theirs = True
        return False


def render(
    job: str, counts: Counts, last: Mapping[str, float], *, running: bool, before: Mapping[_Sample, float] | None = None
) -> str:
    """The textfile, in Prometheus' text exposition format as prometheus-client writes it, each sample labelled
    ``job_name`` with the job's name (not ``job``: Prometheus sets that label to the scrape's own job,
    node_exporter's, and would rename ours), each counter what *before* (the earlier runs') says plus this run's.
    Its first line marks the file as this job's (see :func:`metrics_file`)."""
    families: dict[str, Iterable[tuple[dict[str, str], float]]] = {
        "nanobatch_run_items": [({}, counts.items)],
        "nanobatch_items_total": [({"status": s}, n) for s, n in counts.statuses.items()],
        "nanobatch_requests_total": [({"outcome": o}, n) for o, n in sorted(counts.requests.items())],
        "nanobatch_tokens_total": [({"kind": k}, n) for k, n in sorted(counts.tokens.items())],
        "nanobatch_cost_usd_total": [({}, counts.cost_usd)],
        "nanobatch_run_in_progress": [({}, int(running))],
        "nanobatch_run_start_timestamp_seconds": [({}, counts.started_at)],
        "nanobatch_run_duration_seconds": [({}, counts.duration_s)],
        **{name: [({}, value)] for name, value in sorted(last.items()) if name in _HELP},
    }
    for name, (kind, _) in _HELP.items():
        if kind == "counter":
            families[name] = _added(name, families.get(name, ()), before or {})
    # Imported here: a run without a metrics file does not pay for prometheus-client's import (~60 ms).
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(job, families))  # a Collector is anything with collect()
    head = f"{_HEADER}{_quoted(job)}\n# written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
    return head + generate_latest(registry).decode()


class _Families:
    """The run's samples as metric families, for prometheus-client's writer."""

    def __init__(self, job: str, families: Mapping[str, Iterable[tuple[dict[str, str], float]]]) -> None:
        self.job = job
        self.families = families

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import Metric

        for name, samples in self.families.items():
            kind, text = _HELP[name]
            family = Metric(name.removesuffix("_total") if kind == "counter" else name, text, kind)
            for labels, value in samples:
                family.add_sample(name, {"job_name": self.job, **labels}, float(value))
            yield family


_Sample = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and labels (but job_name)


def _added(
    name: str, samples: Iterable[tuple[dict[str, str], float]], before: Mapping[_Sample, float]
) -> list[tuple[dict[str, str], float]]:
    """The counter *name*'s *samples* (this run's), each plus its value in *before*; and those only *before* has."""
    now = {(name, tuple(sorted(labels.items()))): value for labels, value in samples}
    keys = [*now, *(key for key in before if key[0] == name and key not in now)]
    return [(dict(key[1]), now.get(key, 0.0) + before.get(key, 0.0)) for key in keys]


def _earlier_runs(path: str) -> tuple[dict[str, float], dict[_Sample, float]]:
    """The ``nanobatch_last_*`` samples of the file at *path*, and its counters' (none if there is none, or it
    cannot be read), read by prometheus-client's own parser (a job's name in a label may hold any character)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            families = list(text_string_to_metric_families(f.read()))
    except (OSError, ValueError):
        return {}, {}
    samples = [s for family in families for s in family.samples]
    last = {s.name: s.value for s in samples if s.name.startswith("nanobatch_last_")}
    counters = {name for name, (kind, _) in _HELP.items() if kind == "counter"}
    before = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "job_name"))): s.value
        for s in samples
        if s.name in counters
    }
    return last, before


def _quoted(value: str) -> str:
    """A label value in the exposition format's quotes and escapes."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
