"""The test bed's services are real: each test talks to one over its real protocol."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest

from testbed.base_os import push_to
from testbed.clearml_emulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, ClearMLEmulator
from testbed.docker_engine import Engine
from testbed.rabbitmq import RabbitMQ
from testbed.registry import Registry, start_registry
from testbed.s3 import S3Server

# --- Docker engine, registry, base OS image ----------------------------------------------


@pytest.mark.docker
def test_push_remove_pull_through_registry(
    docker_engine: Engine, oci_registry: Registry, base_os_image: str
) -> None:
    mark = len(oci_registry.requests())
    ref = push_to(docker_engine, oci_registry, base_os_image)
    repository, _, tag = base_os_image.rpartition(":")
    assert ref.startswith(f"{oci_registry.host}/{repository}@sha256:")
    assert oci_registry.blob_uploads(since=mark), "the first push uploads the layer and config"
    assert oci_registry.manifest_puts(since=mark)

    with urllib.request.urlopen(f"{oci_registry.url}/v2/{repository}/tags/list") as r:
        assert json.load(r)["tags"] == [tag]

    mark = len(oci_registry.requests())
    assert push_to(docker_engine, oci_registry, base_os_image) == ref
    assert oci_registry.blob_uploads(since=mark) == [], "blobs already there are not re-sent"

    client = docker_engine.client()
    try:
        remote = f"{oci_registry.host}/{base_os_image}"
        client.images.remove(remote)
        assert remote not in {t for i in client.images.list() for t in i.tags}
        pulled = client.images.pull(remote)
        assert pulled.id == client.images.get(base_os_image).id
        assert ref.split("@")[1] in {d.split("@")[1] for d in pulled.attrs["RepoDigests"]}
    finally:
        client.close()


@pytest.mark.docker
def test_base_image_runs_python(
    docker_engine: Engine, base_os_image: str, oci_registry: Registry
) -> None:
    client = docker_engine.client()
    try:
        out = client.containers.run(
            base_os_image, ["python3", "-c", "print(1)"], remove=True, network_mode="none"
        )
        assert out == b"1\n"
        out = client.containers.run(
            base_os_image,
            ["sh", "-c", "python --version && pip --version >/dev/null && echo pip-ok"],
            remove=True,
            network_mode="none",
        )
        assert out.decode().split() == ["Python", "3.11.2", "pip-ok"]
        # Host networking reaches the loopback services of the test bed.
        probe = f"import urllib.request as u; print(u.urlopen('{oci_registry.url}/v2/').status)"
        out = client.containers.run(
            base_os_image, ["python", "-c", probe], remove=True, network_mode="host"
        )
        assert out == b"200\n"
    finally:
        client.close()


@pytest.mark.docker
def test_registry_basic_auth(docker_engine: Engine) -> None:
    with start_registry(auth=True) as registry:
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{registry.url}/v2/", timeout=5)
        assert anonymous.value.code == 401
        req = urllib.request.Request(f"{registry.url}/v2/", headers=registry.basic_auth_header())
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        auth = registry.auth_config()
        assert auth is not None
        client = docker_engine.client()
        try:
            assert client.login(registry=registry.host, reauth=True, **auth)["Status"]
        finally:
            client.close()
        statuses = [r.status for r in registry.requests()]
        assert statuses[0] == 401 and statuses[-1] == 200  # the engine answered the challenge


# --- S3 -----------------------------------------------------------------------------------


def test_s3_put_get(s3_server: S3Server) -> None:
    s3_server.create_bucket("testbed-bucket")
    s3 = s3_server.client()
    s3.put_object(Bucket="testbed-bucket", Key="a/b.bin", Body=b"weights")
    assert s3.get_object(Bucket="testbed-bucket", Key="a/b.bin")["Body"].read() == b"weights"
    assert s3_server.env()["AWS_ENDPOINT_URL"] == s3_server.endpoint_url


# --- ClearML: the real SDK in a subprocess ------------------------------------------------

SDK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from clearml.backend_api.session.client import APIClient, APIError
    import clearml

    model_id, task_id = sys.argv[1], sys.argv[2]
    out = {}
    c = APIClient()
    m = c.models.get_by_id(model=model_id)
    out["api_model"] = [m.name, m.uri, m.task, m.ready]
    t = c.tasks.get_by_id(task=task_id)
    out["api_task"] = [t.name, t.hyperparams["Args"]["lr"].value]
    out["sdk_model_name"] = clearml.Model(model_id).name
    try:
        c.models.get_by_id(model="no-such-model")
    except APIError as exc:
        out["unknown_codes"] = list(exc.codes)
    out["set_ready"] = c.models.set_ready(model=model_id, publish_task=False).updated
    try:
        c.models.set_ready(model=model_id, publish_task=False)
    except APIError as exc:
        out["again_codes"] = list(exc.codes)
    print(json.dumps(out))
    """
)


