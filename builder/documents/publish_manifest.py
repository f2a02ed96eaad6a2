"""The publish manifest, ``<task id>/<model id>/publish-manifest.json`` in the production store:
the model and task the weights belong to and every file's name, size and sha256; for a weights
package (ClearML system tag ``package``), the archive those files were extracted from.

``builder publish`` writes it; resolve reads it to tie weights to the model asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from builder.documents import FileDigest, check_document

MANIFEST_VERSION: Final = 1
SCHEMA: Final = "publish-manifest"
#: The keys besides ``files``: always written, optional when read (older manifests lack some).
_OPTIONAL: Final = (
    "manifest_version",
    "model_id",
    "model_name",
    "task_id",
    "source_uri",
    "published_by",
    "published_at",
)


@dataclass(frozen=True)
class PublishManifest:
    """One published model's weights; fields other than ``files`` are None when absent."""

    files: tuple[FileDigest, ...]
    manifest_version: int | None = MANIFEST_VERSION
    model_id: str | None = None
    model_name: str | None = None
    task_id: str | None = None
    source_uri: str | None = None
    published_by: str | None = None
    published_at: str | None = None  # RFC 3339 UTC
    package: FileDigest | None = None  # the archive ``files`` were extracted from

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, every key written (null where unknown); ``package`` if one."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _OPTIONAL}
        out["files"] = [f.to_dict() for f in self.files]
        if self.package:  # only for packages: other manifests keep their bytes
            out["package"] = self.package.to_dict()
        return out

    def to_bytes(self) -> bytes:
        """The file's bytes: indented JSON, sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], where: str = "publish-manifest.json"
    ) -> PublishManifest:
        """Read a manifest's JSON form; a malformed one is a ConfigError naming ``where``."""
        check_document(data, SCHEMA, where, "re-run `builder publish` for this model")
        package = data.get("package")
        return cls(
            files=tuple(FileDigest.from_dict(f) for f in data["files"]),
            package=FileDigest.from_dict(package) if package else None,
            **{k: data.get(k) for k in _OPTIONAL},
        )
