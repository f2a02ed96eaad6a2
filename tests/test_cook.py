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
    SeedModel,
    commit_files,
    customer_repo,
    local_settings,
    model_record,
    seed_models,
    task_record,
    write_local_registry,
    write_production,
)

from builder.cook.fetch import Cache
from builder.cook.stage import cook, make_customer_lock
from builder.errors import DriftError, RegistryError, ReleaseGateError
from builder.imagename import ImageName
from builder.settings import Settings

WEIGHTS = {
    (CARCINOMA_TASK, CARCINOMA_ID): b"carcinoma-weights",
    (MITOSIS_TASK, MITOSIS_ID): b"mitosis-weights",
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    models = seed_models(
        tmp_path,
        [
            SeedModel(
                CARCINOMA_ID,
                CARCINOMA_TASK,
                "carcinoma v3",
                {"model.onnx": WEIGHTS[CARCINOMA_TASK, CARCINOMA_ID]},
            ),
            SeedModel(
                MITOSIS_ID,
                MITOSIS_TASK,
                "mitosis v1",
                {"model.onnx": WEIGHTS[MITOSIS_TASK, MITOSIS_ID]},
            ),
        ],
    )
    settings: Settings = local_settings(tmp_path, models.registry)
    return settings


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return customer_repo(tmp_path / "cx", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)


def test_config_is_expanded_once_per_model_set(repo: Path, settings: Settings) -> None:
    """The build flows one way: the same models keep the expansion; fetched (filled) models
    give a new one, from those models."""
    cooked = cook(str(repo), settings)
    assert cooked.with_models(cooked.models) is cooked
    assert cooked.verbose is cooked.verbose  # expanded once, then kept
    first = cooked.models[0]
    emptied = (replace(first, files=()), *cooked.models[1:])
    other = cooked.with_models(emptied)
    assert other is not cooked and other.models == emptied
    slot = other.verbose["analyses"][0]["models"][first.name]
    assert slot["provenance"]["files"] == []


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


def test_the_production_store_spelling_is_no_change(
    repo: Path, settings: Settings, tmp_path: Path
) -> None:
    """A lock made with the production store spelled one way: another spelling of the same
    store (relative to the settings' folder, file://, a trailing slash) is no drift and
    a locked cook accepts it; another store holding the same files is a location change,
    never "weights changed"."""
    import shutil

    cache = Cache(tmp_path / "cache")
    result = make_customer_lock(cook(str(repo), settings), cache, base=None, check=False)
    assert result.path is not None
    commit_files(repo, {"customer.lock.yaml": result.path.read_bytes()}, "lock")
    production = tmp_path / "production"
    for spelled in ("file:production", f"file://{production}/", f"file:{production}//"):
        other = replace(settings, production=spelled, root=tmp_path)
        checked = make_customer_lock(cook(str(repo), other), cache, base=None, check=True)
        assert checked.drift == ()
        locked = cook(str(repo), other, locked=True)
        assert locked.located.verbose_yaml == cook(str(repo), settings).located.verbose_yaml
    shutil.copytree(production, tmp_path / "mirror")
    moved = replace(settings, production=f"file:{tmp_path / 'mirror'}")
    with pytest.raises(DriftError) as raised:
        make_customer_lock(cook(str(repo), moved), cache, base=None, check=True)
    assert "mitosis_model: weights location" in raised.value.message
    assert "weights changed" not in raised.value.message


def test_locked_cook_never_calls_the_registry(
    repo: Path, settings: Settings, tmp_path: Path
) -> None:
    result = make_customer_lock(
        cook(str(repo), settings), Cache(tmp_path / "cache"), base=None, check=False
    )
    commit_files(
        repo, {"customer.lock.yaml": result.path.read_bytes() if result.path else b""}, "lock"
    )
    # The registry is gone; the production store stays: lock entries must lie under it.
    offline = replace(settings, model_registry="local:/does/not/exist")
    locked = cook(str(repo), offline, locked=True)
    assert locked.verbose_yaml == cook(str(repo), settings).verbose_yaml


def _lock_then_change(
    repo: Path, settings: Settings, cache: Cache, *, mitosis: str, threshold: float
) -> None:
    """Commit a lock, then an analysis change that the lock does not follow."""
    result = make_customer_lock(cook(str(repo), settings), cache, base=None, check=False)
    commit_files(
        repo, {"customer.lock.yaml": result.path.read_bytes() if result.path else b""}, "lock"
    )
    text = ANALYSIS_YAML.format(carcinoma=CARCINOMA_ID, mitosis=mitosis, threshold=threshold)
    commit_files(repo, {"analysis.yaml": text}, "change without re-locking")


def test_locked_cook_refuses_a_stale_lock(repo: Path, settings: Settings, tmp_path: Path) -> None:
    _lock_then_change(repo, settings, Cache(tmp_path / "cache"), mitosis=MITOSIS_ID, threshold=0.7)
    # exit 7 (drift), saying what changed key by key, not only "analysis.yaml changed"
    with pytest.raises(DriftError) as raised:
        cook(str(repo), settings, locked=True)
    assert raised.value.exit_code == 7
    assert (
        "analysis.yaml: analyses[breast].features[Carcinoma].params.threshold 0.5 -> 0.7"
        in raised.value.message
    )


def test_lock_check_names_changed_models_and_params(
    repo: Path, settings: Settings, tmp_path: Path
) -> None:
    cache = Cache(tmp_path / "cache")
    other = "0123abcd" * 4
    write_local_registry(
        _registry_folder(settings), [model_record(other, MITOSIS_TASK, name="mitosis v2")], []
    )
    # the second output model of the same task has its own production folder
    write_production(tmp_path / "production", MITOSIS_TASK, other, {"model.onnx": b"mitosis v2"})
    _lock_then_change(repo, settings, cache, mitosis=other, threshold=0.6)
    with pytest.raises(DriftError) as raised:
        make_customer_lock(cook(str(repo), settings), cache, base=None, check=True)
    message = raised.value.message
    assert f"models.mitosis_model.reference {MITOSIS_ID[:12]} -> {other[:12]}" in message
    assert "params.threshold 0.5 -> 0.6" in message
    assert f"mitosis_model: model_id {MITOSIS_ID[:12]} -> {other[:12]}" in message


def test_every_release_gate_reason_is_listed(repo: Path, settings: Settings) -> None:
    write_local_registry(
        _registry_folder(settings),
        [
            model_record(CARCINOMA_ID, CARCINOMA_TASK, name="carcinoma v3", ready=False),
            model_record(MITOSIS_ID, MITOSIS_TASK, name="mitosis v1", ready=False),
        ],
        [task_record(MITOSIS_TASK, status="failed")],
    )
    with pytest.raises(ReleaseGateError) as raised:
        cook(str(repo), settings)
    message = raised.value.message
    assert message.startswith("3 release gates failed: ")
    assert "and 2 more" not in message
    assert f"carcinoma_model ({CARCINOMA_ID}) is not published" in message
    assert f"mitosis_model ({MITOSIS_ID}) is not published" in message
    assert "did not complete (status failed)" in message


def test_unknown_model_id_names_the_line_the_slot_and_a_guess(
    repo: Path, settings: Settings
) -> None:
    typo = CARCINOMA_ID[:-1] + ("0" if CARCINOMA_ID[-1] != "0" else "1")
    text = ANALYSIS_YAML.format(carcinoma=typo, mitosis=MITOSIS_ID, threshold=0.5)
    commit_files(repo, {"analysis.yaml": text}, "typo")
    with pytest.raises(RegistryError) as raised:
        cook(str(repo), settings)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if typo in t)
    message = raised.value.message
    assert f"analysis.yaml:{line}: analyses[0].models.carcinoma_model.reference" in message
    assert "model slot 'carcinoma_model'" in message
    assert f"did you mean {CARCINOMA_ID} (carcinoma v3)?" in message


def test_uncommitted_edits_are_reported_and_worktree_builds_are_development(
    repo: Path, settings: Settings
) -> None:
    (repo / "analysis.yaml").write_text(
        ANALYSIS_YAML.format(carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=0.9)
    )
    cooked = cook(str(repo), settings)
    assert any(
        "uncommitted changes that this build does not include (analysis.yaml)" in w
        for w in cooked.warnings
    )
    assert not cooked.development
    dirty = cook(str(repo), settings, worktree=True)
    assert dirty.development and dirty.spec.worktree
    name = ImageName.of_build(
        "r", "c", "2.4.1", "cpu", dirty.spec.commit, dirty=dirty.spec.worktree
    )
    assert name.tag == f"2.4.1-{dirty.spec.commit[:12]}-dirty"
    assert any("--worktree" in w for w in dirty.warnings)


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
