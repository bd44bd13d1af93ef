"""The ASGI app: routing, auth, quotas, faults, latency, then the edited image."""

from __future__ import annotations

import functools
import hmac
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..models import ALIASES, MODELS, MONEY_ERRORS, lifecycle, lookup
from ._fetch import fetch_files
from ._oauth import TokenIssuer
from .batch import BatchService
from .config import SimulatorConfig
from .errors import RATE_LIMITS_URL, InvalidRequest, SimulatedDrop, google_error, quota_failure, retry_info
from .faults import DailyQuota, Draw, SlidingWindow, draw
from .flaws import QA_FLAWS, flaw_in
from .imaging import load_canned, render
from .responses import Usage, blocked_body, finish_body, image_body, text_body
from .validation import ParsedRequest, parse_request

__all__ = ["SimulatorStats", "create_app"]

logger = logging.getLogger("nanobatch.simulator")

API_VERSIONS = ("v1", "v1beta", "v1alpha")
FAULT_429_RETRY_S = 2.0
TEXT_ONLY_REPLY = "Sure! Here is the image with the requested change:"
_UNAUTHENTICATED = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other "
    "valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_INVALID_TOKEN = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid "
    "authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
Endpoint = Callable[[Request], Awaitable[Response]]
# Unconfirmed wording: Google's flex page says shed requests fail and should be retried or sent at standard.
FLEX_SHED_MESSAGE = (
    "The flex tier has no capacity for this request right now. Please retry later or use the standard tier."
)
_ERRORS = {
    "503": (503, "The model is overloaded. Please try again later."),
    "500": (
        500,
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    "504": (504, "Deadline expired before operation could complete."),
}


@dataclass(slots=True)
class SimulatorStats:
    """Live counters, read by tests and benchmarks (mutable on purpose: requests update them)."""

    received: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    dropped: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    images: int = 0
    tokens: int = 0  # sum of the totalTokenCount of every 200
    in_flight: int = 0
    max_in_flight: int = 0
    # What the top-level "store" said ("true", "false", "absent") in each request answered with a generated
    # reply, online or a batch line: what a request asked Google to keep.
    store: Counter[str] = field(default_factory=Counter)


def live_model_entries() -> list[dict[str, object]]:
    """Entries like Google's ``models.list``: every model id that is not shut down, plus a text model."""
    entries: list[dict[str, object]] = [{
        "name": "models/gemini-3.5-flash", "displayName": "Gemini 3.5 Flash", "version": "3.5",
        "supportedGenerationMethods": ["generateContent", "countTokens", "batchGenerateContent"],
    }]  # fmt: skip
    for model_id in (*MODELS, *ALIASES):
        life = lifecycle(model_id)
        if life is None or life.status() == "shut down":
            continue
        entries.append({
            "name": f"models/{model_id}",
            "displayName": model_id.removeprefix("gemini-").replace("-", " ").title(),
            "version": "001",
            "inputTokenLimit": 131072 if "lite" not in model_id else 65536,
            "outputTokenLimit": 32768 if "lite" not in model_id else 4096,
            "supportedGenerationMethods": ["generateContent", "countTokens", "batchGenerateContent"],
            "thinking": bool(MODELS[model_id].supports_thinking) if model_id in MODELS else True,
        })  # fmt: skip
    return entries


class _Dropped(Response):
    """Stands for "no response": the connection was aborted."""


def create_app(
    config: SimulatorConfig | None = None,
    *,
    clock: Callable[[], float] = anyio.current_time,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> Starlette:
    """A Starlette app serving ``POST /{version}/models/{model}:generateContent``, and the Files
    and Batch APIs (see :mod:`.batch`).

    It also serves Vertex AI's path for the same call
    (``/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent``, with an
    OAuth2 bearer token from its own ``POST /token``, or the API key as in Vertex express mode, whose
    ``/v1/publishers/google/models/{model}:generateContent`` it serves too).

    ``app.state.stats`` holds a SimulatorStats, ``app.state.batches`` the batch
    jobs and files. *clock* (read only inside requests) and *sleep* let tests
    drive time by hand; the defaults follow the event loop, so a virtual clock
    (trio's MockClock) drives them too.

    >>> import httpx2
    >>> client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=create_app()), base_url="http://sim")
    """
    config = config or SimulatorConfig()
    simulator = _Simulator(config, clock, sleep)
    batches = BatchService(config, compose=simulator.compose, guard=simulator.guard, clock=clock)
    vertex = "/v1/projects/{project}/locations/{location}/publishers/google/models/{target}"
    # The batch routes come first: "/{version}/models/{target}" would take ":batchGenerateContent" too.
    app = Starlette(
        routes=[
            *batches.routes(),
            Route("/{version}/models", simulator.list_models, methods=["GET"]),
            Route("/{version}/models/{target}", simulator.handle, methods=["POST"]),
            Route(vertex, simulator.handle, methods=["POST"]),
            Route("/v1/publishers/google/models/{target}", simulator.handle, methods=["POST"]),  # express mode
            Route("/token", simulator.tokens.handle, methods=["POST"]),
        ]
    )
    app.state.config = config
    app.state.stats = simulator.stats
    app.state.tokens = simulator.tokens
    app.state.batches = batches
    # Set by the uvicorn runner: aborts a client's TCP connection, for "drop" faults.
    app.state.abort_connection = None
    return app


class _Simulator:
    def __init__(
        self, config: SimulatorConfig, clock: Callable[[], float], sleep: Callable[[float], Awaitable[None]]
    ) -> None:
        self.config = config
        self.stats = SimulatorStats()
        self._rng = random.Random(config.seed)
        self._sleep = sleep
        self._rpm = SlidingWindow(config.rpm_limit, 60.0 * config.time_scale, clock) if config.rpm_limit else None
        self._daily = DailyQuota(config.daily_limit) if config.daily_limit else None
        self._canned = load_canned(config.canned) if config.canned else None
        self.tokens = TokenIssuer(clock)

    async def list_models(self, request: Request) -> Response:
        """``GET /{version}/models``: the live image models (not shut-down ids), paged by ``nextPageToken``."""
        if (denied := self._check_key(request)) is not None:
            return denied
        entries = live_model_entries()
        try:
            size = max(1, min(1000, int(request.query_params.get("pageSize", "50"))))
            start = int(request.query_params.get("pageToken") or 0)
        except ValueError:
            return google_error(400, "Invalid page size or page token.")
        body: dict[str, object] = {"models": entries[start : start + size]}
        if start + size < len(entries):
            body["nextPageToken"] = str(start + size)
        return JSONResponse(body)

    async def handle(self, request: Request) -> Response:
        stats = self.stats
        stats.received += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            response = await self._respond(request)
        except SimulatedDrop:
            stats.dropped += 1
            raise
        finally:
            stats.in_flight -= 1
        if isinstance(response, _Dropped):
            stats.dropped += 1
            logger.debug("%s %s -> connection dropped", request.method, request.url.path)
        else:
            stats.by_status[response.status_code] += 1
            logger.debug("%s %s -> %d", request.method, request.url.path, response.status_code)
        return response

    def guard(self, endpoint: Endpoint) -> Endpoint:
        """*endpoint* behind the API key check, counted in the stats (for the Files and Batch APIs)."""

        async def guarded(request: Request) -> Response:
            self.stats.received += 1
            version = request.path_params["version"]
            response = (
                google_error(404, f"API version {version} is not served here.") if version not in API_VERSIONS
                else self._check_key(request) or await endpoint(request)
            )  # fmt: skip
            self.stats.by_status[response.status_code] += 1
            logger.debug("%s %s -> %d", request.method, request.url.path, response.status_code)
            return response

        return guarded

    async def _respond(self, request: Request) -> Response:
        version = request.path_params.get("version", "v1")  # Vertex's path has no version segment to vary
        model_id, _, method = request.path_params["target"].partition(":")
        if method != "generateContent":
            return google_error(404, f"models/{model_id}:{method} is not supported by the simulator")
        if (denied := self._check_auth(request)) is not None:
            return denied
        model = lookup(model_id)
        life = lifecycle(model_id)
        if model is None or version not in API_VERSIONS or (life is not None and life.status() == "shut down"):
            return google_error(
                404,
                f"models/{model_id} is not found for API version {version}, or is not supported for "
                "generateContent. Call ListModels to see the list of available models and their supported methods.",
            )
        try:
            # Vertex AI's paths (no {version}) refuse "store", as Vertex does
            vertex = "version" not in request.path_params
            parsed = parse_request(await request.body(), model=model, model_id=model_id, vertex=vertex)
            parsed = await fetch_files(parsed)  # fileData URLs on this machine (a pre-signed S3 URL, say)
        except InvalidRequest as exc:
            return google_error(exc.code, exc.message)
        if (refused := self._check_quota(parsed)) is not None:
            return refused
        if parsed.service_tier == "flex" and self.config.flex_shed and self._rng.random() < self.config.flex_shed:
            self.stats.faults["flex_shed"] += 1
            return google_error(503, FLEX_SHED_MESSAGE)
        return await self._generate(request, parsed, draw(self.config, self._rng))

    def _check_auth(self, request: Request) -> Response | None:
        """On Vertex's path a bearer token must be one /token issued; an API key works as in express mode."""
        bearer = request.headers.get("authorization", "")
        if "project" not in request.path_params or bearer[:7].lower() != "bearer ":
            return self._check_key(request)
        if self.tokens.valid(bearer[7:].strip()):
            return None
        return google_error(401, _INVALID_TOKEN)

    def _check_key(self, request: Request) -> Response | None:
        expected = self.config.api_key
        if expected is None:
            return None
        authorization = request.headers.get("authorization", "")
        bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        given = request.headers.get("x-goog-api-key") or bearer or request.query_params.get("key") or ""
        if not given:
            return google_error(401, _UNAUTHENTICATED)
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return google_error(403, "API key not valid. Please pass a valid API key.")
        return None

    def _check_quota(self, parsed: ParsedRequest) -> Response | None:
        if self._daily is not None and self._daily.exhausted:
            return self._quota_error(
                parsed, "GenerateRequestsPerDayPerProjectPerModel", "generate_requests_per_model_per_day",
                self._daily.limit, None,
            )  # fmt: skip
        if self._rpm is not None and (wait := self._rpm.acquire()) is not None:
            return self._quota_error(
                parsed, "GenerateRequestsPerMinutePerProjectPerModel", "generate_requests_per_model",
                self._rpm.limit, wait,
            )  # fmt: skip
        return None

    def _quota_error(
        self, parsed: ParsedRequest, quota_id: str, metric: str, limit: int, wait: float | None
    ) -> Response:
        model = parsed.model.id
        message = (
            "You exceeded your current quota, please check your plan and billing details. For more information on "
            f"this error, head to: {RATE_LIMITS_URL}.\n* Quota exceeded for metric: "
            f"generativelanguage.googleapis.com/{metric}, limit: {limit}, model: {model}"
        )
        details = quota_failure(quota_id=quota_id, metric=f"generativelanguage.googleapis.com/{metric}",
                                model=model, limit=limit)  # fmt: skip
        if wait is not None:
            info = retry_info(wait)
            message += f"\nPlease retry in {info['retryDelay']}."
            details.append(info)
        return google_error(429, message, details)

    async def _generate(self, request: Request, parsed: ParsedRequest, chance: Draw) -> Response:
        fault = chance.fault
        if fault is not None:
            self.stats.faults[fault] += 1
        if fault == "429":
            return google_error(
                429,
                "Resource has been exhausted (e.g. check quota).",
                [retry_info(FAULT_429_RETRY_S * self.config.time_scale)],
            )
        if fault == "503":
            return google_error(*_ERRORS[fault])
        if fault in MONEY_ERRORS:  # money, not speed: answered at once, as Google does
            shape = MONEY_ERRORS[fault]
            return google_error(shape.status, shape.message, status=shape.status_word)
        if fault == "blocked":
            return self._ok(parsed, *blocked_body(parsed, chance))  # answered at once, without the model's latency
        seconds = chance.latency_s * self.config.time_scale
        if seconds > 0:
            await self._sleep(seconds)
        if fault in ("500", "504"):
            return google_error(*_ERRORS[fault])
        if fault == "drop":
            return await self._drop(request)
        served = "standard" if fault == "priority_standard" and parsed.service_tier == "priority" else None
        try:
            return self._ok(parsed, *await self.compose(parsed, chance), served=served)
        except InvalidRequest as exc:
            return google_error(exc.code, exc.message)

    async def compose(self, parsed: ParsedRequest, chance: Draw) -> tuple[dict[str, Any], Usage]:
        """The 200 body for *parsed*, with the content faults of *chance*; raises InvalidRequest.

        Shared by generateContent and the batch jobs, so a batch line is answered like a request.
        """
        fault = chance.fault
        self.stats.store["absent" if parsed.store is None else str(parsed.store).lower()] += 1
        if fault == "blocked":
            return blocked_body(parsed, chance)
        if fault == "image_safety":
            return finish_body(parsed, chance, "IMAGE_SAFETY")
        if fault == "no_image":
            return finish_body(parsed, chance, "NO_IMAGE")
        if fault == "text_only":
            return text_body(parsed, chance, TEXT_ONLY_REPLY)
        if "IMAGE" not in parsed.modalities:
            return text_body(parsed, chance, f"Here is how I would do it: {parsed.instruction}")
        # A bad image for the output checks: the item's marker, else a drawn fault (rendered even when canned).
        flaw = flaw_in(parsed.instruction) or (fault if fault in QA_FLAWS else None)
        rendered = None if flaw else self._canned
        if rendered is None:
            job = functools.partial(
                render,
                parsed,
                image_format=parsed.image_format or self.config.image_format,
                seed=chance.image_seed,
                thought_image=chance.thought_image and parsed.model.supports_thinking,
                flaw=flaw,
            )
            rendered = await anyio.to_thread.run_sync(job)
        self.stats.images += 1
        if fault == "bad_image":
            rendered = replace(rendered, data=rendered.data[: len(rendered.data) // 2])
        return image_body(parsed, chance, rendered)

    def _ok(self, parsed: ParsedRequest, body: dict[str, Any], usage: Usage, *, served: str | None = None) -> Response:
        if self._daily is not None:
            self._daily.used += 1
        self.stats.tokens += usage.total()
        # Which tier served (and billed) it, where the Gemini API says so: a priority request past priority's limit
        # is served at standard (docs/simulator.md).
        return JSONResponse(body, headers={"x-gemini-service-tier": served or parsed.service_tier})

    async def _drop(self, request: Request) -> Response:
        """Abort the TCP connection (uvicorn), or raise SimulatedDrop (in-process)."""
        abort = request.app.state.abort_connection
        if abort is None or not abort(request.client):
            raise SimulatedDrop()
        # Wait until the server has noticed, so it sends nothing for this request.
        with anyio.move_on_after(5):
            while (await request.receive())["type"] != "http.disconnect":
                pass
        return _Dropped(status_code=500)
