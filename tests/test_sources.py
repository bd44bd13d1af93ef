"""items_from: CSV, JSONL and glob sources, their templates, and where their problems point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import nanobatch
from nanobatch.errors import ManifestError, Problem
from nanobatch.item import WorkItem
from nanobatch.templates import fill, template_fields

from .conftest import run_virtual
from .fakes import FakeGemini, image_bytes, load
from .fakes import manifest_problems as problems

MODEL = "gemini-3.1-flash-image"


def job(folder: Path, doc: dict[str, Any], files: dict[str, str] | None = None, images: list[str] = ()) -> Path:
    """A manifest in *folder* with the given data files and (tiny) images."""
    for name, text in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for name in images:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(image_bytes())
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def items(path: Path) -> list[WorkItem]:
    return list(load(path).items())


CATALOG = "sku,background,category\nMUG-1,pure white,kitchen\nSNK-2,light grey,shoes\n"
CSV_SOURCE = {
    "csv": "catalog.csv",
    "id": "{sku}",
    "image": "photos/{sku}.jpg",
    "instruction": "Replace the background with {background}; keep the product unchanged",
}


def test_a_csv_row_becomes_an_item_with_its_templates_filled(tmp_path: Path) -> None:
    path = job(
        tmp_path, {"items_from": [CSV_SOURCE]}, {"catalog.csv": CATALOG}, ["photos/MUG-1.jpg", "photos/SNK-2.jpg"]
    )
    got = items(path)
    assert [i.id for i in got] == ["MUG-1", "SNK-2"]
    assert got[0].inputs == (str(tmp_path / "photos" / "MUG-1.jpg"),)  # relative to the manifest's folder
    assert got[1].steps == ("Replace the background with light grey; keep the product unchanged",)
    assert got[0].model == MODEL


def test_items_and_sources_combine_and_defaults_apply_to_both(tmp_path: Path) -> None:
    doc = {
        "defaults": {"aspect_ratio": "1:1", "instruction": "make it white"},
        "items": [{"id": "hero", "image": "photos/MUG-1.jpg"}],
        "items_from": [{"csv": "catalog.csv", "id": "{sku}", "image": "photos/{sku}.jpg"}, {"glob": "extra/*.png"}],
    }
    path = job(
        tmp_path, doc, {"catalog.csv": CATALOG}, ["photos/MUG-1.jpg", "photos/SNK-2.jpg", "extra/b.png", "extra/a.png"]
    )
    got = items(path)
    assert [i.id for i in got] == ["hero", "MUG-1", "SNK-2", "a", "b"]  # items:, then each source; globs sorted
    assert {i.aspect_ratio for i in got} == {"1:1"} and {i.steps for i in got} == {("make it white",)}
    report = load(path).check()
    assert (report.items, report.requests, report.problems) == (5, 5, [])


def test_a_jsonl_source_keeps_lists_and_booleans_of_a_lone_placeholder(tmp_path: Path) -> None:
    rows = [
        {"sku": 1001, "refs": ["a.png", "b.png"], "keep": True, "note": "a {brace}"},
        {"sku": 1002, "refs": ["b.png"], "keep": False, "note": "plain"},
    ]
    source = {
        "jsonl": "rows.jsonl",
        "id": "sku-{sku}",
        "images": "{refs}",
        "keep_steps": "{keep}",
        "steps": ["Clean it ({note})", "Brighten it"],
    }
    path = job(
        tmp_path,
        {"items_from": [source]},
        {"rows.jsonl": "\n".join(json.dumps(r) for r in rows) + "\n\n"},
        ["a.png", "b.png"],
    )
    first, second = items(path)
    assert first.id == "sku-1001" and len(first.inputs) == 2 and first.keep_steps is True
    assert first.steps == ("Clean it (a {brace})", "Brighten it")  # a value's braces are not a template
    assert second.inputs == (str(tmp_path / "b.png"),) and second.keep_steps is False


def test_a_glob_source_makes_one_item_per_file_with_the_fields_it_carries(tmp_path: Path) -> None:
    source = {"glob": "photos/**/*.jpg", "instruction": "Remove the sticker from {name}", "output": "clean/{id}.png"}
    path = job(tmp_path, {"items_from": [source]}, images=["photos/x1.jpg", "photos/more/x2.jpg", "photos/x3.png"])
    got = items(path)
    assert [(i.id, Path(i.inputs[0]).name, i.output) for i in got] == [
        ("x2", "x2.jpg", "clean/x2.png"),  # "more/x2.jpg" sorts before "x1.jpg"
        ("x1", "x1.jpg", "clean/x1.png"),
    ]
    assert got[1].steps == ("Remove the sticker from x1.jpg",)


def test_a_glob_does_not_take_the_runs_own_results_for_inputs(tmp_path: Path) -> None:
    # "**/*.png" from the manifest's folder also matches the output folder inside it, from the second run on.
    source = {"glob": "**/*.png", "instruction": "Make it white", "output": "edited/{id}.png"}
    doc = {"output_dir": "out", "items_from": [source]}
    path = job(tmp_path, doc, images=["a.png", "shop/b.png"])
    first = FakeGemini()
    assert run_virtual(lambda: nanobatch.run_job(path, transport=first.transport)).stats.ok == 2
    assert (tmp_path / "out" / "edited" / "a.png").exists()
    again = FakeGemini()
    summary = run_virtual(lambda: nanobatch.run_job(path, transport=again.transport))
    assert summary.exit_code == 0 and summary.stats.skipped == 2 and again.requests == []


def test_a_glob_that_matches_only_the_output_folder_says_so(tmp_path: Path) -> None:
    source = {"glob": "photos/*.jpg", "instruction": "x", "output": "{id}-edited.png"}
    path = job(tmp_path, {"items_from": [source]}, images=["photos/a.jpg"])
    with pytest.raises(ManifestError, match="matches only files inside the output folder"):
        nanobatch.check_job(path, out_dir=tmp_path / "photos")


def test_a_glob_source_can_add_reference_images_to_the_matched_file(tmp_path: Path) -> None:
    source = {
        "glob": "photos/*.jpg",
        "id": "branded-{stem}",
        "images": ["{path}", "logo.png"],
        "instruction": "Put the logo on the box",
    }
    path = job(tmp_path, {"items_from": [source]}, images=["photos/box.jpg", "logo.png"])
    (item,) = items(path)
    assert item.id == "branded-box"
    assert [Path(p).name for p in item.inputs] == ["box.jpg", "logo.png"]


def test_output_templates_may_use_columns(tmp_path: Path) -> None:
    source = {**CSV_SOURCE, "output": "{category}/{id}-white.png"}
    path = job(tmp_path, {"items_from": [source]}, {"catalog.csv": CATALOG}, ["photos/MUG-1.jpg", "photos/SNK-2.jpg"])
    assert [i.output for i in items(path)] == ["kitchen/MUG-1-white.png", "shoes/SNK-2-white.png"]
    # ...and so may the defaults' output, for items that come from a CSV
    doc = {"defaults": {"output": "{category}/{id}.png"}, "items_from": [CSV_SOURCE]}
    path = job(tmp_path, doc, {"catalog.csv": CATALOG})
    assert [i.output for i in items(path)] == ["kitchen/MUG-1.png", "shoes/SNK-2.png"]


def test_csv_options_delimiter_bom_and_an_id_column(tmp_path: Path) -> None:
    csv_text = "\ufeffid;photo;what\nA-1;p.png;make it blue\n"  # Excel's BOM and semicolons
    source = {"csv": "c.csv", "delimiter": ";", "image": "{photo}", "instruction": "{what}"}
    path = job(tmp_path, {"items_from": [source]}, {"c.csv": csv_text}, ["p.png"])
    (item,) = items(path)
    assert (item.id, item.steps) == ("A-1", ("make it blue",))


def test_a_sources_items_run_end_to_end(tmp_path: Path) -> None:
    source = {**CSV_SOURCE, "output": "{category}/{id}.png"}
    path = job(tmp_path, {"items_from": [source]}, {"catalog.csv": CATALOG}, ["photos/MUG-1.jpg", "photos/SNK-2.jpg"])
    fake = FakeGemini()
    summary = run_virtual(lambda: nanobatch.run_job(path, transport=fake.transport, out_dir=tmp_path / "out"))
    assert summary.exit_code == 0 and summary.stats.ok == 2
    assert sorted(fake.instructions()) == [
        "Replace the background with light grey; keep the product unchanged",
        "Replace the background with pure white; keep the product unchanged",
    ]
    assert (tmp_path / "out" / "kitchen" / "MUG-1.png").exists() and (tmp_path / "out" / "shoes" / "SNK-2.png").exists()


def test_a_source_edited_during_a_run_sends_only_what_the_check_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import nanobatch.run.runner

    rows = "sku,background\nS1,white\nS2,grey\nS3,blue\n"
    images = ["photos/S1.jpg", "photos/S2.jpg", "photos/S3.jpg", "photos/S9.jpg"]
    path = job(tmp_path, {"items_from": [CSV_SOURCE]}, {"catalog.csv": rows}, images)
    real_check = nanobatch.run.runner.check_job

    def check_then_edit(*args: Any, **kwargs: Any) -> Any:
        checked = real_check(*args, **kwargs)
        # After the check: S2 loses its background (a bad row now), S9 and a duplicate S1 are appended.
        (tmp_path / "catalog.csv").write_text("sku,background\nS1,white\nS2,\nS3,blue\nS9,red\nS1,red\n")
        return checked

    monkeypatch.setattr(nanobatch.run.runner, "check_job", check_then_edit)
    fake = FakeGemini()
    summary = run_virtual(lambda: nanobatch.run_job(path, transport=fake.transport, out_dir=tmp_path / "out"))
    # S1 and S3 were checked and are done; the broken S2 is skipped with an error (exit 1); the new rows wait.
    assert summary.stats.ok == 2 and len(fake.requests) == 2
    assert summary.exit_code == 1 and summary.stats.failures == {"manifest": 1}
    assert "item 'S2'" in caplog.text and "changed since the check" in caplog.text
    assert (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize(
    ("template", "values", "expected"),
    [
        pytest.param("photos/{sku}.jpg", {"sku": "A1"}, "photos/A1.jpg", id="column"),
        pytest.param("a {{literal}} {x}", {"x": "b"}, "a {literal} b", id="literal-braces"),
        pytest.param("{n}", {"n": 7}, "7", id="number-becomes-text"),
        pytest.param("{refs}", {"refs": ["a", "b"]}, ["a", "b"], id="lone-placeholder-keeps-a-list"),
        pytest.param(["{a}", "x"], {"a": "1"}, ["1", "x"], id="list-of-templates"),
        pytest.param(True, {}, True, id="not-a-template"),
        pytest.param("{n:>5}", {"n": "ab"}, "   ab", id="lone-placeholder-with-a-format-spec"),
        pytest.param("{n!r}", {"n": "ab"}, "'ab'", id="lone-placeholder-with-a-conversion"),
    ],
)
def test_fill(template: Any, values: dict[str, Any], expected: Any) -> None:
    assert fill(template, values) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        pytest.param("photos/{sku.jpg", "expected '}'", id="unclosed"),
        pytest.param("a } b", "Single '}'", id="stray-close"),
        pytest.param("{}", "name a column", id="empty"),
        pytest.param("{0}", "name a column", id="positional"),
        pytest.param("{row.sku}", "name a column", id="attribute"),
        pytest.param("{sku:>9999999999}.png", "a width or precision is a number up to 9999", id="huge-width"),
        pytest.param("{price:.99999f}", "a width or precision is a number up to 9999", id="huge-precision"),
        pytest.param("{sku:{width}}", "a width or precision is a number up to 9999", id="width-from-a-column"),
    ],
)
def test_bad_templates_are_refused_with_a_hint(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        template_fields(template)
    assert "{{" in str(err.value)


def one(found: list[Problem]) -> Problem:
    assert len(found) == 1, found
    return found[0]


def test_a_missing_column_in_the_header_is_one_problem_not_one_per_row(tmp_path: Path) -> None:
    source = {**CSV_SOURCE, "instruction": "Use {backgruond}"}
    rows = "sku,background\n" + "".join(f"S{n},white\n" for n in range(50))
    problem = one(problems(job(tmp_path, {"items_from": [source]}, {"catalog.csv": rows})))
    assert problem.file == f"{tmp_path / 'catalog.csv'}:1" and problem.field == "instruction"
    assert "no column 'backgruond'" in problem.message and 'did you mean "background"' in problem.message
    assert "row 1" in problem.message


def test_a_short_row_names_its_row_and_column(tmp_path: Path) -> None:
    rows = "sku,background\nS1,white\nS2\nS3,grey\n"
    path = job(tmp_path, {"items_from": [CSV_SOURCE]}, {"catalog.csv": rows}, ["photos/S1.jpg", "photos/S3.jpg"])
    problem = one(problems(path))
    assert (problem.file, problem.item, problem.field) == (f"{tmp_path / 'catalog.csv'}:3", "S2", "instruction")
    assert problem.message == "row 3 has no value for column 'background'"
    assert "catalog.csv:3: item 'S2', field 'instruction': row 3" in str(problem)


def test_an_empty_cell_is_no_value_not_an_instruction_cut_short(tmp_path: Path) -> None:
    rows = "sku,background\nS1,white\nS2,\n"
    path = job(tmp_path, {"items_from": [CSV_SOURCE]}, {"catalog.csv": rows}, ["photos/S1.jpg", "photos/S2.jpg"])
    problem = one(problems(path))
    assert (Path(problem.file).name, problem.item, problem.field) == ("catalog.csv:3", "S2", "instruction")
    assert problem.message == "row 3 has no value for column 'background'"


def test_columns_named_like_item_fields_are_those_fields(tmp_path: Path) -> None:
    # No templates at all: id, image, instruction and steps come from the rows' own keys and columns.
    lines = [
        {"id": "A1", "image": "photos/a.jpg", "instruction": "remove the sticker", "note": "not a field"},
        {"id": "A2", "images": ["photos/a.jpg", "photos/b.jpg"], "steps": ["one", "two"], "keep_steps": True},
        {"id": "A3", "image": "photos/b.jpg"},  # no instruction of its own: the defaults' one
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    csv_text = "id,image,instruction,aspect_ratio\nC1,photos/a.jpg,make it blue,16:9\nC2,photos/b.jpg,,\n"
    doc = {"defaults": {"instruction": "make it white"}, "items_from": [{"jsonl": "rows.jsonl"}, {"csv": "c.csv"}]}
    got = {
        i.id: i
        for i in items(job(tmp_path, doc, {"rows.jsonl": text, "c.csv": csv_text}, ["photos/a.jpg", "photos/b.jpg"]))
    }
    a, b = tmp_path / "photos" / "a.jpg", tmp_path / "photos" / "b.jpg"
    assert (got["A1"].inputs, got["A1"].steps) == ((str(a),), ("remove the sticker",))
    assert (got["A2"].inputs, got["A2"].steps, got["A2"].keep_steps) == ((str(a), str(b)), ("one", "two"), True)
    assert (got["A3"].inputs, got["A3"].steps) == ((str(b),), ("make it white",))
    assert (got["C1"].steps, got["C1"].aspect_ratio) == (("make it blue",), "16:9")
    assert (got["C2"].inputs, got["C2"].steps, got["C2"].aspect_ratio) == ((str(b),), ("make it white",), None)


def test_columns_the_templates_use_or_their_counterparts_stay_data(tmp_path: Path) -> None:
    # "image" and "instruction" feed the images/steps templates; "model" and "image_size" are the product's.
    rows = "id,image,instruction,model,image_size\nA1,photos/a.jpg,Make it blue,Mug XL,large\n"
    source = {
        "csv": "c.csv",
        "images": ["{image}", "logo.png"],
        "steps": ["{instruction}", "Photograph the {model} ({image_size}) on white"],
    }
    (item,) = items(job(tmp_path, {"items_from": [source]}, {"c.csv": rows}, ["photos/a.jpg", "logo.png"]))
    assert item.steps == ("Make it blue", "Photograph the Mug XL (large) on white")
    assert item.model == MODEL and item.image_size is None and len(item.inputs) == 2


def test_a_column_the_defaults_output_template_reads_stays_data(tmp_path: Path) -> None:
    rows = "id,image,aspect_ratio\nA1,photos/a.jpg,wide\n"
    doc = {"defaults": {"instruction": "x", "output": "{id}-{aspect_ratio}.png"}, "items_from": [{"csv": "c.csv"}]}
    (item,) = items(job(tmp_path, doc, {"c.csv": rows}, ["photos/a.jpg"]))
    assert item.aspect_ratio is None and item.output == "A1-wide.png"


def test_a_model_column_is_never_taken_for_the_gemini_model(tmp_path: Path) -> None:
    rows = "id,image,model\nA1,photos/a.jpg,Mug XL\n"
    doc = {"defaults": {"instruction": "x"}, "items_from": [{"csv": "c.csv"}]}
    (item,) = items(job(tmp_path, doc, {"c.csv": rows}, ["photos/a.jpg"]))
    assert item.model == MODEL


def test_a_template_on_the_source_wins_over_a_column_of_the_same_name(tmp_path: Path) -> None:
    rows = "id,sku,instruction\nX1,MUG-1,ignored\n"
    source = {"csv": "c.csv", "image": "photos/{sku}.jpg", "instruction": "Make {sku} white"}
    (item,) = items(job(tmp_path, {"items_from": [source]}, {"c.csv": rows}, ["photos/MUG-1.jpg"]))
    assert item.steps == ("Make MUG-1 white",)


def test_a_jsonl_sources_numbers_are_read_as_written(tmp_path: Path) -> None:
    """An id or column of 20 digits stays those digits (not a float), and a fraction stays that fraction."""
    text = '{"sku": 18446744073709551617, "w": 0.1}\n{"sku": 42, "w": 2.5e-3}\n'
    source = {"jsonl": "rows.jsonl", "id": "sku-{sku}", "image": "a.png", "instruction": "weigh {w} kg"}
    first, second = items(job(tmp_path, {"items_from": [source]}, {"rows.jsonl": text}, ["a.png"]))
    assert (first.id, first.steps) == ("sku-18446744073709551617", ("weigh 0.1 kg",))
    assert (second.id, second.steps) == ("sku-42", ("weigh 0.0025 kg",))


def test_a_jsonl_row_without_a_key_names_its_line(tmp_path: Path) -> None:
    text = '{"sku": "S1", "background": "white"}\n{"sku": "S2"}\nnot json\n[1, 2]\n'
    source = {"jsonl": "rows.jsonl", **{k: v for k, v in CSV_SOURCE.items() if k != "csv"}}
    path = job(tmp_path, {"items_from": [source]}, {"rows.jsonl": text})
    found = problems(path)
    assert [(Path(p.file).name, p.field) for p in found] == [
        ("rows.jsonl:1", "image"),  # photos/S1.jpg does not exist: the row is named all the same
        ("rows.jsonl:2", "instruction"),
        ("rows.jsonl:3", None),
        ("rows.jsonl:4", None),
    ]
    assert found[1].message == "line 2 has no column 'background'" and found[1].item == "S2"
    assert "not valid JSON" in found[2].message and "not a JSON object" in found[3].message


def test_row_problems_are_all_listed_by_validate(tmp_path: Path) -> None:
    rows = "sku,background\nS1,white\nbad id!,grey\nS1,blue\nS4,red,extra\n"
    path = job(tmp_path, {"items_from": [CSV_SOURCE]}, {"catalog.csv": rows}, ["photos/S1.jpg"])
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(path)
    found = [(Path(p.file).name, p.item, p.field) for p in err.value.problems]
    assert found == [
        ("catalog.csv:3", "bad id!", "id"),
        ("catalog.csv:3", "bad id!", "image"),
        ("catalog.csv:4", "S1", "id"),  # duplicate
        ("catalog.csv:5", None, None),  # more values than columns
    ]


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ({"qa": {"min_fil": 0.3}}, "items_from[0].qa.min_fil"),
        ({"image_size": ["1K"]}, "items_from[0].image_size"),
        # Values of the right type that the model or the tiers refuse: checked with each item, told once all the same
        ({"image_size": "8K"}, "items_from[0].image_size"),
        ({"tier": "flexx"}, "items_from[0].tier"),
        ({"aspect_ratio": "7:3"}, "items_from[0].aspect_ratio"),
        ({"qa": {"min_side": 99999}}, "items_from[0].qa.min_side"),
    ],
)
@pytest.mark.parametrize("kind", ["jsonl", "glob"])
def test_a_bad_setting_of_a_source_is_named_once_where_it_is_written_not_on_each_row(
    tmp_path: Path, setting: dict[str, Any], field: str, kind: str
) -> None:
    # A typo in the manifest's items_from entry: every row inherits it, but it is one mistake, in the manifest.
    rows = "".join(f'{{"id": "r{n}", "image": "photos/a{n}.jpg"}}\n' for n in range(50))
    source = {"jsonl": "rows.jsonl"} if kind == "jsonl" else {"glob": "photos/*.jpg"}
    doc = {"defaults": {"instruction": "x"}, "items_from": [{**source, **setting}]}
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(job(tmp_path, doc, {"rows.jsonl": rows}, [f"photos/a{n}.jpg" for n in range(50)]))
    (problem,) = err.value.problems
    assert Path(problem.file).name == "job.yaml" and problem.item is None and problem.field == field


def test_a_problem_that_depends_on_a_row_or_on_a_value_written_elsewhere_is_not_moved_to_the_source(
    tmp_path: Path,
) -> None:
    # The entry sets qa.retries, the manifest's top level an unreachable qa.min_side: told at qa.min_side. And a
    # min_side the entry sets is out of reach only for the rows whose image_size column is small: told at the rows.
    rows = '{"id": "small", "image": "photos/a.jpg", "image_size": "1K"}\n'
    rows += '{"id": "big", "image": "photos/a.jpg", "image_size": "4K"}\n'
    doc = {"qa": {"min_side": 9000}, "defaults": {"instruction": "x"},
           "items_from": [{"jsonl": "rows.jsonl", "qa": {"retries": 1}}]}  # fmt: skip
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(job(tmp_path, doc, {"rows.jsonl": rows}, ["photos/a.jpg"]))
    assert {problem.field for problem in err.value.problems} == {"qa.min_side"}
    doc = {"defaults": {"instruction": "x"}, "items_from": [{"jsonl": "rows.jsonl", "qa": {"min_side": 3000}}]}
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(job(tmp_path, doc, {"rows.jsonl": rows}, ["photos/a.jpg"]))
    (problem,) = err.value.problems
    assert (problem.file.endswith("rows.jsonl:1"), problem.item, problem.field) == (True, "small", "qa.min_side")


def test_ids_must_be_unique_across_items_and_sources(tmp_path: Path) -> None:
    doc = {"defaults": {"instruction": "x"}, "items": [{"id": "a"}], "items_from": [{"glob": "*.png"}]}
    problem = one(problems(job(tmp_path, doc, images=["a.png"])))
    assert (problem.item, problem.field) == ("a", "id") and "duplicate id" in problem.message


def test_a_csv_without_an_id_column_or_template_says_how_to_name_items(tmp_path: Path) -> None:
    source = {"csv": "catalog.csv", "image": "photos/{sku}.jpg", "instruction": "x"}
    problem = one(problems(job(tmp_path, {"items_from": [source]}, {"catalog.csv": CATALOG})))
    assert problem.field == "id" and 'id: "{sku}"' in problem.message


@pytest.mark.parametrize(
    ("source", "field", "message"),
    [
        pytest.param(
            {"csv": "catalog.csv", "imgae": "x"}, "items_from[0].imgae", 'did you mean "image"', id="unknown-key"
        ),
        pytest.param(
            {"csv": "catalog.csv", "delimeter": ";"},
            "items_from[0].delimeter",
            'did you mean "delimiter"',
            id="unknown-option",
        ),
        pytest.param(
            {"glob": "*.jpg", "delimiter": ";"}, "items_from[0].delimiter", "unknown key", id="csv-option-on-a-glob"
        ),
        pytest.param({"id": "{sku}"}, "items_from[0]", "give exactly one of csv:, jsonl: or glob:", id="no-kind"),
        pytest.param(
            {"csv": "catalog.csv", "glob": "*.jpg"}, "items_from[0]", "not csv, glob together", id="two-kinds"
        ),
        pytest.param({"csv": "nope.csv"}, "items_from[0].csv", "csv file not found", id="missing-file"),
        pytest.param({"csv": ""}, "items_from[0].csv", "must be a file name", id="empty-name"),
        pytest.param(
            {"csv": "catalog.csv", "instruction": "Use {color"},
            "items_from[0].instruction",
            "expected '}'",
            id="bad-template",
        ),
        pytest.param(
            {"glob": "*.jpg", "instruction": "Make it {color}"},
            "items_from[0].instruction",
            "{path}, {name}, {stem} and {id}",
            id="glob-unknown-placeholder",
        ),
        pytest.param(
            {"csv": "catalog.csv", "delimiter": ";;"}, "items_from[0].delimiter", "one character", id="long-delimiter"
        ),
        pytest.param("catalog.csv", "items_from[0]", "must be a mapping", id="not-a-mapping"),
    ],
)
def test_source_entry_problems(tmp_path: Path, source: Any, field: str, message: str) -> None:
    path = job(tmp_path, {"defaults": {"instruction": "x"}, "items_from": [source]}, {"catalog.csv": CATALOG})
    problem = one(problems(path))
    assert (problem.file, problem.item, problem.field) == (str(path), None, field)
    assert message in problem.message


def test_a_glob_that_matches_nothing_is_a_problem(tmp_path: Path) -> None:
    path = job(tmp_path, {"defaults": {"instruction": "x"}, "items_from": [{"glob": "photos/*.jpg"}]})
    problem = one(problems(path))
    assert problem.field == "glob" and "matches no files" in problem.message


def test_a_source_without_rows_leaves_a_manifest_without_items(tmp_path: Path) -> None:
    path = job(tmp_path, {"items_from": [CSV_SOURCE]}, {"catalog.csv": "sku,background\n"})
    problem = one(problems(path))
    assert problem.field == "items" and "no items" in problem.message


def test_a_single_source_may_be_written_without_the_list(tmp_path: Path) -> None:
    path = job(tmp_path, {"items_from": CSV_SOURCE}, {"catalog.csv": CATALOG}, ["photos/MUG-1.jpg", "photos/SNK-2.jpg"])
    assert [i.id for i in items(path)] == ["MUG-1", "SNK-2"]


def test_a_csv_that_is_not_utf8_is_one_clear_problem(tmp_path: Path) -> None:
    path = job(tmp_path, {"items_from": [CSV_SOURCE]}, images=["photos/MUG-1.jpg"])
    (tmp_path / "catalog.csv").write_bytes(b"sku,background\nMUG-1,caf\xe9 white\n")
    (problem,) = problems(path)
    assert problem.file == f"{tmp_path / 'catalog.csv'}:2" and "line 2 is not UTF-8 text (byte 0xe9)" in problem.message


def test_a_jsonl_byte_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    lines = [b'{"id": "a", "instruction": "x"}', b'{"id": "b", "instruction": "x"}']
    lines.append(b'{"id": "c", "instruction": "caf\xe9"}')
    (tmp_path / "more.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    path = job(tmp_path, {"items_from": [{"jsonl": "more.jsonl"}]})
    (problem,) = problems(path)
    assert problem.file == f"{tmp_path / 'more.jsonl'}:3" and "line 3 is not UTF-8 text (byte 0xe9)" in problem.message


@pytest.mark.parametrize("delimiter", [",", ";"])
def test_an_empty_csv_row_is_skipped_like_a_blank_line(tmp_path: Path, delimiter: str) -> None:
    text = CATALOG.replace("\nSNK-2", "\n,,\n\n , ,\nSNK-2") + ",,\n"  # as Excel saves rows it emptied
    source = {**CSV_SOURCE, "delimiter": delimiter}
    text = text.replace(",", delimiter)
    path = job(tmp_path, {"items_from": [source]}, {"catalog.csv": text}, ["photos/MUG-1.jpg", "photos/SNK-2.jpg"])
    assert problems(path) == []
    assert [i.id for i in items(path)] == ["MUG-1", "SNK-2"]


@pytest.mark.parametrize(
    ("text", "delimiter", "hint"),
    [
        pytest.param(CATALOG.replace(",", ";"), None, '`delimiter: ";"`', id="semicolons-read-as-commas"),
        pytest.param(CATALOG, ";", '`delimiter: ","`', id="commas-read-as-semicolons"),
        pytest.param(CATALOG.replace(",", "\t"), None, '`delimiter: "\\t"`', id="tabs"),
        pytest.param(CATALOG.replace(",", "|"), None, '`delimiter: "|"`', id="pipes"),
    ],
)
def test_a_wrong_delimiter_gets_a_hint(tmp_path: Path, text: str, delimiter: str | None, hint: str) -> None:
    source = {**CSV_SOURCE, **({"delimiter": delimiter} if delimiter else {})}
    path = job(tmp_path, {"items_from": [source]}, {"catalog.csv": text})
    found = problems(path)
    assert found and all(f"did you mean {hint}?" in p.message for p in found), found


def test_text_that_cannot_be_sent_is_refused_where_it_stands(tmp_path: Path) -> None:
    # JSON can spell a lone surrogate; a NUL cannot be in a file name: either would crash the run after paying.
    rows = [
        {"id": "A1", "image": "photos/a.jpg", "instruction": "make it wh\udcffite", "cat": "mugs"},
        {"id": "A2", "image": "photos/a.jpg", "cat": "ki\u0000tchen"},
        {"id": "A3", "image": "photos/a.jpg", "price": "9.99"},
    ]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    source = {"jsonl": "rows.jsonl", "output": "{cat}/{id}.png"}
    doc = {"defaults": {"instruction": "x"}, "items_from": [source]}
    found = problems(job(tmp_path, doc, {"rows.jsonl": text}, ["photos/a.jpg"]))
    assert sorted((p.item, p.field) for p in found) == [("A1", "instruction"), ("A2", "output"), ("A3", "output")]
    by_item = {p.item: p for p in found}
    assert "not valid text" in by_item["A1"].message
    assert "NUL" in by_item["A2"].message and "no such column" in by_item["A3"].message


def test_an_output_format_spec_the_value_cannot_take_is_a_problem(tmp_path: Path) -> None:
    source = {**CSV_SOURCE, "output": "{id}-{background:.2f}.png"}
    path = job(tmp_path, {"items_from": [source]}, {"catalog.csv": CATALOG}, ["photos/MUG-1.jpg", "photos/SNK-2.jpg"])
    found = problems(path)
    assert {p.field for p in found} == {"output"} and "cannot be filled" in found[0].message


def test_a_number_too_big_for_the_output_format_spec_is_a_problem_of_its_row(tmp_path: Path) -> None:
    rows = "".join(json.dumps({"sku": sku, "price": price}) + "\n" for sku, price in [("A1", 9.5), ("A2", 10**400)])
    source = {"jsonl": "rows.jsonl", "id": "{sku}", "instruction": "x", "output": "{id}-{price:.2f}.png"}
    (problem,) = problems(job(tmp_path, {"items_from": [source]}, {"rows.jsonl": rows}))
    assert (problem.file, problem.item, problem.field) == (f"{tmp_path / 'rows.jsonl'}:2", "A2", "output")
    assert "cannot be filled: int too large to convert to float" in problem.message


def test_a_source_file_name_too_long_for_the_file_system_is_a_problem(tmp_path: Path) -> None:
    name = "x" * 5000 + ".csv"
    problem = one(problems(job(tmp_path, {"defaults": {"instruction": "x"}, "items_from": [{"csv": name}]})))
    assert (problem.item, problem.field) == (None, "items_from[0].csv") and "File name too long" in problem.message


def test_a_non_ascii_id_from_a_csv_row_is_named_with_its_row_and_says_ascii(tmp_path: Path) -> None:
    text = CATALOG.replace("SNK-2", "SNÖ-2")
    path = job(tmp_path, {"items_from": [CSV_SOURCE]}, {"catalog.csv": text}, ["photos/MUG-1.jpg", "photos/SNÖ-2.jpg"])
    (problem,) = problems(path)
    assert problem.file == f"{tmp_path / 'catalog.csv'}:3" and "ASCII letters" in problem.message


@pytest.mark.parametrize("requests", [2, 35])  # stopped before row 31, or after it
def test_a_row_turned_bad_is_counted_by_a_stopped_run_only_if_it_got_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, requests: int
) -> None:
    """A run reads its items (their records) a few hundred ahead of the workers: a row that turned bad since the
    check is still told only when the run gets there, so a run stopped first (here by its request budget)
    neither logs it nor counts it as failed, and one stopped after it does both."""
    import nanobatch.run.runner

    skus = [f"S{n:03d}" for n in range(40)]
    rows = "sku,background\n" + "".join(f"{sku},white\n" for sku in skus)
    path = job(tmp_path, {"items_from": [CSV_SOURCE]}, {"catalog.csv": rows}, [f"photos/{s}.jpg" for s in skus])
    real_check = nanobatch.run.runner.check_job

    def check_then_edit(*args: Any, **kwargs: Any) -> Any:
        checked = real_check(*args, **kwargs)
        (tmp_path / "catalog.csv").write_text(rows.replace("S030,white", "S030,"))  # row 31 loses its background
        return checked

    monkeypatch.setattr(nanobatch.run.runner, "check_job", check_then_edit)
    stopped = nanobatch.load_settings(overrides={"budget.max_requests": requests, "limits.concurrency": 1})
    summary = run_virtual(
        lambda: nanobatch.run_job(path, transport=FakeGemini().transport, out_dir=tmp_path / "out", settings=stopped)
    )
    went_past = requests > 30
    assert summary.stats.ok == requests and summary.stats.failed == went_past
    assert ("item 'S030'" in caplog.text) == went_past


def test_a_last_row_turned_bad_is_told_once_the_run_has_taken_every_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The other side of reading ahead: a row past the last item a finished run sent is still told and counted."""
    import nanobatch.run.runner

    rows = "sku,background\nS1,white\nS2,grey\nS3,blue\n"
    path = job(tmp_path, {"items_from": [CSV_SOURCE]}, {"catalog.csv": rows}, ["photos/S1.jpg", "photos/S2.jpg",
                                                                                "photos/S3.jpg"])  # fmt: skip
    real_check = nanobatch.run.runner.check_job

    def check_then_edit(*args: Any, **kwargs: Any) -> Any:
        checked = real_check(*args, **kwargs)
        (tmp_path / "catalog.csv").write_text(rows.replace("S3,blue", "S3,"))  # the last row loses its background
        return checked

    monkeypatch.setattr(nanobatch.run.runner, "check_job", check_then_edit)
    summary = run_virtual(lambda: nanobatch.run_job(path, transport=FakeGemini().transport, out_dir=tmp_path / "out"))
    assert summary.stats.ok == 2 and summary.stats.failures == {"manifest": 1} and summary.exit_code == 1
    assert "item 'S3'" in caplog.text and "changed since the check" in caplog.text


