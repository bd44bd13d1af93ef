"""Manifest validation: every problem with its file, item and field; streaming; the example jobs."""

from __future__ import annotations

import builtins
import io
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

import nanobatch
from nanobatch import safe_yaml
from nanobatch.errors import ManifestError
from nanobatch.job import sources, yaml_stream
from nanobatch.job.manifest import load_manifest

from .fakes import image_bytes, load
from .fakes import manifest_problems as problems

MODEL = "gemini-3.1-flash-image-preview"
JOBS = Path(__file__).resolve().parents[1] / "jobs"


def write(folder: Path, text: str, images: tuple[str, ...] = ("a.png", "b.png", "c.png", "d.png")) -> Path:
    for name in images:
        (folder / name).write_bytes(image_bytes())
    path = folder / "job.yaml"
    path.write_text(text)
    return path


LONG = "x" * 234  # with "a" and ".png": 239 bytes, the longest file name allowed
ITEM = "defaults:\n  instruction: make it white\nitems:\n  - id: a\n    image: a.png\n"


@pytest.mark.parametrize(
    ("text", "item", "field", "message"),
    [
        pytest.param(
            ITEM + "    instrucion: x\n",
            "a",
            "instrucion",
            'unknown field (did you mean "instruction"?)',
            id="unknown-item-key",
        ),
        pytest.param("item:\n  - id: a\n", None, "item", 'did you mean "items"', id="unknown-top-key"),
        pytest.param(
            "defaults:\n  aspect_raito: '1:1'\nitems: [{id: a, instruction: x}]\n",
            None,
            "defaults.aspect_raito",
            'did you mean "aspect_ratio"',
            id="unknown-defaults-key",
        ),
        pytest.param(ITEM.replace("a.png", "missing.png"), "a", "image", "image file not found", id="missing-image"),
        pytest.param(
            ITEM.replace("image: a.png", "image: 'a.png '"),
            "a",
            "image",
            "a.png ' (its name begins or ends with white space)",
            id="image-name-ending-in-a-space",
        ),
        pytest.param(
            ITEM + "    model: models/gemini-3-pro-image\n", "a", "model", "without 'models/'", id="models-prefix"
        ),
        pytest.param(ITEM + "  - id: a\n    image: b.png\n", "a", "id", "duplicate id 'a'", id="duplicate-id"),
        pytest.param(ITEM.replace("id: a", "id: a/b"), "a/b", "id", "not a valid id", id="slash-in-id"),
        pytest.param(ITEM.replace("id: a", "id: -a"), "-a", "id", "not starting with", id="id-starts-with-dash"),
        pytest.param(
            ITEM.replace("id: a", "id: café-1"), "café-1", "id", "use ASCII letters (a-z, A-Z)", id="non-ascii-id"
        ),
        pytest.param(
            "defaults:\n  instruction: x\nitems:\n  - image: a.png\n", "#1", "id", "every item needs an id", id="no-id"
        ),
        pytest.param("items:\n  - not a mapping\n", "#1", None, "must be a mapping", id="item-not-a-mapping"),
        pytest.param(
            ITEM + "    aspect_ratio: '7:3'\n", "a", "aspect_ratio", "does not support '7:3'", id="unsupported-ratio"
        ),
        pytest.param(
            ITEM + "    aspect_ratio: '1:8'\n    model: gemini-3-pro-image-preview\n",
            "a",
            "aspect_ratio",
            "gemini-3-pro-image does not support '1:8'",
            id="ratio-of-another-model",
        ),
        pytest.param(ITEM + "    image_size: 8K\n", "a", "image_size", "does not support '8K'", id="unsupported-size"),
        pytest.param(ITEM + '    model: "gemini\\x01"\n', "a", "model", "is not a model id", id="control-in-model"),
        pytest.param('model: "gemini\\0"\n' + ITEM, None, "model", "is not a model id", id="nul-in-manifest-model"),
        pytest.param(ITEM + '    model: "gemini\\0"\n', "a", "model", "is not a model id", id="nul-in-model-said-once"),
        pytest.param(ITEM + '    model: "gemini 3?"\n', "a", "model", "holds ' '", id="space-in-model"),
        pytest.param(ITEM + '    model: ""\n', "a", "model", "cannot be empty", id="empty-model"),
        pytest.param(
            ITEM + "    image_size: 2K\n    model: gemini-2.5-flash-image\n",
            "a",
            "image_size",
            "takes no image_size",
            id="size-on-2.5-flash",
        ),
        pytest.param(
            ITEM + "    image_size: 512\n    model: gemini-3-pro-image\n",
            "a",
            "image_size",
            "does not support '512'",
            id="512-on-3-pro",
        ),
        pytest.param(
            ITEM.replace("image: a.png", "images: [a.png, b.png, c.png, d.png]")
            + "    model: gemini-2.5-flash-image\n",
            "a",
            "images",
            "4 images, but gemini-2.5-flash-image takes at most 3",
            id="too-many-images-2.5",
        ),
        pytest.param(
            ITEM.replace("image: a.png", "images: [" + ", ".join(["a.png"] * 15) + "]")
            + "    model: gemini-3-pro-image-preview\n",
            "a",
            "images",
            "15 images, but gemini-3-pro-image takes at most 14",
            id="too-many-images-3-pro",
        ),
        pytest.param(
            ITEM.replace("image: a.png", "images: [" + ", ".join(["a.png"] * 15) + "]"),
            "a",
            "images",
            "takes at most 14",
            id="too-many-images-3.1-flash",
        ),
        pytest.param(
            ITEM + "    thinking_level: high\n    model: gemini-2.5-flash-image\n",
            "a",
            "thinking_level",
            "gemini-2.5-flash-image has no thinking level",
            id="thinking-on-2.5",
        ),
        pytest.param(
            ITEM + "    thinking_level: minimal\n    model: gemini-3-pro-image\n",
            "a",
            "thinking_level",
            "'minimal' is not a thinking level of gemini-3-pro-image; choose one of low, high",
            id="a-level-another-model-takes",  # the API's 400, item after item
        ),
        pytest.param(
            ITEM + "    thinking_level: extreme\n",
            "a",
            "thinking_level",
            "is not a thinking level of",
            id="unknown-thinking-level",
        ),
        pytest.param(ITEM + "    images: [b.png]\n", "a", "images", "either image or images", id="image-and-images"),
        pytest.param(
            ITEM + "    instruction: z\n    steps: [x, y]\n",
            "a",
            "steps",
            "either instruction or steps",
            id="instruction-and-steps",
        ),
        pytest.param("items:\n  - id: a\n", "a", "instruction", "no instruction", id="no-instruction"),
        pytest.param(
            ITEM + "    response_modalities: [TEXT]\n", "a", "response_modalities", "[TEXT, IMAGE]", id="text-only"
        ),
        pytest.param(ITEM.replace("image: a.png", "image: ''"), "a", "image", "empty", id="empty-image"),
        pytest.param(ITEM + "    image: b.png\n", "a", None, "the key 'image' is given twice", id="duplicate-key"),
        pytest.param(
            ITEM.replace("a.png", "ftp://example.com/a.png"),
            "a",
            "image",
            "only http(s):// URLs, bucket URLs",
            id="ftp-url",
        ),
        pytest.param(ITEM + "    output: final.png\n", "a", "output", "must contain {id}", id="output-without-id"),
        pytest.param(
            ITEM + "    output: /tmp/{id}.png\n", "a", "output", "relative to the output folder", id="absolute-output"
        ),
        pytest.param(ITEM + "    output: ../{id}.png\n", "a", "output", "no '..'", id="output-with-dotdot"),
        pytest.param(ITEM + "    output: '{id}/'\n", "a", "output", "end with a file name", id="output-a-folder"),
        pytest.param(ITEM + "    output: '{id}/.'\n", "a", "output", "end with a file name", id="output-a-dot"),
        pytest.param(
            ITEM + "    output: '{category}/{id}.png'\n",
            "a",
            "output",
            "unknown placeholder {category}",
            id="output-column-outside-a-source",
        ),
        pytest.param(ITEM + "    output: '{id'\n", "a", "output", "bad template", id="output-bad-template"),
        pytest.param(
            "defaults:\n  id: x\nitems: [{instruction: y}]\n",
            None,
            "defaults.id",
            "cannot set an id",
            id="id-in-defaults",
        ),
        pytest.param(
            "defaults:\n  output: out.png\nitems: [{id: a, instruction: y}]\n",
            None,
            "defaults.output",
            "must contain {id}",
            id="defaults-output-without-id",
        ),
        pytest.param("name: x\nitems: []\n", None, "items", "no items", id="no-items"),
        pytest.param("name: ../../etc\n" + ITEM, None, "name", "plain folder name", id="name-climbs-out"),
        pytest.param("name: /tmp/x\n" + ITEM, None, "name", "plain folder name", id="name-absolute"),
        pytest.param(f"name: {'n' * 300}\n" + ITEM, None, "name", "longer than a folder name", id="name-too-long"),
        pytest.param(ITEM + "    keep_steps: maybe\n", "a", "keep_steps", "valid boolean", id="bad-boolean"),
        pytest.param(
            ITEM.replace("id: a", "id: " + "a" * 240), "a" * 240, "id", "240 bytes long: at most 239", id="id-too-long"
        ),
        pytest.param(
            ITEM + "    output: '{id}-" + "é" * 120 + ".png'\n",
            "a",
            "output",
            "246 bytes long: at most 239",
            id="output-name-too-long-in-bytes",
        ),
        pytest.param(
            ITEM + "    output: '" + "f" * 256 + "/{id}.png'\n", "a", "output", "folder name", id="folder-too-long"
        ),
    ],
)
def test_validation_problems(tmp_path: Path, text: str, item: str | None, field: str | None, message: str) -> None:
    path = write(tmp_path, text)
    found = problems(path)
    assert len(found) == 1, found
    problem = found[0]
    assert (problem.file, problem.item, problem.field) == (str(path), item, field)
    assert message in problem.message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param("    thinking_level: HIGH\n", {"thinking_level": "high"}, id="thinking-level-any-case"),
        pytest.param(
            "    thinking_level: low\n    model: gemini-3-pro-image\n",
            {"thinking_level": "low"},
            id="low-on-3-pro",
        ),
        pytest.param(
            "    aspect_ratio: '1:8'\n    image_size: 512\n",
            {"aspect_ratio": "1:8", "image_size": "512"},
            id="3.1-flash-ratios-and-512",
        ),
        pytest.param("    resize_inputs: true\n", {"resize_inputs": True}, id="resize-inputs"),
        # YAML 1.1 would read this as the number 969 (base 60): it stays as written.
        pytest.param("    aspect_ratio: 16:9\n", {"aspect_ratio": "16:9"}, id="unquoted-16:9"),
        pytest.param("    output: 'white/{id}.png'\n", {"output": "white/a.png"}, id="output-template"),
        pytest.param("    output: '{{raw}}-{id}.png'\n", {"output": "{raw}-a.png"}, id="output-literal-braces"),
        pytest.param(f"    output: '{{id}}{LONG}.png'\n", {"output": f"a{LONG}.png"}, id="output-239-bytes"),
    ],
)
def test_accepted_settings(tmp_path: Path, extra: str, expected: dict[str, Any]) -> None:
    (item,) = load(write(tmp_path, ITEM + extra), MODEL).items()
    assert {name: getattr(item, name) for name in expected} == expected


