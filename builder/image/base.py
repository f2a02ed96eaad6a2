"""The base image, addressed by digest: found by version constraint in a registry or an OCI
layout, its manifest and config read once, its blobs fetched only when a delivery needs them.

Which base a build uses (registry, else the local image store; the lock's pin; variant and
runner checks) is :mod:`builder.image.base_resolution`; building a base is :mod:`builder.image.base_build`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from builder.contracts import BaseImageRef, Progress
from builder.errors import ImageError
from builder.oci import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    BlobStore,
    Descriptor,
    RetryPolicy,
    is_disk_full,
    layout_blob_path,
    read_layout_blob,
    read_layout_index,
    shared_client,
    split_repository,
)

#: The platform an image index is narrowed to.
DEFAULT_PLATFORM: Final = "linux/amd64"
#: Base image label naming its variant (``cpu`` or ``gpu``).
LABEL_VARIANT: Final = "com.ivd.runner.variant"
_CHUNK: Final = 1 << 20


# -- the base image --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseImage:
    """The resolved base image, addressed by digest from here on."""

    repository: str  # "127.0.0.1:5000/ivd/inference-base" or "oci:/path/to/layout"
    version: str  # the tag the version spec resolved to
    digest: str  # manifest digest
    manifest: Mapping[str, Any]
    manifest_bytes: bytes
    config: Mapping[str, Any]
    config_descriptor: Descriptor
    layers: tuple[Descriptor, ...]
    source: str  # "registry" or "oci-layout"
    name: str  # fully qualified name recorded as org.opencontainers.image.base.name
    layout: Path | None = None  # the layout directory for source == "oci-layout"
    insecure: bool | None = None  # how the registry was reached (None: automatic)

    @property
    def labels(self) -> dict[str, str]:
        """The base image's labels (e.g. ``com.ivd.runner.config-schemas``)."""
        labels = (self.config.get("config") or {}).get("Labels") or {}
        return {str(k): str(v) for k, v in labels.items()}

    @property
    def diff_ids(self) -> list[str]:
        """DiffIDs of the base layers."""
        return list((self.config.get("rootfs") or {}).get("diff_ids") or [])

    @property
    def ref(self) -> BaseImageRef:
        """The pipeline's plain-data view of this base image."""
        variant = self.labels.get(LABEL_VARIANT) or "cpu"
        return BaseImageRef(self.repository, self.version, self.digest, variant)

    @property
    def registry(self) -> str | None:
        """Registry host[:port] for registry bases."""
        return None if self.source != "registry" else self.repository.split("/", 1)[0]

    @property
    def path(self) -> str:
        """Repository path inside the registry (``ivd/inference-base``)."""
        return self.repository.split("/", 1)[1] if self.source == "registry" else ""


def select_version(tags: Sequence[str], version_spec: str, *, what: str) -> str:
    """Pick the tag ``version_spec`` resolves to among ``tags``.

    An exact version ("2.4.1", prereleases allowed) must exist as a tag (compared as
    versions, so "v2.4.1" matches). A specifier ("~=2.4", ">=2.4,<3") picks the highest
    matching final release; tags that are not versions (``latest``) are ignored.
    """
    versions: dict[Version, str] = {}
    for tag in tags:
        try:
            version = Version(tag)
        except InvalidVersion:
            continue
        # Prefer the tag spelled exactly like the canonical version when two tags compare equal.
        if version not in versions or tag == str(version):
            versions[version] = tag
    available = ", ".join(versions[v] for v in sorted(versions)) or "no version tags"
    spec = version_spec.strip()
    if (spec and spec[0].isdigit()) or spec.startswith("v"):
        try:
            wanted = Version(spec)
        except InvalidVersion as exc:
            raise ImageError(f"invalid base image version {version_spec!r}") from exc
        if spec in tags:
            return spec
        if wanted in versions:
            return versions[wanted]
        raise ImageError(f"{what} has no tag {spec} (available: {available})")
    try:
        specifiers = SpecifierSet(spec)
    except InvalidSpecifier as exc:
        raise ImageError(
            f"invalid base image version constraint {version_spec!r}",
            hint="use an exact version such as 2.4.1 or a PEP 440 specifier such as ~=2.4",
        ) from exc
    exact = len(specifiers) == 1 and next(iter(specifiers)).operator in ("==", "===")
    matching = [v for v in versions if specifiers.contains(v, prereleases=exact)]
    if not matching:
        raise ImageError(f"no version of {what} satisfies {spec!r} (available: {available})")
    return versions[max(matching)]


def resolve_base(
    repository: str,
    version_spec: str,
    *,
    insecure: bool | None = None,
    platform: str = DEFAULT_PLATFORM,
    retry: RetryPolicy | None = None,
) -> BaseImage:
    """Resolve ``repository`` + ``version_spec`` to a base image addressed by digest.

    ``repository`` is ``registry/path`` (``127.0.0.1:5000/ivd/inference-base``) or, for
    air-gapped sites, ``oci:PATH`` / ``oci:PATH:TAG`` naming an OCI image layout. Tags are
    listed, the version picked by :func:`select_version`, the manifest fetched by tag once
    and everything after by digest. An image index is narrowed to ``platform``.
    """
    if repository.startswith("oci:"):
        return _resolve_layout(repository, version_spec, platform)
    host, path = split_repository(repository)
    client = shared_client(host, insecure=insecure, retry=retry)
    what = f"base image {host}/{path}"
    tag = select_version(client.list_tags(path), version_spec, what=what)
    raw, media_type, digest = client.get_manifest(path, tag)
    if media_type in INDEX_TYPES:
        child = _pick_platform(raw, platform, f"{what}:{tag}")
        raw, media_type, digest = client.get_manifest(path, child.digest)
    manifest = parse_image_manifest(raw, media_type, f"{what}:{tag}")
    config_descriptor = Descriptor.from_dict(manifest["config"])
    config_bytes = client.get_blob_bytes(path, config_descriptor.digest)
    return make_base_image(
        repository=f"{host}/{path}",
        version=tag,
        digest=digest,
        raw=raw,
        manifest=manifest,
        config_bytes=config_bytes,
        source="registry",
        name=f"{host}/{path}:{tag}",
        insecure=insecure,
    )


