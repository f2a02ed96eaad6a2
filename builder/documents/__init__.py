"""Typed documents that cross module boundaries: each a frozen dataclass with to_dict/from_dict
and a JSON Schema in builder/schemas; to_dict gives the exact shape (and key order) written."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import jsonschema

from builder import yamldoc
from builder.errors import ConfigError

#: How a model is sourced: by registry id, or from a folder of the customer repository.
Sourcing = Literal["auto", "manual"]


def sourcing(value: str) -> Sourcing:
    """``value`` as the closed vocabulary (the schemas admit no other)."""
    if value == "auto":
        return "auto"
    if value == "manual":
        return "manual"
    raise ConfigError(f"sourcing {value!r} is neither auto nor manual")


def check_document(data: Mapping[str, Any], schema: str, where: str, hint: str) -> None:
    """Refuse ``data`` that breaks the named schema: one ConfigError naming ``where`` and the
    first offending key (``<key> <value> is missing or malformed``)."""
    validator = jsonschema.Draft202012Validator(yamldoc.schema(schema))
    error = min(
        validator.iter_errors(dict(data)), key=lambda e: list(e.absolute_path), default=None
    )
    if error is None:
        return
    path: tuple[str | int, ...] = tuple(error.absolute_path)
    value: Any = error.instance
    if error.validator == "required" and isinstance(error.instance, Mapping):
        missing = next(str(k) for k in error.validator_value if k not in error.instance)
        path, value = (*path, missing), ""
    raise ConfigError(
        f"{where}: {yamldoc.dotted(path)} {value!r} is missing or malformed", hint=hint
    )


@dataclass(frozen=True)
class FileDigest:
    """One weight file: its name in the model folder, size and sha256."""

    name: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """The written form: name, size, sha256."""
        return {"name": self.name, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileDigest:
        """Read a file entry as written by :meth:`to_dict`."""
        return cls(name=data["name"], size=data["size"], sha256=data["sha256"])


@dataclass(frozen=True)
class ModelRecord:
    """One model of an image, the one record provenance.json, the build report and the release
    record share: its name and sourcing, registry id and name, task, weights URI, in-toto
    ``dirHash`` and files. A release record keeps ids and hashes only (:meth:`to_record_dict`),
    so one read from it has no ``registry_name`` or ``weights_uri`` (None)."""

    name: str
    sourcing: Sourcing
    registry_id: str | None
    registry_name: str | None
    task_id: str | None
    weights_uri: str | None
    dir_hash: str  # in-toto dirHash over the sorted sha256sum lines
    files: tuple[FileDigest, ...]

    def to_dict(self) -> dict[str, Any]:
        """The form of provenance.json and the build report, keys in the written order."""
        return {
            "name": self.name,
            "sourcing": self.sourcing,
            "registry_id": self.registry_id,
            "registry_name": self.registry_name,
            "task_id": self.task_id,
            "weights_uri": self.weights_uri,
            "dir_hash": self.dir_hash,
            "files": [f.to_dict() for f in self.files],
        }

    def recorded(self) -> ModelRecord:
        """This model as a release record keeps it (and reads it back): no registry name or
        weights URI."""
        return replace(self, registry_name=None, weights_uri=None)

    def to_record_dict(self) -> dict[str, Any]:
        """The release record's form: ids and hashes, keys in its written order."""
        return {
            "name": self.name,
            "sourcing": self.sourcing,
            "registry_id": self.registry_id,
            "task_id": self.task_id,
            "dir_hash": self.dir_hash,
            "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in self.files],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRecord:
        """Read either form (the release record's lacks ``registry_name`` and ``weights_uri``)."""
        return cls(
            name=data["name"],
            sourcing=data["sourcing"],
            registry_id=data.get("registry_id"),
            registry_name=data.get("registry_name"),
            task_id=data.get("task_id"),
            weights_uri=data.get("weights_uri"),
            dir_hash=data["dir_hash"],
            files=tuple(FileDigest.from_dict(f) for f in data.get("files") or ()),
        )
