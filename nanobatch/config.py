"""Settings: built-in defaults < config file < environment < command-line flags.

The config file is YAML (``--config FILE``, else ``$NANOBATCH_CONFIG``, else
``./nanobatch.yaml`` if present). Every setting can also be given in the
environment as ``NANOBATCH_<SECTION>_<NAME>``, for example
``NANOBATCH_LIMITS_CONCURRENCY=16`` or ``NANOBATCH_API_BASE_URL=...``.

The API key is never a setting: it is read from the environment variable
named by ``api.api_key_env`` (falling back to ``GEMINI_API_KEY``) when a run
starts, and lives only in the HTTP client.
"""

from __future__ import annotations

import logging
import os
import re
import typing
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator

from . import models
from .config_file import find_config_file, read_config_file
from .errors import ConfigError
from .qa import QaFields, no_bool_numbers

__all__ = [
    "ApiSettings",
    "BudgetSettings",
    "LimitSettings",
    "NotifySettings",
    "OutputSettings",
    "PriceOverride",
    "RetrySettings",
    "Settings",
    "load_settings",
    "read_api_key",
    "read_notify_url",
]

logger = logging.getLogger("nanobatch")

FALLBACK_KEY_ENV = "GEMINI_API_KEY"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    _numbers = field_validator("*", mode="before")(classmethod(no_bool_numbers))


class ApiSettings(_Section):
    base_url: str = "https://api.apiyi.com"
    api_version: str = "v1beta"
    auth: Literal["bearer", "x-goog-api-key"] = "bearer"
    api_key_env: str = "NANOBATCH_API_KEY"
    model: str = models.DEFAULT_MODEL
    timeout_s: float = Field(300.0, gt=0)
    # The service tier of generateContent calls: flex costs half and may be shed, priority costs more;
    # batch costs half and goes through the Batch API (answers within 24 h; see the batch section).
    tier: Literal["standard", "flex", "priority", "batch"] = "standard"
    # How input pictures are sent: their bytes (inline), or a URL the API fetches itself (see nanobatch.inputs.remote).
    inputs: Literal["inline", "by_reference", "auto"] = "inline"
    # gemini: the Gemini API (or a proxy) at base_url. vertex: Vertex AI in api.project at api.location, with
    # Application Default Credentials or the service-account key file api.credentials_file (express mode: no
    # project, the API key instead).
    backend: Literal["gemini", "vertex"] = "gemini"
    project: str | None = None
    location: str = "global"
    credentials_file: str | None = None
    # The request body's top-level "store": false keeps Google from logging prompts, pictures and answers (kept up
    # to 55 days for projects that log by default); true opts in; null leaves the field out, for a proxy that
    # refuses it. Never sent to Vertex AI, which has no such field (docs/privacy.md).
    store: bool | None = False

    @field_validator("model")
    @classmethod
    def _a_model_id(cls, model: str) -> str:
        if message := models.model_id_problem(model):
            raise ValueError(message)
        return model

    @field_validator("base_url")
    @classmethod
    def _an_http_url(cls, url: str) -> str:
        # Every request's URL starts with it: one that cannot be parsed would end the run at its first request.
        # Never shown: it may carry a proxy's user name and password.
        if problem := _http_url_problem(url):
            raise ValueError(f"{problem}, such as https://generativelanguage.googleapis.com (the value is not shown)")
        if urllib.parse.urlsplit(url).query:  # every request's path would land inside the query
            raise ValueError("holds a query (?...), which requests cannot add their path to; a proxy's key goes in "
                             "the variable api.api_key_env names, and api.auth says how it is sent (the value is "
                             "not shown)")  # fmt: skip
        return url

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, name: str) -> str:
        return _variable_name(name)

    @field_validator("api_version")
    @classmethod
    def _a_path_part(cls, version: str) -> str:
        if models.not_in_url_path(version) is not None or version.strip("/") in ("", ".", "..") or "/" in version:
            raise ValueError(f"{version[:40]!r} cannot be part of a URL path; the API's versions are v1 and v1beta")
        return version

    @field_validator("store")
    @classmethod
    def _store_is_gemini_only(cls, store: bool | None, info: ValidationInfo) -> bool | None:
        # Opting in where nothing can be opted into would leave a user believing requests are logged.
        if store is True and info.data.get("backend") == "vertex":
            raise ValueError(
                "true asks the Gemini API to log requests, but Vertex AI (api.backend: vertex) has no store field "
                "and is never sent one; its logging is set up in Google Cloud (request-response logging). Set "
                "api.store: false (the default) or null"
            )
        return store


