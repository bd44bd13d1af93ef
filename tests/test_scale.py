"""Catalog scale (issue 25): memory flat in the number of items whatever the manifest's format, ``status`` from
what the last run's summary holds, and ``validate`` estimating only the work a done folder has left."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import nanobatch
from nanobatch import pictures
from nanobatch.cli.main import main
from nanobatch.cli.status import folder_status
from nanobatch.item import WorkItem
from nanobatch.output import results
from nanobatch.run.preflight import check_job

from .fakes import image_bytes, write_job

MODEL = "gemini-3.1-flash-image"


def _catalog(folder: Path, n: int, kind: str) -> Path:
    """A job of *n* items in *kind* (yaml: ``items:`` in the manifest; csv, jsonl: a source), each item its own
    id and instruction, all sharing one picture."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").write_bytes(image_bytes())
    head = f"name: big\nmodel: {MODEL}\ndefaults:\n  image: a.png\n  aspect_ratio: '1:1'\n"
    if kind == "yaml":
        rows = "".join(f"  - id: sku-{i:06d}\n    instruction: make sku {i} white\n" for i in range(n))
        text = head + "items:\n" + rows
    else:
        if kind == "csv":
            (folder / "rows.csv").write_text("id,what\n" + "".join(f"sku-{i:06d},{i}\n" for i in range(n)))
        else:
            lines = "".join(json.dumps({"id": f"sku-{i:06d}", "what": str(i)}) + "\n" for i in range(n))
            (folder / "rows.jsonl").write_text(lines)
        text = head + f"items_from:\n  - {kind}: rows.{kind}\n    instruction: make sku {{what}} white\n"
    (folder / "job.yaml").write_text(text)
    return folder / "job.yaml"


