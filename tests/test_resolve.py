"""Resolve against registry records and a production store shaped as a real deployment's.

In process with the local registry (ClearML's record shape in a folder): ids and paths from
records are checked before use, weights belong to exactly one model, the store holds plain
files only. The same rules through the real clearml SDK: tests/test_registry_clearml.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import (
    CARCINOMA_ID,
    CARCINOMA_TASK,
    MITOSIS_ID,
    MITOSIS_TASK,
    customer_repo,
    local_settings,
    model_record,
    task_record,
    write_local_registry,
    write_production,
)

from builder.cook.registries.local import LocalRegistry
from builder.cook.stage import cook
from builder.cook.storage import FileStore
from builder.errors import BuilderError, FetchError, RegistryError, ReleaseGateError
from builder.settings import Settings

SIBLING_ID = "5ab1e9" + "0" * 26  # a second output model of the carcinoma task


def _settings(tmp_path: Path, models: list[dict[str, object]]) -> Settings:
    registry = write_local_registry(
        tmp_path / "registry", models, [task_record(CARCINOMA_TASK), task_record(MITOSIS_TASK)]
    )
    settings: Settings = local_settings(tmp_path, registry)
    return settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = _settings(
        tmp_path,
        [
            model_record(CARCINOMA_ID, CARCINOMA_TASK, name="carcinoma v3"),
            model_record(SIBLING_ID, CARCINOMA_TASK, name="carcinoma v3 small head"),
            model_record(MITOSIS_ID, MITOSIS_TASK, name="mitosis v1"),
        ],
    )
    production = tmp_path / "production"
    write_production(production, CARCINOMA_TASK, CARCINOMA_ID, {"model.onnx": b"carcinoma"})
    write_production(production, MITOSIS_TASK, MITOSIS_ID, {"model.onnx": b"mitosis"})
    return settings


def _repo(tmp_path: Path, carcinoma: str = CARCINOMA_ID) -> str:
    return str(customer_repo(tmp_path / "cx", carcinoma=carcinoma, mitosis=MITOSIS_ID))


def test_weights_are_keyed_by_model(settings: Settings, tmp_path: Path) -> None:
    cooked = cook(_repo(tmp_path), settings)
    carcinoma = next(m for m in cooked.models if m.name == "carcinoma_model")
    assert carcinoma.weights_uri.endswith(f"/{CARCINOMA_TASK}/{CARCINOMA_ID}/")
    assert [f.uri.rsplit("/", 3)[-3:] for f in carcinoma.files] == [
        [CARCINOMA_TASK, CARCINOMA_ID, "model.onnx"]
    ]


def test_a_sibling_output_model_never_takes_the_other_models_weights(
    settings: Settings, tmp_path: Path
) -> None:
    with pytest.raises(ReleaseGateError, match=f"{SIBLING_ID}.*no weights"):
        cook(_repo(tmp_path, carcinoma=SIBLING_ID), settings)


def test_a_manifest_naming_another_model_is_refused(settings: Settings, tmp_path: Path) -> None:
    manifest = tmp_path / "production" / CARCINOMA_TASK / CARCINOMA_ID / "publish-manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "model_id": SIBLING_ID}))
    with pytest.raises(RegistryError, match="belong to another model"):
        cook(_repo(tmp_path), settings)


@pytest.mark.parametrize(
    "task", ["../../outside", f"{CARCINOMA_TASK}/../{MITOSIS_TASK}", f"{CARCINOMA_TASK}\n", ""]
)
def test_a_task_id_from_a_record_is_checked(tmp_path: Path, task: str) -> None:
    record = {**model_record(CARCINOMA_ID, CARCINOMA_TASK, name="x"), "task": task}
    registry = LocalRegistry(write_local_registry(tmp_path / "registry", [record], []))
    if not task:
        assert registry.get_model(CARCINOMA_ID).task == ""
        return
    with pytest.raises(RegistryError, match=r"task id .* is not a valid id"):
        registry.get_model(CARCINOMA_ID)


@pytest.mark.parametrize("model_id", ["../models/x", "a957f623-e6d3-4159-a07a-ec1b8323eb54"])
def test_a_model_id_is_checked_before_any_path(tmp_path: Path, model_id: str) -> None:
    registry = LocalRegistry(write_local_registry(tmp_path / "registry", [], []))
    with pytest.raises(RegistryError, match="is not a valid id"):
        registry.get_model(model_id)


def test_a_record_whose_id_is_not_its_file_name_is_refused(tmp_path: Path) -> None:
    folder = write_local_registry(
        tmp_path / "registry", [model_record(CARCINOMA_ID, CARCINOMA_TASK, name="x")], []
    )
    os.replace(folder / "models" / f"{CARCINOMA_ID}.yaml", folder / "models" / f"{MITOSIS_ID}.yaml")
    with pytest.raises(RegistryError, match=f"its id '{CARCINOMA_ID}' is not {MITOSIS_ID}"):
        LocalRegistry(folder).get_model(MITOSIS_ID)


@pytest.mark.parametrize("where", ["file", "folder"])
def test_symlinks_inside_the_production_store_are_refused(
    settings: Settings, tmp_path: Path, where: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(b"not what was published")
    folder = tmp_path / "production" / CARCINOMA_TASK / CARCINOMA_ID
    if where == "file":
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").symlink_to(outside / "model.onnx")
    else:
        for path in folder.iterdir():
            os.replace(path, outside / path.name)
        folder.rmdir()
        folder.symlink_to(outside)
    with pytest.raises(BuilderError, match="symbolic link"):
        cook(_repo(tmp_path), settings)


def test_file_store_keys_never_leave_the_store(tmp_path: Path) -> None:
    store = FileStore(f"file:{tmp_path / 'store'}", tmp_path)
    for key in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(FetchError, match="leaves its folder"):
            store.read_bytes(key)


def test_archived_and_orphaned_models_are_development_only(tmp_path: Path) -> None:
    archived = {
        **model_record(CARCINOMA_ID, CARCINOMA_TASK, name="c"),
        "system_tags": ["archived"],
    }
    orphan = {
        **model_record(MITOSIS_ID, MITOSIS_TASK, name="m"),
        "task": f"__DELETED__{MITOSIS_TASK}",
    }
    settings = _settings(tmp_path, [archived, orphan])
    production = tmp_path / "production"
    write_production(production, CARCINOMA_TASK, CARCINOMA_ID, {"model.onnx": b"c"})
    write_production(production, MITOSIS_TASK, MITOSIS_ID, {"model.onnx": b"m"})
    with pytest.raises(
        ReleaseGateError, match=r"2 release gates failed: .*is archived .*was deleted"
    ):
        cook(_repo(tmp_path), settings)
    cooked = cook(_repo(tmp_path), settings, allow_unpublished=True)
    assert cooked.development
    assert any("was deleted" in w for w in cooked.warnings)
    mitosis = next(m for m in cooked.models if m.name == "mitosis_model")
    assert (mitosis.task_id, mitosis.task_status) == (MITOSIS_TASK, "deleted")
