"""Opening the API clients from the settings: where requests go, and with what credentials, decided once.

``run``, ``models --live`` and ``cancel`` open their clients here, so the Gemini API, a proxy, the built-in
simulator and Vertex AI (``api.backend: vertex``) are told apart in one place: the host and path, and Vertex's
OAuth2 token. Whether the credentials are there, and what a Vertex configuration cannot do (the Batch API, a
list of models), is :mod:`.credentials`', refused in words before anything is sent.

>>> async with connect(settings, api_key=credentials_for(settings, simulate=False, needed=True)) as connection:
...     async with connection.gemini() as client:
...         reply = await client.generate(model, body, timeout_s=300)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import httpx2

from ..config import ApiSettings, Settings
from .batch_api import BatchClient
from .client import GeminiClient
from .credentials import check_offered
from .vertex import vertex_auth, vertex_route

__all__ = ["Connection", "batch_client", "connect"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """Where the settings send requests, and with what: the clients it makes all go to the same endpoint.
    Made by :func:`connect`, which closes what it holds (the simulator, the token endpoint's connection)."""

    settings: Settings = field(repr=False)
    base_url: str = field(repr=False)  # may carry a proxy's user and password: never for a message
    api_key: str | None = field(repr=False)
    auth: str
    path_prefix: str | None = None  # Vertex AI's path before {model}:generateContent
    request_auth: httpx2.Auth | None = field(default=None, repr=False)  # Vertex AI's OAuth2 bearer token
    transport: httpx2.AsyncBaseTransport | None = field(default=None, repr=False)  # tests replace the network

    def gemini(self, spool: str | None = None) -> GeminiClient:
        """A client for ``generateContent`` (and the Gemini API's list of models); enter it to use it. Its worker
        processes write the images of the answers they decode into *spool* (a run's output folder)."""
        api = self.settings.api
        return GeminiClient(
            base_url=self.base_url,
            api_key=self.api_key,
            auth=self.auth,
            api_version=api.api_version,
            max_connections=self.settings.limits.concurrency,
            transport=self.transport,
            path_prefix=self.path_prefix,
            request_auth=self.request_auth,
            workers=self.settings.limits.workers,
            spool=spool,
        )

    def batches(self) -> BatchClient:
        """A client for the Batch and Files APIs at the same endpoint; ConfigError on Vertex AI."""
        return batch_client(self.settings, base_url=self.base_url, api_key=self.api_key, transport=self.transport)


def batch_client(
    settings: Settings,
    *,
    base_url: str,
    api_key: str | None,
    transport: httpx2.AsyncBaseTransport | None = None,
    spool: str | None = None,
) -> BatchClient:
    """A client for the Batch and Files APIs at *base_url* (a :class:`Connection`'s, or a client's
    ``base_url``); ConfigError on Vertex AI, which has no Batch API. *spool*: as :meth:`Connection.gemini`'s."""
    check_offered(settings, "batch")
    api = settings.api
    return BatchClient(
        base_url=base_url, api_key=api_key, auth=api.auth, api_version=api.api_version, transport=transport,
        workers=settings.limits.workers, spool=spool,
    )  # fmt: skip


@asynccontextmanager
async def connect(
    settings: Settings,
    *,
    api_key: str | None,
    simulator_url: str | None = None,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> AsyncIterator[Connection]:
    """The :class:`Connection` the settings describe, sending *api_key* (:func:`~.credentials.credentials_for`):
    to the API, to a proxy, to Vertex AI, or to the built-in simulator at *simulator_url* (no key, no token sent)."""
    api = settings.api
    simulate = simulator_url is not None
    async with AsyncExitStack() as stack:
        base_url = api.base_url
        if simulator_url is not None:
            base_url, api_key = simulator_url, None
        prefix, auth, request_auth = None, api.auth, None
        if api.backend == "vertex":
            # api.base_url, when changed from its default, replaces Vertex's host (a proxy, the simulator)
            custom = base_url if base_url != ApiSettings().base_url else None
            base_url, prefix = vertex_route(api.project, api.location, base_url=custom)
            if not simulate:
                request_auth = vertex_auth(api.project, api.credentials_file, api_key)
                if request_auth is not None:
                    stack.callback(request_auth.close)
            auth = "x-goog-api-key"  # express mode's key (with a project, no key is sent)
        yield Connection(
            settings=settings,
            base_url=base_url,
            api_key=api_key,
            auth=auth,
            path_prefix=prefix,
            request_auth=request_auth,
            transport=transport,
        )
