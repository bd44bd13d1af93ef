"""The Prometheus textfile (--metrics-file): read back with prometheus_client's own parser, as node_exporter's
textfile collector would read it; written whole, during and at the end of a run, however it ends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

import nanobatch
from nanobatch.cli.main import main
from nanobatch.config import Settings, load_settings
from nanobatch.errors import ConfigError
from nanobatch.run.metrics import Counts, metrics_file

from .fakes import FakeGemini, google_error, ok_body, run, write_job

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def read_metrics(path: Path) -> Samples:
    """Every sample of the file, keyed by name and labels (the job_name label left out); names start with
    nanobatch_ and only counters' end in _total."""
    samples: Samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            assert sample.name.startswith("nanobatch_")
            assert sample.name.endswith("_total") == (family.type == "counter"), sample.name
            assert sample.labels.pop("job_name") == "job"
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _settings(path: Path | str, **overrides: Any) -> Settings:
    return load_settings(env={}, overrides={"output.metrics_file": str(path), **overrides})


def _items(n: int) -> list[dict[str, Any]]:
    return [{"id": f"sku-{i}", "instruction": f"edit {i}"} for i in range(n)]


def test_a_run_leaves_its_counts_cost_tokens_and_timestamps(tmp_path: Path) -> None:
    job = write_job(tmp_path, _items(3))
    prom = tmp_path / "textfile" / "nanobatch-{job}.prom"
    prom.parent.mkdir()
    fake = FakeGemini(
        {"edit 1": [google_error(503, "UNAVAILABLE", "busy"), google_error(400, "INVALID_ARGUMENT", "no")]}
    )
    summary = run(job, fake, settings=_settings(prom))
    assert summary.exit_code == 1
    written = tmp_path / "textfile" / "nanobatch-job.prom"
    assert os.listdir(written.parent) == ["nanobatch-job.prom"]  # no temporary file left beside it
    samples = read_metrics(written)
    assert value(samples, "nanobatch_items_total", status="ok") == 2
    assert value(samples, "nanobatch_items_total", status="failed") == 1
    assert value(samples, "nanobatch_items_total", status="skipped") == 0
    assert value(samples, "nanobatch_run_items") == 3
    assert value(samples, "nanobatch_requests_total", outcome="ok") == 2
    assert value(samples, "nanobatch_requests_total", outcome="overloaded") == 1  # retried
    assert value(samples, "nanobatch_requests_total", outcome="bad_request") == 1
    assert value(samples, "nanobatch_tokens_total", kind="input") == 2 * 1312
    assert value(samples, "nanobatch_tokens_total", kind="output") == 2 * 1120
    assert value(samples, "nanobatch_cost_usd_total") == pytest.approx(summary.stats.cost_usd)
    assert value(samples, "nanobatch_run_in_progress") == 0
    assert value(samples, "nanobatch_last_run_exit_code") == 1
    assert value(samples, "nanobatch_last_run_timestamp_seconds") is not None
    assert value(samples, "nanobatch_last_success_timestamp_seconds") is None  # no run has fully succeeded yet


def test_the_last_success_survives_a_failed_run(tmp_path: Path) -> None:
    job = write_job(tmp_path, _items(2))
    prom = tmp_path / "nanobatch.prom"
    assert run(job, FakeGemini(), settings=_settings(prom)).exit_code == 0
    succeeded = value(read_metrics(prom), "nanobatch_last_success_timestamp_seconds")
    assert succeeded is not None and succeeded == value(read_metrics(prom), "nanobatch_last_run_timestamp_seconds")
    fatal = google_error(401, "UNAUTHENTICATED", "API key not valid")
    summary = run(job, FakeGemini({f"edit {i}": [fatal] for i in range(2)}), settings=_settings(prom), force=True)
    assert summary.exit_code == 3  # aborted: the file is still written at the end
    samples = read_metrics(prom)
    assert value(samples, "nanobatch_last_run_exit_code") == 3 and value(samples, "nanobatch_run_in_progress") == 0
    assert value(samples, "nanobatch_last_success_timestamp_seconds") == succeeded
    assert value(samples, "nanobatch_requests_total", outcome="auth") is not None


def test_the_file_is_refreshed_while_the_run_goes(tmp_path: Path) -> None:
    job = write_job(tmp_path, _items(4))
    prom = tmp_path / "nanobatch.prom"
    seen: list[Samples] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(read_metrics(prom) if prom.exists() else {})
        return httpx2.Response(200, json=ok_body())

    fake = FakeGemini({f"edit {i}": [answer] for i in range(4)})
    # One request every 30 s (on the virtual clock): the file is rewritten every 15 s meanwhile.
    settings = _settings(prom, **{"limits.requests_per_minute": 2, "limits.concurrency": 1})
    summary = run(job, fake, settings=settings, settle_s=0.05)  # file writes in threads: let them finish
    assert summary.exit_code == 0
    last = seen[-1]
    assert value(last, "nanobatch_run_in_progress") == 1
    assert value(last, "nanobatch_items_total", status="ok") == 3  # the three before it, done
    assert value(last, "nanobatch_run_duration_seconds") == 75  # rewritten 15 s before the request, at 75 s
    assert value(read_metrics(prom), "nanobatch_items_total", status="ok") == 4


