"""The base image, addressed by digest: found by version constraint in a registry or an OCI
layout, its manifest and config read once, its blobs fetched only when a delivery needs them.

Which base a build uses (registry, else the local image store; the lock's pin; variant and
runner checks) is :mod:`builder.image.base_resolution`; building a base is :mod:`builder.image.base_build`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from builder.contracts import BaseImageRef, Progress
from builder.errors import ImageError
from builder.oci import (
    DEFAULT_PLATFORM,
    BlobStore,
    Descriptor,
    LayoutBlobs,
    LayoutImage,
    OpenedImage,
    RegistryBlobs,
    RegistryImage,
    RetryPolicy,
    fetch_blob,
    read_layout_index,
    shared_client,
    split_repository,
)

#: Base image label naming its variant (``cpu`` or ``gpu``).
LABEL_VARIANT: Final = "com.ivd.runner.variant"


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
    and everything after by digest (the one image reader, :mod:`builder.oci.image`). An
    image index is narrowed to ``platform``.
    """
    if repository.startswith("oci:"):
        return _resolve_layout(repository, version_spec, platform)
    host, path = split_repository(repository)
    client = shared_client(host, insecure=insecure, retry=retry)
    what = f"base image {host}/{path}"
    tag = select_version(client.list_tags(path), version_spec, what=what)
    image = RegistryImage(client, path, tag, platform=platform, what=f"{what}:{tag}")
    return make_base_image(
        image,
        repository=f"{host}/{path}",
        version=tag,
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
    image = LayoutImage(
        directory, digest=entry.descriptor.digest, platform=platform, what=f"{what}:{tag}"
    )
    # Name the base by what the layout recorded (containerd/docker write the full image name);
    # the local directory path must not leak into the image digest.
    name = entry.descriptor.annotations.get("io.containerd.image.name") or f"{directory.name}:{tag}"
    return make_base_image(
        image,
        repository=f"oci:{directory}",
        version=tag,
        source="oci-layout",
        name=name,
        layout=directory,
    )


def make_base_image(
    image: OpenedImage,
    *,
    repository: str,
    version: str,
    source: str,
    name: str,
    layout: Path | None = None,
    insecure: bool | None = None,
) -> BaseImage:
    """A :class:`BaseImage` of an image read by the one reader, its layers checked against
    its config."""
    layers = tuple(image.layers)
    diff_ids = (image.config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise ImageError(
            f"base image {name}: config lists {len(diff_ids)} diff_ids for {len(layers)} layers"
        )
    return BaseImage(
        repository=repository,
        version=version,
        digest=image.manifest_digest,
        manifest=image.manifest,
        manifest_bytes=image.raw_manifest,
        config=image.config,
        config_descriptor=image.config_descriptor,
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
    if base.layout is not None:
        return fetch_blob(LayoutBlobs(base.layout), descriptor, store, progress)
    assert base.registry is not None
    client = shared_client(base.registry, insecure=base.insecure, retry=retry)
    return fetch_blob(RegistryBlobs(client, base.path), descriptor, store, progress)
