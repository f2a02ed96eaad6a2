"""Writing an image to a registry repository: its blobs (each known present, mounted or
uploaded), then its manifest as a tag or by digest.

Like go-containerregistry's ``remote.Write`` (``pkg/v1/remote/write.go``, mountable layers in
``mount.go``): it reads of the image only what :class:`PushableImage` names. Which tags may
move and what differs when one may not is the caller's (``builder.deliver``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from builder.contracts import Progress
from builder.errors import ImageError
from builder.oci.blobs import BlobStore
from builder.oci.descriptor import Descriptor
from builder.oci.reference import parse_reference
from builder.oci.remote import BlobUnknownError, RegistryClient, RetryPolicy, shared_client

#: Blobs up to this size are sent from memory; larger ones are streamed from disk.
_SMALL_BLOB: Final = 8 << 20


@dataclass(frozen=True)
class BlobPush:
    """What happened to one blob in one repository."""

    repository: str
    digest: str
    size: int
    action: str  # "uploaded" | "mounted" | "present"


class PushableImage(Protocol):
    """What writing an image reads of it."""

    @property
    def manifest_digest(self) -> str:
        """The digest of the image's manifest, which the push tags."""
        ...

    @property
    def manifest_bytes(self) -> bytes:
        """The manifest's exact bytes, pushed as they are so the digest holds."""
        ...

    @property
    def media_type(self) -> str:
        """The manifest's media type, sent as its Content-Type."""
        ...

    @property
    def config_digest(self) -> str:
        """The digest of the image's config blob."""
        ...

    @property
    def config_bytes(self) -> bytes:
        """The config blob's exact bytes."""
        ...

    @property
    def store(self) -> BlobStore:
        """The blob store holding its blobs, which remembers where they were pushed."""
        ...

    @property
    def blob_descriptors(self) -> list[Descriptor]:
        """Its blobs, layers first, then the config."""
        ...

    def blob_path(
        self,
        descriptor: Descriptor,
        progress: Progress | None = None,
        retry: RetryPolicy | None = None,
    ) -> Path:
        """A local file holding the blob (fetched into :attr:`store` when it is not there)."""
        ...

    def base_layers(self, host: str) -> tuple[frozenset[str], str | None]:
        """The layers of the image it was built on, and the repository on registry ``host``
        holding that image to mount them from (None: not on ``host``)."""
        ...


def push_image(
    image: PushableImage,
    reference: str,
    *,
    insecure: bool | None = None,
    retry: RetryPolicy | None = None,
    progress: Progress | None = None,
) -> str:
    """Write ``image`` to ``reference`` (``registry/repository:tag``): blobs, then the
    manifest as the tag; the manifest digest."""
    ref = parse_reference(reference)
    if not ref.tag or ref.digest:
        raise ImageError(f"push target {ref} must be registry/repository:tag")
    client = shared_client(ref.registry, insecure=insecure, retry=retry)
    push_blobs(image, client, ref.path, progress)
    put_manifest(image, client, ref.path, ref.tag, progress)
    return image.manifest_digest


def put_manifest(
    image: PushableImage, client: RegistryClient, path: str, ref: str, progress: Progress | None
) -> None:
    """PUT the manifest as ``ref``; if a blob the layer cache believed there is missing,
    check and send every blob, then PUT again."""
    try:
        client.put_manifest(path, ref, image.manifest_bytes, image.media_type)
    except BlobUnknownError:
        image.store.forget_present(client.host, path)
        push_blobs(image, client, path, progress, trust_cache=False)
        client.put_manifest(path, ref, image.manifest_bytes, image.media_type)


def push_blobs(
    image: PushableImage,
    client: RegistryClient,
    path: str,
    progress: Progress | None,
    *,
    trust_cache: bool = True,
) -> list[BlobPush]:
    """Layers then config into one repository: each known present, mounted or uploaded.

    A blob is mounted from the base repository (base layers) or from the repository this
    blob store last pushed it to on the same registry (a model layer shared with another
    customer's image), so shared weights cross repositories without being uploaded again.
    With ``trust_cache`` what the store remembers to be in the repository is not asked
    about, and a small blob it does not know is sent without asking first.
    """
    repository = f"{client.host}/{path}"
    base_digests, base_repo = image.base_layers(client.host)
    there = image.store.present_in(client.host, path) if trust_cache else set()
    results = []
    for descriptor in image.blob_descriptors:
        digest, size = descriptor.digest, descriptor.size
        ask = not trust_cache or size > _SMALL_BLOB
        if digest in there or (ask and client.blob_exists(path, digest)):
            results.append(BlobPush(repository, digest, size, "present"))
            _note_pushed(image, base_digests, digest, client.host, path)
            continue
        if base_repo is not None and base_repo != path and digest in base_digests:
            mounted, session_url = _mount(client, path, digest, base_repo, hint=False)
        else:
            sources = [r for r in image.store.pushed_to(digest, client.host) if r != path]
            mounted, session_url = _mount(client, path, digest, next(iter(sources), None))
        if mounted:
            results.append(BlobPush(repository, digest, size, "mounted"))
            _note_pushed(image, base_digests, digest, client.host, path)
            continue
        if digest == image.config_digest:
            source: Path | bytes = image.config_bytes
        else:
            source = image.blob_path(descriptor, progress, client.retry)
            if size <= _SMALL_BLOB:
                try:
                    source = source.read_bytes()
                except OSError as exc:
                    raise ImageError(f"cannot read blob {digest}: {exc.strerror}") from None
        client.upload_blob(path, digest, size, source, session_url=session_url, progress=progress)
        results.append(BlobPush(repository, digest, size, "uploaded"))
        _note_pushed(image, base_digests, digest, client.host, path)
    with contextlib.suppress(OSError, ImageError):  # a hint only: without it, the next asks
        image.store.note_present(client.host, path, [r.digest for r in results])
    return results


def _mount(
    client: RegistryClient, path: str, digest: str, source: str | None, *, hint: bool = True
) -> tuple[bool, str | None]:
    """(mounted, upload session the registry opened instead) for a mount from ``source``.

    A ``hint`` (a repository this store once pushed the blob to) may be gone or unreadable
    by now: any refusal then means a plain upload, not a failed push.
    """
    if source is None:
        return False, None
    try:
        session_url = client.mount_blob(path, digest, source)
    except ImageError:
        if not hint:
            raise
        return False, None
    return session_url is None, session_url


def _note_pushed(
    image: PushableImage, base_digests: frozenset[str], digest: str, host: str, path: str
) -> None:
    """Remember where a layer of ours now is, as a mount source for the next repository."""
    if digest not in base_digests and digest != image.config_digest:
        with contextlib.suppress(OSError):  # only a hint: without it the next push uploads
            image.store.note_pushed(digest, host, path)
