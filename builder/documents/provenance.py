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
from builder.errors import ConfigError

PROVENANCE_VERSION: Final = 1
SCHEMA: Final = "provenance"
_HINT: Final = "the image was not built by this builder, or its provenance was altered"
#: Keys of ``base_image`` that builders before the constraint-only record wrote (the resolved
#: base, now in the image labels and manifest annotations). Read back from such an image
#: (``from_dict(..., recorded=True)``), never written by this version; the schema, which
#: describes the written form, does not admit them.
_OLDER_BASE_KEYS: Final = ("repository", "version", "digest")


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
    # The resolved base as builders before the constraint-only record wrote it (None: not
    # recorded, as by every build of this version): kept when an older image is read back, so
    # explain can check it against the labels and show the document as the image holds it.
    base_repository: str | None = None
    base_version: str | None = None
    base_digest: str | None = None

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
            "base_image": {"constraint": self.base_constraint, **self._older_base()},
            "models": [m.to_dict() for m in self.models],
            "builder": {"name": self.builder_name, "version": self.builder_version},
            "source_date_epoch": self.source_date_epoch,
            "development_build": self.development_build,
        }

    def _older_base(self) -> dict[str, str]:
        """The resolved base an older builder recorded, as it wrote it (empty for this one)."""
        recorded = (self.base_repository, self.base_version, self.base_digest)
        return {k: v for k, v in zip(_OLDER_BASE_KEYS, recorded, strict=True) if v is not None}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], where: str = "provenance.json", *, recorded: bool = False
    ) -> Provenance:
        """Read provenance.json; a malformed one is a ConfigError naming ``where`` and the key.

        ``recorded``: the document is an image's own record, written by any builder version
        (explain, verify): the resolved base older builders wrote into ``base_image`` is
        admitted and kept in the ``base_*`` fields. Without it the document must be the form
        this version writes."""
        base = data.get("base_image")
        older: dict[str, Any] = {}
        if recorded and isinstance(base, Mapping):
            older = {k: base[k] for k in _OLDER_BASE_KEYS if k in base}
            for key, value in older.items():
                if value is not None and not isinstance(value, str):
                    raise ConfigError(
                        f"{where}: base_image.{key} {value!r} is missing or malformed", hint=_HINT
                    )
            rest = {k: v for k, v in base.items() if k not in older}
            data = {**data, "base_image": rest}
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
            base_repository=older.get("repository"),
            base_version=older.get("version"),
            base_digest=older.get("digest"),
        )
