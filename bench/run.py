"""nanobatch benchmarks (issues #4, #5, #15, #23 and #25): ``make bench``, or ``python bench/run.py [--quick]``.

Section 0 ("peers", ``_peers.py``) measures nanobatch against the scripts a user would write instead
(aiohttp, the google-genai SDK, plain httpx2) in the same run; its rows also go into docs/performance.md's
"Against the peers", between the ``bench:peers`` markers (the README sums them up).

Every measured run is a fresh client process (``_client.py``) talking over
loopback HTTP to the simulator in another process (``_server.py``), which
answers with a canned image instead of editing with Pillow, so that neither
shares an event loop or a GIL and the simulator's CPU is not the bottleneck.
Prints one table and writes it, with a description of the machine, to
``bench/RESULTS.md``. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _fixtures as fixtures
from _bench import HERE, Bench, compile_package, process_env, say
from _peers import SECTION as PEERS_SECTION
from _peers import bench_peers
from _report import table, update_figures, write_results
from _server import SimulatorProcess
from qa import bench_qa

SECTIONS = ("peers", "startup", "dispatch", "rate", "cpu", "memory", "resume", "batch", "buckets", "qa", "scale")
FIGURES = HERE.parent / "docs" / "performance.md"  # the peers' rows in full (the README sums them up)


# 0. CLI start-up ---------------------------------------------------------------------------------------


def bench_startup(b: Bench) -> None:
    """Wall time of `nanobatch --help`, `status` and `validate` (a 10-item job), best of 7 fresh processes."""
    section = "0 startup"
    say("[0] startup: fresh `python -m nanobatch` processes")
    manifest = b.catalog(10)
    out = b.tmp / "out" / "startup"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")
    env = process_env()
    compile_package()
    commands = {
        "--help": ["--help"],
        "status": ["status", str(out)],
        "validate (10 items)": ["validate", str(manifest), "--out", str(out)],
    }
    for name, args in commands.items():
        times = []
        for _ in range(7):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nanobatch", *args], cwd=b.tmp, env=env, capture_output=True)
            times.append(time.perf_counter() - started)
        best = min(times)
        b.add(section, f"`nanobatch {name}` start-up", f"**{best:.3f} s** (median {statistics.median(times):.3f} s)",
              "< 0.25 s", best < 0.25)  # fmt: skip


# 1. Dispatch efficiency ------------------------------------------------------------------------------


def bench_dispatch(b: Bench) -> None:
    n, latency, concurrency = 2000, 0.2, 100
    ideal = n * latency / concurrency
    manifest = b.catalog(n)
    section = "1 dispatch"
    say(f"[1] dispatch: {n} requests, {latency * 1000:.0f} ms latency, concurrency {concurrency} (ideal {ideal:.1f} s)")
    with SimulatorProcess(latency_s=latency, canned=str(b.tiny)) as sim:
        runs = []
        for rep in range(1 if b.quick else 2):
            cpu0 = sim.cpu_s()
            run = b.nanobatch(manifest, b.out(f"dispatch-{rep}"), sim, concurrency, n)
            run["server_cpu_s"] = sim.cpu_s() - cpu0
            runs.append(run)
        walls = sorted(r["wall_s"] for r in runs)
        wall = statistics.median(walls)
        first = min(runs, key=lambda r: abs(r["wall_s"] - wall))  # the median run (the faster of two)
        retries = sum((Counter(r["retries"]) for r in runs), Counter())
        each = ", ".join(f"{w:.2f}" for w in walls)
        b.add(
            section,
            f"nanobatch `await run_job()`, {n:,} req, c={concurrency}",
            f"{wall:.2f} s = **{wall / ideal:.2f}x** ideal {ideal:.1f} s (runs: {each} s); client CPU "
            f"{first['cpu_s'] / n * 1000:.2f} ms/req ({first['main_cpu_s'] / n * 1000:.2f} in the event loop thread); "
            f"server CPU {first['server_cpu_s'] / n * 1000:.2f} ms/req; retries {dict(retries) or 0}",
            "<= 1.03x",
            wall / ideal <= 1.03,
        )
        b.add(section, "  process start + imports (not in the time above)", f"{first['startup_s']:.2f} s")

        n_seq = 20 if b.quick else 50
        seq = b.client(
            "sequential",
            base_url=sim.url,
            n=n_seq,
            input_path=str(b.input),
            out_dir=b.out("sequential"),
            image_size="512",
        )
        per = seq["wall_s"] / n_seq
        b.add(
            section,
            f"(a) sequential loop, the API's Python example ({n_seq} req, scaled)",
            f"{per * 1000:.0f} ms/req -> {per * n:.0f} s for {n:,} = {per * n / ideal:.0f}x ideal",
        )

        params = dict(base_url=sim.url, n=n, concurrency=concurrency, input_path=str(b.input), image_size="512")
        plain = b.client("minimal", out_dir=b.out("gather"), **params)
        b.add(
            section,
            f"(b) asyncio.gather + Semaphore({concurrency}), one httpx2.AsyncClient",
            f"{plain['wall_s']:.2f} s = **{plain['wall_s'] / ideal:.2f}x**; client CPU "
            f"{plain['cpu_s'] / n * 1000:.2f} ms/req; connection errors {plain['connection_errors']}",
        )
        plain_split = b.client("minimal", out_dir=b.out("gather-split"), split_pool=True, **params)
        b.add(
            section,
            "  experiment: same, httpx2 pool split into 10 pools of 10",
            f"{plain_split['wall_s']:.2f} s = {plain_split['wall_s'] / ideal:.2f}x; client CPU "
            f"{plain_split['cpu_s'] / n * 1000:.2f} ms/req",
        )
        floors = sorted(b.client("floor", **params)["wall_s"] for _ in range(1 if b.quick else 2))
        b.add(
            section,
            "(c) floor: raw sockets, no HTTP library, answers skipped unread",
            f"{floors[0]:.2f} s = **{floors[0] / ideal:.3f}x** (runs: {', '.join(f'{w:.2f}' for w in floors)} s): "
            "what the simulator, loopback and event loop take on this machine, before any client work",
        )


# 2. Rate accuracy ----------------------------------------------------------------------------------------


def bench_rate(b: Bench) -> None:
    rpm, seconds, concurrency, window = 1200, (20 if b.quick else 45), 100, 10.0
    n = rpm * seconds // 60
    share = rpm * window / 60
    section = "2 rate"
    say(f"[2] rate: {n} requests at requests_per_minute={rpm} (~{seconds} s), concurrency {concurrency}")
    with SimulatorProcess(latency_s=0.2, canned=str(b.tiny)) as sim:
        sim.stamps()  # forget earlier arrivals
        run = b.nanobatch(b.catalog(n), b.out("rate"), sim, concurrency, n, rpm=rpm)
        stamps = sorted(sim.stamps())
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) * 60
    whole = len(stamps) / run["wall_s"] * 60
    worst, start = _worst_window(stamps, window)
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False)]
    b.add(
        section,
        f"achieved rate, {n} req at {rpm} rpm",
        f"**{steady:.1f} rpm = {steady / rpm:.1%}** of the limit, first to last arrival ({whole:.1f} rpm over the "
        f"whole `run_job`, set-up and last answer included); gap between arrivals: min "
        f"{min(gaps) * 1000:.1f} ms, median {statistics.median(gaps) * 1000:.1f} ms (ideal {60000 / rpm:.1f})",
        ">= 98%",
        steady >= 0.98 * rpm,
    )
    b.add(
        section,
        f"worst {window:.0f} s window (server arrival times)",
        f"**{worst} requests** (limit's share {share:.0f}), window starting {start - stamps[0]:.1f} s into the run",
        f"<= {share:.0f}",
        worst <= share,
    )


def _worst_window(stamps: list[float], width: float) -> tuple[int, float]:
    """The most arrivals in any [t, t + width), and that window's start."""
    best, start, j = 0, stamps[0], 0
    for i, t in enumerate(stamps):
        while j < len(stamps) and stamps[j] < t + width:
            j += 1
        if j - i > best:
            best, start = j - i, t
    return best, start


