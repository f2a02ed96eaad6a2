"""The in-image provenance record, /app/config/provenance.json (``explain`` reads it back).

Only inputs go in (config commit, model ids and sha256, tool version, the config commit time),
so the same inputs give the same bytes and the same image digest; no location (see
:func:`builder.image.provenance.image_locations`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from builder.documents import ModelRecord, check_document

PROVENANCE_VERSION: Final = 1
SCHEMA: Final = "provenance"
_HINT: Final = "the image was not built by this builder, or its provenance was altered"


@dataclass(frozen=True)
class Provenance:
    """What an image was built from: the config (repository, commit, analysis file, verbose
    sha256), the base image constraint, the models, the builder and the commit time."""

    customer: str
    # ``<url>#<folder>``: from image format 3 only the address customer.yaml declares (None:
    # none declared); before, the observed canonical origin
    config_repository: str | None
    config_commit: str
    config_path: str  # the customer folder inside the repository, ``.`` at its root
    config_analysis: str
    verbose_sha256: str
    worktree: bool  # built from uncommitted files (then also ``dirty`` in the written form)
    base_constraint: str
    models: tuple[ModelRecord, ...]
    builder_name: str
    builder_version: str
    source_date_epoch: int
    development_build: bool

    def to_dict(self) -> dict[str, Any]:
        """The written form (canonical JSON of it is provenance.json)."""
        config: dict[str, Any] = {
            "repository": self.config_repository,
            "commit": self.config_commit,
            "path": self.config_path,
            "analysis": self.config_analysis,
            "verbose_sha256": self.verbose_sha256,
            "worktree": self.worktree,
        }
        if self.worktree:  # uncommitted files: not reproducible from the recorded commit
            config["dirty"] = True
        return {
            "provenance_version": PROVENANCE_VERSION,
            "customer": self.customer,
            "config": config,
            # Only the constraint: the resolved base (name, version, digest) is in the image
            # config labels and the manifest annotations, so this layer, like the model layers,
            # is unchanged by a base bump and a fleet rebuild uploads only configs and manifests.
            "base_image": {"constraint": self.base_constraint},
            "models": [m.to_dict() for m in self.models],
            "builder": {"name": self.builder_name, "version": self.builder_version},
            "source_date_epoch": self.source_date_epoch,
            "development_build": self.development_build,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "provenance.json") -> Provenance:
        """Read provenance.json; a malformed one is a ConfigError naming ``where`` and the key."""
        check_document(data, SCHEMA, where, _HINT)
        config = data["config"]
        return cls(
            customer=data["customer"],
            config_repository=config["repository"],
            config_commit=config["commit"],
            config_path=config["path"],
            config_analysis=config["analysis"],
            verbose_sha256=config["verbose_sha256"],
            worktree=config["worktree"],
            base_constraint=data["base_image"]["constraint"],
            models=tuple(ModelRecord.from_dict(m) for m in data["models"]),
            builder_name=data["builder"]["name"],
            builder_version=data["builder"]["version"],
            source_date_epoch=data["source_date_epoch"],
            development_build=data["development_build"],
        )