def test_a_column_or_key_like_a_misspelt_field_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    # Passed over as data, "Image" would have the row sent without its picture (paid, as a text-to-image request),
    # and "instrction" would have it sent with the defaults' instruction.
    files = {
        "c.csv": "id,Image,name,title,price\nA1,photos/a.jpg,Mug,Big mug,9\n",
        "j.jsonl": '{"id": "B1", "image": "photos/a.jpg", "instrction": "Make it blue", "color": "red"}\n'
        '{"id": "B2", "image": "photos/a.jpg", "instruction": "Make it red"}\n',
    }
    doc = {"defaults": {"instruction": "Remove the sticker"}, "items_from": [{"csv": "c.csv"}, {"jsonl": "j.jsonl"}]}
    found = problems(job(tmp_path, doc, files, ["photos/a.jpg"]))
    assert [(Path(p.file).name, p.field) for p in found] == [("c.csv:1", "Image"), ("j.jsonl:1", "instrction")]
    assert "did you mean 'image'?" in found[0].message and "did you mean 'instruction'?" in found[1].message


def test_a_column_like_a_field_that_a_template_reads_or_beside_that_field_is_data(tmp_path: Path) -> None:
    rows = "id,Image,image,instructions,name\nA1,x,photos/a.jpg,Make it blue,Mug\n"
    source = {"csv": "c.csv", "instruction": "{instructions}, keep the {name}"}
    (item,) = items(job(tmp_path, {"items_from": [source]}, {"c.csv": rows}, ["photos/a.jpg"]))
    assert item.steps == ("Make it blue, keep the Mug",) and item.inputs == (str(tmp_path / "photos/a.jpg"),)