# 3. CPU per request with ~6 MB answers -----------------------------------------------------------------


def bench_cpu(b: Bench) -> None:
    n, concurrency = (32 if b.quick else 64), 8
    size_mb = b.noise.stat().st_size / 1e6
    section = "3 cpu"
    say(f"[3] cpu: {n} requests answered with a {size_mb:.1f} MB PNG, concurrency {concurrency}")
    with SimulatorProcess(latency_s=0, canned=str(b.noise)) as sim:
        ours = b.nanobatch(b.catalog(n, "2K"), b.out("cpu"), sim, concurrency, n)
        plain = b.client(
            "minimal",
            base_url=sim.url,
            n=n,
            concurrency=concurrency,
            input_path=str(b.input),
            out_dir=b.out("cpu-minimal"),
            image_size="2K",
        )
    mine, theirs = ours["cpu_s"] / n * 1000, plain["cpu_s"] / n * 1000
    b.add(
        section,
        f"client CPU per request, {size_mb:.1f} MB PNG answers, c={concurrency}",
        f"nanobatch **{mine:.1f} ms** vs minimal loop {theirs:.1f} ms = **{mine / theirs:.2f}x** "
        f"(wall {ours['wall_s']:.1f} s vs {plain['wall_s']:.1f} s)",
        "<= 1.5x",
        mine / theirs <= 1.5,
    )


