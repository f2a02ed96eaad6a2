"""`builder publish`: real clearml SDK (emulated server) and real S3 (moto server)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import model_record, run_cli, task_record, write_local_registry

from builder.cook.registries.local import LocalRegistry
from builder.errors import FetchError
from builder.publish import publish

TRAINING = "training-artifacts"
PROD = "prod-models"
MODEL = "4f0c8a1e2b3d4c5e6f708192a3b4c5d6"
TASK = "9a8b7c6d5e4f30211203f4e5d6c7b8a9"
RUNNING_MODEL = "1b2c3d4e5f60718293a4b5c6d7e8f901"
RUNNING_TASK = "aa11bb22cc33dd44ee55ff6677889900"
WEIGHTS = b"\x08\x07onnx-weights" * 1000


@pytest.fixture
def s3(s3_server: Any) -> Iterator[Any]:
    s3_server.reset()
    s3_server.create_bucket(TRAINING, PROD)
    client = s3_server.client()
    client.put_object(Bucket=TRAINING, Key=f"{TASK}/models/model.onnx", Body=WEIGHTS)
    yield client


@pytest.fixture
def clearml(clearml_server: Any) -> Iterator[Any]:
    clearml_server.set_fault(None)
    record = model_record(MODEL, TASK, name="carcinoma v4", ready=False)
    record["uri"] = f"s3://{TRAINING}/{TASK}/models/model.onnx"
    clearml_server.add_model(record)
    clearml_server.add_model(
        model_record(RUNNING_MODEL, RUNNING_TASK, name="still training", ready=False)
    )
    clearml_server.add_task(task_record(TASK))
    clearml_server.add_task(task_record(RUNNING_TASK, status="in_progress"))
    clearml_server.clear_journal()
    yield clearml_server
    clearml_server.set_fault(None)


@pytest.fixture
def env(clearml_env: dict[str, str], s3_server: Any, tmp_path: Path) -> dict[str, str]:
    return {
        **clearml_env,
        **s3_server.env(),
        "BUILDER_MODEL_REGISTRY": "clearml",
        "BUILDER_PRODUCTION": f"s3://{PROD}",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }


def _publish(env: dict[str, str], *args: str) -> Any:
    return run_cli("publish", *args, "--json", env=env, timeout=60)


def test_publish_copies_verifies_then_marks(s3: Any, clearml: Any, env: dict[str, str]) -> None:
    result = _publish(env, MODEL)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)["result"]
    assert doc["files"] == [
        {
            "name": "model.onnx",
            "size": len(WEIGHTS),
            "sha256": hashlib.sha256(WEIGHTS).hexdigest(),
            "action": "copied",
        }
    ]
    assert doc["marked_published"] is True
    assert s3.get_object(Bucket=PROD, Key=f"{TASK}/{MODEL}/model.onnx")["Body"].read() == WEIGHTS
    manifest = json.loads(
        s3.get_object(Bucket=PROD, Key=f"{TASK}/{MODEL}/publish-manifest.json")["Body"].read()
    )
    assert (
        manifest["model_id"] == MODEL
        and manifest["files"][0]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    )
    bodies = [
        {k: v for k, v in c["body"].items() if k != "method"}
        for c in clearml.calls("models.set_ready")
    ]
    assert bodies == [{"model": MODEL, "publish_task": False}]
    assert clearml.model(MODEL)["ready"] is True


def test_publish_again_changes_nothing(s3: Any, clearml: Any, env: dict[str, str]) -> None:
    assert _publish(env, MODEL).returncode == 0
    before = s3.get_object(Bucket=PROD, Key=f"{TASK}/{MODEL}/publish-manifest.json")["LastModified"]
    again = _publish(env, MODEL)
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)["result"]
    assert (
        doc["files"][0]["action"] == "present"
        and not doc["manifest_written"]
        and not doc["marked_published"]
    )
    assert (
        s3.get_object(Bucket=PROD, Key=f"{TASK}/{MODEL}/publish-manifest.json")["LastModified"]
        == before
    )


def test_dry_run_changes_nothing(s3: Any, clearml: Any, env: dict[str, str]) -> None:
    result = _publish(env, MODEL, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"]["files"][0]["action"] == "would-copy"
    assert s3.list_objects_v2(Bucket=PROD).get("KeyCount", 0) == 0
    assert clearml.calls("models.set_ready") == []


def test_unknown_model(s3: Any, clearml: Any, env: dict[str, str]) -> None:
    result = _publish(env, "deadbeef" * 4)
    assert (
        result.returncode == 3
        and "not found in ClearML" in json.loads(result.stdout)["error"]["message"]
    )


def test_task_not_completed_is_refused(s3: Any, clearml: Any, env: dict[str, str]) -> None:
    result = _publish(env, RUNNING_MODEL)
    assert result.returncode == 4 and "did not complete (status in_progress)" in result.stdout
    assert clearml.calls("models.set_ready") == []


def test_source_object_missing(s3: Any, clearml: Any, env: dict[str, str]) -> None:
    s3.delete_object(Bucket=TRAINING, Key=f"{TASK}/models/model.onnx")
    result = _publish(env, MODEL)
    assert result.returncode == 5 and "do not exist" in result.stdout
    assert clearml.calls("models.set_ready") == []


def test_destination_conflict_is_refused(s3: Any, clearml: Any, env: dict[str, str]) -> None:
    s3.put_object(Bucket=PROD, Key=f"{TASK}/{MODEL}/model.onnx", Body=b"something else")
    result = _publish(env, MODEL)
    assert result.returncode == 5 and "immutable" in result.stdout
    assert (
        s3.get_object(Bucket=PROD, Key=f"{TASK}/{MODEL}/model.onnx")["Body"].read()
        == b"something else"
    )
    assert clearml.calls("models.set_ready") == []


def test_s3_unreachable(clearml: Any, env: dict[str, str]) -> None:
    result = _publish(
        {
            **env,
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
        },
        MODEL,
    )
    message = json.loads(result.stdout)["error"]["message"]
    assert result.returncode == 5, message
    assert "cannot be read with ClearML's storage settings" in message and "127.0.0.1:9" in message
    assert clearml.calls("models.set_ready") == []


def test_clearml_unreachable(s3: Any, env: dict[str, str]) -> None:
    result = _publish({**env, "CLEARML_API_HOST": "http://127.0.0.1:9"}, MODEL)
    assert result.returncode == 3 and "ClearML" in result.stdout


def test_interrupted_between_copy_and_mark_completes_on_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local backend, in process: a crash injected after the copy, then a clean re-run."""
    source = tmp_path / "training" / "model.onnx"
    source.parent.mkdir()
    source.write_bytes(WEIGHTS)
    record = model_record(MODEL, TASK, name="m", ready=False)
    record["uri"] = f"file:{source}"
    registry = LocalRegistry(
        write_local_registry(tmp_path / "registry", [record], [task_record(TASK)])
    )
    production = f"file:{tmp_path / 'production'}"

    def crash(self: LocalRegistry, model_id: str) -> bool:
        raise FetchError("injected: killed before marking")

    with monkeypatch.context() as patch:
        patch.setattr(LocalRegistry, "mark_published", crash)
        with pytest.raises(FetchError, match="injected"):
            publish(MODEL, registry, production)
    assert (tmp_path / "production" / TASK / MODEL / "model.onnx").read_bytes() == WEIGHTS
    assert (
        registry.get_model(MODEL).ready is False
    )  # never published without the copy, nor before it

    rerun = publish(MODEL, registry, production)
    assert [f.action for f in rerun.files] == ["present"] and rerun.marked_published
    assert registry.get_model(MODEL).ready is True