class LimitSettings(_Section):
    concurrency: int = Field(8, ge=1, le=1000)
    requests_per_minute: float | None = Field(None, gt=0)
    rpm_burst: int = Field(1, ge=1)  # requests that may leave at once; the rate's minute is never exceeded
    adaptive: bool = True
    grace_s: float = Field(30.0, ge=0)
    max_duration_s: float | None = Field(None, gt=0)  # no request starts later than this after the start
    breaker_threshold: int = Field(10, ge=1)
    breaker_cooldown_s: float = Field(30.0, gt=0)
    breaker_max_down_s: float = Field(600.0, gt=0)
    # A flex request still shed after its retries is sent at standard price (recorded as a fallback).
    flex_fallback: bool = True
    # Processes that decode big answers (JSON + base64), write their images and run the output checks. None, the
    # default: one per CPU, started once the run has read 256 MiB of big answers (nanobatch.api.decoding); 0:
    # all of it in the run's own process (docs/performance.md has the figures).
    workers: int | None = Field(None, ge=0, le=256)


class RetrySettings(_Section):
    """Retrying one request (read by :func:`nanobatch.api.retry.retrying`), and how long a run may go unanswered."""

    max_attempts: int = Field(6, ge=1)
    backoff_initial_s: float = Field(2.0, ge=0)
    backoff_max_s: float = Field(120.0, ge=0)
    no_image_attempts: int = Field(2, ge=0)  # a 200 with no image, or one that cannot be decoded: billed
    # A server asking for a longer wait than this is out of quota for the day, not busy: stop the run.
    max_server_wait_s: float = Field(600.0, gt=0)
    first_contact_s: float = Field(60.0, gt=0)  # no request has ever reached the API for this long: stop


class BudgetSettings(_Section):
    max_cost_usd: float | None = Field(None, gt=0)
    max_requests: int | None = Field(None, ge=1)


class BatchSettings(_Section):
    """The batch tier: chunk sizes (well under the API's 2 GB per file), polling, and the deadline."""

    chunk_requests: int = Field(1000, ge=1)
    chunk_mb: float = Field(256.0, gt=0, le=1900)
    linger_s: float = Field(2.0, gt=0)  # seal a chunk when no request came for this long
    poll_initial_s: float = Field(10.0, gt=0)
    poll_max_s: float = Field(300.0, gt=0)
    open_chunks: int = Field(4, ge=1)  # chunks filled or waiting at once (items held in memory meanwhile)
    wait: bool = True  # run --no-wait: submit, and leave what is not done for the next run
    deadline_s: float | None = Field(None, ge=0)  # --batch-deadline: then cancel, and send the rest online
    fallback_tier: Literal["standard", "flex"] = "standard"  # the tier of what goes online at the deadline


class OutputSettings(_Section):
    dir: str = "out"
    upload_to: str | None = None  # s3://, gs://, az:// prefix: each finished image is also PUT there
    # --metrics-file: a Prometheus textfile (node_exporter's textfile collector), ``{job}`` the manifest's name.
    metrics_file: str | None = None


class NotifySettings(_Section):
    """The end-of-run webhook: the variable holding its URL (a secret, like the key), and how it is posted."""

    url_env: str = "NANOBATCH_NOTIFY_URL"
    timeout_s: float = Field(10.0, gt=0, le=300)  # all attempts together: the run's exit waits no longer
    payload: Literal["full", "text"] = "full"  # text: {"text": ...} alone, for chats that refuse other fields

    @field_validator("url_env")
    @classmethod
    def _a_variable_name(cls, name: str) -> str:
        return _variable_name(name)  # a webhook's URL pasted there would be named in messages


class TierPrice(_Section):
    """US dollars per million tokens in one service tier; unset fields keep the tier's built-in price."""

    input: float | None = Field(None, ge=0)
    output_image: float | None = Field(None, ge=0)
    output_text: float | None = Field(None, ge=0)


class PriceOverride(TierPrice):
    """Standard-tier prices (other tiers scale them), and optionally each tier's own prices."""

    flex: TierPrice | None = None
    priority: TierPrice | None = None
    batch: TierPrice | None = None