def _peak(job: Path, out: Path) -> tuple[int, int]:
    """(peak bytes Python held while ``check_job`` went through *job*, its items)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = check_job(job, out_dir=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result.items


@pytest.mark.parametrize("kind", ["yaml", "csv"])  # JSONL is read as CSV is, row by row
def test_checking_ten_times_the_items_holds_no_more_memory_per_item(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """validate and run --dry-run (both check_job) keep no item once it is checked: from 1,000 to 10,000 items
    the peak grows by less than 50 bytes per item (a YAML manifest loaded whole took about 2,500). Both look at
    their pictures ahead (the items it holds meanwhile are a bound of their own, not per item)."""
    monkeypatch.setattr("nanobatch.job.pictures.START_AFTER", 100)  # scaled down with the job, as the chunks are
    monkeypatch.setattr("nanobatch.job.pictures._CHUNK", 50)
    small, small_items = _peak(_catalog(tmp_path / "small", 1000, kind), tmp_path / "small" / "out")
    big, big_items = _peak(_catalog(tmp_path / "big", 10000, kind), tmp_path / "big" / "out")
    assert (small_items, big_items) == (1000, 10000)
    per_item = (big - small) / (big_items - small_items)
    assert per_item < 50, f"{per_item:.0f} bytes per item"


def test_defaults_may_follow_the_items_and_values_stay_as_written(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes())
    (tmp_path / "job.yaml").write_text(
        "items:\n  - id: 00123\n    image: a.png\n  - {id: b, image: a.png, aspect_ratio: 16:9}\n"
        "defaults:\n  instruction: make it white\n  aspect_ratio: 4:3\nmodel: " + MODEL + "\n"
    )
    manifest = nanobatch.load_manifest(tmp_path / "job.yaml", default_model="gemini-3-pro-image")
    items = list(manifest.items())
    assert [(i.id, i.aspect_ratio, i.steps, i.model) for i in items] == [
        ("00123", "4:3", ("make it white",), MODEL),
        ("b", "16:9", ("make it white",), MODEL),
    ]


def test_an_item_that_is_not_valid_yaml_is_named_with_its_line_and_the_others_are_checked(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes())
    (tmp_path / "job.yaml").write_text(
        "defaults: {instruction: x, image: a.png}\nitems:\n  - id: good\n  - id: twice\n    image: a.png\n"
        "    image: a.png\n  - !!python/object/apply:os.system [echo hi]\n  - id: good\n"
    )
    with pytest.raises(nanobatch.ManifestError) as err:
        check_job(tmp_path / "job.yaml", out_dir=tmp_path / "out")
    found = [(p.item, p.field, p.message) for p in err.value.problems]
    assert [(item, field) for item, field, _ in found] == [("twice", None), ("#3", None), ("good", "id")]
    assert "line 4" in found[0][2] and "'image' is given twice" in found[0][2]
    assert "line 7" in found[1][2] and "python/object" in found[1][2]


def test_a_manifest_edited_after_it_was_read_is_a_problem_not_another_job(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a"}, {"id": "b"}])
    manifest = nanobatch.load_manifest(job, default_model=MODEL)
    job.write_text(job.read_text() + "\n# edited\n")
    with pytest.raises(nanobatch.ManifestError, match="the manifest changed since it was read"):
        list(manifest.items())


def _run(job: Path, out: Path, *extra: str) -> None:
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet", *extra]) in (0, 1, 3)


def test_status_answers_from_the_summary_until_the_results_or_the_manifest_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items: list[dict[str, Any]] = [{"id": f"i{n}", "image": "images/a.png"} for n in range(5)]
    for item in items[3:]:  # two items whose image can never pass: rejected, left for the next run
        item["qa"] = {"min_side": 2800}  # the simulator answers 1K (1:1); a 1K image of 8:1 could pass
    job = write_job(tmp_path, items)
    out = tmp_path / "out"
    _run(job, out)  # a run that reached every item (one cut short leaves no count: test_status_since.py)
    loads = []
    real_load = results.ResultsIndex.load.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(results.ResultsIndex, "load", classmethod(lambda cls, d: loads.append(d) or real_load(cls, d)))
    info = folder_status(out)
    assert (info["counts"]["ok"], info["left"], info["manifest_items"]) == (3, 2, 5) and loads == []
    job.write_text(job.read_text().replace("- id: i4\n", "- id: i4\n  instruction: another\n"))
    assert folder_status(out)["left"] == 2 and len(loads) == 1  # the manifest changed: counted again
    with (out / "results.jsonl").open("a") as f:  # another tool appends: the summary's totals no longer hold
        f.write(json.dumps({"note": "not a record"}) + "\n")
    info = folder_status(out)
    assert info["counts"]["ok"] == 3 and len(loads) == 2


def test_validate_of_a_done_folder_estimates_only_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    items: list[dict[str, Any]] = [{"id": f"i{n}", "image": f"images/{n}.png"} for n in range(4)]
    job = write_job(tmp_path, items)
    out = tmp_path / "out"
    _run(job, out)
    fresh = check_job(write_job(tmp_path / "two", items[2:]), out_dir=tmp_path / "two" / "out")
    (tmp_path / "images" / "3.png").write_bytes(image_bytes((1, 2, 3)))  # a changed input: work again
    job.write_text(job.read_text().replace("- id: i2\n", "- id: i2\n  instruction: a new instruction\n"))
    read = []
    real = pictures.file_problem
    monkeypatch.setattr("nanobatch.job.pictures.file_problem", lambda path: read.append(path) or real(path))
    result = check_job(job, out_dir=out)
    assert (result.items, result.done_items, result.requests, result.left_requests) == (4, 2, 4, 2)
    assert [Path(p).name for p in read] == ["3.png"]  # the only picture not sent and answered as it is now
    assert result.cost_likely_usd == pytest.approx(fresh.cost_likely_usd, rel=0.05)
    assert result.cost_likely_usd < 0.6 * check_job(job, out_dir=tmp_path / "elsewhere").cost_likely_usd
    assert main(["validate", str(job), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"done:      2 already done in {out} (a run skips them); 2 left" in printed
    assert "for what is left" in printed


def test_the_index_is_read_again_only_from_where_its_kept_copy_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(results, "MIN_LINES", 3)  # scaled down from 10,000
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png"} for n in range(5)])
    out = tmp_path / "out"
    _run(job, out)
    parsed: list[str] = []
    real_row = results._line_row
    monkeypatch.setattr(results, "_line_row", lambda line: parsed.append(line["id"]) or real_row(line))

    def everything() -> tuple[Any, ...]:
        with results.ResultsIndex.load(out) as index:
            return index.totals(), {f"i{n}": index.get(f"i{n}") for n in range(6)}

    first = everything()  # every line read, and a copy kept
    assert len(parsed) == 5 and list((tmp_path / "cache" / "nanobatch" / "index").glob("*.sqlite"))
    lines = (out / "results.jsonl").read_text().splitlines()
    moved = json.loads(lines[0]) | {"id": "i5", "cost_usd": 1.25}
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(moved) + "\n")
    parsed.clear()
    again = everything()
    assert parsed == ["i5"]  # the copy, then the one line appended since
    assert again[0]["items"] == 6 and again[0]["paid_usd"] == pytest.approx(first[0]["paid_usd"] + 1.25)
    assert again[1] == first[1] | {"i5": again[1]["i5"]} and again[1]["i5"] is not None
    (out / "results.jsonl").write_text("\n".join(lines[1:]) + "\n")  # rewritten: the copy no longer holds
    parsed.clear()
    third = everything()
    gone = json.loads(lines[0])["id"]
    assert sorted(parsed) == sorted(f"i{n}" for n in range(5) if f"i{n}" != gone) and third[1][gone] is None


def test_no_copy_of_the_index_is_kept_while_its_last_line_is_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(results, "MIN_LINES", 3)
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png"} for n in range(4)])
    out = tmp_path / "out"
    _run(job, out)
    text = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(text.rstrip("\n"))  # the last record's newline never written: torn
    with results.ResultsIndex.load(out) as index:
        assert len(index) == 4
    assert not list((tmp_path / "cache").rglob("*.sqlite"))  # a run cuts that line: a copy would hold it
    (out / "results.jsonl").write_text(text)
    with results.ResultsIndex.load(out) as index:
        assert len(index) == 4
    assert list((tmp_path / "cache").rglob("*.sqlite"))


def test_a_duplicate_late_in_a_long_catalog_is_found_after_the_first_thousands_were_set_aside(
    tmp_path: Path,
) -> None:
    """What items claim is set aside in a spill file, where the first keys that may be taken are looked for
    (later ones in SQLite): an id the last of 5,001 rows repeats from the fourth is still caught, and only it."""
    job = _catalog(tmp_path, 5000, "csv")
    with (tmp_path / "rows.csv").open("a") as f:
        f.write("sku-000003,again\n")
    with pytest.raises(nanobatch.ManifestError) as err:
        check_job(job, out_dir=tmp_path / "out")
    assert [(p.item, p.field, p.message) for p in err.value.problems] == [
        ("sku-000003", "id", "duplicate id 'sku-000003': ids must be unique")
    ]


def test_each_of_many_duplicates_is_found_in_the_rows_set_aside_and_then_in_sqlite(tmp_path: Path) -> None:
    """The first keys that may be taken are looked for by reading the rows set aside again; past them the rows
    go into SQLite. Twelve ids repeated through a 5,000-item catalog are each caught, whichever way."""
    job = _catalog(tmp_path, 5000, "csv")
    again = [3, 4100, 255, 256, 4999, 0, 1000, 1000, 2048, 17, 4998, 2]  # in the file and in the batch not yet written
    with (tmp_path / "rows.csv").open("a") as f:
        f.writelines(f"sku-{n:06d},again\n" for n in again)
    with pytest.raises(nanobatch.ManifestError) as err:
        check_job(job, out_dir=tmp_path / "out")
    assert [p.item for p in err.value.problems] == [f"sku-{n:06d}" for n in again]


def test_a_scratch_table_reads_its_rows_set_aside_for_the_first_lookups_and_sqlite_after() -> None:
    from nanobatch.scratch import ScratchTable, scratch_db

    table = ScratchTable(scratch_db("CREATE TABLE t (k BLOB PRIMARY KEY, v TEXT) WITHOUT ROWID;"), "t", "k, v")
    for n in range(1000):
        assert table.claim((b"k%d" % n, f"first {n}")) is None
    assert [table.find(b"k%d" % n) for n in (0, 999)] == [(b"k0", "first 0"), (b"k999", "first 999")]
    assert table.find(b"never") is None  # not seen (the filter), or a false alarm: read through, not found
    assert table._db.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)  # nothing in SQLite yet
    found = [table.claim((b"k%d" % n, "again")) for n in range(0, 1000, 50)]  # past the lookups read from the file
    assert found == [(b"k%d" % n, f"first {n}") for n in range(0, 1000, 50)]
    assert table._db.execute("SELECT COUNT(*) FROM t").fetchone() == (1000,)  # each row once, the first claimant's


def test_a_scratch_table_keeps_every_row_and_the_first_of_a_key_through_scans_and_after() -> None:
    """A scan that finds its row early must leave the spill file where the next batch goes: rows written after
    it are still found, and of rows sharing a key (a table without a primary key) the first one answers,
    before and after the rows move into SQLite."""
    from nanobatch.scratch import ScratchTable, scratch_db

    table = ScratchTable(scratch_db("CREATE TABLE f (k BLOB, v TEXT); CREATE INDEX f_k ON f (k);"), "f", "k, v")
    for n in range(600):  # two batches written, the rest not yet
        table.add((b"k%d" % n, "first"))
    assert table.find(b"k3") == (b"k3", "first")  # found in the first batch written: the scan stops there
    table.add((b"k3", "second"))
    for n in range(600, 1200):
        table.add((b"k%d" % n, "first"))
    found = [table.find(b"k%d" % n) for n in (300, 599, 900, 1199)]
    assert found == [(b"k%d" % n, "first") for n in (300, 599, 900, 1199)]
    for n in range(10, 18):  # keys it holds: past the scans, the rows go into SQLite
        assert table.find(b"k%d" % n) == (b"k%d" % n, "first")
    assert table.find(b"k3") == (b"k3", "first") and table.find(b"k700") == (b"k700", "first")
    assert table._db.execute("SELECT COUNT(*) FROM f").fetchone() == (1201,)


def test_a_damaged_picture_linked_under_many_names_is_a_bad_input_of_each_item(tmp_path: Path) -> None:
    """A picture read once for the items that share its file (hard links): each such item is still told."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(image_bytes()[:-20])  # cut short: no end chunk
    for name in ("b", "c"):
        (tmp_path / "images" / f"{name}.png").hardlink_to(tmp_path / "images" / "a.png")
    job = write_job(tmp_path, [{"id": n, "image": f"images/{n}.png"} for n in ("a", "b", "c")], model=MODEL)
    with pytest.raises(nanobatch.ManifestError) as err:
        check_job(job, out_dir=tmp_path / "out")
    assert [(p.item, p.field, p.bad_input) for p in err.value.problems] == [(n, "image", True) for n in ("a", "b", "c")]
    assert all("PNG" in p.message for p in err.value.problems)


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ({"id": "a", "image": "x.png", "instruction": "go", "keep_steps": True, "steps": ["s1", "s2"]}, True),
        ({"id": 1001, "image_size": 512, "aspect_ratio": 1.5, "images": ["x.png", "y.png"]}, True),
        ({"id": "a", "keep_steps": "yes", "instruction": None}, False),  # pydantic converts it
        ({"id": "a", "resize_inputs": 1}, False),
        ({"id": "a", "qa": {"background": "white"}, "tier": "flex"}, False),
        ({"id": "a", "imgae": "x.png"}, False),  # pydantic says what is wrong
        ({"id": "a", "images": ["x.png", 3]}, False),
    ],
)
def test_an_items_fields_are_read_as_pydantic_reads_them(raw: dict[str, Any], plain: bool) -> None:
    """The usual item is read without pydantic (plain_fields): it gives what ItemFields gives for it; any item
    it cannot vouch for is left to ItemFields (its conversions, and its errors with a did-you-mean)."""
    from nanobatch.job.fields import parse_fields, plain_fields

    fast = plain_fields(raw)
    assert (fast is not None) == plain
    fields, _ = parse_fields(raw, "job.yaml", "a")
    if fast is not None:
        assert fields is not None and fast == fields.model_dump(exclude_none=True)