def test_models_list_shows_published_state_and_production_presence() -> None:
    """On the bundled demo: published models are in production, the candidate is not."""
    result = run_cli("models", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in json.loads(result.stdout)["result"]["models"]}
    assert rows["a957f623e6d34159a07aec1b8323eb54"]["published"] is True
    assert rows["a957f623e6d34159a07aec1b8323eb54"]["in_production"] is True
    assert rows["c0ffee00c0ffee00c0ffee00c0ffee00"]["published"] is False
    assert rows["c0ffee00c0ffee00c0ffee00c0ffee00"]["in_production"] is False
    published = run_cli("models", "list", "--published", "--json")
    ids = {row["id"] for row in json.loads(published.stdout)["result"]["models"]}
    assert "c0ffee00c0ffee00c0ffee00c0ffee00" not in ids and len(ids) == 4
    human = run_cli("models", "list")
    assert "IN PRODUCTION" in human.stdout and "carcinoma v3 (demo)" in human.stdout


# --- weights where ClearML users keep them (issue 14) -------------------------------------

HOSTED_MODEL, HOSTED_TASK = "5e" * 16, "6f" * 16


def _hosted(clearml: Any, uri: str) -> None:
    record = model_record(HOSTED_MODEL, HOSTED_TASK, name="mitosis v3", ready=False)
    clearml.add_model({**record, "uri": uri})
    clearml.add_task(task_record(HOSTED_TASK))
    clearml.clear_journal()


