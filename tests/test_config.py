"""Settings: defaults < config file < environment < flags, and errors that name the file and the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nanobatch.config import Settings, load_settings, read_api_key
from nanobatch.config_file import find_config_file
from nanobatch.errors import ConfigError
from nanobatch.qa import QaFields

KEY = "sk-secret-0123456789"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_file_or_environment() -> None:
    settings = load_settings(env={})
    assert settings.api.base_url == "https://api.apiyi.com"
    assert settings.api.api_version == "v1beta"
    assert settings.api.auth == "bearer"
    assert settings.api.api_key_env == "NANOBATCH_API_KEY"
    assert settings.api.model == "gemini-nano-banana-2.1"
    assert settings.api.timeout_s == 300
    assert settings.limits.concurrency == 8
    assert settings.limits.requests_per_minute is None
    assert (settings.retry.max_attempts, settings.retry.backoff_initial_s, settings.retry.backoff_max_s) == (6, 2, 120)
    assert settings.retry.no_image_attempts == 2
    assert settings.budget.max_cost_usd is None
    assert settings.output.dir == "out"


def test_file_values_replace_defaults_and_leave_the_rest(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.yaml",
        """
api:
  base_url: https://generativelanguage.googleapis.com
  auth: x-goog-api-key
limits:
  concurrency: 3
  requests_per_minute: 10
retry:
  max_attempts: 2
pricing:
  gemini-3-pro-image: {output_image: 100}