def test_fourteen_references_are_fine_for_gemini_3(tmp_path: Path) -> None:
    text = ITEM.replace("image: a.png", "images: [" + ", ".join(["a.png"] * 14) + "]")
    (item,) = load(write(tmp_path, text), MODEL).items()
    assert len(item.inputs) == 14


def test_every_problem_is_listed_not_just_the_first(tmp_path: Path) -> None:
    text = (
        "defaults:\n  instruction: x\nitems:\n"
        "  - {id: a, image: nope.png}\n"
        "  - {id: b, aspect_ratio: '7:3'}\n"
        "  - {id: c, image_size: 3K}\n"
        "  - {id: a}\n"
    )
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(write(tmp_path, text))
    assert [(p.item, p.field) for p in err.value.problems] == [
        ("a", "image"),
        ("b", "aspect_ratio"),
        ("c", "image_size"),
        ("a", "id"),
    ]
    assert "item 'b', field 'aspect_ratio'" in str(err.value)


def test_a_flood_of_problems_is_cut_short_with_a_count(tmp_path: Path) -> None:
    rows = "sku\n" + "".join(f"S{n}\n" for n in range(1500))
    (tmp_path / "c.csv").write_text(rows)
    path = write(
        tmp_path,
        "items_from:\n  - csv: c.csv\n    id: '{sku}'\n    image: '{sku}.png'\n    instruction: x\n",
        images=(),
    )
    found = problems(path)
    assert len(found) == 1001 and "and 500 more problems" in found[-1].message