# 4. Peak memory -----------------------------------------------------------------------------------------


def bench_memory(b: Bench) -> None:
    section = "4 memory"
    say("[4] memory: peak RSS of fresh client processes")
    levels = (8, 32, 100)
    for label, canned, size in (("small (150 B) answers", b.tiny, "512"), ("6 MB answers", b.noise, "2K")):
        peaks = []
        with SimulatorProcess(latency_s=0.2, canned=str(canned)) as sim:
            for concurrency in levels:
                n = 400 if size == "512" else max((2 if b.quick else 3) * concurrency, 24)
                run = b.nanobatch(b.catalog(n, size), b.out(f"mem-{size}-{concurrency}"), sim, concurrency, n)
                peaks.append(f"c={concurrency}: **{run['maxrss_mb']:.0f} MB** ({n} req)")
                base = run["rss_before_mb"]
        b.add(section, f"peak RSS, {label}", "; ".join(peaks) + f"; after imports, before the run: {base:.0f} MB")

    short_n, long_n = 2000, (20_000 if b.quick else 100_000)
    say(f"  manifest length: {short_n:,} vs {long_n:,} items, each its own input file, concurrency 8, no latency")
    results = {}
    with SimulatorProcess(latency_s=0, canned=str(b.tiny)) as sim:
        for n in (short_n, long_n):
            manifest = b.catalog(n, distinct=True)
            out = b.out(f"length-{n}")
            run = b.nanobatch(manifest, out, sim, 8, n)
            results[n] = run
    b.long_run = (b.catalog(long_n, distinct=True), Path(b.out(f"length-{long_n}")))
    short, long = results[short_n]["maxrss_mb"], results[long_n]["maxrss_mb"]
    per_item = (long - short) * 2**20 / (long_n - short_n)
    b.add(
        section,
        f"peak RSS, manifest of {short_n:,} vs {long_n:,} items, distinct input files (c=8, small answers)",
        f"{short:.0f} MB vs **{long:.0f} MB** (+{long - short:.0f} MB, {per_item:.0f} bytes per extra item); "
        f"run times {results[short_n]['wall_s']:.1f} s and {results[long_n]['wall_s']:.1f} s "
        f"({long_n / results[long_n]['wall_s']:.0f} items/s)",
        "flat: < 100 bytes per extra item",
        per_item < 100,
    )


# 5. Resume at scale -------------------------------------------------------------------------------------


