"""What a run needs before it sends anything, and whether it has it: the API key, Vertex AI's project, location
and credentials; and the services a backend does not offer (the Batch API, a list of models on Vertex AI).

Light to import (no HTTP client): ``validate`` asks :func:`check_credentials` (through ``check_job``), which
tells on this machine alone what :func:`credentials_for`, a run's, would refuse; only Vertex AI's checks load
google-auth.
"""

from __future__ import annotations

import urllib.parse
from typing import Literal

from ..config import Settings, read_api_key
from ..errors import ConfigError
from ..loopback import loopback_url

__all__ = [
    "Service",
    "api_key_for",
    "check_credentials",
    "check_offered",
    "credentials_for",
    "not_offered",
]

Service = Literal["batch", "cancel", "models"]

# The Batch API is the Gemini API's (Vertex AI's batch prediction is another product, which nanobatch does not
# use), and Vertex AI v1 lists no models (its publisher-model list is v1beta1, and names no methods).
_NOT_ON_VERTEX: dict[str, str] = {
    "batch": "the batch tier goes through the Gemini API's Batch API, which Vertex AI (api.backend: vertex) does "
    "not offer; use the flex tier on Vertex for half price online",
    "cancel": "api.backend is vertex, which makes no batch jobs (the batch tier is the Gemini API's): there is "
    "nothing to cancel with this configuration; give cancel the Gemini API configuration that ran the batch tier",
    "models": "models --live compares with the Gemini API's list of models, and Vertex AI (api.backend: vertex) "
    "has no such list; `nanobatch models` shows the models each backend serves",
}


def not_offered(backend: str, service: Service) -> str | None:
    """Why *backend* (``api.backend``) does not offer *service*, or None if it does: the batch tier's jobs
    (``batch``, ``cancel``) and the list of models (``models``) are the Gemini API's only."""
    return _NOT_ON_VERTEX[service] if backend == "vertex" else None


def check_offered(settings: Settings, service: Service) -> None:
    """ConfigError, saying why, if the configured backend does not offer *service* (:func:`not_offered`).
    (``check_job`` finds the batch tier's refusal first, where the tier was written.)"""
    if (why := not_offered(settings.api.backend, service)) is not None:
        raise ConfigError(why)


def api_key_for(settings: Settings, *, needed: bool) -> str | None:
    """The API key to send: None with Vertex AI in a project (its OAuth2 token stands in), else the key from
    the environment; ConfigError if there is none and one is *needed*, unless the server is on this machine."""
    if settings.api.backend == "vertex" and settings.api.project is not None:
        return None
    api_key = read_api_key(settings)
    # On this machine (a simulator or a local proxy holding its own key), nothing need be sent: a key it wants,
    # it asks for (401, a fatal error).
    if api_key is None and needed and not loopback_url(settings.api.base_url):
        raise ConfigError(
            f"no API key: set the environment variable {settings.api.api_key_env} (or GEMINI_API_KEY), "
            "or try the built-in simulator with --simulate"
        )
    return api_key


def check_credentials(settings: Settings, *, simulate: bool, needed: bool) -> str | None:
    """The API key to send (:func:`api_key_for`), or ConfigError for what :func:`credentials_for` refuses that
    this machine can tell without the network: no API key where one is *needed*, or one no header can carry;
    Vertex AI's project or location that cannot be, express mode without a key, a key file that is no
    service-account key (read, no token fetched). ``check_job`` asks it, so ``validate`` and ``run --dry-run``
    refuse what a run would."""
    api_key = api_key_for(settings, needed=needed)
    api = settings.api
    if api_key is not None and api.auth == "bearer" and "@" in urllib.parse.urlsplit(api.base_url).netloc:
        # httpx sends a URL's user name and password as "Authorization: Basic", in place of the key's header
        raise ConfigError("api.base_url holds a user name and password, which would be sent in place of the key "
                          "(both go in the Authorization header): set api.auth: x-goog-api-key, or take them out "
                          "of the URL (the value is not shown)")  # fmt: skip
    if api.backend == "vertex" and not simulate:
        from .vertex import check_vertex_auth, vertex_route

        vertex_route(api.project, api.location, base_url=None)
        check_vertex_auth(api.project, api.credentials_file, api_key)
    return api_key


def credentials_for(settings: Settings, *, simulate: bool, needed: bool) -> str | None:
    """:func:`api_key_for`, once what :func:`~.connect.connect` will ask of Vertex AI (its project and location, its
    credentials) is known to be there: a ConfigError now, before a run takes its folder, not once it holds it.
    Beyond :func:`check_credentials`, it looks for Application Default Credentials (Vertex AI in a project,
    no key file), which google-auth may ask the metadata server for."""
    api_key = check_credentials(settings, simulate=simulate, needed=needed)
    api = settings.api
    if api.backend == "vertex" and not simulate:
        from .vertex import vertex_auth

        if (auth := vertex_auth(api.project, api.credentials_file, api_key)) is not None:
            auth.close()
    return api_key
