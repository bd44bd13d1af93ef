"""Vertex AI: URLs, and google-auth service-account tokens fetched from the simulator's OAuth2 endpoint."""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from nanobatch.api.vertex import VertexAuth, vertex_express_url, vertex_url
from nanobatch.errors import ConfigError, FatalApiError
from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread

from .fakes import image_bytes, inline

MODEL = "gemini-3.1-flash-image"
BODY = {
    "contents": [{"role": "user", "parts": [{"text": "make the sky purple"}, inline(image_bytes())]}],
    "generationConfig": {"responseModalities": ["IMAGE"]},
}


@pytest.mark.parametrize(
    ("location", "url"),
    [
        pytest.param(
            "global",
            f"https://aiplatform.googleapis.com/v1/projects/shop-123/locations/global/publishers/google/models/{MODEL}"
            ":generateContent",
            id="global",
        ),
        pytest.param(
            "us-central1",
            "https://us-central1-aiplatform.googleapis.com/v1/projects/shop-123/locations/us-central1/publishers/"
            f"google/models/{MODEL}:generateContent",
            id="regional",
        ),
        pytest.param(
            "eu",  # a multi-region: "eu-aiplatform.googleapis.com" does not exist (google-genai's own URL)
            "https://aiplatform.eu.rep.googleapis.com/v1/projects/shop-123/locations/eu/publishers/"
            f"google/models/{MODEL}:generateContent",
            id="multi-region",
        ),
    ],
)
def test_vertex_url_by_location(location: str, url: str) -> None:
    assert vertex_url("shop-123", location, MODEL) == url