def test_unknown_models_are_sent_as_is_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, ITEM + "    model: gemini-9-image\n    aspect_ratio: '7:3'\n")
    report = load(path, MODEL).check()
    assert report.problems == [] and "unknown model 'gemini-9-image'" in caplog.text


# --- output names stay in the output folder ---------------------------------------------------------------


def test_an_output_folder_that_is_a_symlink_out_is_refused(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "white").symlink_to(elsewhere)
    (out / "inside").symlink_to(out / "sub", target_is_directory=True)  # a link that stays inside is fine
    text = ITEM + "    output: 'white/{id}.png'\n  - {id: b, image: b.png, output: 'inside/{id}.png'}\n"
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(path, out_dir=out)
    (problem,) = err.value.problems
    assert (problem.item, problem.field) == ("a", "output") and "symbolic link" in problem.message
    assert nanobatch.check_job(path, out_dir=tmp_path / "other").items == 2


# --- streaming ---------------------------------------------------------------------------------------------


class Watched:
    """A text file that counts the characters read through it."""

    def __init__(self, stream: IO[str], log: dict[str, int]) -> None:
        self.stream, self.log = stream, log

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = next(self.stream)
        self.log["read"] += len(line)
        return line

    def read(self, size: int = -1) -> str:
        text = self.stream.read(size)
        self.log["read"] += len(text)
        return text

    def __enter__(self) -> Watched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()
        self.log["closed"] += 1