def test_the_plain_path_holds_every_field_an_item_may_set() -> None:
    # Merged (pydantic-free, for the usual item) mirrors ItemFields: a field added to one and not the other
    # would be dropped from plain items, or refused on them.
    from dataclasses import fields

    from nanobatch.job.fields import ItemFields, Merged

    assert [f.name for f in fields(Merged)] == list(ItemFields.model_fields)


_SHAPES = [
    {},
    {"output": "white/{id}.jpg", "keep_steps": True, "steps": ["cut out", "white"]},
    {"images": ["a.png", "b.png"], "tier": "Flex", "thinking_level": "High", "output_format": "JPG"},
    {"aspect_ratio": "7:3"},  # not a ratio this model makes
    {"image": "missing.png"},
    {"image": "a.png", "images": ["a.png"]},
    {"instruction": "  "},
    {"instruction": "go", "steps": ["go"]},
    {"instruction": "caf\udce9"},  # a byte that was not UTF-8
    {"image": "a\x00.png"},
    {"output": "../{id}"},
    {"output": "x" * 300 + "{id}"},
    {"response_modalities": ["TEXT"]},
    {"model": "some-model-not-known", "image_size": "9K"},
    {"images": ["a.png"] * 20},  # more than the model takes
    {"inputs": "by_reference", "resize_inputs": True, "image_size": "2K"},
]


