"""The CLI against the simulator over real loopback HTTP: faults recovered or classified as they should be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanobatch.cli.main import main
from nanobatch.simulator import SimulatorConfig, run_in_thread

from .fakes import sku_job

# Fast retries, and a breaker that stays out of the way: these tests are about classification.
CONFIG = """
limits: {concurrency: 4, breaker_threshold: 1000}
retry: {max_attempts: 4, backoff_initial_s: 0.01, backoff_max_s: 0.05, no_image_attempts: 1}
"""


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return sku_job(tmp_path, monkeypatch, CONFIG, 6, model="gemini-3.1-flash-image", pictures=2)


def run(job: Path, config: SimulatorConfig) -> tuple[int, list[dict[str, object]]]:
    out = job.parent / "out"
    with run_in_thread(config) as url:
        code = main(
            [
                "run",
                str(job),
                "--base-url",
                url,
                "--out",
                str(out),
                "--config",
                str(job.parent / "nanobatch.yaml"),
                "--quiet",
            ]
        )
    lines = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
    return code, [json.loads(line) for line in lines]


def test_a_clean_run_saves_every_edit(job: Path) -> None:
    code, records = run(job, SimulatorConfig(api_key="sim-key"))
    assert code == 0 and len(records) == 6 and {r["status"] for r in records} == {"ok"}
    assert all((job.parent / "out" / f"{r['id']}.png").stat().st_size > 1000 for r in records)
    assert all(r["usage"]["totalTokenCount"] > 0 and r["model_version"] for r in records)


def test_a_mix_of_transient_faults_is_recovered(job: Path) -> None:
    config = SimulatorConfig(
        seed=3, rate_429=0.1, rate_503=0.1, rate_500=0.05, rate_504=0.05, rate_drop=0.05, time_scale=0.01
    )
    code, records = run(job, config)
    assert code == 0 and {r["status"] for r in records} == {"ok"}
    assert sum(int(r["attempts"]) for r in records) > 6  # faults did happen and were retried


@pytest.mark.parametrize(
    ("fault", "status", "kind", "attempts"),
    [
        pytest.param("rate_429", "failed", "rate_limited", 4, id="429"),
        pytest.param("rate_503", "failed", "overloaded", 4, id="503"),
        pytest.param("rate_500", "failed", "server_error", 4, id="500"),
        pytest.param("rate_504", "failed", "timeout", 4, id="504"),
        pytest.param("rate_drop", "failed", "connection", 4, id="dropped-connection"),
        pytest.param("rate_image_safety", "blocked", "blocked", 1, id="image-safety"),
        pytest.param("rate_blocked", "blocked", "blocked", 1, id="prompt-blocked"),
        pytest.param("rate_no_image", "failed", "no_image", 2, id="no-image"),
        pytest.param("rate_text_only", "failed", "no_image", 2, id="text-only"),
        pytest.param("rate_bad_image", "failed", "bad_image", 2, id="image-cut-short"),
    ],
)
def test_each_fault_is_classified(job: Path, fault: str, status: str, kind: str, attempts: int) -> None:
    code, records = run(job, SimulatorConfig(time_scale=0.01, **{fault: 1.0}))  # type: ignore[arg-type]
    assert code == 1
    assert {(r["status"], r["error"]["kind"], r["attempts"]) for r in records} == {(status, kind, attempts)}  # type: ignore[index]
    if fault == "rate_text_only":
        assert all(r["text"] for r in records)
    if kind == "bad_image":  # billed, and nothing that cannot be used is saved
        assert all(r["outputs"] == [] and r["usage"]["totalTokenCount"] > 0 for r in records)  # type: ignore[index]


def test_the_servers_rpm_limit_is_respected_and_every_item_ends_ok(job: Path) -> None:
    # 30 requests per (scaled) minute against 4 workers: the server pushes back with RetryInfo; all end ok.
    code, records = run(job, SimulatorConfig(rpm_limit=3, time_scale=0.02))
    assert code == 0 and {r["status"] for r in records} == {"ok"}


def test_a_wrong_key_aborts_with_exit_3(job: Path) -> None:
    code, records = run(job, SimulatorConfig(api_key="another-key"))
    assert code == 3 and records == []


@pytest.mark.parametrize(
    ("name", "rejected"),
    [
        # Its marked items ask the simulator for bad images: the checks set them aside, the run exits 1.
        pytest.param("example.yaml", {"sneaker-grey": ["background"], "bottle-small": ["min_fill"]}, id="example"),
        pytest.param("catalog.yaml", {}, id="catalog"),
        pytest.param("multistep.yaml", {}, id="multistep"),
    ],
)
def test_the_example_jobs_run_against_the_simulator(tmp_path: Path, name: str, rejected: dict[str, list[str]]) -> None:
    manifest = Path(__file__).resolve().parent.parent / "jobs" / name
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--simulate", "--out", str(out), "--quiet"]) == (1 if rejected else 0)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert records and {r["id"]: r["qa"]["failed"] for r in records if r["status"] != "ok"} == rejected
    assert all(r["status"] in ("ok", "rejected") for r in records)
    assert all((out / name).is_file() for r in records for name in r["outputs"])