def big_catalog(folder: Path, rows: int) -> Path:
    (folder / "photo.jpg").write_bytes(image_bytes(fmt="JPEG"))
    with (folder / "big.csv").open("w") as f:
        f.write("sku,background\n")
        f.writelines(f"SKU-{n:07d},colour {n}\n" for n in range(rows))
    return write(
        folder,
        "items_from:\n  - csv: big.csv\n    id: '{sku}'\n    image: photo.jpg\n"
        "    instruction: Replace the background with {background}\n",
        images=(),
    )


def test_a_large_csv_is_read_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = big_catalog(tmp_path, 100_000)
    log = {"read": 0, "closed": 0}
    real_open = sources.open_text
    monkeypatch.setattr(sources, "open_text", lambda p: Watched(real_open(p), log))
    manifest = load(path, MODEL)
    stream = manifest.items()
    first = list(itertools.islice(stream, 3))
    assert [i.id for i in first] == ["SKU-0000000", "SKU-0000001", "SKU-0000002"]
    assert first[2].steps == ("Replace the background with colour 2",)
    size = (tmp_path / "big.csv").stat().st_size
    assert 0 < log["read"] < size / 100  # three rows, not the file
    stream.close()
    assert log["closed"] == 1


def test_validating_a_large_csv_reads_a_shared_picture_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = big_catalog(tmp_path, 10_000)
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return real_open(file, *args, **kwargs)

    def os_spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr(os, "open", os_spy)
    result = nanobatch.check_job(path, out_dir=tmp_path / "out")
    assert (result.items, result.requests) == (10_000, 10_000)
    assert str(tmp_path / "big.csv") in opened and [n for n in opened if n.endswith("photo.jpg")] == [
        str(tmp_path / "photo.jpg")
    ]  # its headers and end, checked once for all 10,000 items