class Settings(_Section):
    api: ApiSettings = ApiSettings()
    limits: LimitSettings = LimitSettings()
    retry: RetrySettings = RetrySettings()
    budget: BudgetSettings = BudgetSettings()
    output: OutputSettings = OutputSettings()
    batch: BatchSettings = BatchSettings()
    notify: NotifySettings = NotifySettings()
    # The output checks every item's final image must pass, unless its manifest says otherwise (docs/qa.md).
    qa: QaFields = QaFields()
    pricing: dict[str, PriceOverride] = {}
    # Where each value set was written ("api.model": "nanobatch.yaml: api.model"): see written_at()
    _written: dict[str, str] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any) -> None:
        if isinstance(context, dict) and "written" in context:  # (load_settings' and with_overrides')
            self._written = dict(context["written"])

    def written_at(self, key: str) -> str:
        """Where the value of the setting *key* (``api.model``, ``qa.min_side``) was written, to begin a message
        about that value with: ``nanobatch.yaml: api.model``, ``environment variable NANOBATCH_API_MODEL``,
        ``--model``; ``api.model (not set: the built-in default)``; or ``api.model`` (set by a program)."""
        if (place := self._written.get(key)) is not None:
            return place
        section, _, name = key.partition(".")
        default = type(self).model_fields[section].default
        unset = getattr(getattr(self, section), name, None) == getattr(default, name, None)
        return f"{key} (not set: the built-in default)" if unset else key

    def gate_limits(self) -> tuple[int, float | None]:
        """The run's concurrency and requests per minute. In the batch tier a step waits in a chunk until its
        job answers, so every step of the open chunks is let through at once, at no rate: the job paces them."""
        if self.api.tier == "batch":
            return self.batch.chunk_requests * self.batch.open_chunks, None
        return self.limits.concurrency, self.limits.requests_per_minute

    def with_overrides(self, overrides: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> Settings:
        """A copy with dotted ``section.name`` values replaced (None values are ignored); *flags* names the
        command-line option each was given with (``{"api.tier": "--tier"}``), for a message about its value."""
        data, written = self.model_dump(), dict(self._written)
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, name = dotted.split(".", 1)
            data[section][name] = value
            written[dotted] = (flags or {}).get(dotted) or f"command line: {dotted}"
        return _validate(data, source="command line", written=written)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults, the config file, the environment and *overrides*, each value's place
    remembered (:meth:`Settings.written_at`).

    *overrides* are command-line values keyed ``"section.name"``; None means "not given"; *flags*: the options
    they were given with.

    >>> load_settings(env={}, overrides={"limits.concurrency": 4}).limits.concurrency
    4
    """
    env = os.environ if env is None else env
    path = find_config_file(config_file, env)
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    written = {f"{section}.{name}": f"{path}: {section}.{name}" for section, values in data.items()
               if isinstance(values, dict) for name in values}  # fmt: skip
    from_env: dict[tuple[str, str], str] = {}
    variables = ["NANOBATCH_CONFIG"]
    for section, model in Settings.model_fields.items():
        annotation = model.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            continue
        for name in annotation.model_fields:
            variable = f"NANOBATCH_{section}_{name}".upper()
            variables.append(variable)
            value = env.get(variable)
            if value is not None and value != "":
                section_data = data.setdefault(section, {})
                if isinstance(section_data, dict):
                    section_data[name] = None if value.lower() in ("null", "none") else value
                    from_env[(section, name)] = variable
    written.update(
        {f"{section}.{name}": f"environment variable {variable}" for (section, name), variable in from_env.items()}
    )
    settings = _validate(data, source=str(path) if path else "environment", from_env=from_env, written=written)
    # A misspelt variable must not silently drop a setting (NANOBATCH_BUDGET_MAX_COST: no budget at all).
    known = {*variables, "NANOBATCH_API_KEY", settings.api.api_key_env, settings.notify.url_env}
    for name in sorted(env):
        if name.startswith("NANOBATCH_") and name not in known:
            raise ConfigError(
                f"environment variable {name}: not a nanobatch setting{did_you_mean(name, variables)}; "
                "unset it, or correct its name"
            )
    _warn_of_unknown_priced_models(settings)
    return settings.with_overrides(overrides or {}, flags)


def _warn_of_unknown_priced_models(settings: Settings) -> None:
    """A ``pricing:`` entry for a model id close to a known one is most likely a typo (its prices would
    then apply to nothing); one for an id like no other is a proxy's own model, and fine."""
    known = [f"{m}{suffix}" for m in models.MODELS for suffix in ("", "-preview")]
    for name in settings.pricing:
        if models.lookup(name) is None and (hint := did_you_mean(name, known)):
            logger.warning("pricing: %r is not a known model%s; its prices apply only to that exact id", name, hint)


def read_api_key(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The API key from ``api.api_key_env``, else ``GEMINI_API_KEY``; None if neither is set.

    A key goes out in an HTTP header, which carries visible ASCII only: a value with a line break inside (a
    second key pasted below the first) or a typographic character (an ellipsis copied from a web page) is
    refused here, with a ConfigError that says where and what, never the value itself.
    """
    env = os.environ if env is None else env
    for name in (settings.api.api_key_env, FALLBACK_KEY_ENV):
        value = env.get(name, "").strip()
        if value:
            _check_key(name, value)
            return value
    return None


def _variable_name(name: str) -> str:
    """*name*, the name of an environment variable; ValueError that does not show it otherwise: a key pasted
    where its variable's name goes would be printed by every message that names the variable. A key is a long
    run with no _ that mixes cases or holds digits (``AIza...``, hex); a name is short, or split by _
    (``NANOBATCH_API_KEY``, ``GeminiKey``)."""
    keyish = len(name) >= 20 and "_" not in name and (not (name.isupper() or name.islower()) or not name.isalpha())
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name.startswith("AIza") or keyish:
        raise ValueError("must be the name of an environment variable (letters, digits and _), such as "
                         "NANOBATCH_API_KEY; the value is not shown: is a key pasted there?")  # fmt: skip
    return name


def _http_url_problem(url: str) -> str | None:
    """Why *url* is not an http(s) URL with a host, on one line, that a request can be sent to; None if it is.
    The reason never quotes it: a URL may carry a proxy's password, or be a webhook's secret."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (a port that is no number raises ValueError)
    except ValueError:  # an unclosed [ in the host, a port that is no number (urllib's words quote it)
        return "not a URL (its host or port cannot be read)"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL with a host"
    if any(char.isspace() or not char.isprintable() for char in url):
        return "a URL holds no space, line break or control character"
    return None


def read_notify_url(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The end-of-run webhook's URL from the variable ``notify.url_env`` names; None if it is unset or empty.

    The URL is a secret (a chat webhook's URL is its credential): a value that is no http(s) URL is refused
    with a ConfigError that names the variable, never the value.
    """
    env = os.environ if env is None else env
    variable = settings.notify.url_env
    value = env.get(variable, "").strip()
    if not value:
        return None
    if _http_url_problem(value) is not None:
        raise ConfigError(
            f"{variable} does not hold an http(s) URL on one line (the value is not shown): set it to the "
            "webhook's URL, or unset it to post nothing at the end of a run"
        )
    return value


def _check_key(variable: str, key: str) -> None:
    for position, char in enumerate(key, 1):
        if not "!" <= char <= "~":
            raise ConfigError(
                f"{variable} holds {_char_name(char)} at character {position} of {len(key)}, which no HTTP "
                "header can carry: set it to the key alone, on one line (the key is not shown here)"
            )


def _char_name(char: str) -> str:
    if char in "\r\n":
        return "a line break"
    if char.isspace():
        return "a space" if char == " " else "white space"
    if char.isascii():
        return f"a control character (U+{ord(char):04X})"
    return f"a non-ASCII character (U+{ord(char):04X})"


def _validate(
    data: dict[str, Any], *, source: str, from_env: Mapping[tuple[str, str], str] | None = None,
    written: Mapping[str, str] | None = None,
) -> Settings:  # fmt: skip
    """*from_env* maps the (section, name) of values taken from the environment to their variable; *written*, each
    value set to where it was written (:meth:`Settings.written_at`)."""
    try:
        return Settings.model_validate(data, context={"written": written or {}})
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(source, err, from_env or {}) for err in exc.errors())) from None


def _describe(source: str, err: Any, from_env: Mapping[tuple[str, str], str]) -> str:
    parts = [str(part) for part in err["loc"]]
    variable = from_env.get((parts[0], parts[1])) if len(parts) >= 2 else None
    if variable is not None:
        source = f"environment variable {variable}"
    loc = ".".join(str(part) for part in err["loc"])
    message = err["msg"]
    if err["type"] == "value_error":  # a check of our own: its words, without pydantic's prefix
        message = message.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown setting" + did_you_mean(str(err["loc"][-1]), _known_names(err["loc"][:-1]))
    return f"{source}: {loc}: {message}"


def _known_names(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Settings
    for part in loc:
        if typing.get_origin(model) is dict:  # ``pricing``: any model id, then a PriceOverride
            model = typing.get_args(model)[1]
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def did_you_mean(name: str, choices: list[str]) -> str:
    """``' (did you mean "x"?)'`` when a choice is close to *name*, else ``''``."""
    import difflib  # (only for a name that is wrong)

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