@pytest.mark.parametrize(
    ("project", "location", "setting"),
    [
        pytest.param("", "global", "api.project", id="no-project"),
        pytest.param("shop/../x", "global", "api.project", id="path-in-project"),
        pytest.param("shop-123", "US Central", "api.location", id="bad-location"),
        pytest.param("shop-123", "", "api.location", id="no-location"),
    ],
)
def test_bad_project_or_location_is_a_config_error_naming_the_setting(
    project: str, location: str, setting: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{setting}: "):
        vertex_url(project, location, MODEL)


@pytest.fixture
def simulator() -> Iterator[tuple[str, Any]]:
    app = create_app(SimulatorConfig(seed=3, api_key="express-key"))
    with run_in_thread(app=app) as base_url:
        yield base_url, app


@pytest.fixture
def auth_for(tmp_path: Path) -> Iterator[Callable[[str], VertexAuth]]:
    """VertexAuth from a fresh service-account key file whose token_uri is the given URL."""
    made: list[VertexAuth] = []

    def make(token_uri: str) -> VertexAuth:
        made.append(VertexAuth.from_service_account_file(str(_key_file(tmp_path, token_uri))))
        return made[-1]

    yield make
    for auth in made:
        auth.close()


def _key_file(folder: Path, token_uri: str) -> Path:
    """A service-account key file like the one Cloud Console downloads, with a fresh RSA key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "shop-123",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": "nanobatch@shop-123.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    path = folder / "key.json"
    path.write_text(json.dumps(info))
    return path


async def test_a_service_account_token_from_the_token_endpoint_authenticates_vertex_calls(
    simulator: tuple[str, Any], auth_for: Callable[[str], VertexAuth], caplog: pytest.LogCaptureFixture
) -> None:
    base_url, app = simulator
    caplog.set_level(logging.DEBUG, logger="nanobatch")
    auth = auth_for(f"{base_url}/token")
    url = vertex_url("shop-123", "europe-west4", MODEL, base_url=base_url)

    async with httpx2.AsyncClient(auth=auth, timeout=30) as client:
        first = await client.post(url, json=BODY)
        second = await client.post(url, json=BODY)
        forged = await client.post(url, json=BODY, auth=_Bearer("ya29.forged"))

    assert first.status_code == 200 and second.status_code == 200, first.text
    assert first.json()["candidates"][0]["content"]["parts"]
    assert app.state.tokens.issued == 1  # the token is reused while it is valid
    assert forged.status_code == 401
    token = await auth.token()
    assert token.startswith("ya29.sim-") and token not in caplog.text


async def test_each_access_token_fetched_is_known_to_redaction_from_then_on(
    simulator: tuple[str, Any], auth_for: Callable[[str], VertexAuth]
) -> None:
    # A proxy in front of Vertex AI may echo the Authorization header: whatever shape the token has, it is cut.
    from nanobatch.api.redaction import SECRETS

    base_url, _ = simulator
    token = await auth_for(f"{base_url}/token").token()
    assert SECRETS.found_in(f"proxy refused: Authorization: Bearer {token}")


async def test_a_token_about_to_expire_is_refreshed_before_it_is_sent(
    simulator: tuple[str, Any], auth_for: Callable[[str], VertexAuth]
) -> None:
    base_url, app = simulator
    auth = auth_for(f"{base_url}/token")
    old = await auth.token()
    soon = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + datetime.timedelta(seconds=60)
    auth._credentials.expiry = soon  # as if an hour had passed

    new = await auth.token()

    assert new != old and app.state.tokens.issued == 2
    assert await auth.token() == new


async def test_application_default_credentials_find_the_key_file_named_in_the_environment(
    simulator: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, app = simulator
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(_key_file(tmp_path, f"{base_url}/token")))
    auth = VertexAuth.application_default()
    try:
        assert (await auth.token()).startswith("ya29.sim-")
    finally:
        auth.close()
    assert app.state.tokens.issued == 1


async def test_a_refused_token_request_stops_the_run_without_showing_the_key(
    simulator: tuple[str, Any], auth_for: Callable[[str], VertexAuth]
) -> None:
    base_url, _ = simulator
    auth = auth_for(f"{base_url}/no-such-token-endpoint")

    with pytest.raises(FatalApiError) as caught:
        await auth.token()

    assert caught.value.kind == "auth"
    assert "PRIVATE KEY" not in str(caught.value)


async def test_express_mode_takes_the_api_key(simulator: tuple[str, Any]) -> None:
    base_url, _ = simulator
    vertex = vertex_url("shop-123", "global", MODEL, base_url=base_url)
    express = vertex_express_url(MODEL, base_url=base_url)
    key = {"x-goog-api-key": "express-key"}
    async with httpx2.AsyncClient(timeout=30) as client:
        answers = [await client.post(url, json=BODY, headers=key) for url in (vertex, express)]
        keyless = await client.post(express, json=BODY)
    assert [a.status_code for a in answers] == [200, 200]
    assert keyless.status_code == 401


def test_a_key_file_that_is_not_one_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text('{"type": "service_account"}')
    with pytest.raises(ConfigError, match=r"key\.json: not a readable service-account key"):
        VertexAuth.from_service_account_file(str(path))


class _Bearer(httpx2.Auth):
    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx2.Request) -> Iterator[httpx2.Request]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


@pytest.mark.parametrize(
    ("form", "error"),
    [
        pytest.param({"grant_type": "client_credentials"}, "unsupported_grant_type", id="other-grant"),
        pytest.param(
            {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "a.b"},
            "invalid_grant",
            id="not-a-jwt",
        ),
        pytest.param(
            {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "e30.e30.c2ln"},
            "invalid_grant",
            id="no-claims",
        ),
    ],
)
async def test_the_token_endpoint_refuses_what_google_would(form: dict[str, str], error: str) -> None:
    app = create_app(SimulatorConfig(seed=3))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://sim") as client:
        answer = await client.post("/token", data=form)
    assert answer.status_code == 400 and answer.json()["error"] == error
    assert app.state.tokens.issued == 0


def _vertex_settings(base_url: str, **more: str) -> Any:
    from nanobatch.config import load_settings

    values = {"api.backend": "vertex", "api.base_url": base_url, "api.model": MODEL, **more}
    return load_settings(env={}, overrides=values)


async def test_a_job_runs_on_vertex_with_a_service_account_key_file(
    simulator: tuple[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import nanobatch

    from .fakes import records, write_job

    base_url, app = simulator
    caplog.set_level(logging.DEBUG, logger="nanobatch")
    key = _key_file(tmp_path, f"{base_url}/token")
    settings = _vertex_settings(
        base_url, **{"api.project": "shop-123", "api.location": "europe-west4", "api.credentials_file": str(key)}
    )
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}, {"id": "sku-2", "image": "images/2.png"}])

    summary = await nanobatch.run_job(job, settings=settings, out_dir=tmp_path / "out")

    assert summary.exit_code == 0 and summary.stats.ok == 2
    assert app.state.tokens.issued == 1 and app.state.stats.by_status[200] == 2  # one token for the run
    assert [r["status"] for r in records(tmp_path / "out")] == ["ok", "ok"]
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file())
    assert b"ya29.sim-" not in written and b"ya29.sim-" not in caplog.text.encode()


async def test_a_job_runs_in_vertex_express_mode_with_the_api_key(
    simulator: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nanobatch

    from .fakes import write_job

    base_url, app = simulator
    monkeypatch.setenv("NANOBATCH_API_KEY", "express-key")
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}])

    summary = await nanobatch.run_job(job, settings=_vertex_settings(base_url), out_dir=tmp_path / "out")

    assert summary.exit_code == 0 and app.state.tokens.issued == 0 and app.state.stats.by_status[200] == 1


def test_validate_refuses_a_model_vertex_does_not_serve(tmp_path: Path) -> None:
    import nanobatch
    from nanobatch.errors import ManifestError

    from .fakes import write_job

    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png", "model": "gemini-nano-banana-2.1"}])
    settings = _vertex_settings("https://aiplatform.googleapis.com", **{"api.project": "shop-123"})

    with pytest.raises(ManifestError) as caught:
        nanobatch.check_job(job, settings=settings, out_dir=tmp_path / "out")

    (problem,) = caught.value.problems
    assert (problem.item, problem.field) == ("sku-1", "model")
    assert "does not serve gemini-nano-banana-2.1" in problem.message and "gemini-3-pro-image" in problem.message
    gemini = _vertex_settings("https://aiplatform.googleapis.com", **{"api.backend": "gemini"})
    assert nanobatch.check_job(job, settings=gemini, out_dir=tmp_path / "out").items == 1


_PUBLISHER = "projects/shop-123/locations/global/publishers/google/models/gemini-3-pro-image"


@pytest.mark.parametrize(
    ("status", "body", "kind", "hint"),
    [
        pytest.param(
            429,
            {
                "code": 429,
                "status": "RESOURCE_EXHAUSTED",
                "message": "Resource exhausted. Please try "
                "again later. Please refer to https://cloud.google.com/vertex-ai/generative-ai/docs/"
                "error-code-429 for more details.",
            },
            "rate_limited",
            None,
            id="shared-capacity-429",
        ),
        pytest.param(
            404,
            {
                "code": 404,
                "status": "NOT_FOUND",
                "message": f"Publisher Model `{_PUBLISHER}` was not found or your project does not have access to it.",
            },
            "not_found",
            "api.location",
            id="model-not-in-location",
        ),
        pytest.param(
            403,
            {
                "code": 403,
                "status": "PERMISSION_DENIED",
                "message": "Permission 'aiplatform.endpoints."
                f"predict' denied on resource '//aiplatform.googleapis.com/{_PUBLISHER}'",
            },
            "permission",
            "roles/aiplatform.user",
            id="no-iam-role",
        ),
        pytest.param(
            401,
            {
                "code": 401,
                "status": "UNAUTHENTICATED",
                "message": "Request had invalid authentication credentials.",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "ACCESS_TOKEN_EXPIRED",
                        "domain": "aiplatform.googleapis.com",
                    }
                ],
            },
            "auth",
            "api.credentials_file",
            id="token-refused",
        ),
    ],
)
def test_vertex_error_bodies_are_classified_with_vertex_hints(
    status: int, body: dict[str, Any], kind: str, hint: str | None
) -> None:
    from nanobatch.api.causes import classify_error

    error = classify_error(status, {}, json.dumps([{"error": body}]).encode())  # Vertex may wrap it in a list

    assert error.kind == kind
    assert isinstance(error, FatalApiError) == (hint is not None)
    if hint is not None:
        assert hint in error.message and "API key" not in error.message


@pytest.mark.parametrize(
    ("traffic", "tier"),
    [("ON_DEMAND", "standard"), ("ON_DEMAND_FLEX", "flex"), ("ON_DEMAND_PRIORITY", "priority"),
     ("PROVISIONED_THROUGHPUT", None)],
)  # fmt: skip
def test_vertex_traffic_type_is_kept_verbatim_and_read_as_a_tier(traffic: str, tier: str | None) -> None:
    from nanobatch import costs
    from nanobatch.api.gemini import parse_reply, sum_usage

    from .fakes import ok_body

    usage = {"promptTokenCount": 10, "candidatesTokenCount": 1120, "totalTokenCount": 1130, "trafficType": traffic}
    reply = parse_reply(json.dumps(ok_body(usage=usage)).encode())

    assert reply.usage["trafficType"] == traffic and costs.reported_tier(reply.usage) == tier
    assert sum_usage([reply.usage, reply.usage])["trafficType"] == traffic  # a multi-step item keeps it
    assert "trafficType" not in sum_usage([reply.usage, {**reply.usage, "trafficType": "OTHER"}])


@pytest.mark.parametrize("model", ["gemini-2.5-flash-image", "gemini-3-pro-image-preview"])
def test_validate_refuses_a_shut_down_model_on_vertex_as_at_google(tmp_path: Path, model: str) -> None:
    import nanobatch
    from nanobatch.errors import ManifestError

    from .fakes import write_job

    # A preview id that proxies still map is refused too: Vertex is Google's own endpoint, whatever its base URL.
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png", "model": model}])
    settings = _vertex_settings("https://api.apiyi.com", **{"api.project": "shop-123"})

    with pytest.raises(ManifestError, match="was shut down at Google") as err:
        nanobatch.check_job(job, settings=settings, out_dir=tmp_path / "out")
    # Its replacement's hint names only a model Vertex serves (gemini-nano-banana-2.1 is the Gemini API's alone).
    assert "gemini-nano-banana-2.1" not in str(err.value)


async def test_output_format_asks_vertex_for_jpeg_and_is_refused_for_the_gemini_api(
    simulator: tuple[str, Any], tmp_path: Path
) -> None:
    import nanobatch
    from nanobatch.errors import ManifestError

    from .fakes import records, write_job

    base_url, _ = simulator
    key = _key_file(tmp_path, f"{base_url}/token")
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png", "output_format": "jpeg"}])
    vertex = _vertex_settings(base_url, **{"api.project": "shop-123", "api.credentials_file": str(key)})

    summary = await nanobatch.run_job(job, settings=vertex, out_dir=tmp_path / "out")

    assert summary.exit_code == 0 and records(tmp_path / "out")[0]["outputs"] == ["sku-1.jpg"]
    assert (tmp_path / "out" / "sku-1.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    with pytest.raises(ManifestError) as caught:
        nanobatch.check_job(job, settings=_vertex_settings(base_url, **{"api.backend": "gemini"}))
    assert [(p.item, p.field) for p in caught.value.problems] == [("sku-1", "output_format")]
    job.write_text(job.read_text().replace("output_format: jpeg", "output_format: gif"))
    with pytest.raises(ManifestError, match="must be png or jpeg"):
        nanobatch.check_job(job, settings=vertex)


# -- the commands on a Vertex configuration, against the simulator's Vertex path -----------------------------


@pytest.fixture
def vertex_config(simulator: tuple[str, Any], tmp_path: Path) -> Path:
    """A config file for Vertex AI in a project, with a service-account key whose token endpoint is the
    simulator's, as a user writes one (the simulator standing in for Vertex's host)."""
    base_url, _ = simulator
    key = _key_file(tmp_path, f"{base_url}/token")
    api = {"backend": "vertex", "base_url": base_url, "model": MODEL, "project": "shop-123",
           "location": "europe-west4", "credentials_file": str(key)}  # fmt: skip
    path = tmp_path / "vertex.yaml"
    path.write_text("api:\n" + "".join(f"  {name}: {json.dumps(value)}\n" for name, value in api.items()))
    return path


def _vertex_run(config: Path, *args: str) -> tuple[int, Path]:
    """`nanobatch run` of a one-item job with the Vertex *config*; (exit code, output folder)."""
    from nanobatch.cli.main import main

    from .fakes import write_job

    job = write_job(config.parent, [{"id": "sku-1", "image": "images/1.png"}])
    out = config.parent / "out"
    return main(["run", str(job), "--config", str(config), "--out", str(out), "--quiet", *args]), out


def test_status_of_a_vertex_run_reads_the_folder_and_sends_nothing(
    simulator: tuple[str, Any], vertex_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanobatch.cli.main import main

    _, app = simulator
    code, out = _vertex_run(vertex_config)
    assert code == 0 and app.state.tokens.issued == 1
    received = app.state.stats.received
    capsys.readouterr()

    assert main(["status", str(out)]) == 0

    assert f"{out}: 1 items: 1 ok, 0 failed, 0 blocked" in capsys.readouterr().out
    assert app.state.stats.received == received and app.state.tokens.issued == 1


def test_cancel_on_a_vertex_configuration_says_it_has_no_batch_jobs_and_sends_nothing(
    simulator: tuple[str, Any], vertex_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanobatch.cli.main import main

    _, app = simulator
    code, out = _vertex_run(vertex_config)
    assert code == 0
    received, issued = app.state.stats.received, app.state.tokens.issued
    capsys.readouterr()

    assert main(["cancel", str(out), "--config", str(vertex_config)]) == 2

    seen = capsys.readouterr()
    assert seen.out == "" and seen.err.count("\n") == 1
    assert seen.err.startswith("error: api.backend is vertex, which makes no batch jobs")
    assert "give cancel the Gemini API configuration" in seen.err
    assert (app.state.stats.received, app.state.tokens.issued) == (received, issued)


def test_the_batch_tier_on_a_vertex_configuration_is_refused_before_anything_is_sent(
    simulator: tuple[str, Any], vertex_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, app = simulator

    code, _ = _vertex_run(vertex_config, "--tier", "batch")

    assert code == 2
    assert capsys.readouterr().err == (  # the tier named where it was written: the option
        "error: --tier: the batch tier goes through the Gemini API's Batch API, which Vertex AI (api.backend: vertex) "
        "does not offer; use the flex tier on Vertex for half price online\n"
    )
    assert app.state.stats.received == 0 and app.state.tokens.issued == 0 and not app.state.batches._jobs


@pytest.mark.parametrize("mode", ["project", "express"])
def test_models_live_on_a_vertex_configuration_exits_2_saying_why(
    simulator: tuple[str, Any],
    vertex_config: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    from nanobatch.cli.main import main

    _, app = simulator
    if mode == "express":  # an API key and no project: the key must not show in what the user sees
        monkeypatch.setenv("NANOBATCH_API_KEY", "express-key")
        vertex_config.write_text("".join(line + "\n" for line in vertex_config.read_text().splitlines()
                                         if "project" not in line and "credentials_file" not in line))  # fmt: skip

    assert main(["models", "--live", "--config", str(vertex_config)]) == 2

    seen = capsys.readouterr()
    assert seen.out == "" and seen.err.count("\n") == 1
    assert seen.err.startswith("error: models --live compares with the Gemini API's list of models, and Vertex AI")
    assert "express-key" not in seen.err
    assert app.state.stats.received == 0 and app.state.tokens.issued == 0


async def test_the_opener_sends_vertex_requests_to_the_project_path_and_shows_no_key(
    simulator: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanobatch.api.connect import connect
    from nanobatch.api.credentials import api_key_for

    base_url, app = simulator
    monkeypatch.setenv("NANOBATCH_API_KEY", "express-key")
    key = _key_file(tmp_path, f"{base_url}/token")
    in_project = _vertex_settings(base_url, **{"api.project": "shop-123", "api.credentials_file": str(key)})
    express = _vertex_settings(base_url)

    assert api_key_for(in_project, needed=True) is None  # the OAuth2 token stands in for the key
    for settings in (in_project, express):
        async with connect(settings, api_key=api_key_for(settings, needed=True)) as connection:
            assert "express-key" not in repr(connection) and base_url not in repr(connection)
            async with connection.gemini() as client:
                reply = await client.generate(MODEL, BODY, timeout_s=30)
            assert reply.images
            with pytest.raises(ConfigError, match=r"Vertex AI \(api.backend: vertex\) does not offer"):
                connection.batches()
    assert app.state.tokens.issued == 1 and app.state.stats.by_status[200] == 2


async def test_the_credentials_quota_project_is_sent_as_google_auth_sends_it() -> None:
    # gcloud's user credentials name the project billed for the calls: google-auth's apply() and google-genai send
    # it as x-goog-user-project; without it Vertex may refuse them, or count another project's quota.
    import datetime

    from google.oauth2.credentials import Credentials

    expiry = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + datetime.timedelta(hours=1)
    user = Credentials(token="ya29.user-token", quota_project_id="billing-456", expiry=expiry)
    auth = VertexAuth(user)
    seen: list[httpx2.Headers] = []
    transport = httpx2.MockTransport(lambda request: seen.append(request.headers) or httpx2.Response(200, json={}))
    try:
        async with httpx2.AsyncClient(transport=transport, auth=auth) as client:
            await client.post("https://aiplatform.googleapis.com/v1/x", json={})
    finally:
        auth.close()
    assert seen[0]["x-goog-user-project"] == "billing-456" and seen[0]["authorization"].startswith("Bearer ")
