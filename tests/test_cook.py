"""Resolve, expand, release gates and the lock, against the local registry backend."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from helpers import (
    ANALYSIS_YAML,
    CARCINOMA_ID,
    CARCINOMA_TASK,
    MITOSIS_ID,
    MITOSIS_TASK,
    commit_files,
    customer_repo,
    local_settings,
    model_record,
    task_record,
    write_local_registry,
    write_production,
)

from builder.cook import cook, make_customer_lock
from builder.errors import ConfigError, DriftError, RegistryError, ReleaseGateError
from builder.fetch import Cache
from builder.settings import Settings

WEIGHTS = {
    (CARCINOMA_TASK, CARCINOMA_ID): b"carcinoma-weights",
    (MITOSIS_TASK, MITOSIS_ID): b"mitosis-weights",
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    registry = write_local_registry(
        tmp_path / "registry",
        [
            model_record(CARCINOMA_ID, CARCINOMA_TASK, name="carcinoma v3"),
            model_record(MITOSIS_ID, MITOSIS_TASK, name="mitosis v1"),
        ],
        [task_record(CARCINOMA_TASK), task_record(MITOSIS_TASK)],
    )
    for (task, model), data in WEIGHTS.items():
        write_production(tmp_path / "production", task, model, {"model.onnx": data})
    settings: Settings = local_settings(tmp_path, registry)
    return settings


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return customer_repo(tmp_path / "cx", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)


def test_expand_gives_the_verbose_form(repo: Path, settings: Settings) -> None:
    cooked = cook(str(repo), settings)
    analysis = cooked.verbose["analyses"][0]
    carcinoma = analysis["models"]["carcinoma_model"]
    assert cooked.verbose["schema_version"] == 1
    assert carcinoma["sourcing"] == "manual"
    assert carcinoma["reference"] == "models/carcinoma_model/"
    assert carcinoma["preprocessing"] == [{"cls": "Normalization", "params": {"factor": 255.0}}]
    assert carcinoma["params"]["tile_size"] == 64
    assert carcinoma["provenance"]["registry_id"] == CARCINOMA_ID
    assert carcinoma["provenance"]["task_id"] == CARCINOMA_TASK
    assert (
        carcinoma["provenance"]["files"][0]["sha256"]
        == hashlib.sha256(WEIGHTS[CARCINOMA_TASK, CARCINOMA_ID]).hexdigest()
    )
    # Everything but `models` passes through untouched.
    assert analysis["features"][1] == {
        "cls": "Mitosis",
        "models": {"segmentation_model": "mitosis_model"},
        "depends_on": ["Carcinoma"],
    }
    assert not cooked.development


def test_expand_is_byte_identical_across_runs(repo: Path, settings: Settings) -> None:
    assert cook(str(repo), settings).verbose_yaml == cook(str(repo), settings).verbose_yaml


def test_verbose_config_matches_the_runner_schema(repo: Path, settings: Settings) -> None:
    import jsonschema

    from builder import yamldoc

    jsonschema.validate(
        yaml.safe_load(cook(str(repo), settings).verbose_yaml), yamldoc.schema("analysis-verbose")
    )


def test_unknown_model_id(repo: Path, settings: Settings) -> None:
    commit_files(
        repo,
        {
            "analysis.yaml": ANALYSIS_YAML.format(
                carcinoma="deadbeef" * 4, mitosis=MITOSIS_ID, threshold=0.5
            )
        },
        "typo",
    )
    with pytest.raises(RegistryError, match=f"model {'deadbeef' * 4} not found"):
        cook(str(repo), settings)


def _registry_folder(settings: Settings) -> Path:
    return Path(settings.model_registry.removeprefix("local:"))


def test_unpublished_model_is_refused_for_release(repo: Path, settings: Settings) -> None:
    write_local_registry(
        _registry_folder(settings),
        [model_record(MITOSIS_ID, MITOSIS_TASK, name="mitosis v1", ready=False)],
        [],
    )
    with pytest.raises(
        ReleaseGateError, match=f"model mitosis_model \\({MITOSIS_ID}\\) is not published"
    ):
        cook(str(repo), settings)
    cooked = cook(str(repo), settings, allow_unpublished=True)
    assert cooked.development and "not published" in cooked.warnings[0]


def test_task_not_completed_is_refused(repo: Path, settings: Settings) -> None:
    write_local_registry(
        _registry_folder(settings), [], [task_record(CARCINOMA_TASK, status="failed")]
    )
    with pytest.raises(ReleaseGateError, match="did not complete \\(status failed\\)"):
        cook(str(repo), settings)


def test_weights_missing_from_production_are_refused(
    repo: Path, settings: Settings, tmp_path: Path
) -> None:
    for path in (tmp_path / "production" / MITOSIS_TASK / MITOSIS_ID).iterdir():
        path.unlink()
    with pytest.raises(ReleaseGateError, match="no weights under the production store"):
        cook(str(repo), settings)


def test_lock_write_check_and_drift(repo: Path, settings: Settings, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    result = make_customer_lock(cook(str(repo), settings), cache, base=None, check=False)
    assert result.path == repo / "customer.lock.yaml"
    lock = yaml.safe_load(result.path.read_bytes())
    assert (
        lock["models"]["mitosis_model"]["files"][0]["sha256"]
        == hashlib.sha256(WEIGHTS[MITOSIS_TASK, MITOSIS_ID]).hexdigest()
    )
    commit_files(repo, {"customer.lock.yaml": result.path.read_bytes()}, "lock")
    make_customer_lock(cook(str(repo), settings), cache, base=None, check=True)

    # Someone re-publishes different weights under the same task: the check names it.
    write_production(
        tmp_path / "production", MITOSIS_TASK, MITOSIS_ID, {"model.onnx": b"retrained"}
    )
    with pytest.raises(DriftError, match="mitosis_model: weights changed"):
        make_customer_lock(cook(str(repo), settings), cache, base=None, check=True)


def test_locked_cook_never_calls_the_registry(
    repo: Path, settings: Settings, tmp_path: Path
) -> None:
    result = make_customer_lock(
        cook(str(repo), settings), Cache(tmp_path / "cache"), base=None, check=False
    )
    commit_files(
        repo, {"customer.lock.yaml": result.path.read_bytes() if result.path else b""}, "lock"
    )
    offline = replace(
        settings, model_registry="local:/does/not/exist", production="file:/does/not/exist"
    )
    locked = cook(str(repo), offline, locked=True)
    assert locked.verbose_yaml == cook(str(repo), settings).verbose_yaml


def test_locked_cook_refuses_a_stale_lock(repo: Path, settings: Settings, tmp_path: Path) -> None:
    result = make_customer_lock(
        cook(str(repo), settings), Cache(tmp_path / "cache"), base=None, check=False
    )
    commit_files(
        repo, {"customer.lock.yaml": result.path.read_bytes() if result.path else b""}, "lock"
    )
    commit_files(
        repo,
        {
            "analysis.yaml": ANALYSIS_YAML.format(
                carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=0.7
            )
        },
        "threshold",
    )
    with pytest.raises(ConfigError, match=r"stale: analysis\.yaml changed"):
        cook(str(repo), settings, locked=True)


def test_manual_model_from_the_customer_repo(repo: Path, settings: Settings) -> None:
    analysis = ANALYSIS_YAML.format(
        carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=0.5
    ).replace(
        f"sourcing: auto\n      reference: {MITOSIS_ID}",
        "sourcing: manual\n      reference: weights/mitosis\n      params: {file: model.onnx, tile_size: 64}\n"
        "      postprocessing: [{cls: MaskToObjects, params: {min_area: 4}}]",
    )
    commit_files(
        repo,
        {"analysis.yaml": analysis, "weights/mitosis/model.onnx": b"in-repo"},
        "ship own model",
    )
    model = cook(str(repo), settings).verbose["analyses"][0]["models"]["mitosis_model"]
    assert model["reference"] == "models/mitosis_model/"
    assert model["postprocessing"] == [{"cls": "MaskToObjects", "params": {"min_area": 4}}]
    assert model["provenance"]["source"] == "customer-repo"
    assert model["provenance"]["files"] == [
        {"name": "model.onnx", "size": 7, "sha256": hashlib.sha256(b"in-repo").hexdigest()}
    ]
