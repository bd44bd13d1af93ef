from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from nanobatch.item import WorkItem
from nanobatch.job.manifest import Manifest
from nanobatch.qa import QaSettings

from .emulators import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    SECRET,
    Bucket,
    Emulator,
    azurite,
    gcs_emulator,
    moto_s3,
    new_bucket,
)

T = TypeVar("T")


TEST_KEY = "test-key-0123456789"  # what every test finds in NANOBATCH_API_KEY, unless it sets or removes it


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test sees the developer's keys, config, OpenTelemetry set-up or current folder. Each finds a key of
    its own (:data:`TEST_KEY`), as a user's shell holds one: ``validate`` refuses a job with no key to send."""
    for name in list(os.environ):
        if name.startswith(("NANOBATCH_", "OTEL_")) or name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NANOBATCH_API_KEY", TEST_KEY)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield


@pytest.fixture(autouse=True)
def _no_secrets_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test starts with the credentials an earlier one made known (``api.redaction.SECRETS`` is the process's):
    a test of a leak would pass because another test's client had learnt its key."""
    from nanobatch.api.redaction import SECRETS

    monkeypatch.setattr(SECRETS, "_values", ())
    monkeypatch.setattr(SECRETS, "_json", ())


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures the "nanobatch" and root loggers (and captures warnings) for its process; undo that
    after each test so caplog sees logs."""
    names = ("nanobatch", "nanobatch.progress", "")
    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level) for n in names
    }
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)
    logging.captureWarnings(False)


def run_virtual(fn: Callable[[], Awaitable[T]], *, settle_s: float = 0.0) -> T:
    """Run *fn* on trio's virtual clock: sleeps take no real time, and time only moves when all tasks wait.

    Work handed to a thread (file writes, fsyncs, reading pictures) runs on the event loop's own thread here,
    so however long it takes in real time, the clock cannot jump while it works: on a loaded machine an fsync
    of 60 ms would otherwise let the clock skip a rewrite of the metrics file, or a request's turn. A task
    waiting for a worker process (``limits.workers``) counts as waiting; *settle_s* is how much real time the
    clock lets such processes have before it jumps, for tests where an early jump would change the outcome.
    """
    from unittest import mock

    from trio.testing import MockClock

    async def on_this_thread(func: Callable[..., T], *args: Any, **_options: Any) -> T:
        await anyio.lowlevel.checkpoint()
        return func(*args)

    clock = MockClock(autojump_threshold=settle_s)
    if not INLINE_THREADS:  # (a test whose thread calls back into the loop: anyio.from_thread)
        return anyio.run(fn, backend="trio", backend_options={"clock": clock})
    with mock.patch("anyio.to_thread.run_sync", on_this_thread):
        return anyio.run(fn, backend="trio", backend_options={"clock": clock})


INLINE_THREADS = True  # see run_virtual; a test sets it False (monkeypatch) for work that must run in a thread


@pytest.fixture
def virtual() -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    return run_virtual


@pytest.fixture
def before_2_5_flash_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lifecycle checks see a day when gemini-2.5-flash-image (shut down 2026-10-02) still answered."""
    import datetime

    from nanobatch import models

    monkeypatch.setattr(models, "today", lambda: datetime.date(2026, 9, 1))


@pytest.fixture(params=["libyaml", "pure-python"])
def yaml_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a YAML test on both parsers: libyaml's (the default where PyYAML has it) and PyYAML's own."""
    from nanobatch import safe_yaml

    loaders = safe_yaml.C_LOADERS if request.param == "libyaml" else safe_yaml.PURE_LOADERS
    if loaders is None:
        pytest.skip("PyYAML was built without libyaml")
    monkeypatch.setattr(safe_yaml, "LOADERS", loaders)
    return str(request.param)


# --- storage emulators on loopback (tests/emulators.py): one server per test module that asks for it ----------


@pytest.fixture(scope="module")
def s3_server() -> Iterator[Emulator]:
    yield from moto_s3()


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[Emulator]:
    yield from gcs_emulator()


@pytest.fixture
def s3_env(s3_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)  # the developer's own AWS setup must not leak in
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3_server


@pytest.fixture
def gcs_env(gcs_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    # gcsfs 2026 first probes a bucket's layout over gRPC, which an emulator never answers (3 x 60 s).
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    return gcs_server


@pytest.fixture(scope="module")
def az_server() -> Iterator[Emulator]:
    yield from azurite()


@pytest.fixture
def az_env(az_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={az_server.url};"
    )
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
    for name in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # the developer's own Azure setup must not leak in
    import adlfs

    adlfs.AzureBlobFileSystem.clear_instance_cache()
    return az_server


ENV_FIXTURES = {"s3": "s3_env", "gs": "gcs_env", "az": "az_env"}


@pytest.fixture(params=["s3", "gs", "az"])
def bucket(request: pytest.FixtureRequest) -> Bucket:
    server: Emulator = request.getfixturevalue(ENV_FIXTURES[request.param])
    found = Bucket(request.param, new_bucket(request.param), server)
    server.log.clear()
    return found


@pytest.fixture
def without_module(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``without_module("s3fs")``: importing that module fails from then on, as if it were not installed."""

    def hide(missing: str) -> None:
        import importlib

        real_import = importlib.import_module

        def fake_import(name: str, *args: Any) -> Any:
            if name == missing:
                raise ImportError(f"No module named {missing!r}")
            return real_import(name, *args)

        monkeypatch.setattr(importlib, "import_module", fake_import)

    return hide


@pytest.fixture
def with_qa(monkeypatch: pytest.MonkeyPatch) -> Callable[[QaSettings], None]:
    """Give every item of the manifests run from now on these ``qa:`` settings."""

    def use(qa: QaSettings) -> None:
        items = Manifest.items

        def with_settings(self: Manifest, **options: Any) -> Iterator[WorkItem]:
            for item in items(self, **options):
                yield dataclasses.replace(item, qa=qa)

        monkeypatch.setattr(Manifest, "items", with_settings)

    return use