def test_publish_from_s3_host_port(
    s3: Any, clearml: Any, env: dict[str, str], s3_server: Any
) -> None:
    """Point 5: MinIO & co: the SDK writes s3://host:port/bucket/key; host:port is no bucket.
    The endpoint's credentials come from clearml.conf (sdk.aws.s3.credentials), as ClearML
    users configure them."""
    from urllib.parse import urlparse

    host = urlparse(s3_server.endpoint_url).netloc
    s3.put_object(Bucket=TRAINING, Key=f"{HOSTED_TASK}/models/model.onnx", Body=WEIGHTS)
    _hosted(clearml, f"s3://{host}/{TRAINING}/{HOSTED_TASK}/models/model.onnx")
    aws = s3_server.env()
    conf = Path(env["CLEARML_CONFIG_FILE"])
    conf.write_text(
        conf.read_text()
        + f'sdk.aws.s3.credentials: [{{host: "{host}", key: "{aws["AWS_ACCESS_KEY_ID"]}",'
        f' secret: "{aws["AWS_SECRET_ACCESS_KEY"]}", secure: false, multipart: false}}]\n'
    )
    result = _publish(env, HOSTED_MODEL)
    assert result.returncode == 0, result.stdout + result.stderr
    key = f"{HOSTED_TASK}/{HOSTED_MODEL}/model.onnx"
    assert s3.get_object(Bucket=PROD, Key=key)["Body"].read() == WEIGHTS
    assert clearml.model(HOSTED_MODEL)["ready"] is True


def _publish_from_file_server(
    clearml: Any, env: dict[str, str], tmp_path: Path, path: str, fault: str | None = None
) -> tuple[Any, Any]:
    """Publish a model whose weights are on the test bed's ClearML file server at `path`
    (the server answering with `fault`, if any): (CLI result, the stopped file server)."""
    from testbed.clearml_emulator import FileServer

    stored = tmp_path / "files" / path
    stored.parent.mkdir(parents=True)
    stored.write_bytes(WEIGHTS)
    files = FileServer(tmp_path / "files").start()
    files.fault = fault
    try:
        _hosted(clearml, f"{files.url}/{path}")
        return _publish({**env, "CLEARML_FILES_HOST": files.url}, HOSTED_MODEL), files
    finally:
        files.stop()


