"""Resolve stage: each declared model -> registry record, creating task, production files.

`sourcing: auto` models are looked up in the model registry and the production store (laid
out ``<task id>/<model id>/``, whose publish manifest must name the model asked for);
`sourcing: manual` models are files committed in the customer repo.

Registry records are taken as a real clearml-server holds them: an archived model, a model
whose creating task was deleted (``task: __DELETED__<id>``) and an imported model (no ``task``
at all: ``InputModel.import_model``) resolve, but are recorded as such (``system_tags``,
``task_status: deleted``, ``task_id: null``) and blocked by :func:`release_blockers`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from builder.contracts import CustomerSpec, ModelDecl, Plugin, ResolvedModel, WeightFile
from builder.cook.packages import archive_kind
from builder.cook.registries import (
    ARCHIVED_TAG,
    COMPLETED_TASK_STATES,
    TASK_DELETED,
    ModelRecord,
    ModelRegistry,
    TaskRecord,
)
from builder.cook.storage import MANIFEST_NAME, Store, production_folder, read_manifest
from builder.errors import RegistryError


def _plugins(raw: Any, where: str) -> tuple[Plugin, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise RegistryError(f"{where}: expected a list of {{cls, params}}")
    out = []
    for item in raw:
        if not isinstance(item, Mapping) or not isinstance(item.get("cls"), str):
            raise RegistryError(f"{where}: every entry needs a 'cls' name")
        out.append(Plugin(cls=item["cls"], params=dict(item.get("params") or {})))
    return tuple(out)


def _manual_entry(spec: CustomerSpec, name: str) -> Mapping[str, Any]:
    for analysis in spec.analysis["analyses"]:
        if name in analysis["models"]:
            entry: Mapping[str, Any] = analysis["models"][name]
            return entry
    raise KeyError(name)  # load guarantees every declared model is in some analysis


def _resolve_manual(spec: CustomerSpec, decl: ModelDecl) -> ResolvedModel:
    entry = _manual_entry(spec, decl.name)
    prefix = f"{decl.reference}/"
    files = tuple(
        WeightFile(
            name=path.removeprefix(prefix),
            uri=f"repo:{path}",
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        for path, data in sorted(spec.manual_files.items())
        if path.startswith(prefix)
    )
    where = f"{spec.analysis_path}: model {decl.name}"
    return ResolvedModel(
        name=decl.name,
        sourcing="manual",
        model_id=None,
        registry_name=None,
        task_id=None,
        task_status=None,
        project=None,
        framework=None,
        tags=(),
        published=True,  # committed in the customer repo: reviewed like any config change
        weights_uri=f"repo:{decl.reference}",
        files=files,
        preprocessing=_plugins(entry.get("preprocessing"), f"{where}.preprocessing"),
        postprocessing=_plugins(entry.get("postprocessing"), f"{where}.postprocessing"),
        params=dict(entry.get("params") or {}),
    )


def _production_files(store: Store, task_id: str, model_id: str) -> tuple[WeightFile, ...]:
    """The files of ``<task id>/<model id>/``; with a manifest, only if it names this model."""
    folder = production_folder(task_id, model_id)
    listing = {o.key.removeprefix(f"{folder}/"): o.size for o in store.list(folder)}
    listing.pop(MANIFEST_NAME, None)
    manifest = read_manifest(store, folder)
    if manifest is None:
        return tuple(
            WeightFile(name=n, uri=store.uri(f"{folder}/{n}"), size=s)
            for n, s in sorted(listing.items())
        )
    where = store.uri(f"{folder}/{MANIFEST_NAME}")
    if manifest.model_id != model_id or manifest.task_id != task_id:
        raise RegistryError(
            f"{where} is for model {manifest.model_id!r} of task {manifest.task_id!r},"
            f" not model {model_id} of task {task_id}; refusing weights that belong to another model",
            hint="re-run `builder publish` for this model and investigate the production store",
        )
    files = []
    for item in manifest.files:
        name = item.name
        if listing.get(name) != item.size:
            raise RegistryError(
                f"{store.uri(f'{folder}/{name}')}: listed in the publish manifest but missing or of another size in the store",
                hint="re-run `builder publish` for this model",
            )
        files.append(
            WeightFile(
                name=name,
                uri=store.uri(f"{folder}/{name}"),
                size=item.size,
                sha256=item.sha256,
            )
        )
    return tuple(sorted(files, key=lambda f: f.name))


def _check_package(record: ModelRecord, files: tuple[WeightFile, ...], folder: str) -> None:
    """A weights package must be in production as its extracted files (what the SDK hands a
    runner), never as the archive itself: a copy made before publish extracted packages."""
    archive = PurePosixPath(record.uri.rstrip("/")).name
    if record.package and archive_kind(archive) and archive in {f.name for f in files}:
        raise RegistryError(
            f"model {record.id} is a weights package (system tag `package`), but production "
            f"holds its archive {archive} itself, not the files ClearML extracts from it",
            hint=f"remove {folder}/ from the production store and run `builder publish {record.id}` again",
        )


def _task_of(record: ModelRecord, registry: ModelRegistry) -> TaskRecord:
    """The creating task; a deleted one (``__DELETED__<id>``) is not asked for: the server
    no longer has it. Its id is kept, its status recorded as ``deleted``."""
    if record.task_deleted:
        return TaskRecord(id=record.task, name="", status=TASK_DELETED, project=record.project)
    return registry.get_task(record.task)


def _resolve_auto(decl: ModelDecl, registry: ModelRegistry, store: Store) -> ResolvedModel:
    record = registry.get_model(decl.reference)
    if record.id != decl.reference:
        raise RegistryError(
            f"{registry.description} answered model {record.id!r} when asked for {decl.reference}"
        )
    task = _task_of(record, registry) if record.task else None
    project_id = record.project or (task.project if task else None)
    project = registry.get_project(project_id) if project_id else None
    where = f"{registry.description}: model {record.id} design"
    design = record.design
    files = _production_files(store, task.id, record.id) if task else ()
    _check_package(record, files, store.uri(production_folder(task.id, record.id)) if task else "")
    return ResolvedModel(
        name=decl.name,
        sourcing="auto",
        model_id=record.id,
        registry_name=record.name,
        task_id=task.id if task else None,
        task_status=task.status if task else None,
        project=project.name if project else project_id,
        framework=record.framework,
        tags=tuple(sorted(record.tags)),
        published=record.ready,
        # production is laid out by task: an imported model has no folder there
        weights_uri=store.uri(production_folder(task.id, record.id)) + "/" if task else "",
        files=files,
        preprocessing=_plugins(design.get("preprocessing"), f"{where}.preprocessing"),
        postprocessing=_plugins(design.get("postprocessing"), f"{where}.postprocessing"),
        params=dict(design.get("params") or {}),
        project_id=project_id,
        system_tags=tuple(sorted(record.system_tags)),
    )


def resolve(
    spec: CustomerSpec, registry: ModelRegistry | None, store: Store | None
) -> tuple[ResolvedModel, ...]:
    """Resolve every declared model; registry and store are only touched for auto models."""
    out = []
    for decl in spec.models:
        if decl.sourcing == "manual":
            out.append(_resolve_manual(spec, decl))
            continue
        if registry is None or store is None:
            raise RegistryError(
                f"model {decl.name} needs the model registry and the production store"
            )
        out.append(_resolve_auto(decl, registry, store))
    return tuple(out)


def resolve_manual(spec: CustomerSpec) -> tuple[ResolvedModel, ...]:
    """The manually sourced models alone (their files are in the customer repo: no registry)."""
    return tuple(_resolve_manual(spec, d) for d in spec.models if d.sourcing == "manual")


def release_blockers(models: Sequence[ResolvedModel]) -> list[str]:
    """Why each model may not ship in a release build (empty: all may)."""
    reasons = []
    for m in models:
        if m.sourcing != "auto":
            continue
        label = f"model {m.name} ({m.model_id})"
        if not m.published and m.task_id is not None:
            reasons.append(
                f"{label} is not published in the registry (run `builder publish {m.model_id}`)"
            )
        if ARCHIVED_TAG in m.system_tags:
            reasons.append(
                f"{label} is archived in the registry (withdrawn); restore it or pick another model"
            )
        if m.task_id is None:
            reasons.append(
                f"{label} has no creating task in the registry (an imported model): nothing "
                "records how it was trained, and production keeps weights by task"
            )
            continue
        if m.task_status == TASK_DELETED:
            reasons.append(
                f"{label}: its creating task {m.task_id} was deleted in the registry; "
                "its training record is gone"
            )
        elif m.task_status not in COMPLETED_TASK_STATES:
            reasons.append(
                f"{label}: its task {m.task_id} did not complete (status {m.task_status})"
            )
        if not m.files:
            reasons.append(f"{label}: no weights under the production store at {m.weights_uri}")
    return reasons
