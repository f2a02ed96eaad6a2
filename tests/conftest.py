"""Session fixtures for the real services of the test bed (see testbed/ and DESIGN.md).

Each fixture starts its service once per session (or reuses one that answers, for Docker),
tears down only what it started, and FAILS with the service's log tail when it cannot start:
tests are never skipped for a missing service. Add fixtures for new areas in their own
section below.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # testbed/ is a top-level package of the repo, not installed
    sys.path.insert(0, str(REPO_ROOT))

from helpers import make_clearml_env  # noqa: E402

from testbed.base_os import ensure_base_image  # noqa: E402
from testbed.clearml_emulator import ClearMLEmulator  # noqa: E402
from testbed.docker_engine import Engine, ensure_engine  # noqa: E402
from testbed.object_stores import AzuriteServer, GcsServer, start_azurite, start_gcs  # noqa: E402
from testbed.rabbitmq import RabbitMQ, start_rabbitmq  # noqa: E402
from testbed.registry import Registry, start_registry  # noqa: E402
from testbed.s3 import S3Server, start_s3  # noqa: E402

T = TypeVar("T")


def _start(what: str, starter: Callable[[], T]) -> T:
    """Run a starter; turn any failure into a test failure with a clear message."""
    try:
        return starter()
    except Exception as exc:
        pytest.fail(f"test bed: {what} could not start: {exc}", pytrace=False)


# --- Docker engine, registry and the base OS image ---------------------------------------


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """A Docker engine (reused if one answers, else a private dockerd). Attributes: .host,
    .client(), .env(), .started. Containers need network_mode "host" or "none" (no bridge)."""
    engine = _start("the Docker engine", ensure_engine)
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def oci_registry() -> Iterator[Registry]:
    """A docker-registry on 127.0.0.1 without auth. Attributes: .host ("127.0.0.1:PORT"),
    .url, .requests(), .blob_uploads(since=), .manifest_puts(since=), .auth_config()."""
    registry = _start("docker-registry", start_registry)
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def base_os_image(docker_engine: Engine) -> str:
    """Tag of the bookworm image standing in for python:3.11-slim-bookworm, in the engine.
    Push it with testbed.base_os.push_to(docker_engine, oci_registry)."""
    return _start("the base OS image", lambda: ensure_base_image(docker_engine))


@pytest.fixture(scope="session")
def inference_base(docker_engine: Engine, oci_registry: Registry, base_os_image: str) -> str:
    """The real inference base image (runner, ONNX Runtime) built from base-image/ on the
    base OS image and pushed to the test registry once per session; returns its repository
    (``<registry>/e2e/inference-base``). The engine keeps its layers (builds reuse them)."""
    from builder.image.base_build import build_base_image

    repository = f"{oci_registry.host}/e2e/inference-base"
    build_base_image(
        docker_client=docker_engine.client(),
        repository=repository,
        base_from=base_os_image,
        wheelhouse=None,
        push=True,
    )
    return repository


# --- Object stores: S3, Google Cloud Storage, Azure Blob Storage ----------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto in server mode. Attributes: .endpoint_url, .env(), .client(), .create_bucket()."""
    server = _start("the moto S3 server", start_s3)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    """gcp-storage-emulator: .env() (STORAGE_EMULATOR_HOST), .put(bucket, key, data)."""
    server = _start("the GCS emulator", start_gcs)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    """Azurite (npm) behind TLS: .host, .env() (proxy, CA), .clearml_conf(), .put()."""
    server = _start("Azurite", lambda: start_azurite(tmp_path_factory.mktemp("azurite")))
    yield server
    server.stop()


# --- ClearML ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clearml_server() -> Iterator[ClearMLEmulator]:
    """The clearml-server emulator. Seed with .add_model/.add_task/.add_project (use unique
    ids: the session shares it), read .journal/.calls(endpoint), inject faults with
    `with clearml_server.faulted("http503"): ...`."""
    server = _start("the ClearML emulator", lambda: ClearMLEmulator().start())
    yield server
    server.stop()


@pytest.fixture
def clearml_env(clearml_server: ClearMLEmulator, tmp_path: Path) -> dict[str, str]:
    """A full env dict (os.environ without CLEARML_*/AWS_*, plus HOME=tmp, CLEARML_API_HOST,
    keys, CLEARML_CACHE_DIR and CLEARML_CONFIG_FILE with capped retries) for subprocesses."""
    return make_clearml_env(clearml_server, tmp_path / "clearml-home")


# --- Message broker -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQ]:
    """A private rabbitmq-server node. Attributes: .url (amqp://guest:guest@127.0.0.1:PORT/),
    .port."""
    broker = _start("rabbitmq-server", start_rabbitmq)
    yield broker
    broker.stop()
