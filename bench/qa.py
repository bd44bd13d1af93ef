"""The output checks' CPU (issue 23, point 6): ``bench/run.py --only qa``, or ``python bench/qa.py`` for the
check alone (no runs), ``python bench/qa.py --workers 0,2,default [--reps 3] [--n 48]`` for whole ``nanobatch
run`` processes with ``qa:`` on and off and each ``--workers`` (``default``: no flag), alternating: the run's own
process's CPU per answer, and the total (its worker processes' too), from runs of N and 5 N items.

With every check on, a 2K answer must cost at most 1.2x the CPU it costs without them. Measured twice: the
check alone (``check_image`` on a 2K JPEG, the type the 3.x models answer with, and on the 5.9 MB noise PNG
the other sections use, the worst case), and a whole run of 2K JPEG answers with a manifest's ``qa:`` on and off.
"""

from __future__ import annotations

import io
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import _fixtures as fixtures
from _bench import Bench, say
from _server import SimulatorProcess
from PIL import Image, ImageDraw, ImageFilter

from nanobatch.checks import check_image
from nanobatch.qa import QaSettings

__all__ = ["bench_qa", "check_ms"]

SECTION = "9 qa"
ALL = QaSettings(background="white", min_fill=0.6, min_side=2048, aspect=True, changed=True, same_subject=True)
QA_YAML = "qa: {background: white, min_fill: 0.6, min_side: 2048, aspect: true, changed: true, same_subject: true}\n"