# --- the example jobs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "items", "requests"),
    [
        pytest.param("catalog.yaml", 5, 5, id="catalog"),
        pytest.param("multistep.yaml", 2, 4, id="multistep"),
        pytest.param("example.yaml", None, None, id="example"),
    ],
)
def test_the_example_jobs_are_valid(tmp_path: Path, name: str, items: int | None, requests: int | None) -> None:
    path = JOBS / name
    if not path.exists():
        pytest.skip(f"{path} is not there")
    result = nanobatch.check_job(path, out_dir=tmp_path / "out")
    assert result.items > 0 and result.cost_worst_usd >= result.cost_likely_usd > 0
    if items is not None:
        assert (result.items, result.requests) == (items, requests)


def test_the_catalog_example_fills_its_templates_from_the_csv() -> None:
    manifest = load(JOBS / "catalog.yaml", MODEL)
    by_id = {item.id: item for item in manifest.items()}
    assert by_id["MUG-1001"].output == "kitchen/MUG-1001.png" and by_id["MUG-1001"].resize_inputs
    assert by_id["SNK-2040"].steps == ("Replace the background with light grey studio; keep the product unchanged",)
    assert all(Path(p).is_file() for item in by_id.values() for p in item.inputs)
    multistep = {item.id: item for item in load(JOBS / "multistep.yaml", MODEL).items()}
    assert len(multistep["sneaker-campaign"].steps) == 3 and multistep["sneaker-campaign"].keep_steps
    assert len(multistep["model-with-logo"].inputs) == 3


IDS = ("00123", "0123", "1_000", "12.50", "1001", "7", "yes", "off", "2024-01-15", "0x1F", "1e3", "0o17", "1.0")


@pytest.mark.usefixtures("yaml_parser")
def test_numbers_yaml_would_change_stay_as_written(tmp_path: Path) -> None:
    # YAML 1.1 reads 00123 as 83 (octal), 1_000 as 1000 and 12.50 as 12.5: catalog ids must not change.
    text = "defaults:\n  instruction: x\nitems:\n" + "".join(f"  - id: {raw}\n" for raw in IDS)
    manifest = load_manifest(write(tmp_path, text), default_model="gemini-3.1-flash-image-preview")
    assert [item.id for item in manifest.items()] == list(IDS)


@pytest.mark.usefixtures("yaml_parser")
def test_settings_read_numbers_as_yaml_does(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "limits:\n  concurrency: 0x10\n  requests_per_minute: 1_200\n  adaptive: off\n  grace_s: 1:30\n"
        "retry:\n  backoff_initial_s: 0.50\n  backoff_max_s: 1.2e+2\n"
    )
    settings = nanobatch.load_settings(config, env={})
    assert settings.limits.adaptive is False and settings.limits.grace_s == 90  # YAML 1.1's base 60
    assert settings.retry.backoff_max_s == 120
    assert (settings.limits.concurrency, settings.limits.requests_per_minute) == (16, 1200)
    assert settings.retry.backoff_initial_s == 0.5


# Anchors a0..a7, each ten aliases of the one before: *a7 stands for 10^8 values (a "billion laughs").
LAUGHS = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]\n" for n in range(1, 8)
)


@pytest.mark.usefixtures("yaml_parser")
@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("items: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply", id="deep"),
        pytest.param(
            LAUGHS + "items: []\n",
            "expand it by more than 5,000,000 values",
            id="billion-laughs",
        ),
        pytest.param(
            LAUGHS + "items:\n  - {id: a, instruction: x, note: *a7}\n",
            "expand it by more than 5,000,000 values",
            id="billion-laughs-in-an-item",
        ),
        pytest.param("items: []\nname: x\nname: y\n", "the key 'name' is given twice", id="duplicate-top-level-key"),
        pytest.param(
            "items:\n  - id: a\n    instruction: x\n    instruction: y\n",
            "the key 'instruction' is given twice",
            id="duplicate-key-in-an-item",
        ),
        # A tag on the wrong kind of node, or on a value its constructor cannot read, at the top and in an item
        pytest.param("items: []\nname: !!set [a]\n", "expected a mapping node", id="set-of-a-list"),
        pytest.param("items: []\nname: !!set x\n", "expected a mapping node", id="set-of-a-text"),
        pytest.param("items:\n  - {id: a, note: !!map [a]}\n", "expected a mapping node", id="map-of-a-list-in-item"),
        pytest.param("items: []\nname: !!int ''\n", "'' cannot be read as int", id="int-of-nothing"),
        pytest.param("items:\n  - {id: a, n: !!float ''}\n", "'' cannot be read as float", id="float-in-item"),
    ],
)
def test_hostile_yaml_is_a_clear_error_not_a_crash(tmp_path: Path, text: str, message: str) -> None:
    (problem,) = problems(write(tmp_path, text))
    assert problem.file == str(tmp_path / "job.yaml") and message in problem.message


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null here")
def test_a_manifest_that_is_not_a_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # It is read more than once, and to its end: /dev/urandom was read for ever (for its first byte not UTF-8).
    (problem,) = problems(Path("/dev/null"))
    assert problem.file == "/dev/null" and "the manifest must be a file" in problem.message
    fifo = tmp_path / "job.yaml"  # what `validate <(make-job)` names: a pipe, read once, then found empty
    os.mkfifo(fifo)
    (problem,) = problems(fifo)  # refused without opening it (an open would wait for a writer)
    assert problem.file == str(fifo) and "the manifest must be a file" in problem.message