def test_a_file_nanobatch_did_not_write_is_left_alone(tmp_path: Path) -> None:
    job = write_job(tmp_path, _items(1))
    theirs = tmp_path / "node.prom"
    theirs.write_text("# HELP node_thing x\n# TYPE node_thing gauge\nnode_thing 1\n")
    fake = FakeGemini()
    with pytest.raises(ConfigError, match="not written by nanobatch, and is left as it is"):
        run(job, fake, settings=_settings(theirs))
    assert fake.requests == [] and theirs.read_text().startswith("# HELP node_thing")
    assert run(job, fake, settings=_settings(tmp_path / "ours.prom")).exit_code == 0
    other = write_job(tmp_path / "other", _items(1), name="other")
    with pytest.raises(ConfigError, match="another job's"):
        run(other, fake, settings=_settings(tmp_path / "ours.prom"))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("metrics.txt", "must end in .prom", id="not-prom"),
        pytest.param("missing/nanobatch.prom", "does not exist", id="no-folder"),
    ],
)
def test_a_path_the_collector_would_not_read_is_refused(tmp_path: Path, name: str, message: str) -> None:
    job = write_job(tmp_path, _items(1))
    fake = FakeGemini()
    with pytest.raises(ConfigError, match=message):
        run(job, fake, settings=_settings(tmp_path / name))
    assert fake.requests == []


def test_the_file_is_readable_by_all_and_a_failed_write_leaves_the_old_one_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "textfile").mkdir()
    prom = tmp_path / "textfile" / "nanobatch.prom"
    metrics = metrics_file(str(prom), "job")
    assert metrics is not None
    counts = Counts(items=1, statuses={"ok": 1}, requests={}, tokens={}, cost_usd=0.0, started_at=0.0, duration_s=1)
    mask = os.umask(0o077)
    try:
        metrics.write(counts)
    finally:
        os.umask(mask)
    assert prom.stat().st_mode & 0o777 == 0o644  # node_exporter reads it, as another user
    before = prom.read_text()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    metrics.write(counts)  # logged, not raised: a run goes on without its metrics
    assert os.listdir(prom.parent) == ["nanobatch.prom"] and prom.read_text() == before
    assert "cannot write the metrics file" in caplog.text and "No space left on device" in caplog.text


def test_the_metrics_file_flag(tmp_path: Path) -> None:
    job = write_job(tmp_path, _items(2))
    prom = tmp_path / "nanobatch.prom"
    assert main(["run", str(job), "--simulate", "--out", str(tmp_path / "out"), "--metrics-file", str(prom), "-q"]) == 0
    samples = read_metrics(prom)
    assert value(samples, "nanobatch_items_total", status="ok") == 2
    assert value(samples, "nanobatch_last_success_timestamp_seconds") is not None


def test_a_run_that_cannot_take_the_folder_leaves_the_file_to_the_run_that_holds_it(tmp_path: Path) -> None:
    import anyio

    import nanobatch
    from nanobatch.output.lock import RunLock

    job = write_job(tmp_path, _items(1))
    prom, out = tmp_path / "nanobatch.prom", tmp_path / "out"
    assert run(job, FakeGemini(), settings=_settings(prom)).exit_code == 0
    before = prom.read_bytes()

    async def go() -> None:
        async with RunLock(out):
            await nanobatch.run_job(job, transport=FakeGemini().transport, out_dir=out, settings=_settings(prom))

    with pytest.raises(nanobatch.LockHeld):
        anyio.run(go)
    assert prom.read_bytes() == before


def test_a_run_stopped_while_it_waits_for_the_folder_leaves_the_file_to_the_run_that_holds_it(tmp_path: Path) -> None:
    # Its time limit comes while it waits (--wait-lock): it never held the folder, and must not write
    # "last run: exit 3, not in progress" over the live run's file (an alert on that would fire at once).
    import anyio

    from nanobatch.errors import TimeLimitReached
    from nanobatch.output.lock import RunLock

    job = write_job(tmp_path, _items(1))
    prom, out = tmp_path / "nanobatch.prom", tmp_path / "out"
    assert run(job, FakeGemini(), settings=_settings(prom)).exit_code == 0
    before = prom.read_bytes()
    limited = _settings(prom).model_copy(
        update={"limits": _settings(prom).limits.model_copy(update={"max_duration_s": 1})}
    )

    async def go() -> None:
        async with RunLock(out):
            await nanobatch.run_job(
                job, transport=FakeGemini().transport, out_dir=out, settings=limited, wait_lock=True
            )

    with pytest.raises(TimeLimitReached):
        anyio.run(go)
    assert prom.read_bytes() == before