def bench_resume(b: Bench) -> None:
    section = "5 resume"
    if b.long_run is None:
        say("[5] resume needs the long manifest's output folder: running it first (not measured)")
        n = 20_000 if b.quick else 100_000
        with SimulatorProcess(latency_s=0, canned=str(b.tiny)) as sim:
            b.nanobatch(b.catalog(n, distinct=True), b.out(f"length-{n}"), sim, 8, n)
        b.long_run = (b.catalog(n, distinct=True), Path(b.out(f"length-{n}")))
    manifest, out = b.long_run
    records = sum(1 for _ in (out / "results.jsonl").open("rb"))
    size_mb = (out / "results.jsonl").stat().st_size / 1e6
    say(f"[5] resume: {records:,} records ({size_mb:.0f} MB of results.jsonl)")
    load = b.client("load_index", out_dir=str(out))
    b.add(
        section,
        f"`ResultsIndex.load`, {records:,} records ({size_mb:.0f} MB)",
        f"**{load['wall_s']:.2f} s**, +{load['rss_growth_mb']:.0f} MB",
        "well under 1 s (<= 0.5 s)",
        load["wall_s"] <= 0.5,
    )
    with SimulatorProcess(latency_s=0, canned=str(b.tiny)) as sim:
        rerun = b.client("nanobatch", manifest=str(manifest), out_dir=str(out), base_url=sim.url, concurrency=8)
        profiled = None
        if rerun["wall_s"] > 2.0:  # profile the first 20,000 items only: cProfile doubles the time
            first = fixtures.first_items(manifest, min(records, 20_000))
            profiled = b.client(
                "nanobatch", manifest=str(first), out_dir=str(out), base_url=sim.url, concurrency=8, profile=True
            )
    b.add(
        section,
        f"re-run with all {records:,} items done (all skipped)",
        f"**{rerun['wall_s']:.1f} s** ({rerun['wall_s'] / records * 1e6:.0f} us/item; CPU {rerun['cpu_s']:.1f} s); "
        f"skipped {rerun['skipped']:,}, requests sent {rerun['requests']}; peak RSS {rerun['maxrss_mb']:.0f} MB",
    )
    if profiled is not None:
        b.notes.append(
            f"### Profile of a skip-everything re-run\n\nThe first {profiled['items']:,} items of the manifest "
            f"against the folder of {records:,} records (so the index load counts in full); cProfile sees the event "
            f"loop thread only; {profiled['wall_s']:.1f} s under the profiler.\n\n```\n{profiled['profile']}\n```"
        )


# 6. The batch tier ------------------------------------------------------------------------------------------


