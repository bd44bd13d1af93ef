"""Section 0 of ``make bench``: nanobatch against what a user would write instead, in the same run.

The peers (``peer_aiohttp.py``, ``peer_genai.py``, ``peer_httpx2.py``) and nanobatch take turns against
one simulator process per workload, each run a fresh process, repetitions alternating so that a busy
moment of the machine hits every client alike. Reported: min / median wall time, CPU per request and
peak RSS of each, and nanobatch's ratios to the peer each target names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from _bench import HERE, Bench, process_env, say
from _server import SimulatorProcess
from dispatch import PEER_SCRIPTS, canned, line, run_cli, run_script

__all__ = ["bench_peers"]

PEERS = {"aiohttp script": "peer_aiohttp.py", "google-genai SDK": "peer_genai.py", "plain httpx2": "peer_httpx2.py"}
SECTION = "0 peers"
SMALL = (2000, 100)  # small answers: requests, concurrency
QUOTA = (1000, 100, 600, 0.1)  # requests, concurrency, quota per (scaled) minute, the simulator's time scale
BIG = {"quick": (64, 200, 16, 1), "full": (300, 1000, 16, 2)}  # requests, then nanobatch alone, concurrency, rounds
HUGE = {"quick": (32, 16, 1), "full": (96, 16, 2)}  # 2K and 4K answers, whole processes: requests, concurrency, rounds


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # google itself missing
        return False


def run_peer(b: Bench, script: str, all_ok: bool = True, **params: Any) -> dict[str, Any]:
    env = process_env()
    done = subprocess.run(
        [sys.executable, str(HERE / script), json.dumps(params)],
        cwd=b.tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    if all_ok and result["ok"] != params["n"]:
        raise RuntimeError(f"{script}: expected {params['n']} ok, got {result}")
    return result


def _rounds(b: Bench, sim: SimulatorProcess, n: int, concurrency: int, size: str, reps: int) -> dict[str, list[dict]]:
    """Every client *reps* times, in turn: name -> its runs."""
    manifest = b.catalog(n, size)
    runs: dict[str, list[dict[str, Any]]] = {"nanobatch": [], **{name: [] for name in PEERS}}
    for rep in range(reps):
        tag = f"{size}-{n}-{rep}"
        runs["nanobatch"].append(b.nanobatch(manifest, b.out(f"peers-nb-{tag}"), sim, concurrency, n))
        for name, script in PEERS.items():
            params = dict(base_url=sim.url, n=n, concurrency=concurrency, input_path=str(b.input), image_size=size)
            runs[name].append(run_peer(b, script, out_dir=b.out(f"peers-{script[5:-3]}-{tag}"), **params))
    return runs


def _summary(runs: list[dict[str, Any]], n: int) -> str:
    walls = sorted(r["wall_s"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs) / n * 1000
    rss = max(r["maxrss_mb"] for r in runs)
    client = f" ({runs[0]['client']})" if "client" in runs[0] else ""
    return (
        f"wall {walls[0]:.2f} / {statistics.median(walls):.2f} s (min / median of {len(walls)}); "
        f"CPU {cpu:.2f} ms/req; peak RSS {rss:.0f} MB{client}"
    )


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def bench_peers(b: Bench) -> None:
    missing = [name for name in ("aiohttp", "google.genai") if not _installed(name)]
    if missing:
        say(f"[0] peers skipped: {', '.join(missing)} not installed (pip install -e '.[bench]', or make bench)")
        b.add(SECTION, "peers", f"skipped: {', '.join(missing)} not installed (`pip install -e '.[bench]'`)")
        return
    # Small answers: what the client itself costs per request.
    (n, concurrency), reps = SMALL, (1 if b.quick else 3)
    say(f"[0] peers: {n} small answers, 200 ms latency, concurrency {concurrency}, {reps} alternating round(s)")
    with SimulatorProcess(latency_s=0.2, canned=str(b.tiny)) as sim:
        runs = _rounds(b, sim, n, concurrency, "512", reps)
    for name, each in runs.items():
        b.add(SECTION, f"{n:,} small answers, c={concurrency}: {name}", _summary(each, n))
    ratio = _median(runs["nanobatch"], "wall_s") / _median(runs["aiohttp script"], "wall_s")
    b.add(SECTION, "  nanobatch / aiohttp script, median wall", f"**{ratio:.2f}x**", "<= 1.15x", ratio <= 1.15)
    _whole_processes(b, "small", n, concurrency, reps, peers=("aiohttp",))
    _big_answers(b)
    n, concurrency, reps = HUGE["quick" if b.quick else "full"]
    cpus = os.cpu_count() or 1
    _whole_processes(b, "2K", n, concurrency, reps, peers=("genai",), workers=(0, cpus))
    _whole_processes(b, "4K", n, concurrency, reps, peers=("genai", "aiohttp"), workers=(0, cpus))
    _quota(b)


def _whole_processes(
    b: Bench, answers: str, n: int, concurrency: int, reps: int, *, peers: tuple[str, ...],
    workers: tuple[int, ...] = (),
) -> None:  # fmt: skip
    """Each client timed as a whole process, start to exit (bench/dispatch.py): ``nanobatch run`` (once per
    ``--workers`` value given) against the peer scripts, taking turns."""
    size = {"small": "512"}.get(answers, answers)
    ours: dict[str, int | None] = {f"nanobatch --workers {w}": w for w in workers} or {"nanobatch": None}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*ours, *peers]}
    say(f"[0] peers, whole processes: {n} {answers} answers, concurrency {concurrency}, {reps} alternating round(s)")
    with SimulatorProcess(latency_s=0.2, canned=str(canned(b, answers))) as sim:

        def one(name: str, count: int, out: str) -> dict[str, Any]:
            if name in PEER_SCRIPTS:
                return run_script(b, PEER_SCRIPTS[name], base_url=sim.url, n=count, concurrency=concurrency,
                                  input_path=str(b.input), image_size=size, out_dir=out)  # fmt: skip
            return run_cli(b, None, manifest=b.catalog(count, size), out=out, url=sim.url, concurrency=concurrency,
                           n=count, workers=ours[name])  # fmt: skip

        for name in runs:  # warm-up: the bytecode of what each imports (as a pip install leaves it)
            one(name, 2, b.out(f"whole-warm-{answers}-{name}"))
        for rep in range(reps):
            for name in list(runs) if rep % 2 == 0 else list(runs)[::-1]:
                runs[name].append(one(name, n, b.out(f"whole-{answers}-{name}-{rep}".replace(" ", ""))))
    label = "2,000 small answers" if answers == "small" else f"{n} answers of {answers}"
    for name, each in runs.items():
        b.add(SECTION, f"{label}, c={concurrency}, whole process: {name}", line(name, each, n).split(": ", 1)[1])
    mine = next(iter(ours))
    first, peer = runs[mine], runs[peers[0]]
    wall = _median(first, "wall_s") / _median(peer, "wall_s")
    if answers == "small":
        b.add(SECTION, f"  {mine} / {peers[0]} script, whole process, median wall", f"**{wall:.2f}x**",
              "<= 1.05x", wall <= 1.05)  # fmt: skip
        return
    for name in ours:  # all processes: the worker processes' memory counts as the run's
        pss = _median(runs[name], "tree_mb") / _median(peer, "tree_mb")
        b.add(SECTION, f"  {name} / {peers[0]}, all processes' peak memory (PSS)", f"**{pss:.2f}x**", "<= 1.0x",
              pss <= 1.0)  # fmt: skip
    for name in ours:
        per_minute = n / _median(runs[name], "wall_s") * 60
        main_cpu = _median(runs[name], "main_cpu_s") / n * 1000
        b.add(SECTION, f"  {name}: answers per minute; the main process's CPU per answer",
              f"{per_minute:.0f}; {main_cpu:.0f} ms")  # fmt: skip


def _big_answers(b: Bench) -> None:
    n, longer, concurrency, reps = BIG["quick" if b.quick else "full"]
    size_mb = b.noise.stat().st_size / 1e6
    say(f"[0] peers: {n} answers of {size_mb:.1f} MB, concurrency {concurrency}, {reps} alternating round(s)")
    with SimulatorProcess(latency_s=0.2, canned=str(b.noise)) as sim:
        runs = _rounds(b, sim, n, concurrency, "2K", reps)
        say(f"  nanobatch alone, {longer} answers (does its memory grow with the number of requests?)")
        long_run = b.client(
            "nanobatch", manifest=str(b.catalog(longer, "2K")), out_dir=b.out("peers-long"), base_url=sim.url,
            concurrency=concurrency,
        )  # fmt: skip
    for name, each in runs.items():
        b.add(SECTION, f"{n} answers of {size_mb:.1f} MB, c={concurrency}: {name}", _summary(each, n))
    ours = _median(runs["nanobatch"], "cpu_s")
    sdk = _median(runs["google-genai SDK"], "cpu_s")
    b.add(
        SECTION,
        "  nanobatch / google-genai SDK, CPU per answer",
        f"**{ours / sdk:.2f}x** ({ours / n * 1000:.1f} vs {sdk / n * 1000:.1f} ms)",
        "<= 1.0x",
        ours <= sdk,
    )
    peak = max(r["maxrss_mb"] for r in runs["nanobatch"])
    grew = long_run["maxrss_mb"] - peak
    b.add(
        SECTION,
        f"  nanobatch peak RSS, {n} vs {longer} answers",
        f"**{peak:.0f} vs {long_run['maxrss_mb']:.0f} MB** ({grew:+.0f} MB); {longer} answers in "
        f"{long_run['wall_s']:.1f} s, CPU {long_run['cpu_s'] / longer * 1000:.1f} ms/answer",
        "<= 300 MB, flat",
        max(peak, long_run["maxrss_mb"]) <= 300 and grew <= 0.1 * peak,
    )


def _quota(b: Bench) -> None:
    """Against a sliding-window quota, in simulated time (a minute lasts 60 x scale seconds)."""
    n, concurrency, quota, scale = QUOTA
    minute = 60 * scale
    say(f"[0] peers: {n} requests against a quota of {quota} in any {minute:g} s (a scaled minute), c={concurrency}")
    results: dict[str, tuple[dict[str, Any], int]] = {}
    with SimulatorProcess(latency_s=0.2, canned=str(b.tiny), rpm_limit=quota, time_scale=scale) as sim:
        sim.stamps()
        for burst in (1, quota):
            time.sleep(minute)  # each client starts with the quota's window empty
            run = b.client(
                "nanobatch", manifest=str(b.catalog(n)), out_dir=b.out(f"peers-quota-{burst}"), base_url=sim.url,
                concurrency=concurrency, rpm=quota / scale, rpm_burst=burst,
            )  # fmt: skip
            results[f"nanobatch, --rpm = quota, rpm_burst {burst}"] = (run, len(sim.stamps()))
        for name, script in PEERS.items():
            params = dict(base_url=sim.url, n=n, concurrency=concurrency, input_path=str(b.input), image_size="512")
            if script != "peer_genai.py":  # the SDK has no rate limit of its own: its retries are all it has
                params["rpm"] = quota / scale
            time.sleep(minute)
            run = run_peer(b, script, all_ok=False, out_dir=b.out(f"peers-quota-{script[5:-3]}"), **params)
            results[name] = (run, len(sim.stamps()))
    for name, (run, seen) in results.items():
        lost = f", **{n - run['ok']} lost**" if run["ok"] < n else ""
        b.add(
            SECTION,
            f"{n:,} requests, quota {quota} per {minute:g} s: {name}",
            f"{run['wall_s']:.1f} s = {run['wall_s'] / minute:.2f} minutes; {run['ok']} ok{lost}; "
            f"{seen - run['ok']} refused (server saw {seen} requests)",
        )
