"""The lock file (customer.lock.yaml): every input of a customer's image pinned.

Made by ``builder lock`` (:func:`builder.cook.lock.make_lock`), read by ``--locked`` builds,
release builds (drift), ``validate``, the audit's history and ``verify``; all of them use this
one type. ``to_dict`` gives the exact mapping (and key order) the file holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from builder.contracts import LOCK_VERSION, BaseImageRef, Plugin, ResolvedModel
from builder.documents import Sourcing, check_document, sourcing

SCHEMA: Final = "lock"
_HINT: Final = "regenerate it with `builder lock`"


@dataclass(frozen=True)
class LockedFile:
    """One pinned weight file: its name in the model folder, where it lies, size, sha256."""

    name: str
    uri: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """The file's entry as the lock document writes it."""
        return {"name": self.name, "uri": self.uri, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class LockedModel:
    """One model as the registry (or the repository) gave it when the lock was made."""

    sourcing: Sourcing
    model_id: str | None
    registry_name: str | None
    task_id: str | None
    task_status: str | None
    project: str | None
    project_id: str | None
    system_tags: tuple[str, ...]
    framework: str | None
    tags: tuple[str, ...]
    published: bool
    weights_uri: str
    files: tuple[LockedFile, ...]
    preprocessing: tuple[Plugin, ...]
    postprocessing: tuple[Plugin, ...]
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, m: ResolvedModel) -> LockedModel:
        """The lock entry of a resolved model (every file's sha256 and size known)."""
        return cls(
            sourcing=sourcing(m.sourcing),
            model_id=m.model_id,
            registry_name=m.registry_name,
            task_id=m.task_id,
            task_status=m.task_status,
            project=m.project,
            project_id=m.project_id,
            system_tags=tuple(m.system_tags),
            framework=m.framework,
            tags=tuple(m.tags),
            published=m.published,
            weights_uri=m.weights_uri,
            files=tuple(LockedFile(f.name, f.uri, f.size or 0, f.sha256 or "") for f in m.files),
            preprocessing=tuple(m.preprocessing),
            postprocessing=tuple(m.postprocessing),
            params=dict(m.params),
        )

    def to_dict(self) -> dict[str, Any]:
        """The file's entry, keys in the written order."""
        return {
            "sourcing": self.sourcing,
            "model_id": self.model_id,
            "registry_name": self.registry_name,
            "task_id": self.task_id,
            "task_status": self.task_status,
            "project": self.project,
            "project_id": self.project_id,
            "system_tags": list(self.system_tags),
            "framework": self.framework,
            "tags": list(self.tags),
            "published": self.published,
            "weights_uri": self.weights_uri,
            "files": [f.to_dict() for f in self.files],
            "preprocessing": [p.to_dict() for p in self.preprocessing],
            "postprocessing": [p.to_dict() for p in self.postprocessing],
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LockedModel:
        """Read an entry the ``lock`` schema accepted (older locks lack project_id and
        system_tags)."""
        return cls(
            sourcing=sourcing(data["sourcing"]),
            model_id=data["model_id"],
            registry_name=data["registry_name"],
            task_id=data["task_id"],
            task_status=data["task_status"],
            project=data["project"],
            project_id=data.get("project_id"),
            system_tags=tuple(data.get("system_tags") or ()),
            framework=data["framework"],
            tags=tuple(data["tags"]),
            published=data["published"],
            weights_uri=data["weights_uri"],
            files=tuple(
                LockedFile(f["name"], f["uri"], f["size"], f["sha256"]) for f in data["files"]
            ),
            preprocessing=tuple(Plugin(p["cls"], p["params"]) for p in data["preprocessing"]),
            postprocessing=tuple(Plugin(p["cls"], p["params"]) for p in data["postprocessing"]),
            params=data["params"],
        )


@dataclass(frozen=True)
class LockedBase:
    """The base image resolved when the lock was made: repository, constraint, version, digest."""

    repository: str
    version: str
    constraint: str | None = None
    digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The base image's entry as the lock document writes it."""
        return {
            "repository": self.repository,
            "constraint": self.constraint,
            "version": self.version,
            "digest": self.digest,
        }


@dataclass(frozen=True)
class Lock:
    """customer.lock.yaml: the customer, the sha256 of the config files it was made from, every
    model by name, and the base image (absent when none could be resolved)."""

    customer: str
    inputs: Mapping[str, str]
    models: Mapping[str, LockedModel]
    base_image: LockedBase | None = None

    @classmethod
    def make(
        cls,
        customer: str,
        inputs: Mapping[str, str],
        models: tuple[ResolvedModel, ...],
        base: BaseImageRef | None,
        constraint: str,
    ) -> Lock:
        """The lock of resolved models and a resolved base."""
        pinned = (
            LockedBase(base.repository, base.version, constraint, base.digest)
            if base is not None
            else None
        )
        return cls(customer, dict(inputs), {m.name: LockedModel.of(m) for m in models}, pinned)

    def to_dict(self) -> dict[str, Any]:
        """The file's mapping, keys in the written order."""
        out: dict[str, Any] = {
            "lock_version": LOCK_VERSION,
            "customer": self.customer,
            "inputs": dict(self.inputs),
            "models": {name: m.to_dict() for name, m in self.models.items()},
        }
        if self.base_image is not None:
            out["base_image"] = self.base_image.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "customer.lock.yaml") -> Lock:
        """Read a lock file's mapping; a malformed one is a ConfigError naming ``where`` and the
        offending key."""
        check_document(data, SCHEMA, where, _HINT)
        base = data.get("base_image")
        return cls(
            customer=data["customer"],
            inputs=dict(data["inputs"]),
            models={name: LockedModel.from_dict(m) for name, m in data["models"].items()},
            base_image=LockedBase(
                repository=base["repository"],
                version=base["version"],
                constraint=base.get("constraint"),
                digest=base.get("digest"),
            )
            if base
            else None,
        )
