"""The ClearML backend through the real clearml SDK against the test bed's server emulation.

Every call runs the real CLI in a subprocess: the SDK keeps process-wide state, and this is
how engineers and CI run it. The subprocess timeout is the "never hangs" bound.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    CARCINOMA_ID,
    CARCINOMA_TASK,
    MITOSIS_ID,
    MITOSIS_TASK,
    customer_repo,
    make_clearml_env,
    model_record,
    run_cli,
    task_record,
    write_production,
)

#: The CLI must answer well within this, whatever the server does (retries and deadline capped).
CLI_BOUND = 45
DASHLESS_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.fixture
def clearml(clearml_server: Any) -> Iterator[Any]:
    clearml_server.set_fault(None)
    for record in (
        model_record(CARCINOMA_ID, CARCINOMA_TASK, name="carcinoma v3"),
        model_record(MITOSIS_ID, MITOSIS_TASK, name="mitosis v1"),
        model_record(DASHLESS_ID, MITOSIS_TASK, name="mitosis draft", ready=False),
    ):
        clearml_server.add_model(record)
    clearml_server.add_task(task_record(CARCINOMA_TASK))
    clearml_server.add_task(task_record(MITOSIS_TASK))
    clearml_server.clear_journal()
    yield clearml_server
    clearml_server.set_fault(None)


@pytest.fixture
def env(clearml_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    production = tmp_path / "production"
    write_production(production, CARCINOMA_TASK, CARCINOMA_ID, {"model.onnx": b"c"})
    write_production(production, MITOSIS_TASK, MITOSIS_ID, {"model.onnx": b"m"})
    return {
        **clearml_env,
        "BUILDER_MODEL_REGISTRY": "clearml",
        "BUILDER_PRODUCTION": f"file:{production}",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }


def _repo(tmp_path: Path, carcinoma: str = CARCINOMA_ID, mitosis: str = MITOSIS_ID) -> str:
    return str(customer_repo(tmp_path / "cx", carcinoma=carcinoma, mitosis=mitosis))


def test_expand_resolves_through_the_sdk(clearml: Any, env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("expand", _repo(tmp_path), env=env, timeout=CLI_BOUND)
    assert result.returncode == 0, result.stderr
    verbose = yaml.safe_load(result.stdout)
    carcinoma = verbose["analyses"][0]["models"]["carcinoma_model"]
    assert carcinoma["provenance"]["registry_id"] == CARCINOMA_ID
    assert carcinoma["provenance"]["task_id"] == CARCINOMA_TASK
    assert carcinoma["preprocessing"][0]["cls"] == "Normalization"
    endpoints = [call["endpoint"] for call in clearml.journal]
    assert "auth.login" in endpoints
    assert endpoints.count("models.get_by_id") == 2 and endpoints.count("tasks.get_by_id") == 2
    assert not clearml.unknown_endpoints


def test_unknown_model_id(clearml: Any, env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(
        "expand", _repo(tmp_path, carcinoma="deadbeef" * 4), env=env, timeout=CLI_BOUND
    )
    assert result.returncode == 3
    line = result.stderr.strip().splitlines()[-1]
    # the line, the slot and the id (issue 15), then the server it asked
    assert "analysis.yaml:" in line and "carcinoma_model" in line
    assert f"{'deadbeef' * 4} not found in ClearML at " in line


def test_unpublished_model_needs_allow_unpublished(
    clearml: Any, env: dict[str, str], tmp_path: Path
) -> None:
    repo = _repo(tmp_path, mitosis=DASHLESS_ID)  # a real-style 32-hex id without dashes
    refused = run_cli("expand", repo, env=env, timeout=CLI_BOUND)
    assert refused.returncode == 4 and f"({DASHLESS_ID}) is not published" in refused.stderr
    allowed = run_cli("expand", repo, "--allow-unpublished", env=env, timeout=CLI_BOUND)
    assert allowed.returncode == 0 and "warning:" in allowed.stderr


def test_bad_credentials(clearml: Any, env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(
        "expand",
        _repo(tmp_path),
        env={**env, "CLEARML_API_SECRET_KEY": "wrong-secret-123"},
        timeout=CLI_BOUND,
    )
    assert result.returncode == 3 and "rejected the credentials" in result.stderr
    assert "wrong-secret-123" not in result.stderr + result.stdout


def test_no_api_host_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    without = {k: v for k, v in env.items() if k != "CLEARML_API_HOST"}
    Path(without["CLEARML_CONFIG_FILE"]).write_text("api { http { retries { total: 1 } } }\n")
    result = run_cli("expand", _repo(tmp_path), env=without, timeout=CLI_BOUND)
    assert result.returncode == 3 and "no ClearML API host configured" in result.stderr


@pytest.mark.parametrize("fault", ["http500", "http503", "drop", "hang"])
def test_failing_server_gives_a_bounded_clear_error(
    clearml: Any, env: dict[str, str], tmp_path: Path, fault: str
) -> None:
    repo = _repo(tmp_path)
    clearml.set_fault(fault)
    result = run_cli("expand", repo, env=env, timeout=CLI_BOUND)
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "ClearML" in last


def test_server_not_running(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(
        "expand",
        _repo(tmp_path),
        env={**env, "CLEARML_API_HOST": "http://127.0.0.1:9"},
        timeout=CLI_BOUND,
    )
    assert result.returncode == 3 and "ClearML" in result.stderr


# --- data a real ClearML server holds (issue 14) ------------------------------------------

PROJECT_NAME = "pathology/breast"


def _hex(n: int) -> str:
    return f"{n:032x}"


@pytest.fixture(scope="module")
def crowded() -> Iterator[tuple[Any, dict[str, list[dict[str, Any]]]]]:
    """A server of its own with server-shaped data: >1,000 models in three projects, archived
    ones, free-text designs, several output models per task, a deleted task."""
    from testbed.clearml_emulator import ClearMLEmulator, realistic_seed

    data = realistic_seed(models=1200)
    with ClearMLEmulator() as server:
        server.seed(data)
        yield server, data


def _listed(data: dict[str, list[dict[str, Any]]], project: str | None = None) -> set[str]:
    ids = {p["name"]: p["id"] for p in data["projects"]}
    return {
        m["id"]
        for m in data["models"]
        if "archived" not in m["system_tags"] and (project is None or m["project"] == ids[project])
    }


def _list_models(server: Any, tmp_path: Path, *args: str) -> Any:
    env = {**make_clearml_env(server, tmp_path / "home"), "BUILDER_MODEL_REGISTRY": "clearml"}
    return run_cli("models", "list", "--json", *args, env=env, timeout=120)


def test_models_list_reads_every_page_without_refetching(
    crowded: tuple[Any, dict[str, Any]], tmp_path: Path
) -> None:
    """Point 1: get_all pages at 500; all pages are read, and no model is fetched one by one.
    Point 7: the radiology team's free-text designs do not break the listing."""
    server, data = crowded
    server.clear_journal()
    result = _list_models(server, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(result.stdout)["result"]["models"]
    expected = _listed(data)
    assert (
        len(expected) > 1000 and {r["id"] for r in rows} == expected and len(rows) == len(expected)
    )
    pages = server.calls("models.get_all")
    assert len(pages) == -(-len(expected) // 500)
    assert all(
        p["body"]["page_size"] == 500 and "design" not in p["body"]["only_fields"] for p in pages
    )
    assert server.calls("models.get_by_id") == []
    deleted = [r for r in rows if r["task_deleted"]]
    assert deleted and all(len(r["task"]) == 32 for r in deleted)  # the id, without __DELETED__


def test_models_list_by_project_name_or_id(
    crowded: tuple[Any, dict[str, Any]], tmp_path: Path
) -> None:
    """Point 4: a model's `project` is an id; people type names. Both work."""
    server, data = crowded
    by_name = _list_models(server, tmp_path, "--project", PROJECT_NAME)
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    rows = json.loads(by_name.stdout)["result"]["models"]
    assert {r["id"] for r in rows} == _listed(data, PROJECT_NAME) != set()
    assert {r["project"] for r in rows} == {PROJECT_NAME}
    project_id = next(p["id"] for p in data["projects"] if p["name"] == PROJECT_NAME)
    by_id = _list_models(server, tmp_path, "--project", project_id)
    assert {r["id"] for r in json.loads(by_id.stdout)["result"]["models"]} == {
        r["id"] for r in rows
    }
    other_team = _list_models(server, tmp_path, "--project", "radiology/ct")  # free-text designs
    assert other_team.returncode == 0 and json.loads(other_team.stdout)["result"]["models"]
    unknown = _list_models(server, tmp_path, "--project", "no/such project")
    assert unknown.returncode == 3
    assert "no project 'no/such project'" in json.loads(unknown.stdout)["error"]["message"]


ARCHIVED_ID, ARCHIVED_TASK = _hex(0xA1), _hex(0xA2)
ORPHAN_ID, DRAFT_ID, DELETED_TASK = _hex(0xB1), _hex(0xB2), _hex(0xB3)
TWIN_A, TWIN_B, TWIN_TASK = _hex(0xC1), _hex(0xC2), _hex(0xC3)


@pytest.fixture
def real_shaped(clearml: Any, env: dict[str, str]) -> Any:
    """Archived model, a model whose task was deleted, two output models of one task."""
    from helpers import PROJECT_ID

    clearml.add_project({"id": PROJECT_ID, "name": PROJECT_NAME})
    clearml.add_model(model_record(ARCHIVED_ID, ARCHIVED_TASK, name="carcinoma v2 (withdrawn)"))
    clearml.add_task(task_record(ARCHIVED_TASK))
    clearml.archive_model(ARCHIVED_ID)
    clearml.add_task(task_record(DELETED_TASK))
    clearml.add_model(model_record(ORPHAN_ID, DELETED_TASK, name="mitosis v0"))
    clearml.add_model(model_record(DRAFT_ID, DELETED_TASK, name="mitosis v0 draft", ready=False))
    clearml.delete_task(DELETED_TASK)
    clearml.add_task(task_record(TWIN_TASK))
    clearml.add_model(model_record(TWIN_A, TWIN_TASK, name="mitosis head A"))
    clearml.add_model(model_record(TWIN_B, TWIN_TASK, name="mitosis head B"))
    production = Path(env["BUILDER_PRODUCTION"].removeprefix("file:"))
    write_production(production, ARCHIVED_TASK, ARCHIVED_ID, {"model.onnx": b"a"})
    write_production(production, DELETED_TASK, ORPHAN_ID, {"model.onnx": b"o"})
    write_production(production, TWIN_TASK, TWIN_A, {"model.onnx": b"weights of A"})
    clearml.clear_journal()
    return clearml


def _release_and_development(repo: str, env: dict[str, str]) -> tuple[Any, Any]:
    """`expand` as a release build, then as a development build (--allow-unpublished)."""
    release = run_cli("expand", repo, env=env, timeout=CLI_BOUND)
    return release, run_cli("expand", repo, "--allow-unpublished", env=env, timeout=CLI_BOUND)


def test_archived_model_is_held_by_the_release_gate(
    real_shaped: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """Point 3: get_by_id answers archived models; the gate refuses them, a dev build warns."""
    refused, allowed = _release_and_development(_repo(tmp_path, carcinoma=ARCHIVED_ID), env)
    assert refused.returncode == 4 and f"({ARCHIVED_ID}) is archived" in refused.stderr
    assert allowed.returncode == 0 and "is archived" in allowed.stderr


def test_model_of_a_deleted_task(real_shaped: Any, env: dict[str, str], tmp_path: Path) -> None:
    """Point 8: deleting a task rewrites its published models' task to __DELETED__<id>."""
    assert real_shaped.model(ORPHAN_ID)["task"] == f"__DELETED__{DELETED_TASK}"
    assert real_shaped.model(DRAFT_ID) is None  # drafts go with the task, as on the server
    refused, allowed = _release_and_development(_repo(tmp_path, mitosis=ORPHAN_ID), env)
    assert refused.returncode == 4, refused.stderr
    assert f"its creating task {DELETED_TASK} was deleted" in refused.stderr
    assert allowed.returncode == 0, allowed.stderr
    mitosis = yaml.safe_load(allowed.stdout)["analyses"][0]["models"]["mitosis_model"]
    assert mitosis["provenance"]["task_id"] == DELETED_TASK
    assert mitosis["provenance"]["files"][0]["size"] == 1
    asked = [c["body"]["task"] for c in real_shaped.calls("tasks.get_by_id")]
    assert DELETED_TASK not in asked and f"__DELETED__{DELETED_TASK}" not in asked


def test_weights_belong_to_exactly_one_model(
    real_shaped: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """Point 2: two output models of one task; B never gets A's weights."""
    repo = _repo(tmp_path, mitosis=TWIN_B)
    missing = run_cli("expand", repo, env=env, timeout=CLI_BOUND)
    assert missing.returncode == 4 and f"({TWIN_B}): no weights" in missing.stderr
    production = Path(env["BUILDER_PRODUCTION"].removeprefix("file:"))
    write_production(production, TWIN_TASK, TWIN_B, {"model.onnx": b"weights of A"})
    manifest = production / TWIN_TASK / TWIN_B / "publish-manifest.json"
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "model_id": TWIN_A}))  # a mis-filed copy of A
    misfiled = run_cli("expand", repo, env=env, timeout=CLI_BOUND)
    assert misfiled.returncode == 3 and "belong to another model" in misfiled.stderr
    assert len(misfiled.stderr.strip().splitlines()) <= 2


def test_lock_records_project_name_and_id(
    real_shaped: Any, env: dict[str, str], tmp_path: Path
) -> None:
    from helpers import PROJECT_ID

    out = tmp_path / "lock.yaml"
    result = run_cli("lock", _repo(tmp_path), "-o", str(out), env=env, timeout=CLI_BOUND)
    assert result.returncode == 0, result.stderr
    carcinoma = yaml.safe_load(out.read_text())["models"]["carcinoma_model"]
    assert carcinoma["project"] == PROJECT_NAME and carcinoma["project_id"] == PROJECT_ID


@pytest.mark.parametrize("reference", ["abc123", "a957f623-e6d3-4159-a07a-ec1b8323eb5g"])
def test_validate_checks_the_id_format(env: dict[str, str], tmp_path: Path, reference: str) -> None:
    """ClearML ids are 32 hex digits, server-generated: anything else can never resolve."""
    result = run_cli("validate", _repo(tmp_path, carcinoma=reference), env=env, timeout=CLI_BOUND)
    assert result.returncode == 2, result.stderr
    assert "analysis.yaml" in result.stderr and "is not a model id" in result.stderr


@pytest.mark.parametrize(
    "reference", ["a957f623-e6d3-4159-a07a-ec1b8323eb54", "A957F623E6D34159A07AEC1B8323EB54"]
)
def test_uuid_spellings_are_looked_up_as_the_servers_id(
    clearml: Any, env: dict[str, str], tmp_path: Path, reference: str
) -> None:
    """The canonical UUID spellings of a model id (dashed, any case) reach the server as its
    own form, 32 lowercase hex: the SDK's models.get_by_id, and the verbose config's
    provenance, name that id."""
    result = run_cli(
        "expand", _repo(tmp_path, carcinoma=reference), "--json", env=env, timeout=CLI_BOUND
    )
    assert result.returncode == 0, result.stderr
    models = json.loads(result.stdout)["result"]["config"]["analyses"][0]["models"]
    assert models["carcinoma_model"]["provenance"]["registry_id"] == CARCINOMA_ID
    asked = [call["body"].get("model") for call in clearml.calls("models.get_by_id")]
    assert CARCINOMA_ID in asked and reference not in asked


@pytest.mark.parametrize("task", ["../../outside", "__DELETED__../../outside"])
def test_a_task_id_from_the_server_is_checked(
    clearml: Any, env: dict[str, str], tmp_path: Path, task: str
) -> None:
    """Ids the server sends name paths (production folders): they are checked first."""
    clearml.add_model({**model_record(TWIN_A, TWIN_TASK, name="odd"), "task": task})
    result = run_cli("expand", _repo(tmp_path, mitosis=TWIN_A), env=env, timeout=CLI_BOUND)
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "task id '../../outside' is not a valid id" in last
    assert not (tmp_path / "outside").exists()


# --- ClearML as deployed in the field (issue 27) -------------------------------------------


def _own_server(**options: Any) -> Any:
    """A server of its own (an older API, a lower page cap) holding the usual two models."""
    from testbed.clearml_emulator import ClearMLEmulator

    server = ClearMLEmulator(**options).start()
    for model_id, task_id, name in (
        (CARCINOMA_ID, CARCINOMA_TASK, "carcinoma v3"),
        (MITOSIS_ID, MITOSIS_TASK, "mitosis v1"),
    ):
        server.add_model(model_record(model_id, task_id, name=name))
        server.add_task(task_record(task_id))
    return server


@pytest.mark.parametrize(("api", "schema"), [("2.9", "2.9"), ("2.13", "2.13"), ("2.20", "2.20")])
def test_older_servers_work(env: dict[str, str], tmp_path: Path, api: str, schema: str) -> None:
    """clearml-server 0.16 (API 2.9), 1.0 (2.13), 1.6 (2.20): the SDK speaks the newest schema
    it ships that the server admits, and every command works with it."""
    server = _own_server(api_version=api)
    weights = tmp_path / "training" / "model.onnx"
    weights.parent.mkdir()
    weights.write_bytes(b"draft weights")
    draft = model_record(DASHLESS_ID, MITOSIS_TASK, name="mitosis draft", ready=False)
    server.add_model({**draft, "uri": f"file:{weights}"})
    try:
        own = {**env, **make_clearml_env(server, tmp_path / "home")}
        expanded = run_cli("expand", _repo(tmp_path), env=own, timeout=CLI_BOUND)
        listed = run_cli("models", "list", "--json", env=own, timeout=CLI_BOUND)
        published = run_cli("publish", DASHLESS_ID, env=own, timeout=CLI_BOUND)
    finally:
        server.stop()
    assert expanded.returncode == 0, expanded.stderr
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["result"]["models"]) == 3
    assert published.returncode == 0, published.stderr
    assert (server.model(DASHLESS_ID) or {})["ready"] is True
    assert {e["version"] for e in server.journal if e["endpoint"] != "auth.login"} == {schema}
    assert not server.unknown_endpoints