def bench_batch(b: Bench) -> None:
    """Items through --tier batch against the simulator's Batch API (canned answers, a fixed job latency):
    wall time should be the jobs' latency plus little, peak memory flat in the number of items."""
    section = "6 batch"
    latency = 20.0
    sizes = (max(b.batch_items // 10, 50), b.batch_items, 2 * b.batch_items)
    sizes_text = ", ".join(f"{n:,}" for n in sizes)
    say(f"[6] batch tier: {sizes_text} items, chunks of 1,000, job latency {latency:g} s")
    runs = {}
    answer = fixtures.product_jpeg(b.tmp / "product-1k.jpg")  # a 70 KB answer: 0.9 GB of result files at 10,000
    with SimulatorProcess(latency_s=0, canned=str(answer), batch_latency_s=latency) as sim:
        for n in sizes:
            run = b.nanobatch(
                b.catalog(n, distinct=True), b.out(f"batch-{n}"), sim, 8, n, tier="batch",
                batch={"chunk_requests": 1000, "open_chunks": 4, "linger_s": 1.0, "poll_initial_s": 2.0,
                       "poll_max_s": 5.0},
            )  # fmt: skip
            runs[n] = run
    for n in sizes[1:]:
        rounds = math.ceil(n / 4000)
        b.add(
            section,
            f"{n:,} items through the batch tier (job latency {latency:g} s, 4 chunks of 1,000 open at once)",
            f"**{runs[n]['wall_s']:.0f} s** wall, {runs[n]['cpu_s']:.0f} s CPU; "
            f"{rounds} rounds of jobs take {rounds * latency:.0f} s",
        )
    b.add(
        section,
        f"peak RSS, batch tier, {sizes_text} items (at most 4,000 wait at once)",
        " vs ".join(f"{runs[n]['maxrss_mb']:.0f} MB" for n in sizes),
    )


# 7. Buckets ---------------------------------------------------------------------------------------------


def bench_buckets(b: Bench) -> None:
    """What a re-run's bucket checks cost, counted at moto's S3 server in-process (``bench/storage.py``)."""
    section = "7 buckets"
    n = 2000 if b.quick else 10_000
    say(f"[7] buckets: stamps of {n:,} objects, then a job of {n:,} items uploading to S3 and its re-run")
    stamps = _storage_rows(["--objects", str(n)])
    for row in stamps:
        b.add(section, f"{row['label']} ({n:,} objects in moto's S3)", f"{row['seconds']:.2f} s, {_requests(row)}")
    first, again = _storage_rows(["--rerun", str(n)])
    b.add(section, f"{n:,} items with `output.upload_to`, first run", f"{first['seconds']:.1f} s, {_requests(first)}")
    b.add(
        section,
        f"re-run of those {n:,} done items (distinct inputs)",
        f"**{again['seconds']:.1f} s**, {_requests(again)}; {again['sent']} sent, {again['skipped']:,} skipped",
        "downloads nothing, lists in batches",
        again["requests"].get("GET", 0) == 0 and again["sent"] == 0,
    )


def _storage_rows(args: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(HERE / "storage.py"), *args, "--json"], capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench/storage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def _requests(row: dict[str, Any]) -> str:
    return ", ".join(f"{count:,} {kind}" for kind, count in sorted(row["requests"].items())) or "no requests"


# 8. Catalog scale --------------------------------------------------------------------------------------


def bench_scale(b: Bench) -> None:
    """``validate`` and ``status`` of a catalog, nothing done and all done, in fresh processes (``bench/scale.py``)."""
    section = "8 scale"
    sizes = "10000" if b.quick else "10000,100000"
    say(f"[8] scale: validate and status at {sizes} items (bench/scale.py)")
    command = [sys.executable, str(HERE / "scale.py"), "--sizes", sizes, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"bench/scale.py failed:\n{done.stderr[-3000:]}")
    for row in json.loads(done.stdout.strip().splitlines()[-1]):
        fmt = f" ({row['format']} manifest)" if row["format"] != "-" else ""
        command, _, state = row["what"].partition(", ")
        name = f"`{command}` {row['items']:,} items, {state}{fmt}"
        limit = 1.0 if row["what"].startswith("status, all") else 5.0 if row["what"].startswith("validate") else None
        met = None if limit is None or row["items"] != 100_000 else row["wall_s"] < limit
        target = f"< {limit:g} s at 100,000" if limit is not None else ""
        b.add(section, name, f"**{row['wall_s']:.2f} s** ({row['cpu_s']:.2f} s CPU), peak RSS {row['rss_mb']} MB",
              target, met)  # fmt: skip


BENCHES: dict[str, Callable[[Bench], None]] = {
    "peers": bench_peers,
    "startup": bench_startup,
    "dispatch": bench_dispatch,
    "rate": bench_rate,
    "cpu": bench_cpu,
    "memory": bench_memory,
    "resume": bench_resume,
    "batch": bench_batch,
    "buckets": bench_buckets,
    "qa": bench_qa,
    "scale": bench_scale,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests, 20,000 items instead of 100,000")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    parser.add_argument(
        "--results", default=str(HERE / "RESULTS.md"), help="where to write the table (default: %(default)s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--batch-items", type=int, default=10_000, help="items through the batch tier (batch)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    if unknown := [s for s in chosen if s not in SECTIONS]:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="nanobatch-bench-"))
    say(f"working in {tmp}")
    try:
        b = Bench(tmp=tmp, quick=args.quick, batch_items=args.batch_items)
        for name in SECTIONS:
            if name in chosen:
                t0 = time.perf_counter()
                BENCHES[name](b)
                say(f"  ({time.perf_counter() - t0:.0f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - started
    write_results(Path(args.results), b, elapsed)
    if any(row.section == PEERS_SECTION for row in b.rows) and update_figures(FIGURES, b, elapsed):
        say(f"peers' rows written into {FIGURES}")
    sys.stdout.write("\n" + table(b.rows) + "\n\n")
    sys.stdout.write(f"{elapsed / 60:.1f} minutes; written to {args.results}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
