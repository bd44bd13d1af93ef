"""Manifest, status and validate at catalog scale (issue 25): ``python bench/scale.py [--sizes 10000,100000]``.

For each size N it writes a job of N items in each format (``items:`` in the YAML manifest itself, a CSV and a
JSONL source), every item its own input file (a tiny PNG of its own pixels), and measures, each in a fresh
``nanobatch`` process (wall and CPU time, from ``wait4``, and its peak RSS, ``VmHWM``):

* ``validate`` of the job, nothing done yet, for each format;
* a done folder: ``results.jsonl`` written for every item (the records a run would write, work keys computed
  by nanobatch's own functions, outputs hard-linked), then ``run --simulate`` over it twice: the first goes
  through every item (no summary yet; it skips each, writes ``summary.json`` and keeps a copy of the resume
  index), the second is answered from that summary; then ``status`` and ``validate`` of that folder (for the
  manifest the run used, the last run's summary may answer; the others are checked item by item), then
  ``run`` once 10 rows and ``validate`` once 1% more rows were appended to the catalog (only those are
  checked and sent; the 1% taken away again after), ``status`` once another tool appended a line to
  results.jsonl (the summary no longer holds), and ``status`` after a run was killed (SIGKILL, no summary at
  its end) once it had appended N/50 records (``run --force``, so the records replace done ones).

Prints a table (``--json``: one JSON list). Nothing leaves the machine. 1,000,000 items take a few minutes and
about 2 GB of disk (``--sizes 1000000``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from _bench import compile_package, process_env

HERE = Path(__file__).resolve().parent
_LINKS = 50_000  # hard links per source file (ext4 allows 65,000)
_SOURCES = 8  # distinct tiny PNGs the inputs link to
MODEL = "gemini-3.1-flash-image"
INSTRUCTION = "Replace the background with pure white; keep the product unchanged"
FORMATS = ("yaml", "csv", "jsonl")


def say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _png(path: Path, shade: int) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (shade, 40, 40)).save(path, "PNG")


def _link_many(folder: Path, names: list[str], prefix: str) -> None:
    """*names* in *folder*, each a hard link to one of a few tiny PNGs (a new source every :data:`_LINKS`)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = None
    for number, name in enumerate(names):
        if number % _LINKS == 0:
            source = folder.parent / f"{prefix}-{number // _LINKS}.png"
            _png(source, number // _LINKS % _SOURCES * 30)
        assert source is not None
        os.link(source, folder / name)


def _distinct_pngs(folder: Path, names: list[str]) -> None:
    """*names* in *folder*, each a file of its own with its own pixels, as a catalog's photos are (a check that
    reads a picture once per file, not per path, meets each)."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for number, name in enumerate(names):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (number % 256, number // 256 % 256, number // 65536 % 256)).save(buffer, "PNG")
        (folder / name).write_bytes(buffer.getvalue())


def write_job(folder: Path, n: int) -> dict[str, Path]:
    """The N-item job in every format, sharing one images/ folder; returns {format: manifest}."""
    ids = [f"sku-{number:07d}" for number in range(n)]
    _distinct_pngs(folder / "images", [f"{i}.png" for i in ids])
    head = f'model: {MODEL}\ndefaults:\n  instruction: {INSTRUCTION}\n  aspect_ratio: "1:1"\n'
    manifests = {}
    with (folder / "job-yaml.yaml").open("w") as f:
        f.write(f"name: scale-{n}\n{head}items:\n")
        for i in ids:
            f.write(f"  - id: {i}\n    image: images/{i}.png\n")
    manifests["yaml"] = folder / "job-yaml.yaml"
    with (folder / "catalog.csv").open("w") as f:
        f.write("id\n" + "".join(f"{i}\n" for i in ids))
    with (folder / "catalog.jsonl").open("w") as f:
        f.write("".join(f'{{"id": "{i}"}}\n' for i in ids))
    for kind, source in (("csv", "catalog.csv"), ("jsonl", "catalog.jsonl")):
        path = folder / f"job-{kind}.yaml"
        path.write_text(f'name: scale-{n}\n{head}items_from:\n  - {kind}: {source}\n    image: "images/{{id}}.png"\n')
        manifests[kind] = path
    return manifests


def grow(folder: Path, fmt: str, n: int, more: int) -> None:
    """Rows appended to the job's *fmt* catalog of *n* rows, as a nightly export adds new products: *more*
    items, each its own new input file."""
    ids = [f"sku-{number:07d}" for number in range(n, n + more)]
    _distinct_pngs(folder / "images", [f"{i}.png" for i in ids])
    with (folder / f"catalog.{fmt}").open("a") as f:
        f.write("".join(f"{i}\n" if fmt == "csv" else f'{{"id": "{i}"}}\n' for i in ids))


def write_done(manifest: Path, out: Path) -> int:
    """``results.jsonl`` with an ok record for every item of *manifest*, as a run writes them, and their images
    (hard links); returns the number of records."""
    from nanobatch.inputs.stamps import work_key
    from nanobatch.job.manifest import load_manifest
    from nanobatch.output.record import ItemRecord

    job = load_manifest(manifest, default_model=MODEL)
    stamps: dict[tuple[int, int], tuple[int, int, str]] = {}
    names = []
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.jsonl").open("wb") as f:
        for item in job.items(check_files=False):
            input_stamps = tuple(_stamp(path, stamps) for path in item.inputs)
            name = f"{item.stem}.png"
            names.append(name)
            record = ItemRecord(
                id=item.id, status="ok", run="bench", outputs=(name,), finish_reason="STOP", attempts=1,
                latency_s=1.0, cost_usd=0.045, model=item.model, key=work_key(item, [s[2] for s in input_stamps]),
                instructions=item.steps, inputs=item.inputs, aspect_ratio=item.aspect_ratio,
                usage={"promptTokenCount": 300, "candidatesTokenCount": 1120, "totalTokenCount": 1420},
                started_at="2026-12-06T00:00:00Z", finished_at="2026-12-06T00:00:01Z", input_stamps=input_stamps,
            )  # fmt: skip
            f.write(orjson.dumps(record.to_json()) + b"\n")
    _link_many(out, names, "../answer")
    return len(names)


def _stamp(path: str, known: dict[tuple[int, int], tuple[int, int, str]]) -> tuple[int, int, str]:
    import hashlib

    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    if key not in known:
        with open(path, "rb") as f:
            known[key] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return known[key]


# Runs nanobatch's CLI and, at exit, writes its peak resident set (VmHWM: this process's own, since its exec; a
# child's ru_maxrss from wait4 starts at its parent's peak on Linux, the bench's own).
_WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f, open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(next(line for line in f if line.startswith("VmHWM")).split()[1])
atexit.register(_peak)
sys.argv = ["nanobatch", *sys.argv[1:]]
runpy.run_module("nanobatch", run_name="__main__", alter_sys=True)
"""


def measure_rss(args: list[str], cwd: Path) -> dict[str, Any]:
    """One ``nanobatch ARGS`` process: wall seconds, CPU seconds (``wait4``), its peak RSS, exit code, output."""
    env = process_env()
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak:
        env["BENCH_PEAK_FILE"] = peak.name
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", _WRAPPER, *args], cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        rss_kb = int(peak.read() or 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mb": rss_kb / 1024,
        "code": process.returncode,
        "out": out.read().decode()[-2000:],
        "err": err.read().decode()[-2000:],
    }


