"""The build report: what one build made and where it went (``builder build --json`` result).

``pipeline.build`` fills it stage by stage; the release record is made from its JSON form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from builder.documents import ModelRecord, check_document
from builder.imagename import ImageName

SCHEMA: Final = "build-report"


@dataclass
class LayerReport:
    """One layer of the built image."""

    name: str
    digest: str
    size: int
    media_type: str
    new: bool  # added by this build (False: from the base image)
    push: str | None = None  # when pushed: uploaded | mounted | present (deliver's actions)


@dataclass
class BuildReport:
    """One build's result. Mutable while the build runs: delivery and attestation add their
    outputs, uploaded bytes and warnings."""

    customer: str
    image: str  # the immutable reference
    tags: list[str]
    manifest_digest: str
    config_digest: str
    config_commit: str
    base: dict[str, str]  # repository, version, digest
    models: list[ModelRecord]  # as provenance.json records them, with the weights URIs reached
    layers: list[LayerReport]
    development: bool
    bytes_downloaded: int = 0
    bytes_resumed: int = 0  # weights reused from an interrupted download, not downloaded again
    bytes_uploaded: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> ImageName:
        """The built image's immutable name (ConfigError if ``image`` is not one)."""
        return ImageName.parse(self.image, base_version=self.base.get("version"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``builder build --json``'s result)."""
        return {**asdict(self), "models": [m.to_dict() for m in self.models]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "build report") -> BuildReport:
        """Read a report's JSON form; a malformed one is a ConfigError naming ``where``."""
        check_document(data, SCHEMA, where, "pass the result of `builder build --json`")
        fields = {k: v for k, v in data.items() if k not in ("layers", "models")}
        return cls(
            **fields,
            models=[ModelRecord.from_dict(m) for m in data["models"]],
            layers=[LayerReport(**layer) for layer in data["layers"]],
        )
