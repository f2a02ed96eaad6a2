"""OCI media types, canonical JSON, digests and content descriptors: plain data, no I/O."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from builder.errors import ImageError

# -- media types ---------------------------------------------------------------------------

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"

IMAGE_MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
#: What we accept when fetching a manifest by tag or digest.
MANIFEST_ACCEPT: Final = (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST)

#: Annotation naming a manifest in an image layout's index.json.
REF_NAME: Final = "org.opencontainers.image.ref.name"

_DIGEST_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")


# -- canonical JSON and digests ------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` the one way we hash it: sorted keys, compact separators, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise ImageError."""
    if not _DIGEST_RE.match(digest):
        raise ImageError(f"not a sha256 digest: {digest!r}")
    return digest


# -- descriptors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor; ``extra`` keeps fields we do not interpret (urls, platform)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with every field the descriptor was read with."""
        out: dict[str, Any] = dict(self.extra)
        out.update(mediaType=self.media_type, digest=self.digest, size=self.size)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Descriptor:
        """Read a descriptor as found in a manifest or index, keeping unknown fields."""
        try:
            media_type = str(data["mediaType"])
            digest = check_digest(str(data["digest"]))
            size = int(data["size"])
            annotations = data.get("annotations") or {}
            if not isinstance(annotations, Mapping):
                raise TypeError("annotations is not a mapping")
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"malformed OCI descriptor: {dict(data)!r}"[:300]) from exc
        known = {"mediaType", "digest", "size", "annotations"}
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=dict(annotations),
            extra={k: v for k, v in data.items() if k not in known},
        )
