"""The ``qa:`` settings: config file < manifest < defaults < item, key by key; bad keys and values refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nanobatch.cli.main import main
from nanobatch.config import load_settings
from nanobatch.errors import ConfigError
from nanobatch.job.manifest import load_manifest
from nanobatch.qa import QaSettings

from .fakes import image_bytes, manifest_problems

MODEL = "gemini-3.1-flash-image"


def job(folder: Path, doc: dict[str, object]) -> Path:
    (folder / "a.png").write_bytes(image_bytes())
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"instruction": "white background"}, **doc}, sort_keys=False))
    return path


def checks_of(path: Path, config: dict[str, object] | None = None) -> dict[str, QaSettings | None]:
    settings = load_settings(None, env={}, overrides={})
    if config is not None:
        (path.parent / "nanobatch.yaml").write_text(yaml.safe_dump(config))
        settings = load_settings(path.parent / "nanobatch.yaml", env={})
    manifest = load_manifest(path, default_model=MODEL, qa=settings.qa)
    return {item.id: item.qa for item in manifest.items()}


def test_the_nearest_layer_wins_key_by_key(tmp_path: Path) -> None:
    path = job(tmp_path, {
        "qa": {"background": "white", "min_fill": 0.5, "min_side": 1000},
        "defaults": {"instruction": "white background", "qa": {"min_fill": 0.7, "retries": 3}},
        "items": [
            {"id": "plain", "image": "a.png"},
            {"id": "own", "image": "a.png", "qa": {"min_fill": 0.9, "background": "any"}},
        ],
    })  # fmt: skip
    found = checks_of(path, config={"qa": {"min_side": 800, "same_subject": True, "retries": 2}})
    assert found["plain"] == QaSettings(background="white", min_fill=0.7, min_side=1000, same_subject=True, retries=3)
    assert found["own"] == QaSettings(background="any", min_fill=0.9, min_side=1000, same_subject=True, retries=3)


def test_an_item_without_any_check_has_none(tmp_path: Path) -> None:
    path = job(tmp_path, {
        "qa": {"retries": 4},  # retries alone checks nothing
        "items": [{"id": "a", "image": "a.png"}, {"id": "b", "image": "a.png", "qa": {"aspect": True}}],
    })  # fmt: skip
    found = checks_of(path)
    assert found["a"] is None
    assert found["b"] == QaSettings(aspect=True, retries=4)


def test_items_from_csv_and_jsonl_get_the_layered_checks(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("id,image\nc1,a.png\n")
    rows = [{"id": "j1", "image": "a.png"}, {"id": "j2", "image": "a.png", "qa": {"min_side": 2048}}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = job(tmp_path, {
        "qa": {"background": "white"},
        "defaults": {"instruction": "white background", "qa": {"min_side": 1024}},
        "items_from": [{"csv": "rows.csv", "qa": {"changed": True}}, {"jsonl": "rows.jsonl"}],
    })  # fmt: skip
    found = checks_of(path)
    assert found["c1"] == QaSettings(background="white", min_side=1024, changed=True)
    assert found["j1"] == QaSettings(background="white", min_side=1024)
    assert found["j2"] == QaSettings(background="white", min_side=2048)


def test_the_checks_are_not_part_of_the_work_key(tmp_path: Path) -> None:
    """Tightening a threshold re-checks images; it does not make finished items new work."""
    loose = job(tmp_path, {"qa": {"min_fill": 0.5}, "items": [{"id": "a", "image": "a.png"}]})
    before = next(load_manifest(loose, default_model=MODEL).items())
    strict = job(tmp_path, {"qa": {"min_fill": 0.9}, "items": [{"id": "a", "image": "a.png"}]})
    after = next(load_manifest(strict, default_model=MODEL).items())
    assert before.qa != after.qa
    assert before.settings() == after.settings()


@pytest.mark.parametrize(
    ("doc", "item", "field", "message"),
    [
        pytest.param(
            {"qa": {"min_fil": 0.8}}, None, "qa.min_fil", 'unknown field (did you mean "min_fill"?)', id="top-key"
        ),
        pytest.param(
            {"defaults": {"instruction": "x", "qa": {"backgroud": "white"}}},
            None,
            "defaults.qa.backgroud",
            'did you mean "background"',
            id="defaults-key",
        ),
        pytest.param(
            {"items": [{"id": "a", "image": "a.png", "qa": {"same_subjet": True}}]},
            "a",
            "qa.same_subjet",
            'did you mean "same_subject"',
            id="item-key",
        ),
        pytest.param({"qa": {"min_fill": 1.5}}, None, "qa.min_fill", "share of the frame, from 0 to 1", id="fill-1.5"),
        pytest.param({"qa": {"min_fill": 85}}, None, "qa.min_fill", "write 0.85 for 85%", id="fill-percent"),
        pytest.param({"qa": {"background": "grey"}}, None, "qa.background", "'white' or 'any'", id="background"),
        pytest.param(
            {"items": [{"id": "a", "image": "a.png", "qa": {"retries": -1}}]},
            "a",
            "qa.retries",
            "greater than or equal to 0",
            id="negative-retries",
        ),
        pytest.param(
            {"items": [{"id": "a", "image": "a.png", "qa": {"min_side": 0}}]},
            "a",
            "qa.min_side",
            "greater than or equal to 1",
            id="min-side-0",
        ),
        # aspect checks the shape against the item's aspect_ratio; a ratio written here is a misunderstanding
        pytest.param({"qa": {"aspect": "16:9"}}, None, "qa.aspect", "true or false, not '16:9'", id="aspect-ratio"),
        pytest.param({"qa": {"changed": 1}}, None, "qa.changed", "true or false, not 1", id="changed-1"),
    ],
)
def test_bad_checks_are_problems_naming_file_item_and_field(
    tmp_path: Path, doc: dict[str, object], item: str | None, field: str, message: str
) -> None:
    doc = {"items": [{"id": "a", "image": "a.png"}], **doc}
    problems = manifest_problems(job(tmp_path, doc))
    assert [(p.item, p.field) for p in problems] == [(item, field)]
    assert message in problems[0].message and problems[0].file.endswith("job.yaml")


def test_a_bad_check_in_a_jsonl_row_names_the_row(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"id": "j1", "image": "a.png", "qa": {"min_fill": 2}}) + "\n")
    problems = manifest_problems(job(tmp_path, {"items_from": [{"jsonl": "rows.jsonl"}]}))
    assert [(p.file.rsplit("/", 1)[-1], p.item, p.field) for p in problems] == [("rows.jsonl:1", "j1", "qa.min_fill")]


def test_the_config_file_refuses_unknown_checks_with_a_hint(tmp_path: Path) -> None:
    config = tmp_path / "nanobatch.yaml"
    config.write_text("qa:\n  min_sides: 1000\n")
    with pytest.raises(ConfigError, match=r'qa\.min_sides: unknown setting \(did you mean "min_side"\?\)'):
        load_settings(config, env={})
    config.write_text("qa:\n  min_fill: -0.1\n")
    with pytest.raises(ConfigError, match=r"qa\.min_fill: min_fill is a share of the frame, from 0 to 1"):
        load_settings(config, env={})


def test_the_environment_sets_a_check(tmp_path: Path) -> None:
    env = {"NANOBATCH_QA_MIN_SIDE": "1000", "NANOBATCH_QA_BACKGROUND": "white", "NANOBATCH_QA_CHANGED": "true"}
    settings = load_settings(None, env=env)
    assert settings.qa.min_side == 1000 and settings.qa.background == "white" and settings.qa.changed is True


def test_validate_and_run_exit_2_before_sending_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = job(tmp_path, {"items": [{"id": "a", "image": "a.png", "qa": {"min_fil": 0.8}}]})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "job.yaml: item 'a', field 'qa.min_fil': unknown field (did you mean \"min_fill\"?)" in err
    assert main(["run", str(path), "--simulate", "--out", str(tmp_path / "out")]) == 2
    assert "qa.min_fil" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_a_bad_check_in_the_config_file_stops_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = job(tmp_path, {"items": [{"id": "a", "image": "a.png"}]})
    config = tmp_path / "bad.yaml"
    config.write_text("qa:\n  min_fill: 7\n")
    assert main(["validate", str(path), "--config", str(config)]) == 2
    assert "qa.min_fill" in capsys.readouterr().err


def test_a_run_and_the_cli_load_the_manifest_under_the_config_files_checks(tmp_path: Path) -> None:
    from nanobatch.cli.options import manifest_from
    from nanobatch.run.preflight import load_job

    path = job(tmp_path, {"qa": {"min_fill": 0.8}, "items": [{"id": "a", "image": "a.png"}]})
    settings = load_settings(None, env={"NANOBATCH_QA_BACKGROUND": "white"})
    expected = QaSettings(background="white", min_fill=0.8)
    manifest, _ = load_job(path, settings)
    assert next(manifest.items()).qa == expected
    assert next(manifest_from(str(path), settings, None).items()).qa == expected


def test_a_min_side_no_image_of_the_items_size_can_reach_is_refused_before_anything_is_paid(tmp_path: Path) -> None:
    # Every 1K answer would be rejected, and each of its retries paid for: a check no answer can pass.
    items = [
        {"id": "a", "image": "a.png", "image_size": "1K", "aspect_ratio": "1:1"},
        {"id": "b", "image": "a.png", "image_size": "4K"},
    ]
    problems = manifest_problems(job(tmp_path, {"model": MODEL, "qa": {"min_side": 4000}, "items": items}))
    assert [(p.item, p.field) for p in problems] == [("a", "qa.min_side")]
    assert "at most 1024 px" in problems[0].message and "ask for image_size 4K" in problems[0].message
    # Just past the edge is out of reach too: a 1:1 1K image is 1024 px exactly (1070 was let through)
    items = [{"id": "a", "image": "a.png", "image_size": "1K", "aspect_ratio": "1:1", "qa": {"min_side": 1025}}]
    (problem,) = manifest_problems(job(tmp_path, {"model": MODEL, "items": items}))
    assert problem.field == "qa.min_side" and "ask for image_size 2K" in problem.message
    items[0]["qa"] = {"min_side": 1024}
    assert manifest_problems(job(tmp_path, {"model": MODEL, "items": items})) == []


def test_the_worst_cost_counts_every_retry_the_checks_may_pay_for(tmp_path: Path) -> None:
    import nanobatch

    doc: dict[str, object] = {"model": MODEL, "items": [{"id": "a", "image": "a.png"}]}
    plain = nanobatch.check_job(job(tmp_path, doc), out_dir=tmp_path / "out")
    checked = nanobatch.check_job(job(tmp_path, {**doc, "qa": {"min_side": 500, "retries": 3}}), out_dir=tmp_path / "o")
    assert checked.cost_likely_usd == plain.cost_likely_usd
    assert checked.cost_worst_usd == pytest.approx(4 * plain.cost_worst_usd)  # the request, then 3 more


@pytest.mark.parametrize("ratio", ["16/9", "1:0", "16:9:1", "-1:1"])
def test_a_ratio_no_model_takes_is_named_with_min_side_set_not_a_crash(tmp_path: Path, ratio: str) -> None:
    items = [{"id": "a", "image": "a.png", "aspect_ratio": ratio}]
    problems = manifest_problems(job(tmp_path, {"model": MODEL, "qa": {"min_side": 1000}, "items": items}))
    assert [(p.item, p.field) for p in problems] == [("a", "aspect_ratio")]