def _resolve_layout(repository: str, version_spec: str, platform: str) -> BaseImage:
    """resolve_base for an ``oci:PATH[:TAG]`` image layout."""
    location = repository[len("oci:") :]
    directory, tag = Path(location), None
    if not directory.is_dir() and ":" in location:
        head, _, tail = location.rpartition(":")
        directory, tag = Path(head), tail
    entries = read_layout_index(directory)
    what = f"OCI layout {directory}"
    by_name = {e.ref_name: e for e in entries if e.ref_name}
    if tag is None:
        tag = select_version(sorted(by_name), version_spec, what=what)
    elif tag not in by_name:
        names = ", ".join(sorted(by_name)) or "none"
        raise ImageError(f"{what} has no image named {tag} (available: {names})")
    entry = by_name[tag]
    raw = read_layout_blob(directory, entry.descriptor.digest)
    media_type, digest = entry.descriptor.media_type, entry.descriptor.digest
    if media_type in INDEX_TYPES:
        child = _pick_platform(raw, platform, f"{what}:{tag}")
        raw, media_type, digest = (
            read_layout_blob(directory, child.digest),
            child.media_type,
            child.digest,
        )
    manifest = parse_image_manifest(raw, media_type, f"{what}:{tag}")
    config_bytes = read_layout_blob(directory, manifest["config"]["digest"])
    # Name the base by what the layout recorded (containerd/docker write the full image name);
    # the local directory path must not leak into the image digest.
    name = entry.descriptor.annotations.get("io.containerd.image.name") or f"{directory.name}:{tag}"
    return make_base_image(
        repository=f"oci:{directory}",
        version=tag,
        digest=digest,
        raw=raw,
        manifest=manifest,
        config_bytes=config_bytes,
        source="oci-layout",
        name=name,
        layout=directory,
    )


def _pick_platform(raw: bytes, platform: str, what: str) -> Descriptor:
    """The manifest for ``platform`` ("os/arch[/variant]") in an image index."""
    index = _load_json(raw, what)
    want = platform.split("/")
    offered = []
    for item in index.get("manifests") or []:
        plat = item.get("platform") or {}
        have = [plat.get("os", ""), plat.get("architecture", "")]
        if plat.get("variant"):
            have.append(plat["variant"])
        offered.append("/".join(have))
        if have[: len(want)] == want:
            return Descriptor.from_dict(item)
    raise ImageError(f"{what} has no image for {platform} (offers: {', '.join(offered) or 'none'})")


def parse_image_manifest(raw: bytes, media_type: str, what: str) -> dict[str, Any]:
    """``raw`` as an image manifest (not an index or an artifact), else ImageError."""
    manifest = _load_json(raw, what)
    media_type = manifest.get("mediaType") or media_type
    if media_type not in IMAGE_MANIFEST_TYPES or "config" not in manifest:
        raise ImageError(f"{what} is not an image manifest (media type {media_type})")
    return manifest


def _load_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"{what}: manifest is not JSON") from exc
    if not isinstance(data, dict):
        raise ImageError(f"{what}: manifest is not a JSON object")
    return data


def make_base_image(
    *,
    repository: str,
    version: str,
    digest: str,
    raw: bytes,
    manifest: dict[str, Any],
    config_bytes: bytes,
    source: str,
    name: str,
    layout: Path | None = None,
    insecure: bool | None = None,
) -> BaseImage:
    """A :class:`BaseImage` from its manifest and config bytes, its layers checked against the config."""
    what = f"base image {name}"
    config = _load_json(config_bytes, what)
    layers = tuple(Descriptor.from_dict(d) for d in manifest.get("layers") or [])
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise ImageError(f"{what}: config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    return BaseImage(
        repository=repository,
        version=version,
        digest=digest,
        manifest=manifest,
        manifest_bytes=raw,
        config=config,
        config_descriptor=Descriptor.from_dict(manifest["config"]),
        layers=layers,
        source=source,
        name=name,
        layout=layout,
        insecure=insecure,
    )


def fetch_base_blob(
    base: BaseImage,
    descriptor: Descriptor,
    store: BlobStore,
    progress: Progress | None = None,
    retry: RetryPolicy | None = None,
) -> Path:
    """Put one base-image blob into ``store`` (from its registry or OCI layout), verified; a
    stored one is checked first (a bad one is removed and fetched again)."""
    found = store.existing(descriptor.digest)
    if found is not None:
        return found
    if base.layout is not None:
        path = layout_blob_path(base.layout, descriptor.digest)
        try:
            with path.open("rb") as file:
                return store.ingest(iter(lambda: file.read(_CHUNK), b""), descriptor.digest)
        except OSError as exc:
            if is_disk_full(exc):
                raise ImageError(f"disk full while copying base blob {descriptor.digest}") from None
            raise ImageError(
                f"cannot read base blob {descriptor.digest} from {base.layout}: {exc.strerror}"
            ) from None
    assert base.registry is not None
    client = shared_client(base.registry, insecure=base.insecure, retry=retry)
    return client.download_blob(base.path, descriptor.digest, store, progress, descriptor.size)
