"""The local registry: ClearML's record shape in a folder, for the demo and air-gapped sites.

``models/<id>.yaml``, ``tasks/<id>.yaml`` and ``projects/<id>.yaml`` hold the fields a
clearml-server answers with (apiserver/schema/services/models.conf, tasks.conf,
projects.conf): 32-hex ids, ``project`` as a project id, ``system_tags`` (``archived``),
``task`` rewritten to ``__DELETED__<id>`` when the task was deleted. Every id read from a
request or a record is checked (builder.paths.check_id) and every path goes through
builder.paths.safe_join (symlinks refused).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from builder import yamldoc
from builder.cook.registries import (
    ModelRecord,
    ProjectRef,
    TaskRecord,
    check_clearml_id,
    parse_design,
    task_reference,
)
from builder.errors import ConfigError, RegistryError
from builder.paths import CLEARML_ID, UnsafePathError, safe_join


class LocalRegistry:
    """A model registry in a folder of YAML records (models/, tasks/, projects/), for demos."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.description = f"local registry {folder}"
        if not (folder / "models").is_dir():
            raise RegistryError(f"{folder}: not a local model registry (no models/ folder)")

    def _path(self, kind: str, record_id: str) -> Path:
        check_clearml_id(record_id, f"{kind} id")
        try:
            return safe_join(self.folder, f"{kind}s", f"{record_id}.yaml", what=f"{kind} record")
        except UnsafePathError as exc:
            raise RegistryError(str(exc)) from None

    def _record(self, kind: str, record_id: str) -> tuple[dict[str, Any], str]:
        path = self._path(kind, record_id)
        if not path.is_file():
            raise RegistryError(
                f"{kind} {record_id} not found in {self.description}",
                hint="check the id, or `builder models list`",
            )
        try:
            doc = yamldoc.parse(path.read_bytes(), str(path))
            yamldoc.validate(doc, f"registry-{kind}")
        except ConfigError as exc:
            raise RegistryError(exc.message, hint="fix or re-export the record") from None
        if doc.data.get("id") != record_id:
            raise RegistryError(
                f"{path}: its id {str(doc.data.get('id'))[:80]!r} is not {record_id}"
            )
        return doc.data, str(path)

    def get_model(self, model_id: str, *, design: bool = True) -> ModelRecord:
        """The model's record from its YAML file; with ``design=False`` its design is not parsed."""
        data, where = self._record("model", model_id.strip())
        return self._model_from(data, where, parse=design)

    def get_task(self, task_id: str) -> TaskRecord:
        """The task's record from its YAML file (RegistryError when a field is missing)."""
        data, where = self._record("task", task_id.strip())
        try:
            project = data.get("project")
            return TaskRecord(
                id=data["id"],
                name=data.get("name", ""),
                status=data["status"],
                project=check_clearml_id(project, f"{where}: project") if project else None,
            )
        except KeyError as exc:
            raise RegistryError(f"{where}: task record lacks {exc.args[0]!r}") from None

    def get_project(self, project_id: str) -> ProjectRef | None:
        """The project with this id from its YAML file, None when there is none."""
        path = self._path("project", project_id)
        if not path.is_file():
            return None
        data, _ = self._record("project", project_id)
        return ProjectRef(id=project_id, name=str(data.get("name") or ""))

    def _projects(self) -> list[ProjectRef]:
        folder = self.folder / "projects"
        found = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
        return [
            p
            for p in (
                self.get_project(path.stem) for path in found if CLEARML_ID.fullmatch(path.stem)
            )
            if p
        ]

    def list_models(
        self, *, project: str | None = None, published: bool | None = None
    ) -> list[ModelRecord]:
        """Every non-archived model of the folder, without designs, filtered like ClearML's."""
        projects = {p.id: p.name for p in self._projects()}
        wanted: set[str] | None = None
        if project is not None:
            wanted = {i for i, name in projects.items() if project in (i, name)}
            if not wanted:
                raise RegistryError(
                    f"no project {project!r} in {self.description}",
                    hint="give the project's full name or its id",
                )
        out = []
        for path in sorted((self.folder / "models").glob("*.yaml")):
            data, where = self._record("model", check_clearml_id(path.stem, f"{path}: model id"))
            record = self._model_from(data, where, parse=False, names=projects)
            if record.archived:
                continue  # as the SDK's query_models: system_tags ["-archived"]
            if (wanted is None or record.project in wanted) and (
                published is None or record.ready == published
            ):
                out.append(record)
        return out

    def mark_published(self, model_id: str) -> bool:
        """Set the model's ``ready`` flag in its file (atomically); False when it already was."""
        data, where = self._record("model", model_id.strip())
        if data.get("ready"):
            return False
        data["ready"] = True
        path = Path(where)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=True), "utf-8")
        os.replace(tmp, path)
        return True

    def _model_from(
        self,
        data: dict[str, Any],
        where: str,
        *,
        parse: bool,
        names: dict[str, str] | None = None,
    ) -> ModelRecord:
        try:
            task, deleted = task_reference(data["task"], where)
            project = data.get("project")
            if project:
                check_clearml_id(project, f"{where}: project")
                if names is None:
                    ref = self.get_project(project)
                    names = {ref.id: ref.name} if ref else {}
            return ModelRecord(
                id=check_clearml_id(data["id"], f"{where}: id"),
                name=data.get("name", ""),
                task=task,
                uri=data.get("uri", ""),
                ready=bool(data.get("ready", False)),
                framework=data.get("framework"),
                tags=tuple(data.get("tags") or ()),
                project=project or None,
                design=parse_design(data.get("design"), where) if parse else {},
                system_tags=tuple(data.get("system_tags") or ()),
                task_deleted=deleted,
                project_name=(names or {}).get(project or ""),
                public=data.get("company") == "",
            )
        except KeyError as exc:
            raise RegistryError(f"{where}: model record lacks {exc.args[0]!r}") from None