def test_a_manifest_that_is_not_utf8_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: caf\xe9\nitems: [{id: a, instruction: x}]\n")
    (problem,) = problems(path)
    assert "not UTF-8 text: byte 0xe9 at offset 9" in problem.message


@pytest.mark.parametrize(
    ("items", "item", "field", "message"),
    [
        pytest.param(
            "  - {id: shirt, steps: [one, two], keep_steps: true}\n  - {id: shirt.step1, instruction: x}\n",
            "shirt.step1",
            "id",
            "its image would be shirt.step1.<type>, as is its step 1 of item 'shirt'",
            id="kept-step-vs-item",
        ),
        pytest.param(
            "  - {id: a, instruction: x, output: 'same/{id}.png'}\n"
            "  - {id: same, instruction: x, output: '{id}/a.png'}\n",
            "same",
            "output",
            "as is its image of item 'a'",
            id="two-templates-meet",
        ),
        pytest.param(
            "  - {id: a, instruction: x, output: '{id}/./x.png'}\n  - {id: x, instruction: x, output: 'a//{id}.png'}\n",
            "x",
            "output",
            "its image would be a/x.<type>, as is its image of item 'a'",
            id="dot-and-double-slash-are-one-name",  # each paid, the second refused as output_exists every night
        ),
        pytest.param(
            "  - {id: b, instruction: x}\n  - {id: c, instruction: x, output: 'b.png/{id}'}\n",
            "c",
            "output",
            "its folder 'b.png' may be the name of item 'b''s image",
            id="folder-named-like-an-image",
        ),
        pytest.param(
            "  - {id: c, instruction: x, output: 'b.png/{id}'}\n  - {id: b, instruction: x}\n",
            "b",
            "id",
            "a file where item 'c' needs a folder",
            id="image-named-like-a-folder",
        ),
    ],
)
def test_items_that_would_overwrite_each_others_images_are_refused(
    tmp_path: Path, items: str, item: str, field: str, message: str
) -> None:
    (problem,) = problems(write(tmp_path, "items:\n" + items))
    assert (problem.item, problem.field) == (item, field) and message in problem.message


def test_distinct_names_and_multi_image_stems_pass(tmp_path: Path) -> None:
    text = "items:\n" + "".join(
        f"  - {{id: {i}, instruction: x}}\n" for i in ("sku", "sku-1", "sku.step", "SKU", "sku.png")
    )
    assert problems(write(tmp_path, text)) == []