""",
    )
    settings = load_settings(config, env={})
    assert settings.api.base_url == "https://generativelanguage.googleapis.com"
    assert settings.api.auth == "x-goog-api-key"
    assert settings.limits.concurrency == 3 and settings.limits.requests_per_minute == 10
    assert settings.retry.max_attempts == 2
    assert settings.api.model == "gemini-nano-banana-2.1"  # untouched default
    assert settings.pricing["gemini-3-pro-image"].output_image == 100
    assert settings.pricing["gemini-3-pro-image"].input is None


@pytest.mark.parametrize(
    "text",
    [pytest.param("# nothing yet\n", id="comment-only"), pytest.param("api:\npricing:\n", id="empty-sections")],
)
def test_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    assert load_settings(write(tmp_path / "c.yaml", text), env={}) == Settings()


def test_each_setting_knows_where_its_value_was_written_for_messages_to_name_it(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "api:\n  model: gemini-3-pro-image\n  tier: flex\nqa:\n  min_side: 900\n")
    env = {"NANOBATCH_API_TIER": "priority", "NANOBATCH_LIMITS_CONCURRENCY": "4"}

    settings = load_settings(config, env=env, overrides={"api.model": "gemini-3.1-flash-image", "api.base_url": None},
                             flags={"api.model": "--model", "api.base_url": "--base-url"})  # fmt: skip

    assert settings.written_at("api.model") == "--model"  # a flag beats the file, as its value does
    assert settings.written_at("api.tier") == "environment variable NANOBATCH_API_TIER"
    assert settings.written_at("qa.min_side") == f"{config}: qa.min_side"
    assert settings.written_at("api.base_url") == "api.base_url (not set: the built-in default)"  # (None: not given)
    assert settings.with_overrides({"limits.concurrency": 2}).written_at("limits.concurrency") == (
        "command line: limits.concurrency"
    )
    assert settings.with_overrides({}).written_at("qa.min_side") == f"{config}: qa.min_side"  # kept in a copy
    assert Settings(qa=QaFields(min_side=900)).written_at("qa.min_side") == "qa.min_side"  # a program's own


def test_environment_beats_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "limits:\n  concurrency: 3\napi:\n  model: gemini-3-pro-image\n")
    env = {
        "NANOBATCH_LIMITS_CONCURRENCY": "16",
        "NANOBATCH_API_BASE_URL": "http://127.0.0.1:8080",
        "NANOBATCH_LIMITS_ADAPTIVE": "false",
    }
    settings = load_settings(config, env=env)
    assert settings.limits.concurrency == 16
    assert settings.api.base_url == "http://127.0.0.1:8080"
    assert settings.limits.adaptive is False
    assert settings.api.model == "gemini-3-pro-image"  # from the file, not in env


def test_empty_environment_value_is_not_given(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "limits:\n  concurrency: 3\n")
    assert load_settings(config, env={"NANOBATCH_LIMITS_CONCURRENCY": ""}).limits.concurrency == 3


def test_environment_null_clears_a_file_value(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "limits:\n  requests_per_minute: 30\n")
    settings = load_settings(config, env={"NANOBATCH_LIMITS_REQUESTS_PER_MINUTE": "null"})
    assert settings.limits.requests_per_minute is None


def test_os_environ_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOBATCH_RETRY_MAX_ATTEMPTS", "9")
    assert load_settings().retry.max_attempts == 9


def test_flags_beat_environment_and_file(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "limits:\n  concurrency: 3\napi:\n  model: gemini-3-pro-image\n")
    settings = load_settings(
        config,
        env={"NANOBATCH_LIMITS_CONCURRENCY": "16", "NANOBATCH_API_MODEL": "gemini-2.5-flash-image"},
        overrides={"limits.concurrency": 2, "api.model": None, "budget.max_cost_usd": 5.0},
    )
    assert settings.limits.concurrency == 2
    assert settings.api.model == "gemini-2.5-flash-image"  # None flag = not given: env stays
    assert settings.budget.max_cost_usd == 5.0


def test_bad_flag_value_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides={"limits.concurrency": 0})
    assert "limits.concurrency" in str(info.value)


def test_nanobatch_config_variable_names_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "elsewhere.yaml", "limits:\n  concurrency: 5\n")
    write(Path.cwd() / "nanobatch.yaml", "limits:\n  concurrency: 7\n")
    assert load_settings(env={"NANOBATCH_CONFIG": str(config)}).limits.concurrency == 5


def test_explicit_file_beats_nanobatch_config(tmp_path: Path) -> None:
    explicit = write(tmp_path / "explicit.yaml", "limits:\n  concurrency: 4\n")
    other = write(tmp_path / "other.yaml", "limits:\n  concurrency: 5\n")
    assert load_settings(explicit, env={"NANOBATCH_CONFIG": str(other)}).limits.concurrency == 4


def test_local_nanobatch_yaml_is_found_in_the_current_folder() -> None:
    assert find_config_file(None, {}) is None
    write(Path.cwd() / "nanobatch.yaml", "limits:\n  concurrency: 7\n")
    assert find_config_file(None, {}) == Path("nanobatch.yaml")
    assert load_settings(env={}).limits.concurrency == 7


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "missing.yaml", env={})
    assert "missing.yaml" in str(info.value)


def test_missing_nanobatch_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"NANOBATCH_CONFIG": str(tmp_path / "gone.yaml")})
    assert "gone.yaml" in str(info.value)


@pytest.mark.parametrize(
    ("text", "bad", "suggestion"),
    [
        pytest.param("limits:\n  concurency: 4\n", "limits.concurency", "concurrency", id="typo-in-section"),
        pytest.param("limit:\n  concurrency: 4\n", "limit", "limits", id="typo-in-section-name"),
        pytest.param("api:\n  base-url: http://x\n", "api.base-url", "base_url", id="dash-for-underscore"),
        pytest.param("retry:\n  max_attemps: 3\n", "retry.max_attemps", "max_attempts", id="typo-retry"),
        pytest.param("pricing:\n  gemini-3-pro-image: {outptu_image: 1}\n", "outptu_image", "output_image",
                     id="typo-in-pricing"),
    ],
)  # fmt: skip
def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path, text: str, bad: str, suggestion: str) -> None:
    config = write(tmp_path / "typo.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    message = str(info.value)
    assert "typo.yaml" in message
    assert bad in message
    assert f'did you mean "{suggestion}"' in message


def test_unknown_key_far_from_any_setting_has_no_suggestion(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "limits:\n  zzzzzz: 4\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert "limits.zzzzzz" in str(info.value) and "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        pytest.param("limits:\n  concurrency: lots\n", "limits.concurrency", id="not-a-number"),
        pytest.param("limits:\n  concurrency: 0\n", "limits.concurrency", id="below-range"),
        pytest.param("limits:\n  requests_per_minute: -5\n", "limits.requests_per_minute", id="negative-rate"),
        pytest.param("api:\n  auth: basic\n", "api.auth", id="unknown-auth"),
        pytest.param("api:\n  timeout_s: 0\n", "api.timeout_s", id="zero-timeout"),
        pytest.param("budget:\n  max_cost_usd: -1\n", "budget.max_cost_usd", id="negative-budget"),
        pytest.param("limits: 8\n", "limits", id="section-not-a-mapping"),
        pytest.param('api:\n  model: "gemini\\0"\n', "api.model", id="model-id-a-url-cannot-carry"),
        pytest.param('api:\n  api_version: "v1\\0"\n', "api.api_version", id="version-a-url-cannot-carry"),
        pytest.param('api:\n  api_version: "v1?key=x"\n', "api.api_version", id="version-that-asks-another-url"),
        pytest.param('api:\n  api_version: ""\n', "api.api_version", id="version-empty"),
        pytest.param('api:\n  api_version: "../x"\n', "api.api_version", id="version-out-of-the-path"),
        pytest.param("api:\n  model: models/gemini-3-pro-image\n", "api.model", id="model-as-a-resource-name"),
        pytest.param("pricing:\n  gemini-3-pro-image: {input: .inf}\n", "pricing.gemini-3-pro-image.input", id="inf"),
        pytest.param("limits:\n  requests_per_minute: .nan\n", "limits.requests_per_minute", id="nan"),
        pytest.param('api:\n  base_url: "https://s3cret@[proxy.example/v1"\n', "api.base_url", id="base-url-bad-host"),
        pytest.param('api:\n  base_url: "https://s3cret@proxy.example:port"\n', "api.base_url", id="base-url-bad-port"),
        pytest.param('api:\n  base_url: "localhost:8000"\n', "api.base_url", id="base-url-without-scheme"),
        pytest.param('api:\n  base_url: "https://s3cret@proxy.example/\\x01"\n', "api.base_url", id="base-url-ctl"),
    ],
)
def test_bad_value_names_the_file_and_setting(tmp_path: Path, text: str, setting: str) -> None:
    config = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert f"c.yaml: {setting}:" in str(info.value) and "s3cret" not in str(info.value)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "limits:\n  concurrency: 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={"NANOBATCH_LIMITS_CONCURRENCY": "many"})
    message = str(info.value)
    assert "NANOBATCH_LIMITS_CONCURRENCY" in message and "limits.concurrency" in message
    assert "c.yaml" not in message  # the file is fine; do not send the user there


@pytest.mark.usefixtures("yaml_parser")
@pytest.mark.parametrize(
    "text",
    [
        pytest.param("limits:\n  concurrency: [1, 2\n", id="unclosed-bracket"),
        pytest.param("api:\n\tbase_url: x\n", id="tab-indent"),
        pytest.param("- api\n- limits\n", id="list"),
        pytest.param("just a string\n", id="scalar"),
        pytest.param("limits:\n  concurrency: !!int many\n", id="a-tag-its-value-does-not-fit"),
        pytest.param("limits:\n  concurrency: !!int ''\n", id="int-of-nothing"),
        pytest.param("limits:\n  adaptive: !!bool maybe\n", id="bool-of-a-word"),
        pytest.param("output:\n  dir: !!timestamp soon\n", id="timestamp-of-a-word"),
        pytest.param("api: !!set [a]\n", id="set-of-a-list"),
        pytest.param("api: !!set x\n", id="set-of-a-text"),
    ],
)
def test_unreadable_yaml_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    config = write(tmp_path / "broken.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert "broken.yaml" in str(info.value)


def test_a_config_file_is_read_only_so_far(tmp_path: Path) -> None:
    # --config /dev/zero read without end, until memory ran out: a config file is read up to 1 MiB
    config = write(tmp_path / "big.yaml", "# a comment\n" * 100_000 + "limits:\n  concurrency: 3\n")
    with pytest.raises(ConfigError, match="big.yaml: over 1,048,576 bytes: not a config file"):
        load_settings(config, env={})
    if os.path.exists("/dev/null"):  # an empty file, as ever: no settings
        assert load_settings("/dev/null", env={}).limits.concurrency == 8


def test_key_is_read_from_the_named_variable_first() -> None:
    settings = load_settings(env={}, overrides={"api.api_key_env": "MY_KEY"})
    assert read_api_key(settings, {"MY_KEY": " k1 \n", "GEMINI_API_KEY": "k2"}) == "k1"
    assert read_api_key(settings, {"MY_KEY": "", "GEMINI_API_KEY": "k2"}) == "k2"
    assert read_api_key(settings, {"NANOBATCH_API_KEY": "k3"}) is None  # not the named variable
    assert read_api_key(settings, {}) is None


def test_default_key_variable_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANOBATCH_API_KEY")
    settings = load_settings(env={})
    monkeypatch.setenv("GEMINI_API_KEY", "fallback")
    assert read_api_key(settings) == "fallback"
    monkeypatch.setenv("NANOBATCH_API_KEY", "primary")
    assert read_api_key(settings) == "primary"


def test_settings_never_hold_the_key(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "api:\n  api_key_env: MY_KEY\n")
    env = {"MY_KEY": KEY, "NANOBATCH_API_KEY": KEY, "GEMINI_API_KEY": KEY}
    settings = load_settings(config, env=env)
    assert KEY not in repr(settings.model_dump())
    assert KEY not in settings.model_dump_json()
    assert read_api_key(settings, env) == KEY
    # The key in a variable named like a setting: refused by name, without its value.
    with pytest.raises(ConfigError, match="NANOBATCH_API_API_KEY: not a nanobatch setting") as info:
        load_settings(config, env={**env, "NANOBATCH_API_API_KEY": KEY})
    assert KEY not in str(info.value)


def test_a_key_setting_in_the_file_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", f"api:\n  api_key: {KEY}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert "api.api_key" in str(info.value)


@pytest.mark.usefixtures("yaml_parser")
@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"limits:\n  concurrency: 4\n# caf\xe9\n", "not UTF-8 text: byte 0xe9", id="latin-1"),
        pytest.param(b"limits:\n  concurrency: 4\n  concurrency: 8\n", "'concurrency' is given twice", id="dup-key"),
        pytest.param(b"limits: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply", id="deep"),
        pytest.param(b"limits: !!python/object/apply:os.system [echo hi]\n", "not valid YAML", id="python-tag"),
    ],
)
def test_a_config_file_that_cannot_be_read_safely_is_a_config_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "nanobatch.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(path, env={})
    assert str(path) in str(info.value)


def test_a_misspelt_environment_variable_is_an_error_not_a_silently_missing_budget() -> None:
    with pytest.raises(
        ConfigError,
        match=r'NANOBATCH_BUDGET_MAX_COST: not a nanobatch setting \(did you mean "NANOBATCH_BUDGET_MAX_COST_USD"\?\)',
    ):
        load_settings(env={"NANOBATCH_BUDGET_MAX_COST": "0.01"})


def test_the_key_variables_and_the_config_variable_are_not_settings_but_are_known(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("api:\n  api_key_env: NANOBATCH_PROD_KEY\n")
    env = {"NANOBATCH_API_KEY": "a", "NANOBATCH_PROD_KEY": "b", "NANOBATCH_CONFIG": str(config)}
    assert load_settings(env=env).api.api_key_env == "NANOBATCH_PROD_KEY"


def test_a_priced_model_that_looks_like_a_typo_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("pricing:\n  gemini-3.1-flash-imag: {output_image: 1}\n  my-proxy-model: {output_image: 2}\n")
    load_settings(config, env={})
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "'gemini-3.1-flash-imag' is not a known model" in warned[0]
    assert 'did you mean "gemini-3.1-flash-image' in warned[0]


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("limits:\n  concurrency: true\n", "limits.concurrency"),  # was 1
        ("budget:\n  max_requests: yes\n", "budget.max_requests"),  # yes is true in a config file: was 1
        ("limits:\n  workers: no\n", "limits.workers"),  # was 0
        ("budget:\n  max_cost_usd: true\n", "budget.max_cost_usd"),  # was $1
        ("qa:\n  min_fill: true\n", "qa.min_fill"),  # was 1.0: every image short of filling the frame rejected
    ],
)
def test_true_or_false_where_a_number_goes_is_refused_not_read_as_1_or_0(
    tmp_path: Path, text: str, setting: str
) -> None:
    path = tmp_path / "nanobatch.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert f"{setting}: a number, not " in str(err.value)


def test_a_number_from_the_environment_is_still_read_from_its_text() -> None:
    settings = load_settings(env={"NANOBATCH_LIMITS_CONCURRENCY": "12", "NANOBATCH_BUDGET_MAX_COST_USD": "2.5"})
    assert settings.limits.concurrency == 12 and settings.budget.max_cost_usd == 2.5


def test_a_yes_or_no_setting_written_as_0_or_y_still_loads_as_before() -> None:
    # The checks' strict yes-or-no is theirs: a config file that loaded before must load the same after an upgrade.
    from nanobatch.config import Settings

    loaded = Settings.model_validate({"limits": {"adaptive": 0}, "batch": {"wait": "y"}})
    assert loaded.limits.adaptive is False and loaded.batch.wait is True
