"""Listing the referrers of a manifest (OCI 1.1): in an OCI image layout, and in a registry
through the referrers API, else the referrers tag schema (``sha256-<hex>``).

Like go-containerregistry, which keeps ``Referrers`` and ``fallbackTag`` in its transport
(``pkg/v1/remote/referrers.go``): what the artifacts say is the caller's (``builder.attest``
writes and reads our attestations), how they are found is the OCI wing's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from builder.errors import ImageError
from builder.oci.descriptor import OCI_MANIFEST, Descriptor
from builder.oci.layout import read_layout_blob, read_layout_index
from builder.oci.remote import RegistryClient


def layout_referrers(directory: Path, digest: str) -> list[Descriptor]:
    """Descriptors (with artifactType) of the manifests in a layout whose subject is ``digest``.

    An artifact is listed in ``index.json`` without a ref name; its manifest's ``subject``
    says which image it refers to (how oras and the image-layout spec find referrers there).
    """
    found = []
    for entry in read_layout_index(directory):
        descriptor = entry.descriptor
        if descriptor.media_type != OCI_MANIFEST or entry.ref_name:
            continue
        try:
            manifest = json.loads(read_layout_blob(directory, descriptor.digest))
        except (ImageError, ValueError):
            continue
        if (manifest.get("subject") or {}).get("digest") == digest:
            found.append(_referrer_descriptor(descriptor, manifest))
    return found


def _referrer_descriptor(descriptor: Descriptor, manifest: Mapping[str, Any]) -> Descriptor:
    """The referrers-index form of an artifact manifest's descriptor."""
    extra = dict(descriptor.extra)
    artifact_type = manifest.get("artifactType") or (manifest.get("config") or {}).get("mediaType")
    if artifact_type:
        extra["artifactType"] = artifact_type
    annotations = dict(manifest.get("annotations") or {}) or dict(descriptor.annotations)
    return Descriptor(descriptor.media_type, descriptor.digest, descriptor.size, annotations, extra)


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject digest: ``sha256-<hex>``."""
    algorithm, _, hex_ = digest.partition(":")
    return f"{algorithm}-{hex_}"


#: Registries (host) found without the referrers API by this process: not asked again.
_NO_REFERRERS_API: set[str] = set()


def registry_referrers(
    client: RegistryClient, path: str, digest: str
) -> tuple[list[Descriptor], str]:
    """Referrers of ``digest`` in ``path``: from the referrers API, else the fallback tag.

    Returns the descriptors and the mode used ("referrers-api" or "tag-schema").
    """
    api = None if client.host in _NO_REFERRERS_API else client.referrers(path, digest)
    if api is not None:
        return [Descriptor.from_dict(d) for d in api], "referrers-api"
    _NO_REFERRERS_API.add(client.host)
    tag = fallback_tag(digest)
    found = client.find_manifest(path, tag)
    if found is None:
        return [], "tag-schema"
    raw = found[0]
    try:
        entries = json.loads(raw).get("manifests") or []
    except (ValueError, AttributeError):
        raise ImageError(f"{client.host}/{path}:{tag} is not an image index") from None
    return [Descriptor.from_dict(d) for d in entries], "tag-schema"