@pytest.mark.usefixtures("yaml_parser")
def test_a_big_document_without_aliases_is_not_taken_for_an_alias_bomb(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(safe_yaml, "MAX_VALUES", 1000)  # scaled down: 500 items of 5 values each, no alias
    text = "items:\n" + "".join(f"  - {{id: i{n}, instruction: x}}\n" for n in range(500))
    assert len(safe_yaml.load_yaml(text)["items"]) == 500
    with pytest.raises(yaml.YAMLError, match="aliases"):
        safe_yaml.load_yaml("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                        "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n")  # fmt: skip


STREAMED_ITEMS = [
    pytest.param(
        ["- {id: 00123, n: 1_000, t: 12:30, f: 1.50, x: 0x1A, on: yes, d: 2024-01-15, b: true, g: 2.5}\n"],
        id="numbers-and-words-as-written",
    ),
    pytest.param(
        [
            "- {id: '7', e: '', nothing: ~, list: [a, 1, null, [b]], map: {k: {deep: [1]}}}\n",
            "- id: '8'\n  empty:\n  image: \"b.png\"\n",
        ],
        id="quoted-empty-nested",
    ),
    pytest.param(
        ["- id: a\n  steps:\n    - |\n      two\n      lines\n    - >-\n      folded\n      text\n"], id="blocks"
    ),
    pytest.param(["- just text\n", "- 12\n", "-\n", "- [a, b]\n"], id="items-that-are-not-mappings"),
    pytest.param(
        ["- &first {id: a, instruction: x}\n", "- *first\n", "- {<<: *first, id: b}\n"], id="anchor-alias-merge"
    ),
    pytest.param(["- {id: a, tags: &t [x, y]}\n", "- {id: b, tags: *t}\n"], id="alias-of-an-earlier-items-part"),
    pytest.param(["- {id: !!str 0012, n: !!int '5', s: ! 12}\n"], id="tags"),
    pytest.param(["- {id: a, n: 1, id: b}\n", "- {id: c}\n"], id="key-twice"),
    pytest.param(["- {id: d, [a, b]: c}\n", "- {id: e}\n"], id="key-that-is-a-list"),
    pytest.param(["- {id: d, 1: a, '1': b}\n", "- {id: e, 2: x, null: y, true: z}\n"], id="keys-that-are-not-text"),
    pytest.param(["- {id: f, x: !!python/object/apply:os.system [echo hi]}\n", "- {id: g}\n"], id="python-tag"),
    pytest.param(["- {id: h, b: !!int x}\n", "- {id: i}\n"], id="value-the-constructor-refuses"),
    pytest.param(["- {id: j, note: !custom x}\n", "- {id: k}\n"], id="unknown-tag"),
    pytest.param(
        ["- {id: l, note: !!set x, n: !!int ''}\n", "- &m {id: m}\n", "- {id: n, s: !!seq x}\n"],
        id="tags-on-values-they-do-not-fit",
    ),  # m, read by the constructor too, has none of l's mistakes
]


@pytest.mark.usefixtures("yaml_parser")
@pytest.mark.parametrize("items", STREAMED_ITEMS)
def test_each_streamed_item_is_what_loading_it_whole_gives(tmp_path: Path, items: list[str]) -> None:
    """Items are built straight from their events where they can be, else by PyYAML's constructor: either
    way each one is the value, or the error, that loading the document whole gives (the items before it that
    load, then it)."""
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nitems:\n" + "".join(items) + "model: m\n")
    streamed = list(yaml_stream.stream_items(str(path)))
    assert len(streamed) == len(items)
    good: list[str] = []
    for text, found in zip(items, streamed, strict=True):
        try:
            expected = safe_yaml.load_yaml("items:\n" + "".join([*good, text]))["items"][-1]
        except yaml.YAMLError as exc:
            assert found.error is not None and str(getattr(exc, "problem", exc)) in str(found.error)
            continue
        good.append(text)
        assert found.error is None and found.value == expected and type(found.value) is type(expected)


def test_manifests_are_parsed_by_libyaml_where_pyyaml_has_it() -> None:

    assert safe_yaml.LOADERS is (safe_yaml.C_LOADERS if yaml.__with_libyaml__ else safe_yaml.PURE_LOADERS)
    if yaml.__with_libyaml__:
        assert all(issubclass(loader, yaml.CSafeLoader) for loader in safe_yaml.LOADERS)


@pytest.mark.usefixtures("yaml_parser")
def test_merged_keys_may_be_overridden_but_python_tags_are_refused() -> None:

    data = safe_yaml.load_yaml("base: &b {instruction: x, id: 007}\nitem:\n  <<: *b\n  instruction: y\n")
    assert data["item"] == {"instruction": "y", "id": "007"}
    with pytest.raises(yaml.YAMLError):
        safe_yaml.load_yaml("a: !!python/object/apply:os.system [echo hi]\n")


def test_the_longest_name_the_check_allows_fits_every_file_the_engine_names(tmp_path: Path) -> None:
    from nanobatch.api.gemini import OUTPUT_EXTENSIONS
    from nanobatch.names import output_names

    steps = "".join(f"    - step {n}\n" for n in range(1, 13))
    item = f"  - id: a\n    image: a.png\n    keep_steps: true\n    output: '{{id}}{LONG}.png'\n"
    text = f"items:\n{item}    steps:\n{steps}"
    (one,) = load(write(tmp_path, text), MODEL).items()
    longest = max(OUTPUT_EXTENSIONS, key=len)
    names = [*output_names(one, [longest] * 9), *output_names(one, [longest] * 3, step=11)]
    assert max(len(name.encode()) for name in names) <= 255


def test_a_picture_that_cannot_be_looked_at_says_why_not_only_not_found(tmp_path: Path) -> None:
    # A name longer than the file system takes is "File name too long", not a file that is missing.
    path = write(tmp_path, ITEM.replace("a.png", "x" * 300 + ".png"))
    (problem,) = problems(path)
    assert problem.field == "image" and "cannot read the image" in problem.message
    assert "name too long" in problem.message.lower()


CASE_ONLY = "defaults:\n  instruction: x\nitems:\n  - {id: SKU-1, image: a.png}\n  - {id: sku-1, image: b.png}\n"


def test_ids_that_differ_only_in_case_are_two_items_where_the_folder_tells_case(tmp_path: Path) -> None:
    report = nanobatch.check_job(write(tmp_path, CASE_ONLY), out_dir=tmp_path / "out")
    assert report.items == 2  # (a problem would have raised ManifestError)


def test_ids_that_differ_only_in_case_are_refused_where_the_folder_does_not_tell_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On macOS and Windows SKU-1.png is sku-1.png: the second answer, paid, could not be written.
    import nanobatch.job.check

    asked: list[str] = []
    monkeypatch.setattr(nanobatch.job.check, "folds_case", lambda folder: asked.append(str(folder)) or True)
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(write(tmp_path, CASE_ONLY), out_dir=tmp_path / "out")
    (problem,) = err.value.problems
    assert (problem.item, problem.field) == ("sku-1", "id") and asked == [str(tmp_path / "out")]
    assert "as is its image of item 'SKU-1'" in problem.message and "upper from lower case" in problem.message


def _folding_lstat(real: Any) -> Any:
    """os.lstat as a file system that does not tell case answers, over a folder whose names are lower case."""
    return lambda path: real(os.path.join(os.path.dirname(path), os.path.basename(path).lower()))


def test_a_folder_that_does_not_tell_case_is_told_by_a_name_already_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanobatch import names

    (tmp_path / "photo.png").write_bytes(b"x")
    assert not names.folds_case(tmp_path)  # this file system tells case: PHOTO.PNG is no file
    (tmp_path / "PHOTO.png").write_bytes(b"y")
    assert not names.folds_case(tmp_path)  # nor when both are there: two files
    (tmp_path / "PHOTO.png").unlink()
    monkeypatch.setattr(names.os, "lstat", _folding_lstat(os.lstat))
    assert names.folds_case(tmp_path / "out" / "night-1")  # not made yet: the folder it would be made in


def test_an_empty_folder_is_told_by_a_file_of_nanobatchs_own_that_does_not_stay(tmp_path: Path) -> None:
    from nanobatch import names

    (tmp_path / "out").mkdir()
    assert not names.folds_case(tmp_path / "out") and list((tmp_path / "out").iterdir()) == []


def test_an_output_path_longer_than_the_file_system_takes_is_refused_though_each_name_fits(tmp_path: Path) -> None:
    # 18 folders of 250 bytes: each name fits, the path does not. Caught at the write, it was paid for, every night.
    folder = "d" * 250
    text = f"items:\n  - {{id: a, image: a.png, instruction: x, output: '{'/'.join([folder] * 18)}/{{id}}.png'}}\n"
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(write(tmp_path, text), out_dir=tmp_path / "out")
    (problem,) = err.value.problems
    assert problem.field == "output" and "bytes this file system takes in a path" in problem.message