def test_a_server_older_than_the_sdk_is_refused_in_one_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    server = _own_server(api_version="2.8", server_version="0.15.1")
    try:
        own = {**env, **make_clearml_env(server, tmp_path / "home")}
        result = run_cli("expand", _repo(tmp_path), env=own, timeout=CLI_BOUND)
    finally:
        server.stop()
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "speaks API 2.8 (clearml-server 0.15.1)" in lines[0]
    assert "needs API 2.9 or newer" in lines[0]
    assert [e["endpoint"] for e in server.journal] == ["auth.login"]


@pytest.mark.parametrize("cap", [100, None])
def test_models_list_pages_until_the_server_says_it_is_complete(
    tmp_path: Path, cap: int | None
) -> None:
    """A server with max_page_size 100 (or none, as before clearml-server 1.2) answers fewer
    models per page than asked for: every page is read, never 500 assumed. A model archived
    while the pages are read shifts no other model out of the list."""
    from testbed.clearml_emulator import ClearMLEmulator, realistic_seed

    data = realistic_seed(models=608)
    with ClearMLEmulator(max_page_size=cap) as server:
        server.seed(data)
        order = sorted(data["models"], key=lambda m: (m["created"], m["id"]))
        victim = next(m["id"] for m in order[:50] if "archived" not in m["system_tags"])

        def archive_after_the_first_page(body: dict[str, Any]) -> None:
            if body.get("page") == 1 and body.get("only_fields"):
                server.archive_model(victim)

        server.on_request("models.get_all", archive_after_the_first_page)
        result = _list_models(server, tmp_path)
        assert "archived" in (server.model(victim) or {})["system_tags"]
        server.on_request("models.get_all", None)
        published = _list_models(server, tmp_path, "--published")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {r["id"] for r in json.loads(result.stdout)["result"]["models"]}
    assert _listed(data) - {victim} <= listed <= _listed(data)
    ready = {m["id"] for m in data["models"] if m["ready"]}
    rows = json.loads(published.stdout)["result"]["models"]
    assert {r["id"] for r in rows} == (_listed(data) - {victim}) & ready
    pages = [c for c in server.calls("models.get_all") if c["body"].get("only_fields")]
    assert len(pages) >= (len(data["models"]) // 100 if cap else 2)


IMPORTED_ID = _hex(0xD1)


def test_an_imported_model_without_a_task(
    clearml: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """InputModel.import_model creates a model with no task: a development build resolves
    it, a release refuses it and says why."""
    record = model_record(IMPORTED_ID, CARCINOMA_TASK, name="vendor model")
    del record["task"]
    clearml.add_model(record)
    refused, allowed = _release_and_development(_repo(tmp_path, mitosis=IMPORTED_ID), env)
    assert refused.returncode == 4, refused.stderr
    assert f"({IMPORTED_ID}) has no creating task in the registry (an imported model)" in (
        refused.stderr
    )
    assert "builder publish" not in refused.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert "warning:" in allowed.stderr and "imported model" in allowed.stderr
    mitosis = yaml.safe_load(allowed.stdout)["analyses"][0]["models"]["mitosis_model"]
    assert mitosis["provenance"]["task_id"] is None


def test_the_sdks_older_trains_variables_are_honoured(
    clearml: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """The SDK still reads TRAINS_API_HOST & co (backend_api/session/defs.py); so does the
    builder, which never falls back to a default host."""
    renamed = {
        k.replace("CLEARML_", "TRAINS_", 1) if k.startswith("CLEARML_") else k: v
        for k, v in env.items()
    }
    conf = Path(renamed["TRAINS_CONFIG_FILE"])
    conf.write_text("api { http { retries { total: 1 } } }\n")  # the host comes from TRAINS_*
    result = run_cli("expand", _repo(tmp_path), env=renamed, timeout=CLI_BOUND)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("host_from_env", [True, False])
def test_a_malformed_clearml_conf_is_one_line_naming_the_file(
    env: dict[str, str], tmp_path: Path, host_from_env: bool
) -> None:
    conf = tmp_path / "broken" / "clearml.conf"
    conf.parent.mkdir()
    conf.write_text('api {\n  api_server: "http://127.0.0.1:9"\n  credentials { access_key: "a"\n')
    broken = {**env, "CLEARML_CONFIG_FILE": str(conf)}
    if not host_from_env:
        del broken["CLEARML_API_HOST"]
    result = run_cli("expand", _repo(tmp_path), env=broken, timeout=CLI_BOUND)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {conf}: ClearML cannot read")
    assert "line:4" in lines[0]