def bench_size(tmp: Path, n: int, formats: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    folder = tmp / f"job-{n}"
    t0 = time.perf_counter()
    manifests = write_job(folder, n)
    say(f"[{n:,}] job written in {time.perf_counter() - t0:.0f} s")

    def row(what: str, fmt: str, args: list[str]) -> dict[str, Any]:
        result = measure_rss(args, folder)
        if result["code"] not in (0,):
            raise RuntimeError(f"{what} ({fmt}, {n:,}) exited {result['code']}:\n{result['err']}{result['out']}")
        entry = {"items": n, "what": what, "format": fmt, "wall_s": round(result["wall_s"], 2),
                 "cpu_s": round(result["cpu_s"], 2), "rss_mb": round(result["rss_mb"])}  # fmt: skip
        say(f"  {what:<34} {fmt:<5} {entry['wall_s']:>6.2f} s, {entry['cpu_s']:>6.2f} s CPU, {entry['rss_mb']:>4} MB")
        rows.append(entry)
        return entry

    for fmt in formats:
        row("validate, nothing done", fmt, ["validate", str(manifests[fmt]), "--out", str(folder / "out")])
    done_fmt = "csv" if "csv" in formats else formats[0]
    out = folder / "out"
    t0 = time.perf_counter()
    write_done(manifests[done_fmt], out)
    say(f"[{n:,}] done folder written in {time.perf_counter() - t0:.0f} s")
    rerun = ["run", str(manifests[done_fmt]), "--out", str(out), "--simulate", "-q"]
    row("run, all done, item by item", done_fmt, rerun)  # the records have no summary to rest on yet
    row("run, all done, as its last run left it", done_fmt, rerun)
    row("status, all done", "-", ["status", str(out)])
    for fmt in formats:  # the run's own manifest may be answered from its summary; the others check every item
        what = "validate, all done, as its run left it" if fmt == done_fmt else "validate, all done"
        row(what, fmt, ["validate", str(manifests[fmt]), "--out", str(out)])
    if done_fmt in ("csv", "jsonl"):  # the catalog grows: its old rows rest on the last run's check
        # A run sends what is new (the built-in simulator edits each image: about 60 ms of CPU), so it gets 10
        # new rows; then 1% more, for validate
        grow(folder, done_fmt, n, 10)
        row("run, catalog grown by 10 rows", done_fmt, rerun)
        more = max(n // 100, 10)
        catalog = folder / f"catalog.{done_fmt}"
        before = catalog.stat()
        grow(folder, done_fmt, n + 10, more)
        check = ["validate", str(manifests[done_fmt]), "--out", str(out)]
        row(f"validate, catalog grown by {more:,} rows", done_fmt, check)
        os.truncate(catalog, before.st_size)  # as the last run left it, for the rows below
        os.utime(catalog, ns=(before.st_atime_ns, before.st_mtime_ns))
    with (out / "results.jsonl").open("a") as f:  # another tool's line: the summary's figures no longer hold
        f.write('{"note": "appended by another tool"}\n')
    row("status, results changed since", "-", ["status", str(out)])
    appended = killed_run(manifests[done_fmt], out, folder, max(n // 50, 200))
    say(f"[{n:,}] a run killed after appending {appended:,} records")
    row(f"status, run killed (+{appended:,} records)", "-", ["status", str(out)])


def killed_run(manifest: Path, out: Path, cwd: Path, records: int) -> int:
    """``run --force --simulate`` over the done folder, killed (SIGKILL: no summary at its end) once it has
    appended at least *records* records; returns how many it appended."""
    results = out / "results.jsonl"
    start = results.stat().st_size

    def appended() -> int:
        with results.open("rb") as f:
            f.seek(start)
            return f.read().count(b"\n")

    env = process_env()
    args = [sys.executable, "-m", "nanobatch", "run", str(manifest), "--out", str(out), "--simulate", "--force", "-q"]
    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and appended() < records:
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
    return appended()


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| items | command | manifest | wall | CPU | peak RSS |", "|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['items']:,} | {r['what']} | {r['format']} | {r['wall_s']:.2f} s | {r['cpu_s']:.2f} s "
            f"| {r['rss_mb']} MB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="item counts (default: %(default)s)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="yaml, csv, jsonl (default: all)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    formats = tuple(f.strip() for f in args.formats.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="nanobatch-scale-"))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")  # the resume index's kept copies, thrown away with the rest
    say(f"working in {tmp}")
    compile_package()  # as installed: no run compiles nanobatch's modules
    rows: list[dict[str, Any]] = []
    try:
        for n in sizes:
            bench_size(tmp, n, formats, rows)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        sys.stdout.write(json.dumps(rows) + "\n")
    else:
        sys.stdout.write(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
