"""Typed documents that cross module boundaries: each a frozen dataclass with to_dict/from_dict
and a JSON Schema in builder/schemas; to_dict gives the exact shape (and key order) written."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
