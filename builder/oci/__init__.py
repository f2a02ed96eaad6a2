"""The OCI wing, shaped like go-containerregistry's ``pkg/v1``: one module per transport. It
knows nothing of the product (no label, path or layer of ours): the rooms above it do.

- ``descriptor``: media types, canonical JSON, digests, :class:`Descriptor` (no I/O)
- ``blobs``: the content-addressed :class:`BlobStore` (itself an OCI image layout)
- ``layout``: OCI image layouts on disk (index.json under a lock, blobs)
- ``reference`` / ``remote``: image references and the registry transport (:class:`RegistryClient`
  carries insecure, retry and credentials)
- ``referrers``: the referrers of a manifest in a layout or a registry (API, else tag schema)
- ``image``: the one image reader (registry, OCI layout, docker archive) and its blob sources
- ``push``: writing an image to a registry repository (blobs present, mounted or uploaded)

``from builder.oci import X`` is the one import path for the names below.
"""

from builder.oci.blobs import (
    BlobStore,
    BlobWriter,
    atomic_write,
    hash_file,
    is_disk_full,
    link_refused,
    remove_abandoned,
)
from builder.oci.descriptor import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MANIFEST_ACCEPT,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    canonical_json,
    check_digest,
    sha256_digest,
)
from builder.oci.image import (
    DEFAULT_PLATFORM,
    ArchiveImage,
    BlobSource,
    ImageFiles,
    LayoutBlobs,
    LayoutImage,
    OpenedImage,
    RegistryBlobs,
    RegistryImage,
    fetch_blob,
    open_path,
    read_files,
)
from builder.oci.layout import (
    INDEX_LOCK,
    INDEX_LOCK_TIMEOUT,
    LayoutEntry,
    copy_blob,
    layout_blob_path,
    layout_directories,
    locked_layout,
    read_layout_blob,
    read_layout_index,
    update_layout_index,
    write_layout_index,
)
from builder.oci.push import BlobPush, PushableImage, push_blobs, push_image, put_manifest
from builder.oci.reference import (
    Reference,
    is_loopback,
    parse_reference,
    split_repository,
    use_plain_http,
)
from builder.oci.referrers import fallback_tag, layout_referrers, registry_referrers
from builder.oci.remote import BlobUnknownError, RegistryClient, RetryPolicy, shared_client

__all__ = [
    "DEFAULT_PLATFORM",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "IMAGE_MANIFEST_TYPES",
    "INDEX_LOCK",
    "INDEX_LOCK_TIMEOUT",
    "INDEX_TYPES",
    "MANIFEST_ACCEPT",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_MANIFEST",
    "REF_NAME",
    "ArchiveImage",
    "BlobPush",
    "BlobSource",
    "BlobStore",
    "BlobUnknownError",
    "BlobWriter",
    "Descriptor",
    "ImageFiles",
    "LayoutBlobs",
    "LayoutEntry",
    "LayoutImage",
    "OpenedImage",
    "PushableImage",
    "Reference",
    "RegistryBlobs",
    "RegistryClient",
    "RegistryImage",
    "RetryPolicy",
    "atomic_write",
    "canonical_json",
    "check_digest",
    "copy_blob",
    "fallback_tag",
    "fetch_blob",
    "hash_file",
    "is_disk_full",
    "is_loopback",
    "layout_blob_path",
    "layout_directories",
    "layout_referrers",
    "link_refused",
    "locked_layout",
    "open_path",
    "parse_reference",
    "push_blobs",
    "push_image",
    "put_manifest",
    "read_files",
    "read_layout_blob",
    "read_layout_index",
    "registry_referrers",
    "remove_abandoned",
    "sha256_digest",
    "shared_client",
    "split_repository",
    "update_layout_index",
    "use_plain_http",
    "write_layout_index",
]
