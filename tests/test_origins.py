"""A problem with a value is told where the value was written (the item, the manifest's defaults: or top level,
the config file, the environment, an option, or the built-in default), and once, not once for every item."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nanobatch.cli.main import main

from .fakes import write_job

GOOGLE = "https://generativelanguage.googleapis.com"
VERTEX = "api:\n  backend: vertex\n"  # Vertex AI in express mode: the test's key, no project
ON_VERTEX = (
    "the batch tier goes through the Gemini API's Batch API, which Vertex AI (api.backend: vertex) does not offer; "
    "use the flex tier on Vertex for half price online"
)
SERVED = "choose one of gemini-3.1-flash-image, gemini-3-pro-image"
THREE = [{"id": "a", "image": "images/a.png"}, {"id": "b", "image": "images/a.png"}, {"id": "c", "instruction": "x"}]

Validate = Callable[..., tuple[int, list[str]]]


@pytest.fixture
def validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Validate:
    """`nanobatch validate` of a job (its items, and top-level fields) with the config file c.yaml holding the
    given text: the exit code, and the lines of stderr but warnings, the test's folder cut from the paths."""

    def run(config: str, items: list[dict[str, Any]], *argv: str, **top: Any) -> tuple[int, list[str]]:
        (tmp_path / "c.yaml").write_text(config)
        job = write_job(tmp_path, items, **top)
        code = main(["validate", str(job), "--config", str(tmp_path / "c.yaml"), *argv])
        lines = capsys.readouterr().err.replace(f"{tmp_path}/", "").splitlines()
        return code, [line for line in lines if ": WARNING: " not in line]

    return run


@pytest.mark.parametrize(
    ("config", "argv", "where"),
    [
        pytest.param(VERTEX, [], "api.model (not set: the built-in default)", id="built-in-default"),
        pytest.param(VERTEX + "  model: gemini-nano-banana-2.1\n", [], "c.yaml: api.model", id="config-file"),
        pytest.param(VERTEX, ["--model", "gemini-nano-banana-2.1"], "--model", id="option"),
    ],
)
def test_a_model_the_backend_does_not_serve_is_named_in_the_settings_once(
    validate: Validate, config: str, argv: list[str], where: str
) -> None:
    assert validate(config, THREE, *argv) == (2, [
        f"error: {where}: api.backend is vertex, which does not serve gemini-nano-banana-2.1; {SERVED}"
    ])  # fmt: skip


def test_a_model_shut_down_is_named_at_the_manifest_s_top_level_once(validate: Validate) -> None:
    code, err = validate(f"api:\n  base_url: {GOOGLE}\n", THREE, model="gemini-3.1-flash-image-preview")
    assert (code, err) == (2, [
        "error: job.yaml, field 'model': gemini-3.1-flash-image-preview was shut down at Google on 2026-06-25; "
        "use gemini-nano-banana-2.1"
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("config", "argv", "top", "where"),
    [
        pytest.param("qa:\n  min_side: 9999\n", [], {}, "c.yaml: qa.min_side", id="config-file"),
        pytest.param("{}\n", [], {"qa": {"min_side": 9999}}, "job.yaml, field 'qa.min_side'", id="manifest"),
        pytest.param("{}\n", [], {"defaults": {"instruction": "edit", "qa": {"min_side": 9999}}},
                     "job.yaml, field 'defaults.qa.min_side'", id="defaults"),
    ],
)  # fmt: skip
def test_a_check_no_image_can_pass_is_named_where_it_was_written_once(
    validate: Validate, config: str, argv: list[str], top: dict[str, Any], where: str
) -> None:
    code, err = validate(config, THREE, *argv, **top)
    assert (code, err) == (2, [
        f"error: {where}: 9999 px: gemini-nano-banana-2.1's 1K images are at most 2896 px on their longest side, "
        "so every image would be rejected (each retry paid); ask for image_size 4K, or lower qa.min_side"
    ])  # fmt: skip


def test_an_item_that_makes_an_inherited_check_pass_or_fail_is_judged_alone(validate: Validate) -> None:
    # 2000 px is reached at 1K (8:1): the items that keep the default size pass; the one asking for 512 does not
    items = [{"id": "small", "image": "images/a.png", "image_size": "512"}, *THREE]
    code, err = validate("qa:\n  min_side: 2000\n", items, "--model", "gemini-3.1-flash-image")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: job.yaml: item 'small', field 'qa.min_side': 2000 px: ")
    assert "gemini-3.1-flash-image's 512 images are at most" in err[0]


@pytest.mark.parametrize(
    ("items", "argv", "top", "where"),
    [
        pytest.param([{"id": "a", "instruction": "x"}, {"id": "b", "instruction": "x", "tier": "batch"}], [], {},
                     "job.yaml: item 'b', field 'tier'", id="item"),
        pytest.param(THREE, [], {"defaults": {"instruction": "edit", "tier": "batch"}},
                     "job.yaml, field 'defaults.tier'", id="defaults"),
        pytest.param(THREE, ["--tier", "batch"], {}, "--tier", id="option"),
    ],
)  # fmt: skip
def test_the_batch_tier_on_vertex_is_refused_by_validate_where_it_was_written(
    validate: Validate, items: list[dict[str, Any]], argv: list[str], top: dict[str, Any], where: str
) -> None:
    code, err = validate(VERTEX + "  model: gemini-3-pro-image\n", items, *argv, **top)
    assert (code, err) == (2, [f"error: {where}: {ON_VERTEX}"])


def test_the_batch_tier_in_the_config_file_is_named_there(validate: Validate) -> None:
    code, err = validate(VERTEX + "  model: gemini-3-pro-image\n  tier: batch\n", THREE)
    assert (code, err) == (2, [f"error: c.yaml: api.tier: {ON_VERTEX}"])


def test_a_default_every_item_inherits_is_named_once_and_an_item_s_own_value_with_the_item(
    validate: Validate,
) -> None:
    items = [*THREE, {"id": "d", "instruction": "x", "aspect_ratio": "9:9"}]
    code, err = validate("{}\n", items, defaults={"instruction": "edit", "aspect_ratio": "7:7"})
    choose = "choose one of 1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9, 1:4, 4:1, 1:8, 8:1"
    assert (code, err) == (2, [
        f"error: job.yaml, field 'defaults.aspect_ratio': gemini-nano-banana-2.1 does not support '7:7'; {choose}",
        f"job.yaml: item 'd', field 'aspect_ratio': gemini-nano-banana-2.1 does not support '9:9'; {choose}",
    ])  # fmt: skip
