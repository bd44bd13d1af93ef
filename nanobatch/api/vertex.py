"""Vertex AI: where ``api.backend: vertex`` sends requests, and the OAuth2 bearer token it sends them with.

Vertex serves the same ``generateContent`` body as the Gemini API under a project and a location::

    https://{host}/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent

where the host is ``aiplatform.googleapis.com`` for ``global`` and ``{location}-aiplatform.googleapis.com``
otherwise. Express mode (an API key, no project) uses ``/v1/publishers/google/models/{model}:generateContent``.

Authentication is google-auth's (the ``nanobatch[vertex]`` extra): Application Default Credentials or a
service-account key file. google-auth is synchronous, so tokens are fetched in a worker thread, one refresh
at a time, a few minutes before they expire. The token never appears in a log, error or record.

>>> vertex_url("my-project", "europe-west4", "gemini-3.1-flash-image")
'https://europe-west4-aiplatform.googleapis.com/v1/projects/my-project/locations/europe-west4/publishers/google/models/gemini-3.1-flash-image:generateContent'
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anyio
import anyio.to_thread
import httpx2

from ..errors import ConfigError, FatalApiError
from .redaction import SECRETS, public_url, scrub

__all__ = [
    "SCOPE",
    "VertexAuth",
    "check_vertex_auth",
    "vertex_auth",
    "vertex_base_url",
    "vertex_express_url",
    "vertex_route",
    "vertex_url",
]

logger = logging.getLogger("nanobatch")

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
REFRESH_MARGIN_S = 300.0  # refresh this long before expiry, so no request leaves with a token about to lapse
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$|^[0-9]{6,20}$")  # project id, or project number
_LOCATION = re.compile(r"^[a-z]+(?:-[a-z0-9]+)*$")


def vertex_base_url(location: str) -> str:
    """``https://aiplatform.googleapis.com`` for ``global``, ``aiplatform.us.rep.googleapis.com`` for a
    multi-region (``us``, ``eu``: as google-genai 3.6.1 builds it, ``_MULTI_REGIONAL_LOCATIONS``), else the
    regional host (``us-central1-aiplatform.googleapis.com``)."""
    _check("api.location", location, _LOCATION, "a Vertex location such as 'global' or 'us-central1'")
    if location in _MULTI_REGIONS:
        return f"https://aiplatform.{location}.rep.googleapis.com"
    host = "aiplatform.googleapis.com" if location == "global" else f"{location}-aiplatform.googleapis.com"
    return f"https://{host}"


_MULTI_REGIONS = frozenset({"us", "eu"})


def vertex_url(project: str, location: str, model: str, *, base_url: str | None = None) -> str:
    """The ``generateContent`` URL of *model* in *project* at *location*; *base_url* replaces the host (tests)."""
    _check("api.project", project, _PROJECT, "a Google Cloud project id (6-30 letters, digits, hyphens) or number")
    root = (base_url or vertex_base_url(location)).rstrip("/")
    if base_url is not None:
        _check("api.location", location, _LOCATION, "a Vertex location such as 'global' or 'us-central1'")
    return f"{root}/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent"


def vertex_express_url(model: str, *, base_url: str | None = None) -> str:
    """Vertex express mode: an API key instead of OAuth, no project or location in the path."""
    root = (base_url or "https://aiplatform.googleapis.com").rstrip("/")
    return f"{root}/v1/publishers/google/models/{model}:generateContent"


def _check(setting: str, value: str, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(f"{setting}: {value!r} is not {what}")


class VertexAuth(httpx2.Auth):
    """httpx auth that sends ``Authorization: Bearer`` with a google-auth token, refreshed before it expires.

    >>> auth = VertexAuth.from_service_account_file("key.json")  # doctest: +SKIP
    >>> client = httpx2.AsyncClient(auth=auth)  # doctest: +SKIP
    """

    requires_request_body = False
    requires_response_body = False

    def __init__(self, credentials: Any, *, http: httpx2.Client | None = None) -> None:
        self._credentials = credentials
        self._owns_http = http is None
        self._http = http or httpx2.Client(timeout=30.0)
        self._lock: anyio.Lock | None = None

    def close(self) -> None:
        """Close the connection to the token endpoint (if this object opened it)."""
        if self._owns_http:
            self._http.close()

    @classmethod
    def from_service_account_file(cls, path: str, *, http: httpx2.Client | None = None) -> VertexAuth:
        """Credentials from a service-account key file (JSON)."""
        return cls(_service_account(path), http=http)

    @classmethod
    def application_default(cls, *, http: httpx2.Client | None = None) -> VertexAuth:
        """Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud's login, the metadata server."""
        google_auth = _google_auth("google.auth")
        exceptions = _google_auth("google.auth.exceptions")
        try:
            credentials, _ = google_auth.default(scopes=[SCOPE])
        except exceptions.DefaultCredentialsError:
            raise ConfigError(
                "api.backend: vertex found no Google credentials: run 'gcloud auth application-default login', "
                "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
            ) from None
        return cls(credentials, http=http)

    async def token(self) -> str:
        """A token valid for at least REFRESH_MARGIN_S more seconds, fetched if needed (one fetch at a time)."""
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self._needs_refresh():
                await anyio.to_thread.run_sync(self._refresh)
                SECRETS.add(str(self._credentials.token))  # cut out of whatever a proxy echoes back
        return str(self._credentials.token)

    def _needs_refresh(self) -> bool:
        credentials = self._credentials
        if not credentials.token or credentials.expiry is None:
            return not credentials.token
        import datetime

        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # google-auth keeps naive UTC
        return bool((credentials.expiry - now).total_seconds() < REFRESH_MARGIN_S)

    def _refresh(self) -> None:
        exceptions = _google_auth("google.auth.exceptions")
        try:
            self._credentials.refresh(_Request(self._http))
        except (exceptions.RefreshError, exceptions.TransportError) as exc:
            # google-auth's message quotes the token endpoint's reply, which may echo the signed assertion
            raise FatalApiError(
                f"Vertex: could not get an access token: {scrub(str(exc), None)}", kind="auth"
            ) from None
        logger.debug("Vertex: access token refreshed, valid until %s UTC", self._credentials.expiry)

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        request.headers["Authorization"] = f"Bearer {await self.token()}"
        # A user's credentials (gcloud's) name the project billed and whose quota counts, as google-auth's own
        # apply() and google-genai send it; without it Vertex may refuse them, or bill another project.
        if quota_project := getattr(self._credentials, "quota_project_id", None):
            request.headers["x-goog-user-project"] = str(quota_project)
        response = yield request
        if response.status_code == 401:  # revoked or expired early: one fresh token, one more try
            self._credentials.token = None
            request.headers["Authorization"] = f"Bearer {await self.token()}"
            yield request


