"""The release record: what one pushed release build shipped, committed on the releases branch.

Written by builder.record (``release_record`` makes it, ``render_record`` writes it) and read
back by the audit (``ReleaseRecord.from_dict``); both use this one shape (record_version 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from builder.documents import ModelRecord, check_document
from builder.imagename import ImageName

#: Version of the release record layout (bump on any incompatible change).
RECORD_VERSION: Final = 1
SCHEMA: Final = "release-record"
_HINT: Final = "release records are append-only: add a corrected record, do not edit"


@dataclass(frozen=True)
class ReleaseRecord:
    """One released image: config commit, image and digest, base image, models, when, which CI job.

    ``config_repository``/``config_path`` are the canonical source (``path`` is ``.`` for a
    repository root); ``base_*`` the base image the image was built on.
    """

    customer: str
    config_repository: str
    config_path: str
    config_commit: str
    image: str  # the immutable reference
    manifest_digest: str
    tags: tuple[str, ...]
    base_repository: str
    base_version: str
    base_digest: str
    models: tuple[ModelRecord, ...]
    built_at: str  # RFC 3339 UTC
    builder_version: str
    ci_url: str | None = None
    ci_pipeline_url: str | None = None
    #: Where a reader found it (``releases/<customer>/<file>`` on the branch); not written.
    path: str = field(default="", compare=False)

    @property
    def name(self) -> ImageName:
        """The released image's name (ConfigError if ``image`` is not one on ``base_version``)."""
        return ImageName.parse(self.image, base_version=self.base_version)

    @property
    def base(self) -> dict[str, str]:
        """The base image as the build report names it: repository, version, digest."""
        return {
            "repository": self.base_repository,
            "version": self.base_version,
            "digest": self.base_digest,
        }

    def to_dict(self) -> dict[str, Any]:
        """The record file's mapping, keys in the written (readable) order."""
        out: dict[str, Any] = {
            "record_version": RECORD_VERSION,
            "customer": self.customer,
            "config": {
                "repository": self.config_repository,
                "path": self.config_path,
                "commit": self.config_commit,
            },
            "image": self.image,
            "manifest_digest": self.manifest_digest,
            "tags": list(self.tags),
            "base_image": self.base,
            "models": [m.to_record_dict() for m in self.models],
            "built_at": self.built_at,
            "builder_version": self.builder_version,
        }
        if self.ci_url:
            out["ci_url"] = self.ci_url
        if self.ci_pipeline_url:
            out["ci_pipeline_url"] = self.ci_pipeline_url
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "release record") -> ReleaseRecord:
        """Read a record file's mapping; a malformed one is a ConfigError naming ``where`` and
        the offending key. Keys starting with ``_`` (a reader's own notes) are ignored."""
        data = {k: v for k, v in data.items() if not str(k).startswith("_")}
        check_document(data, SCHEMA, where, _HINT)
        return cls.from_checked(data)

    @classmethod
    def from_checked(cls, data: Mapping[str, Any], path: str = "") -> ReleaseRecord:
        """Read a mapping already checked against the schema (:meth:`from_dict` checks; the
        fleet's index of the builder's own reads does not check again), found at ``path``."""
        config, base = data["config"], data["base_image"]
        return cls(
            customer=data["customer"],
            config_repository=config["repository"],
            config_path=config["path"],
            config_commit=config["commit"],
            image=data["image"],
            manifest_digest=data["manifest_digest"],
            tags=tuple(data["tags"]),
            base_repository=base["repository"],
            base_version=base["version"],
            base_digest=base["digest"],
            models=tuple(ModelRecord.from_dict(m) for m in data["models"]),
            built_at=data["built_at"],
            builder_version=data["builder_version"],
            ci_url=data.get("ci_url"),
            ci_pipeline_url=data.get("ci_pipeline_url"),
            path=path,
        )