def test_a_run_that_waited_for_the_folder_keeps_the_success_of_the_run_it_waited_for(tmp_path: Path) -> None:
    from nanobatch.run.metrics import Ending

    prom = tmp_path / "nanobatch.prom"
    counts = Counts(items=1, statuses={"ok": 1}, requests={}, tokens={}, cost_usd=0.0, started_at=0.0, duration_s=1)
    waiting = metrics_file(str(prom), "job")  # checked at its start, then waits for the lock (--wait-lock)
    holding = metrics_file(str(prom), "job")
    assert waiting is not None and holding is not None
    holding.write(counts, Ending(exit_code=0, at=1_800_000_000.0))  # the run it waited for succeeds
    waiting.write(counts, Ending(exit_code=1, at=1_800_003_600.0))
    samples = read_metrics(prom)
    assert value(samples, "nanobatch_last_success_timestamp_seconds") == 1_800_000_000
    assert value(samples, "nanobatch_last_run_timestamp_seconds") == 1_800_003_600


def test_validate_refuses_a_metrics_file_the_run_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `validate` checks what `run` checks: a missing folder is named before the night, not at its start.
    job = write_job(tmp_path, [{"id": "a", "image": "images/1.png"}])
    config = tmp_path / "nanobatch.yaml"
    config.write_text(f"output:\n  metrics_file: {tmp_path / 'missing' / 'catalog.prom'}\n")
    assert main(["validate", str(job), "--config", str(config)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_link_at_the_metrics_files_path_is_refused_not_replaced(tmp_path: Path) -> None:
    # Each write replaces the file whole: a link there (to the collector's folder) became a plain file, the link
    # gone and its target never written.
    (tmp_path / "collector").mkdir()
    link = tmp_path / "link.prom"
    link.symlink_to(tmp_path / "collector" / "a.prom")
    with pytest.raises(ConfigError, match="it is a link"):
        metrics_file(str(link), "job")
    assert link.is_symlink()


def test_the_last_success_survives_a_failed_run_whatever_the_jobs_name_holds(tmp_path: Path) -> None:
    # A name is a label value: "}" and quotes inside it broke the reading of the previous file's samples.
    from nanobatch.run.metrics import Ending

    prom = tmp_path / "nanobatch.prom"
    counts = Counts(items=1, statuses={"ok": 1}, requests={}, tokens={}, cost_usd=0.0, started_at=0.0, duration_s=1)
    name = 'spring}cat "sale" \\ 2027'
    first, second = metrics_file(str(prom), name), metrics_file(str(prom), name)
    assert first is not None and second is not None
    first.write(counts, Ending(exit_code=0, at=1_800_000_000.0))
    second.write(counts, Ending(exit_code=1, at=1_800_003_600.0))
    (family,) = [f for f in text_string_to_metric_families(prom.read_text()) if f.name.startswith("nanobatch_last_s")]
    assert [(s.labels["job_name"], s.value) for s in family.samples] == [(name, 1_800_000_000)]


def test_a_file_another_jobs_run_took_meanwhile_is_left_to_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Two jobs started at once with the same file: both checks found none. The one that writes second must not
    # replace the other's file every 15 s (jobB's metrics vanished, both runs exiting 0).
    job = write_job(tmp_path, _items(2))
    prom = tmp_path / "shared.prom"
    theirs = '# nanobatch metrics of job "jobB"\nnanobatch_run_in_progress{job_name="jobB"} 1.0\n'

    def answer(request: httpx2.Request) -> httpx2.Response:
        prom.write_text(theirs)  # jobB's run, writing its file meanwhile
        return httpx2.Response(200, json=ok_body())

    fake = FakeGemini({f"edit {i}": [answer] for i in range(2)})
    assert run(job, fake, settings=_settings(prom), settle_s=0.05).exit_code == 0
    assert prom.read_text() == theirs
    assert sum("is another job's now" in r.getMessage() for r in caplog.records) == 1  # said once


def test_the_counters_add_up_over_the_jobs_runs_so_a_short_run_is_not_lost(tmp_path: Path) -> None:
    # Two nights shorter than a scrape interval, each spending the same: restarted from 0 each run, Prometheus saw
    # 0.077 then 0.077, no reset, and increase() counted the second night as nothing.
    job = write_job(tmp_path, _items(2))
    prom = tmp_path / "job.prom"
    first = run(job, FakeGemini(), settings=_settings(prom), settle_s=0.05)
    after_one = read_metrics(prom)

    second = run(job, FakeGemini({"edit 1": [google_error(500, "INTERNAL", "boom")]}), settings=_settings(prom),
                 settle_s=0.05, force=True)  # fmt: skip

    after_two = read_metrics(prom)
    assert value(after_two, "nanobatch_items_total", status="ok") == 3  # 2, then 1 more
    assert value(after_two, "nanobatch_items_total", status="failed") == 1
    assert value(after_two, "nanobatch_cost_usd_total") == pytest.approx(first.stats.cost_usd + second.stats.cost_usd)
    assert value(after_two, "nanobatch_cost_usd_total") > value(after_one, "nanobatch_cost_usd_total")  # type: ignore[operator]
    assert value(after_two, "nanobatch_run_items") == 2  # a gauge: this run's