def _service_account(path: str) -> Any:
    """google-auth's credentials from the service-account key file at *path*, read here (no token is fetched);
    ConfigError if it is not one."""
    service_account = _google_auth("google.oauth2.service_account")
    try:
        return service_account.Credentials.from_service_account_file(path, scopes=[SCOPE])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"api.credentials_file: {path}: not a readable service-account key ({exc})") from None


def _google_auth(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError("api.backend: vertex needs google-auth: pip install 'nanobatch[vertex]'") from None


class _Response:
    """google-auth's transport Response over an httpx2.Response."""

    def __init__(self, response: httpx2.Response) -> None:
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers
        self.data = response.content


class _Request:
    """google-auth's transport Request over httpx (so nanobatch needs no second HTTP library)."""

    def __init__(self, http: httpx2.Client) -> None:
        self._http = http

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _Response:
        exceptions = _google_auth("google.auth.exceptions")
        try:
            response = self._http.request(method, url, content=body, headers=headers, timeout=timeout or 30.0)
        except httpx2.HTTPError as exc:
            raise exceptions.TransportError(f"{type(exc).__name__} talking to {public_url(url)}") from None
        return _Response(response)


def vertex_route(project: str | None, location: str, *, base_url: str | None = None) -> tuple[str, str]:
    """(host, path before ``{model}:generateContent``) for ``api.backend: vertex``; express mode without a
    *project*. *base_url* replaces the host (a proxy, the simulator). ConfigError for a bad project or location."""
    root = (base_url or vertex_base_url(location)).rstrip("/")
    if project is None:
        return root, "/v1/publishers/google/models/"
    path = vertex_url(project, location, "MODEL", base_url=root)[len(root) :]
    return root, path.removesuffix("MODEL:generateContent")


def vertex_auth(project: str | None, credentials_file: str | None, api_key: str | None) -> VertexAuth | None:
    """The OAuth2 auth for a *project* (the key file, else Application Default Credentials); None in express
    mode (no project), which sends the API key instead. ConfigError when neither can work."""
    check_vertex_auth(project, credentials_file, api_key)
    if project is None:
        return None
    if credentials_file:
        return VertexAuth.from_service_account_file(credentials_file)
    return VertexAuth.application_default()


def check_vertex_auth(project: str | None, credentials_file: str | None, api_key: str | None) -> None:
    """ConfigError for what :func:`vertex_auth` refuses that this machine can tell alone: express mode (no
    *project*) without an API key, a key file that is no service-account key (read, no token fetched).
    Application Default Credentials are not looked for: google-auth may ask the metadata server for them."""
    if project is None and not api_key:
        raise ConfigError(
            "api.backend: vertex needs api.project (with Google credentials), or an API key for express mode"
        )
    if project is not None and credentials_file:
        _service_account(credentials_file)