def test_a_csv_header_that_names_a_column_twice_is_refused(tmp_path: Path) -> None:
    # csv rows as dicts keep the last one: the first picture would be dropped without a word.
    rows = "id,image,instruction,image\nX1,photos/a.jpg,Make it blue,logo.png\n"
    (problem,) = problems(job(tmp_path, {"items_from": [{"csv": "c.csv"}]}, {"c.csv": rows}, ["photos/a.jpg"]))
    assert problem.file.endswith("c.csv:1") and problem.field == "image" and "twice" in problem.message


def test_repeated_columns_no_item_reads_are_data_as_excel_saves_them(tmp_path: Path) -> None:
    # Excel's trailing empty column names, two "notes" columns, and "Tier" or "QA" columns of the catalog's own.
    rows = "id,image,instruction,notes,notes,Tier,QA,,\nX1,photos/a.jpg,Make it blue,a,b,gold,ok,,\n"
    (item,) = items(job(tmp_path, {"items_from": [{"csv": "c.csv"}]}, {"c.csv": rows}, ["photos/a.jpg"]))
    assert item.steps == ("Make it blue",) and item.tier is None and item.qa is None


def test_a_setting_every_row_shares_is_reported_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A misspelt check on the items_from entry is every row's problem: 1,000 rows must not print 1,000 lines.
    rows = "id,image\n" + "".join(f"S{n},photos/a.jpg\n" for n in range(40))
    source = {"csv": "c.csv", "instruction": "x", "qa": {"min_fil": 0.5}}
    path = job(tmp_path, {"items_from": [source]}, {"c.csv": rows}, ["photos/a.jpg"])
    from nanobatch.cli.main import main

    assert main(["validate", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {path}, field 'items_from[0].qa.min_fil': unknown field")


def test_a_column_a_template_reads_named_twice_is_refused(tmp_path: Path) -> None:
    rows = "sku,photo,photo\nX1,photos/a.jpg,photos/b.jpg\n"
    source = {"csv": "c.csv", "id": "{sku}", "image": "{photo}", "instruction": "x"}
    (problem,) = problems(job(tmp_path, {"items_from": [source]}, {"c.csv": rows}, ["photos/a.jpg", "photos/b.jpg"]))
    assert problem.field == "photo" and "twice" in problem.message


def test_a_flood_of_problems_counts_what_it_does_not_show(tmp_path: Path) -> None:
    from nanobatch.errors import ManifestError

    distinct = [Problem("job.yaml", f"i{n}", "image", f"image file not found: {n}.png") for n in range(60)]
    same = [Problem("job.yaml", f"s{n}", "qa.min_fil", "unknown field") for n in range(10)]
    lines = str(ManifestError(distinct + same)).splitlines()
    assert lines[50] == "... and 13 more problems"  # 60 distinct and 3 of the repeated one shown at most 50
    assert lines[51] == "... and 7 more items with the same problem in field 'qa.min_fil': unknown field"


def table_job(tmp_path: Path, name: str, rows: str, **doc: Any) -> Path:
    """A job whose items are the *rows* of the CSV or JSONL file *name* (by its extension), photos/a.jpg there."""
    kind = "jsonl" if name.endswith(".jsonl") else "csv"
    return job(tmp_path, {**doc, "items_from": [{kind: name}]}, {name: rows}, ["photos/a.jpg"])


# A row whose photo is missing is not a text-to-image request: sent, it would be paid for a picture made from the
# instruction alone ("make the background white"), and recorded ok.
@pytest.mark.parametrize(
    ("name", "rows", "field"),
    [
        ("c.csv", "id,image\nA1,photos/a.jpg\nA2,\n", "image"),
        ("c.csv", "id,images,image\nA1,,photos/a.jpg\nA2,,\n", "image"),  # A1: one of the two is enough
        ("j.jsonl", '{"id": "A1", "image": "photos/a.jpg"}\n{"id": "A2", "image": null}\n', "image"),
        ("j.jsonl", '{"id": "A1", "image": "photos/a.jpg"}\n{"id": "A2", "images": []}\n', "images"),
        ("j.jsonl", '{"id": "A1", "image": "photos/a.jpg"}\n{"id": "A2", "image": ""}\n', "image"),
    ],
)
def test_a_row_that_leaves_its_picture_empty_is_refused_before_anything_is_sent(
    tmp_path: Path, name: str, rows: str, field: str
) -> None:
    path = table_job(tmp_path, name, rows, defaults={"instruction": "Make the background white"})
    fake = FakeGemini()
    with pytest.raises(ManifestError) as err:
        run_virtual(lambda: nanobatch.run_job(path, transport=fake.transport, out_dir=tmp_path / "out"))
    (problem,) = err.value.problems
    line = 3 if name.endswith(".csv") else 2  # a CSV's row 1 is its header
    assert (Path(problem.file).name, problem.item, problem.field) == (f"{name}:{line}", "A2", field)
    assert "no picture" in problem.message and fake.requests == []


@pytest.mark.parametrize("given", [[], None])
def test_an_item_in_the_manifest_with_an_empty_images_list_is_refused(tmp_path: Path, given: Any) -> None:
    doc = {"defaults": {"instruction": "Make it blue"}, "items": [{"id": "X1", "images": given}]}
    (problem,) = problems(job(tmp_path, doc))
    assert (problem.item, problem.field) == ("X1", "images") and "text-to-image" in problem.message


def test_an_empty_picture_cell_takes_the_defaults_picture_when_they_give_one(tmp_path: Path) -> None:
    doc = {"defaults": {"image": "photos/a.jpg"}, "items_from": [{"csv": "c.csv"}]}
    rows = "id,image,instruction\nA1,photos/b.jpg,Make it blue\nA2,,Make it red\n"
    first, second = items(job(tmp_path, doc, {"c.csv": rows}, ["photos/a.jpg", "photos/b.jpg"]))
    assert first.inputs == (str(tmp_path / "photos/b.jpg"),) and second.inputs == (str(tmp_path / "photos/a.jpg"),)


def test_a_table_without_a_picture_column_is_still_text_to_image(tmp_path: Path) -> None:
    rows = "id,instruction\nP1,A poster of a lemon on a blue table\n"
    (item,) = items(job(tmp_path, {"items_from": [{"csv": "c.csv"}]}, {"c.csv": rows}))
    assert item.inputs == () and item.steps == ("A poster of a lemon on a blue table",)


def test_nan_in_a_jsonl_line_is_no_value_as_pandas_means_it_and_infinity_is_refused(tmp_path: Path) -> None:
    # Python's json.dumps writes a pandas missing value as NaN: it must not go out as the text "nan".
    lines = (
        '{"id": "A1", "image": "photos/a.jpg", "instruction": NaN, "background": "grey"}\n'
        '{"id": "A2", "image": "photos/a.jpg", "background": NaN}\n'
    )
    doc = {"defaults": {"instruction": "Make the background white"}, "items_from": [{"jsonl": "j.jsonl"}]}
    first, second = items(job(tmp_path, doc, {"j.jsonl": lines}, ["photos/a.jpg"]))
    assert first.steps == second.steps == ("Make the background white",)  # the defaults', as for null
    doc["items_from"] = [{"jsonl": "j.jsonl", "instruction": "Put it on {background}"}]
    (problem,) = problems(job(tmp_path, doc, {"j.jsonl": lines}))
    assert (Path(problem.file).name, problem.item) == ("j.jsonl:2", "A2")
    assert "no value for column 'background'" in problem.message
    (problem,) = problems(job(tmp_path, doc, {"j.jsonl": lines.replace("NaN}", "Infinity}")}))
    assert Path(problem.file).name == "j.jsonl:2" and "Infinity is not JSON" in problem.message


# A template under defaults: is filled by each row of a source, as defaults' output always was; sent as written, an
# instruction "Replace the background with {background}" was paid for and recorded ok.
def test_a_defaults_template_is_filled_by_each_row_for_a_field_the_row_does_not_give(tmp_path: Path) -> None:
    rows = "sku,photo,background,instruction\nA1,photos/a.jpg,grey,\nA2,photos/a.jpg,blue,Crop it tight\n"
    doc = {"defaults": {"instruction": "Replace the background with {background}"},
           "items_from": [{"csv": "c.csv", "id": "{sku}", "image": "{photo}"}]}  # fmt: skip
    first, second = items(job(tmp_path, doc, {"c.csv": rows}, ["photos/a.jpg"]))
    assert first.steps == ("Replace the background with grey",)  # its instruction cell is empty
    assert second.steps == ("Crop it tight",)  # its own wins, as over any default


def test_a_defaults_template_reading_a_column_the_table_lacks_is_refused_at_its_header(tmp_path: Path) -> None:
    doc = {"defaults": {"instruction": "Replace the background with {backgroud}"}, "items_from": [{"csv": "c.csv"}]}
    (problem,) = problems(
        job(tmp_path, doc, {"c.csv": "id,image,background\nA1,photos/a.jpg,grey\n"}, ["photos/a.jpg"])
    )
    assert (Path(problem.file).name, problem.field) == ("c.csv:1", "instruction")
    assert "the defaults' instruction uses {backgroud}" in problem.message and '"background"?' in problem.message


def test_a_glob_fills_a_defaults_template_it_can_and_refuses_one_it_cannot(tmp_path: Path) -> None:
    doc = {"defaults": {"instruction": "Edit {stem}"}, "items_from": [{"glob": "photos/*.jpg"}]}
    (item,) = items(job(tmp_path, doc, {}, ["photos/a.jpg"]))
    assert item.steps == ("Edit a",)
    doc["defaults"] = {"instruction": "Replace the background with {background}"}
    (problem,) = problems(job(tmp_path, doc, {}, ["photos/a.jpg"]))
    assert problem.field == "items_from[0].instruction" and "a glob source cannot fill" in problem.message


def test_braces_doubled_under_defaults_are_braces_for_a_row_too(tmp_path: Path) -> None:
    doc = {"defaults": {"instruction": "Print {{SALE}} on {color} paper"}, "items_from": [{"csv": "c.csv"}]}
    (item,) = items(job(tmp_path, doc, {"c.csv": "id,image,color\nA1,photos/a.jpg,red\n"}, ["photos/a.jpg"]))
    assert item.steps == ("Print {SALE} on red paper",)


@pytest.mark.parametrize(
    ("name", "rows", "column"),
    [
        ("c.csv", "id,img,instruction\nA1,photos/a.jpg,Make it white\n", "img"),
        ("c.csv", "id,photo_url,instruction\nA1,https://cdn.example/a.JPG?w=2000,Make it white\n", "photo_url"),
        ("j.jsonl", '{"id": "A1", "picture": "photos/a.png", "instruction": "Make it white"}\n', "picture"),
    ],
)
def test_a_column_that_names_pictures_under_another_name_is_refused_not_sent_as_text_to_image(
    tmp_path: Path, name: str, rows: str, column: str
) -> None:
    # Not close to "image" by spelling ("img", "photo_url"): its values tell what it holds.
    (problem,) = problems(table_job(tmp_path, name, rows))
    assert (problem.item, problem.field) == ("A1", column) and "text-to-image" in problem.message
    assert f'image: "{{{column}}}"' in problem.message


def test_a_picture_name_in_a_table_whose_items_have_pictures_or_that_a_template_reads_is_data(tmp_path: Path) -> None:
    rows = "id,image,thumbnail,title\nA1,photos/a.jpg,thumbs/a.jpg,Poster.png\n"
    (item,) = items(job(tmp_path, {"defaults": {"instruction": "x"}, "items_from": [{"csv": "c.csv"}]},
                        {"c.csv": rows}, ["photos/a.jpg"]))  # fmt: skip
    assert item.inputs == (str(tmp_path / "photos/a.jpg"),)
    doc = {"defaults": {"image": "photos/a.jpg"}, "items_from": [{"csv": "t.csv"}]}  # the defaults' picture
    (item,) = items(job(tmp_path, doc, {"t.csv": "id,instruction,ref\nP1,A poster,old.png\n"}))
    assert item.inputs == (str(tmp_path / "photos/a.jpg"),)
    doc = {"items_from": [{"csv": "t.csv", "instruction": "A poster like {ref}"}]}  # read: data
    (item,) = items(job(tmp_path, doc, {"t.csv": "id,ref\nP1,old.png\n"}))
    assert item.inputs == () and item.steps == ("A poster like old.png",)