@pytest.mark.parametrize("item_id", ["sku-1", ".hidden", "x" * 250])
@pytest.mark.parametrize("fields", _SHAPES)
def test_an_item_checked_by_its_shape_is_the_item_the_whole_check_makes(
    tmp_path: Path, fields: dict[str, Any], item_id: str
) -> None:
    """Items that share their fields but their id, images and instructions are checked once for what they share
    (build_plain); such an item is the one build_item makes, and any item with a problem goes to build_item,
    which names each problem as before."""
    from nanobatch.job.build import Shapes, build_item, build_plain
    from nanobatch.job.fields import Merged
    from nanobatch.job.sources import RawItem

    (tmp_path / "a.png").write_bytes(image_bytes())
    (tmp_path / "b.png").write_bytes(image_bytes())
    given = {"id": item_id, "image": "a.png", "instruction": "white background", **fields}
    if "images" in fields and "image" not in fields:
        del given["image"]
    if "steps" in fields and "instruction" not in fields:
        del given["instruction"]
    raw = RawItem(fields=given, file="job.yaml", label=item_id)
    shapes = Shapes(MODEL, ())
    for own in (None, given, given):  # the shape worked out, then known; the defaults' shape, then known
        fast = build_plain(given, raw, shapes, base=str(tmp_path), check_files=True, own=own)
        item, problems = build_item(Merged(**given), given, raw, model=MODEL, base=str(tmp_path), check_files=True)
        assert fast == item
        assert (fast is None) == bool(problems)