def test_publish_from_the_clearml_file_server(
    s3: Any, clearml: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """Point 6: no output_uri: ClearML keeps weights on its file server (http(s)://...:8081)."""
    path = f"pathology/train.{HOSTED_TASK}/models/model.onnx"
    result, files = _publish_from_file_server(clearml, env, tmp_path, path)
    assert result.returncode == 0, result.stdout + result.stderr
    key = f"{HOSTED_TASK}/{HOSTED_MODEL}/model.onnx"
    assert s3.get_object(Bucket=PROD, Key=key)["Body"].read() == WEIGHTS
    assert any(path.endswith("/models/model.onnx") for _, path in files.requests)


@pytest.mark.parametrize(
    ("uri", "container"),
    [
        ("s3://127.0.0.1:9000/bucket/t/models/m.onnx", "s3://127.0.0.1:9000/bucket"),
        ("s3://bucket/t/models/m.onnx", "s3://bucket"),
        ("gs://clearml-models/t/m.onnx", "gs://clearml-models"),
        ("https://files.example.com:8081/p/t.x/models/m.onnx", "https://"),
    ],
)
def test_weights_uris_are_parsed_by_clearml(uri: str, container: str) -> None:
    """Point 6 (gs/azure): the SDK's own URI parsing decides bucket and endpoint."""
    from builder.cook.storage import clearml_container

    assert clearml_container(uri) == container


@pytest.mark.parametrize(
    "uri", ["azure://acct.blob.core.windows.net/models/m.onnx", "ftp://host/m.onnx", "m.onnx"]
)
def test_weights_uris_clearml_cannot_read_are_one_clear_error(uri: str) -> None:
    from builder.cook.storage import clearml_container

    with pytest.raises(FetchError, match="weights URI"):
        clearml_container(uri)


def test_publish_from_google_cloud_storage(
    s3: Any, clearml: Any, env: dict[str, str], gcs_server: Any
) -> None:
    """gs://: the SDK's GoogleCloudStorage driver (clearml[gs]) against gcp-storage-emulator."""
    gcs_server.put("clearml-models", f"{HOSTED_TASK}/models/model.onnx", WEIGHTS)
    _hosted(clearml, f"gs://clearml-models/{HOSTED_TASK}/models/model.onnx")
    result = _publish({**env, **gcs_server.env()}, HOSTED_MODEL)
    assert result.returncode == 0, result.stdout + result.stderr
    key = f"{HOSTED_TASK}/{HOSTED_MODEL}/model.onnx"
    assert s3.get_object(Bucket=PROD, Key=key)["Body"].read() == WEIGHTS


def test_publish_from_azure_blob_storage(
    s3: Any, clearml: Any, env: dict[str, str], azurite: Any
) -> None:
    """azure://<account>.blob.core.windows.net/<container>/<blob>: the SDK's Azure driver
    (clearml[azure]) against Azurite, with the account key in clearml.conf as users keep it."""
    azurite.put("models", f"{HOSTED_TASK}/model.onnx", WEIGHTS)
    _hosted(clearml, f"azure://{azurite.host}/models/{HOSTED_TASK}/model.onnx")
    conf = Path(env["CLEARML_CONFIG_FILE"])
    conf.write_text(conf.read_text() + azurite.clearml_conf())
    result = _publish({**env, **azurite.env()}, HOSTED_MODEL)
    assert result.returncode == 0, result.stdout + result.stderr
    key = f"{HOSTED_TASK}/{HOSTED_MODEL}/model.onnx"
    assert s3.get_object(Bucket=PROD, Key=key)["Body"].read() == WEIGHTS
    assert azurite.host in azurite.proxy.hosts


def test_a_missing_storage_driver_keeps_the_sdks_install_hint(
    s3: Any, clearml: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """Fault injected: google.cloud.storage cannot be imported. The one line carries the
    SDK's own reason (storage/helper.py: "install driver using: pip install ...")."""
    shadow = tmp_path / "shadow" / "google" / "cloud" / "storage"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('injected: no google-cloud-storage')\n")
    _hosted(clearml, f"gs://clearml-models/{HOSTED_TASK}/model.onnx")
    path = f"{shadow.parents[2]}{os.pathsep}{env.get('PYTHONPATH', '')}"
    result = _publish({**env, "PYTHONPATH": path}, HOSTED_MODEL)
    assert result.returncode == 5, result.stdout + result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    assert "gs://clearml-models" in message and "pip install" in message
    assert "google-cloud-storage" in message
    assert clearml.calls("models.set_ready") == []


def test_publish_refuses_archived_and_orphaned_models(
    s3: Any, clearml: Any, env: dict[str, str]
) -> None:
    """Policy: archived = withdrawn; a deleted task = no training record. Neither is published."""
    clearml.archive_model(MODEL)
    archived = _publish(env, MODEL)
    assert archived.returncode == 4 and "is archived" in archived.stdout
    clearml.add_model(model_record(HOSTED_MODEL, HOSTED_TASK, name="orphan", ready=True))
    clearml.add_task(task_record(HOSTED_TASK))
    clearml.delete_task(HOSTED_TASK)
    orphan = _publish(env, HOSTED_MODEL)
    assert orphan.returncode == 4 and "was deleted" in orphan.stdout
    assert clearml.calls("models.set_ready") == []


# --- ClearML as deployed in the field (issue 27) -------------------------------------------

PACKAGE = {"model.onnx": WEIGHTS, "labels/classes.txt": b"background\ntumour\n"}


def _package_bytes(entries: dict[str, bytes]) -> bytes:
    """A weights package as the SDK writes it (model.py::update_weights_package: ZIP_STORED,
    names relative to the packed folder)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zipped:
        for name, data in entries.items():
            zipped.writestr(name, data)
    return buffer.getvalue()


def _packaged(s3: Any, clearml: Any, entries: dict[str, bytes]) -> bytes:
    archive = _package_bytes(entries)
    key = f"{TASK}/models/model_package.zip"
    s3.put_object(Bucket=TRAINING, Key=key, Body=archive)
    record = clearml.model(MODEL)
    clearml.add_model(
        {**record, "uri": f"s3://{TRAINING}/{key}", "system_tags": ["package"], "ready": False}
    )
    return archive


def _prod_keys(s3: Any) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=PROD).get("Contents", [])}


SDK_LOCAL_COPY = """
import json, pathlib, sys
from clearml import InputModel
path = pathlib.Path(InputModel(model_id=sys.argv[1]).get_local_copy(raise_on_error=True))
files = {p.relative_to(path).as_posix(): p.read_bytes().hex() for p in path.rglob("*") if p.is_file()}
print(json.dumps(files))
"""


def test_a_weights_package_is_published_and_locked_as_the_files_the_sdk_extracts(
    s3: Any, clearml: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """System tag `package`: publish extracts the zip as the SDK's get_local_copy does, copies
    the extracted files; the manifest, resolve and the lock name those files."""
    import subprocess
    import sys

    from helpers import customer_repo

    archive = _packaged(s3, clearml, PACKAGE)
    result = _publish(env, MODEL)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)["result"]
    assert [f["name"] for f in doc["files"]] == ["labels/classes.txt", "model.onnx"]
    assert doc["package"]["sha256"] == hashlib.sha256(archive).hexdigest()
    folder = f"{TASK}/{MODEL}"
    assert _prod_keys(s3) == {
        f"{folder}/model.onnx",
        f"{folder}/labels/classes.txt",
        f"{folder}/publish-manifest.json",
    }
    manifest = json.loads(
        s3.get_object(Bucket=PROD, Key=f"{folder}/publish-manifest.json")["Body"].read()
    )
    assert [f["name"] for f in manifest["files"]] == ["labels/classes.txt", "model.onnx"]
    assert manifest["package"]["name"] == "model_package.zip"

    # the real SDK, asked for the same model, hands a runner exactly these files
    sdk = subprocess.run(
        [sys.executable, "-c", SDK_LOCAL_COPY, MODEL],
        env={**env, "CLEARML_CACHE_DIR": str(tmp_path / "sdk-cache")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sdk.returncode == 0, sdk.stderr
    assert json.loads(sdk.stdout.strip().splitlines()[-1]) == {
        name: data.hex() for name, data in PACKAGE.items()
    }

    repo = customer_repo(tmp_path / "cx", carcinoma=MODEL, mitosis=MODEL)
    lock = tmp_path / "lock.yaml"
    locked = run_cli("lock", str(repo), "-o", str(lock), env=env, timeout=120)
    assert locked.returncode == 0, locked.stderr
    pinned = yaml.safe_load(lock.read_text())["models"]["carcinoma_model"]["files"]
    assert {f["name"]: f["sha256"] for f in pinned} == {
        name: hashlib.sha256(data).hexdigest() for name, data in PACKAGE.items()
    }


@pytest.mark.parametrize(
    ("entry", "reason"),
    [("../evil.onnx", "leaves its folder"), ("/etc/evil.onnx", "leaves its folder")],
)
def test_a_hostile_package_is_refused_in_one_line(
    s3: Any, clearml: Any, env: dict[str, str], entry: str, reason: str
) -> None:
    _packaged(s3, clearml, {"model.onnx": WEIGHTS, entry: b"x"})
    result = _publish(env, MODEL)
    assert result.returncode == 5, result.stdout + result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    assert "model_package.zip" in message and entry in message and reason in message
    assert _prod_keys(s3) == set()
    assert clearml.calls("models.set_ready") == []


def test_a_package_published_as_its_archive_is_refused_by_resolve(
    clearml: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """An older copy of a package in production (the zip itself) cannot be loaded by a runner."""
    from helpers import customer_repo, write_production

    record = clearml.model(MODEL)
    clearml.add_model(
        {**record, "uri": f"s3://{TRAINING}/{TASK}/models/model_package.zip", "ready": True}
    )
    clearml.add_model({**clearml.model(MODEL), "system_tags": ["package"]})
    production = tmp_path / "production"
    write_production(production, TASK, MODEL, {"model_package.zip": _package_bytes(PACKAGE)})
    repo = customer_repo(tmp_path / "cx", carcinoma=MODEL, mitosis=MODEL)
    result = run_cli(
        "expand", str(repo), env={**env, "BUILDER_PRODUCTION": f"file:{production}"}, timeout=60
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds its archive model_package.zip itself" in lines[0]
    assert f"run `builder publish {MODEL}` again" in lines[0]


def test_publish_reads_no_design(s3: Any, clearml: Any, env: dict[str, str]) -> None:
    """Other teams keep free text in a model's design; publish never needs it."""
    from testbed.clearml_emulator import FREE_TEXT_DESIGNS

    clearml.add_model({**clearml.model(MODEL), "design": {"design": FREE_TEXT_DESIGNS[1]}})
    result = _publish(env, MODEL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert clearml.calls("models.get_by_id") == []
    asked = [c["body"]["only_fields"] for c in clearml.calls("models.get_all")]
    assert asked and all("design" not in fields for fields in asked)


def test_a_public_model_is_not_copied_unless_already_published(
    s3: Any, clearml: Any, env: dict[str, str]
) -> None:
    """A public model (company "") is read by every company, but set_ready looks models up in
    the caller's company only (bll/model/__init__.py): refused before any copy; a published
    one is copied and not marked again."""
    clearml.add_model({**clearml.model(MODEL), "company": ""})
    refused = _publish(env, MODEL)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "is a public model" in json.loads(refused.stdout)["error"]["message"]
    assert _prod_keys(s3) == set()
    clearml.add_model({**clearml.model(MODEL), "ready": True})
    published = _publish(env, MODEL)
    assert published.returncode == 0, published.stdout + published.stderr
    assert json.loads(published.stdout)["result"]["marked_published"] is False
    assert f"{TASK}/{MODEL}/model.onnx" in _prod_keys(s3)
    assert clearml.calls("models.set_ready") == []


def test_a_model_gone_when_marking_says_what_happened(
    s3: Any, clearml: Any, env: dict[str, str]
) -> None:
    clearml.on_request("models.set_ready", lambda body: clearml.delete_model(MODEL))
    try:
        result = _publish(env, MODEL)
    finally:
        clearml.on_request("models.set_ready", None)
    assert result.returncode == 3, result.stdout + result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    assert f"model {MODEL}: its weights are copied and verified at s3://{PROD}/{TASK}/{MODEL}/" in (
        message
    )
    assert "but it is not marked published" in message and "deleted meanwhile" in message
    assert "models.set_ready not found" not in message


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("http503", "kept answering HTTP 503"), ("hang", "did not answer within 1 s")],
)
def test_a_failing_file_server_is_bounded_and_named(
    s3: Any, clearml: Any, env: dict[str, str], tmp_path: Path, fault: str, reason: str
) -> None:
    """The SDK's own retries (15, backoff up to 120 s) are capped; one line names the host."""
    conf = Path(env["CLEARML_CONFIG_FILE"])
    conf.write_text(conf.read_text() + "sdk.http.timeout.total: 1\n")
    result, files = _publish_from_file_server(clearml, env, tmp_path, "model.onnx", fault)
    assert result.returncode == 5, result.stdout + result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    host = files.url.removeprefix("http://")
    assert f"cannot be downloaded: {host} {reason}" in message
    assert len(files.requests) <= 6  # two requests (size, body), each tried at most 3 times
    assert clearml.calls("models.set_ready") == []


def test_a_tar_package_of_a_local_registry_is_published_as_its_files(tmp_path: Path) -> None:
    """The local backend, in process: a `.tgz` package at a relative file: URI (the SDK
    extracts .tar.gz/.tgz as well as .zip)."""
    import io
    import tarfile

    archive = tmp_path / "training" / "weights.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tarred:
        for name, data in PACKAGE.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tarred.addfile(info, io.BytesIO(data))
    record = {
        **model_record(MODEL, TASK, name="m", ready=False),
        "uri": "file:training/weights.tgz",
        "system_tags": ["package"],
    }
    registry = LocalRegistry(
        write_local_registry(tmp_path / "registry", [record], [task_record(TASK)])
    )
    result = publish(MODEL, registry, "file:production", base=tmp_path)
    assert [f.name for f in result.files] == ["labels/classes.txt", "model.onnx"]
    assert result.package is not None and result.package.name == "weights.tgz"
    folder = tmp_path / "production" / TASK / MODEL
    assert (folder / "labels" / "classes.txt").read_bytes() == PACKAGE["labels/classes.txt"]
    assert not (folder / "weights.tgz").exists()