def _run_sdk(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_clearml_sdk_reads_and_publishes(
    clearml_server: ClearMLEmulator, clearml_env: dict[str, str]
) -> None:
    task_id, model_id = uuid.uuid4().hex, uuid.uuid4().hex
    clearml_server.add_task(
        {
            "id": task_id,
            "name": "train jet-tagger",
            "hyperparams": {
                "Args": {"lr": {"section": "Args", "name": "lr", "value": "0.001", "type": "float"}}
            },
            "models": {"input": [], "output": [{"name": "jet-tagger v3", "model": model_id}]},
        }
    )
    clearml_server.add_model(
        {"id": model_id, "name": "jet-tagger v3", "task": task_id, "uri": "s3://m/w.onnx"}
    )
    clearml_server.clear_journal()

    done = _run_sdk(SDK_SCRIPT, clearml_env, model_id, task_id)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "api_model": ["jet-tagger v3", "s3://m/w.onnx", task_id, False],
        "api_task": ["train jet-tagger", "0.001"],
        "sdk_model_name": "jet-tagger v3",
        "unknown_codes": [400, 201],
        "set_ready": 1,
        "again_codes": [400, 203],
    }
    endpoints = [e["endpoint"] for e in clearml_server.journal]
    assert "auth.login" in endpoints
    assert any(e["body"].get("model") == model_id for e in clearml_server.calls("models.get_by_id"))
    assert clearml_server.unknown_endpoints == []
    stored = clearml_server.model(model_id)
    assert stored is not None and stored["ready"] is True


def test_clearml_sdk_bad_credentials_fail_fast(
    clearml_server: ClearMLEmulator, clearml_env: dict[str, str]
) -> None:
    env = {**clearml_env, "CLEARML_API_SECRET_KEY": "wrong"}
    conf = Path(env["CLEARML_CONFIG_FILE"])
    conf.write_text(conf.read_text().replace(clearml_server.secret_key, "wrong"))
    script = "from clearml.backend_api.session.client import APIClient; APIClient()"
    done = _run_sdk(script, env)  # the subprocess timeout bounds "quickly"
    assert done.returncode != 0
    assert "invalid credentials" in done.stderr
    login = clearml_server.calls("auth.login")[-1]
    assert (login["status"], login["subcode"]) == (401, 22)


# --- ClearML: the emulator's wire behaviour -----------------------------------------------


def _basic(key: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()


def _call(
    url: str, endpoint: str, body: dict[str, Any] | None = None, auth: str | None = None
) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"{url}/{endpoint}", data=json.dumps(body or {}).encode(), method="GET"
    )
    req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status), json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_clearml_emulator_envelope_auth_and_faults(clearml_server: ClearMLEmulator) -> None:
    url = clearml_server.url
    basic_auth = _basic(DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY)
    status, login = _call(url, "auth.login", auth=basic_auth)
    assert status == login["meta"]["result_code"] == 200
    bearer = "Bearer " + login["data"]["token"]

    status, env = _call(url, "v2.23/models.get_all", {"name": "^NOPE$", "method": "get"}, bearer)
    assert (status, env["data"]) == (200, {"models": []})
    assert set(env["meta"]) == {
        "id", "trx", "endpoint", "result_code", "result_subcode", "result_msg",
        "error_stack", "error_data",
    }  # fmt: skip
    assert env["meta"]["endpoint"]["requested_version"] == "2.23"

    cases = [
        ("v2.23/models.get_by_id", {"model": "x"}, None, (401, 20)),
        ("v2.23/models.get_by_id", {"model": "x"}, "Bearer not-a-jwt", (401, 30)),
        ("v2.23/models.get_by_id", {"model": "x"}, bearer, (400, 201)),
        ("v2.23/tasks.get_by_id", {"task": "x"}, bearer, (400, 101)),
        ("v2.23/models.delete", {"model": "x"}, bearer, (404, 0)),
        ("auth.login", None, _basic("k", "bad"), (401, 22)),
    ]
    for endpoint, body, auth, want in cases:
        status, env = _call(url, endpoint, body, auth)
        assert (status, env["meta"]["result_subcode"]) == want, endpoint
        assert env["meta"]["endpoint"]["name"] == endpoint.split("/")[-1]
    assert "models.delete" in clearml_server.unknown_endpoints

    with clearml_server.faulted("bad_login"):
        assert _call(url, "auth.login", auth=basic_auth)[0] == 401
    with clearml_server.faulted("http500"):
        assert _call(url, "v2.23/models.get_all", {}, bearer)[0] == 500
    with clearml_server.faulted("http503"):
        assert _call(url, "v2.23/models.get_all", {}, bearer)[0] == 503
        assert _call(url, "auth.login", auth=basic_auth)[0] == 200  # login spared by default
    with clearml_server.faulted("drop"), pytest.raises(http.client.RemoteDisconnected):
        _call(url, "v2.23/models.get_all", {}, bearer)
    with clearml_server.faulted("hang"), pytest.raises(TimeoutError):
        req = urllib.request.Request(
            f"{url}/v2.23/models.get_all", headers={"Authorization": bearer}
        )
        urllib.request.urlopen(req, timeout=1)
    assert _call(url, "v2.23/models.get_all", {}, bearer)[0] == 200


