"""The ClearML backend through the real clearml SDK against the test bed's server emulation.

Every call runs the real CLI in a subprocess: the SDK keeps process-wide state, and this is
how engineers and CI run it. The subprocess timeout is the "never hangs" bound.
"""

from __future__ import annotations

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
    write_production(production, CARCINOMA_TASK, {"model.onnx": b"c"})
    write_production(production, MITOSIS_TASK, {"model.onnx": b"m"})
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
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: model {'deadbeef' * 4} not found in ClearML")
    )


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
