"""The local registry: ``models/<id>.yaml`` and ``tasks/<id>.yaml`` in ClearML's record shape."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from builder import yamldoc
from builder.errors import ConfigError, RegistryError
from builder.registries import ModelRecord, TaskRecord, parse_design

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class LocalRegistry:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.description = f"local registry {folder}"
        if not (folder / "models").is_dir():
            raise RegistryError(f"{folder}: not a local model registry (no models/ folder)")

    def _record(self, kind: str, record_id: str) -> tuple[dict[str, Any], str]:
        if not _SAFE_ID.match(record_id):
            raise RegistryError(
                f"{record_id!r} is not a valid {kind} id",
                hint="ids are letters, digits, '-', '_' and '.'",
            )
        path = self.folder / f"{kind}s" / f"{record_id}.yaml"
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
        return doc.data, str(path)

    def get_model(self, model_id: str) -> ModelRecord:
        data, where = self._record("model", model_id.strip())
        return _model_from(data, where)

    def get_task(self, task_id: str) -> TaskRecord:
        data, where = self._record("task", task_id.strip())
        try:
            return TaskRecord(
                id=data["id"],
                name=data.get("name", ""),
                status=data["status"],
                project=data.get("project"),
            )
        except KeyError as exc:
            raise RegistryError(f"{where}: task record lacks {exc.args[0]!r}") from None

    def list_models(
        self, *, project: str | None = None, published: bool | None = None
    ) -> list[ModelRecord]:
        out = []
        for path in sorted((self.folder / "models").glob("*.yaml")):
            record = self.get_model(path.stem)
            if (project is None or record.project == project) and (
                published is None or record.ready == published
            ):
                out.append(record)
        return out

    def mark_published(self, model_id: str) -> bool:
        data, where = self._record("model", model_id.strip())
        if data.get("ready"):
            return False
        data["ready"] = True
        path = Path(where)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=True), "utf-8")
        os.replace(tmp, path)
        return True


def _model_from(data: dict[str, Any], where: str) -> ModelRecord:
    try:
        return ModelRecord(
            id=data["id"],
            name=data.get("name", ""),
            task=data["task"],
            uri=data.get("uri", ""),
            ready=bool(data.get("ready", False)),
            framework=data.get("framework"),
            tags=tuple(data.get("tags") or ()),
            project=data.get("project"),
            design=parse_design(data.get("design"), where),
        )
    except KeyError as exc:
        raise RegistryError(f"{where}: model record lacks {exc.args[0]!r}") from None