@pytest.mark.parametrize(
    "item",
    [
        WorkItem(id="a", model=MODEL, inputs=("/x/a.png",), steps=("white",)),
        WorkItem(
            id="b",
            model=MODEL,
            inputs=("/x/a.png", "https://e.com/b.jpg"),
            steps=("cut", "café"),
            aspect_ratio="4:3",
            image_size="2K",
            thinking_level="high",
            resize_inputs=True,
            output_format="jpeg",
        ),  # fmt: skip
    ],
)
def test_the_work_key_is_the_digest_of_the_work_as_runs_before_wrote_it(item: WorkItem) -> None:
    """A re-run skips finished work by its key: the key must stay the digest of this document, or every item of
    every folder already done would be sent (and paid for) again."""
    import hashlib

    from nanobatch.inputs.stamps import work_key

    digests = ["ab" * 32, "cd" * 32][: len(item.inputs)]
    doc = {"v": 1, "settings": item.settings(), "inputs": digests}
    expected = "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    assert work_key(item, digests) == expected
    assert work_key(item, digests) == expected  # the settings' part kept from the first


@pytest.mark.parametrize(
    "digests", [[], ["ab" * 32], ["ab" * 32, "cd" * 32], [""], ["ab", ""], ['a"b'], ["café"], ["a b"], ["x\\y"]]
)
def test_the_work_key_writes_any_digest_list_as_json_does(digests: list[str]) -> None:
    """The key's inputs part, written by hand for hex digests, is json.dumps's text for every list: else a
    re-run would not know its own finished work."""
    import hashlib

    from nanobatch.inputs.stamps import work_key

    item = WorkItem(id="a", model=MODEL, inputs=tuple(f"/x/{i}.png" for i in range(len(digests))), steps=("w",))
    doc = {"v": 1, "settings": item.settings(), "inputs": digests}
    assert work_key(item, digests) == "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize(
    "ref", ["a.png", "photos/a.png", ".hidden/a.png", "..a.png", "./a.png", "x/../a.png", "x//a.png", "x/.", "~/a.png",
            "/abs/x/../a.png", "a/"],
)  # fmt: skip
@pytest.mark.parametrize("base", ["/", "/work/job"])
def test_an_input_path_resolves_as_the_file_system_reads_it(ref: str, base: str) -> None:
    import os

    from nanobatch.job.build import _resolve_input

    path, _, _ = _resolve_input(ref, base, check_files=False)
    assert path == os.path.normpath(os.path.join(base, os.path.expanduser(ref)))