def test_clearml_emulator_cli(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"models": [{"id": "m1", "name": "Jet Tagger", "tags": ["a"]}]}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.clearml_emulator", "--port", "0", "--seed", str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        body = {"name": "jet", "tags": ["-b"]}
        status, env = _call(
            url, "v2.23/models.get_all", body, _basic(DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY)
        )
        assert status == 200
        assert [m["name"] for m in env["data"]["models"]] == ["Jet Tagger"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_clearml_emulator_field_shapes() -> None:
    """What a deployed server does differently (issue 27), each as clearml-server does it:
    an older API version (token, scroll keys ignored, metadata as a list), a lower page cap,
    public models set_ready refuses, and hooks for what other users do meanwhile."""
    import jwt

    with ClearMLEmulator(api_version="2.13", max_page_size=2) as server:
        for n in range(5):
            server.add_model({"id": f"m{n}", "name": f"model {n}", "metadata": {"k": {}}})
        server.add_model({"id": "public", "name": "example", "company": ""})
        basic = _basic(DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY)
        token = _call(server.url, "auth.login", auth=basic)[1]["data"]["token"]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert (claims["api_version"], claims["server_version"]) == ("2.13", "1.0.0")

        def page(body: dict[str, Any]) -> list[str]:
            data = _call(server.url, "v2.13/models.get_all", body, basic)[1]["data"]
            assert "scroll_id" not in data  # scroll paging came with API 2.15
            return [m["id"] for m in data["models"]]

        assert page({"page": 0, "page_size": 500, "order_by": ["id"]}) == ["m0", "m1"]
        assert page({"page": 1, "page_size": 500, "order_by": ["id"]}) == ["m2", "m3"]
        assert page({"scroll_id": "", "size": 10, "order_by": ["id"]}) == ["m0", "m1"]
        got = _call(server.url, "v2.13/models.get_by_id", {"model": "m0"}, basic)[1]
        assert got["data"]["model"]["metadata"] == []  # services/utils.py::unescape_metadata
        status, ready = _call(server.url, "v2.13/models.set_ready", {"model": "public"}, basic)
        assert (status, ready["meta"]["result_subcode"]) == (400, 201)

        seen: list[dict[str, Any]] = []
        server.on_request("models.get_all", seen.append)
        page({"page": 0, "page_size": 2})
        assert seen and seen[0]["page_size"] == 2

    with ClearMLEmulator(max_page_size=None) as uncapped:  # before clearml-server 1.2
        for n in range(3):
            uncapped.add_model({"id": f"m{n}"})
        status, data = _call(uncapped.url, "models.get_all", {"scroll_id": "", "size": 2}, basic)
        assert status == 200 and len(data["data"]["models"]) == 2 and data["data"]["scroll_id"]
        status, refused = _call(uncapped.url, "models.get_all", {"page": 0}, basic)
        assert (status, refused["meta"]["result_subcode"]) == (400, 11)


# --- Message broker -----------------------------------------------------------------------


def test_rabbitmq_publish_consume(rabbitmq: RabbitMQ) -> None:
    params = pika.URLParameters(rabbitmq.url)
    params.socket_timeout = params.blocked_connection_timeout = 10
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.queue_declare(queue="testbed", durable=False, auto_delete=True)
        channel.basic_publish(exchange="", routing_key="testbed", body=b"slide-1")
        method, _props, body = None, None, None
        for _ in range(50):
            method, _props, body = channel.basic_get(queue="testbed")
            if method is not None:
                break
            connection.sleep(0.1)
        assert body == b"slide-1"
        assert method is not None
        channel.basic_ack(method.delivery_tag)
    finally:
        connection.close()