def photo(edge: int, background: tuple[int, int, int]) -> Image.Image:
    """A product shot: a textured bottle with a label, on *background*, with a photo's grain."""
    rng = random.Random(edge)
    image = Image.new("RGB", (edge, edge), background)
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((edge * 0.3, edge * 0.15, edge * 0.7, edge * 0.88), radius=edge // 16, fill=(170, 40, 50))
    draw.rectangle((edge * 0.3, edge * 0.45, edge * 0.7, edge * 0.65), fill=(235, 225, 190))
    for _ in range(400):  # print on the label and the glass's texture
        x, y = rng.uniform(0.31, 0.69) * edge, rng.uniform(0.16, 0.87) * edge
        draw.ellipse((x, y, x + edge / 90, y + edge / 90), fill=tuple(rng.randrange(256) for _ in range(3)))
    grain = Image.effect_noise((edge, edge), 12).convert("RGB")
    subject = Image.new("L", (edge, edge), 0)
    ImageDraw.Draw(subject).rectangle((edge * 0.29, edge * 0.14, edge * 0.71, edge * 0.89), fill=255)
    textured = Image.blend(image, grain, 0.15).filter(ImageFilter.GaussianBlur(1))
    return Image.composite(textured, image, subject)


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def check_ms(answer: bytes, original: bytes, repeat: int) -> float:
    """CPU milliseconds of one ``check_image`` with every check on (the mean of *repeat*, after one warm-up)."""
    check_image(answer, original=original, aspect_ratio="1:1", settings=ALL)
    started = time.process_time()
    for _ in range(repeat):
        check_image(answer, original=original, aspect_ratio="1:1", settings=ALL)
    return (time.process_time() - started) / repeat * 1000


def catalogs(folder: Path, n: int) -> tuple[Path, Path]:
    """A manifest of *n* 2K items whose input is the product the answer shows (so ``same_subject`` passes),
    without and with every check on."""
    folder.mkdir(parents=True, exist_ok=True)
    original = folder / "original.jpg"
    original.write_bytes(jpeg(photo(1600, (176, 196, 222))))
    off = fixtures.write_catalog(folder / f"job-qa-{n}", n, original, image_size="2K")
    on = off.with_name("job-qa.yaml")
    on.write_text(off.read_text() + QA_YAML)
    return off, on


def bench_qa(b: Bench) -> None:
    say("[9] qa: CPU of the output checks on 2K answers")
    answer = b.tmp / "answer-2k.jpg"
    answer.write_bytes(jpeg(photo(2048, (255, 255, 255))))
    original = jpeg(photo(1600, (176, 196, 222)))
    repeat = 20 if b.quick else 60
    alone = check_ms(answer.read_bytes(), original, repeat)
    worst = check_ms(b.noise.read_bytes(), original, max(3, repeat // 10))
    size_mb = answer.stat().st_size / 1e6
    b.add(SECTION, "check_image, every check on, 2K JPEG answer", f"{alone:.1f} ms CPU ({size_mb:.1f} MB)")
    b.add(SECTION, "check_image, every check on, 5.9 MB 2K PNG answer", f"{worst:.1f} ms CPU (a full PNG decode)")
    n, concurrency = (32 if b.quick else 64), 8
    manifest, with_qa = catalogs(b.tmp, n)
    with SimulatorProcess(latency_s=0, canned=str(answer)) as sim:
        off = b.nanobatch(manifest, b.out("qa-off"), sim, concurrency, n)
        on = b.nanobatch(with_qa, b.out("qa-on"), sim, concurrency, n)
    off_ms, on_ms = off["cpu_s"] / n * 1000, on["cpu_s"] / n * 1000
    b.add(
        SECTION,
        f"run CPU per 2K JPEG answer, the manifest's qa: on vs off, c={concurrency}",
        f"**{on_ms:.1f} ms** vs {off_ms:.1f} ms = **{on_ms / off_ms:.2f}x** (wall {on['wall_s']:.1f} s vs "
        f"{off['wall_s']:.1f} s)",
        "<= 1.2x",
        on_ms / off_ms <= 1.2,
    )
    # The same ratio from the parts: a run that ignores qa: (before the engine checks) still shows what it will cost.
    projected = (off_ms + alone) / off_ms
    b.add(
        SECTION,
        "run without checks + check_image, per 2K JPEG answer",
        f"{off_ms:.1f} + {alone:.1f} ms = **{projected:.2f}x**",
        "<= 1.2x",
        projected <= 1.2,
    )


@contextmanager
def _removed(folder: Path) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def whole_runs(workers: list[int | None], reps: int, n: int = 48, concurrency: int = 8) -> None:
    """Whole ``nanobatch run`` processes of 2K JPEG answers, ``qa:`` on and off with each of *workers*, taking
    turns, each of *n* and of 5 *n* items: the per-answer CPU is the difference of the two divided by 4 *n*,
    so the start-up (imports, the workers' own, the first decode) is counted once, apart, as a night of a
    catalog meets it. Medians of *reps* for the run's own process and for all processes together."""
    import statistics
    import tempfile

    from dispatch import run_cli

    tmp = Path(tempfile.mkdtemp(prefix="nanobatch-qa-"))
    b = Bench(tmp=tmp, quick=True)
    answer = tmp / "answer-2k.jpg"
    answer.write_bytes(jpeg(photo(2048, (255, 255, 255))))
    sizes = (n, 5 * n)
    jobs = {size: catalogs(tmp / f"n{size}", size) for size in sizes}
    turns = [(w, q, size) for w in workers for q in ("off", "on") for size in sizes]
    runs: dict[tuple[int | None, str, int], list[dict[str, float]]] = {turn: [] for turn in turns}
    with SimulatorProcess(latency_s=0.2, canned=str(answer)) as sim, _removed(tmp):
        for rep in range(reps + 1):  # the first round warms up (bytecode, page cache), not counted
            for w, q, size in turns if rep % 2 else reversed(turns):
                run = run_cli(b, None, manifest=jobs[size][q == "on"], out=b.out(f"w{w}-{q}-{size}-{rep}"),
                              url=sim.url, concurrency=concurrency, n=size, workers=w)  # fmt: skip
                if rep:
                    runs[w, q, size].append(run)

    def median(w: int | None, q: str, size: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[w, q, size])

    def per_answer(w: int | None, q: str, key: str) -> float:  # ms
        return (median(w, q, sizes[1], key) - median(w, q, sizes[0], key)) / (sizes[1] - sizes[0]) * 1000

    def start(w: int | None, q: str, key: str) -> float:  # ms
        return median(w, q, sizes[0], key) * 1000 - per_answer(w, q, key) * sizes[0]

    say(f"2K JPEG answers, c={concurrency}, whole processes of {sizes[0]} and {sizes[1]} items, medians of {reps}:")
    for w in workers:
        for q in ("off", "on"):
            wall = median(w, q, sizes[1], "wall_s")
            say(f"  --workers {w}, qa {q}: per answer, run's process {per_answer(w, q, 'main_cpu_s'):.1f} ms, "
                f"all {per_answer(w, q, 'cpu_s'):.1f} ms; start-up {start(w, q, 'main_cpu_s'):.0f} / "
                f"{start(w, q, 'cpu_s'):.0f} ms; wall of {sizes[1]} {wall:.2f} s")  # fmt: skip
        main = per_answer(w, "on", "main_cpu_s") / per_answer(w, "off", "main_cpu_s")
        total = per_answer(w, "on", "cpu_s") / per_answer(w, "off", "cpu_s")
        wall = median(w, "on", sizes[1], "wall_s") / median(w, "off", sizes[1], "wall_s")
        say(f"  --workers {w}: qa on / off per answer, run's process {main:.2f}x, all {total:.2f}x; wall {wall:.2f}x")


def main() -> int:
    if "--workers" in sys.argv:
        at = sys.argv.index("--workers")
        reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 3
        n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 48
        # "default": no --workers flag (limits.workers unset: one per CPU, started once the checks add up)
        whole_runs([None if w == "default" else int(w) for w in sys.argv[at + 1].split(",")], reps, n)
        return 0
    original = jpeg(photo(1600, (176, 196, 222)))
    answer = jpeg(photo(2048, (255, 255, 255)))
    buffer = io.BytesIO()
    photo(2048, (255, 255, 255)).save(buffer, "PNG")
    for name, data in (("2K JPEG", answer), ("2K PNG", buffer.getvalue())):
        sys.stdout.write(f"{name} ({len(data) / 1e6:.2f} MB): {check_ms(data, original, 30):.1f} ms CPU\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
