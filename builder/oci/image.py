"""Reading images: one reader for a registry, an OCI image layout or a docker archive.

Like go-containerregistry's ``v1.Image`` over its transports (``remote``, ``layout``,
``tarball``): every source gives the same :class:`OpenedImage` (the manifest as stored, the
config, labels, layers, blobs, attached referrers), an image index narrowed to one platform.
Base resolution, the local image store (an OCI layout) and the audit commands read images
through it. Where the blobs are is a blob source per transport (:class:`LayoutBlobs`,
:class:`RegistryBlobs`, a docker archive's), which also copies a blob into a
:class:`~builder.oci.BlobStore` without reading any manifest (a base image's layers).

:func:`read_files` reads the files under given folders of given layers, each layer hashed in
the same pass to check its digest. The wing knows no product: which layers and folders matter
is the caller's (:mod:`builder.image.contents`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

from builder.contracts import Progress
from builder.errors import ImageError
from builder.fsutil import open_nofollow
from builder.oci.blobs import BlobStore, is_disk_full
from builder.oci.descriptor import IMAGE_MANIFEST_TYPES, INDEX_TYPES, Descriptor, sha256_digest
from builder.oci.layout import layout_blob_path, read_layout_blob, read_layout_index
from builder.oci.reference import parse_reference
from builder.oci.referrers import layout_referrers, registry_referrers
from builder.oci.remote import RegistryClient

#: The platform an image index is narrowed to.
DEFAULT_PLATFORM: Final = "linux/amd64"
_CHUNK: Final = 1 << 20
_MAX_KEPT: Final = 16 << 20  # files kept in memory to read back; the others are only hashed


# == where the blobs are: one source per transport ============================================


class BlobSource:
    """The blobs of an image in one place (a layout, an archive, a registry repository)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def read(self, digest: str) -> bytes:
        """A small blob (a manifest, a config), verified."""
        raise NotImplementedError

    def read_manifest(self, digest: str) -> bytes:
        """A manifest by digest, verified."""
        return self.read(digest)

    @contextlib.contextmanager
    def open(self, descriptor: Descriptor) -> Iterator[IO[bytes]]:
        """A stream of a (large) blob; the reader checks its digest."""
        raise NotImplementedError
        yield  # pragma: no cover

    def fetch(self, descriptor: Descriptor, store: BlobStore, progress: Progress | None) -> Path:
        """Copy the blob into ``store`` (verified while written); its path there."""
        try:
            with self.open(descriptor) as file:
                return store.ingest(iter(lambda: file.read(_CHUNK), b""), descriptor.digest)
        except OSError as exc:
            if is_disk_full(exc):
                raise ImageError(
                    f"disk full while copying blob {descriptor.digest} from {self.what}"
                ) from None
            raise ImageError(
                f"cannot read blob {descriptor.digest} from {self.what}: {exc.strerror or exc}"
            ) from None

    def referrers(self, digest: str) -> tuple[list[Descriptor], str]:
        """Artifacts attached to manifest ``digest`` and where they were looked for."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds open (an archive)."""


def fetch_blob(
    source: BlobSource,
    descriptor: Descriptor,
    store: BlobStore,
    progress: Progress | None = None,
) -> Path:
    """Blob ``descriptor`` in ``store``: the stored one when it checks out, else copied or
    downloaded from ``source`` (verified; a bad stored one is removed and fetched again)."""
    found = store.existing(descriptor.digest)
    if found is not None:
        return found
    return source.fetch(descriptor, store, progress)


class LayoutBlobs(BlobSource):
    """The blobs of an OCI image layout, never read through a link. With ``store`` (the layout
    is that blob store, such as the local image store) they are read through it: a bad one is
    removed there."""

    def __init__(self, directory: Path, store: BlobStore | None = None) -> None:
        super().__init__(f"OCI layout {directory}")
        self.directory, self.store = directory, store

    def read(self, digest: str) -> bytes:
        """The blob's bytes from the layout (or its blob store); ImageError when it lacks it."""
        if self.store is None:
            return read_layout_blob(self.directory, digest)
        try:
            return self.store.read_bytes(digest)
        except OSError:
            raise ImageError(f"{self.what} lacks blob {digest}") from None

    @contextlib.contextmanager
    def open(self, descriptor: Descriptor) -> Iterator[IO[bytes]]:
        """The blob's file, opened without following links; ImageError when it is missing."""
        path = layout_blob_path(self.directory, descriptor.digest)
        try:
            file = os.fdopen(open_nofollow(path, os.O_RDONLY), "rb")  # a link is never read
        except OSError:
            raise ImageError(f"{self.what} lacks blob {descriptor.digest}") from None
        with file:
            yield file

    def referrers(self, digest: str) -> tuple[list[Descriptor], str]:
        """The layout's referrers of ``digest`` (from its index) and how they were found."""
        if not (self.directory / "index.json").is_file():
            return [], "blob store (no index)"
        return layout_referrers(self.directory, digest), "OCI layout index"


class RegistryBlobs(BlobSource):
    """The blobs of a registry repository; a stream is a download into ``cache`` (verified)."""

    def __init__(self, client: RegistryClient, path: str, cache: Path | None = None) -> None:
        super().__init__(f"{client.host}/{path}")
        self.client, self.path, self.cache = client, path, cache

    def read(self, digest: str) -> bytes:
        """The blob's bytes, downloaded from the registry."""
        return self.client.get_blob_bytes(self.path, digest)

    def read_manifest(self, digest: str) -> bytes:
        """The manifest's bytes, downloaded from the registry."""
        return self.client.get_manifest(self.path, digest)[0]

    @contextlib.contextmanager
    def open(self, descriptor: Descriptor) -> Iterator[IO[bytes]]:
        """The blob's file, downloaded into the cache (verified) and opened."""
        if self.cache is None:
            raise ImageError(f"no cache to download blob {descriptor.digest} of {self.what} into")
        path = fetch_blob(self, descriptor, BlobStore(self.cache))
        with path.open("rb") as file:
            yield file

    def fetch(self, descriptor: Descriptor, store: BlobStore, progress: Progress | None) -> Path:
        """Download the blob into ``store`` (verified against its digest) and return its path."""
        return self.client.download_blob(
            self.path, descriptor.digest, store, progress, descriptor.size
        )

    def referrers(self, digest: str) -> tuple[list[Descriptor], str]:
        """The registry's referrers of ``digest`` and how they were found (API or tag schema)."""
        found, mode = registry_referrers(self.client, self.path, digest)
        return found, "referrers API" if mode == "referrers-api" else "referrers tag schema"


class _ArchiveBlobs(BlobSource):
    """The blobs of a docker archive that is also an OCI layout (ours; ``docker save`` >= 25)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"docker archive {path}")
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            self.members = {m.name.removeprefix("./"): m for m in self._tar.getmembers()}
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None
        except tarfile.TarError:
            raise ImageError(f"{path} is not a readable docker archive (not a tar file)") from None

    def member(self, name: str) -> IO[bytes]:
        """The archive member ``name`` (a regular file), to read."""
        member = self.members.get(name)
        if member is None or not member.isfile():
            raise ImageError(f"{self.what} lacks {name}")
        file = self._tar.extractfile(member)
        assert file is not None
        return file

    def read(self, digest: str) -> bytes:
        data = self.member(f"blobs/sha256/{digest.split(':', 1)[1]}").read()
        if sha256_digest(data) != digest:
            raise ImageError(f"blob {digest} in {self.what} is corrupt")
        return data

    @contextlib.contextmanager
    def open(self, descriptor: Descriptor) -> Iterator[IO[bytes]]:
        with self.member(f"blobs/sha256/{descriptor.digest.split(':', 1)[1]}") as file:
            yield file

    def referrers(self, digest: str) -> tuple[list[Descriptor], str]:
        return [], "docker-archives hold no attestations"

    def close(self) -> None:
        self._tar.close()


# == the image ================================================================================


class OpenedImage:
    """An image read from a registry, an OCI layout or a docker archive: its manifest (as
    stored, parsed), config and layers, its blobs through :attr:`source`."""

    kind = "image"

    def __init__(self, source: BlobSource, what: str | None = None) -> None:
        self.source = source
        self.what = what or source.what
        self.notes: list[str] = []  # how it was found, when that is worth saying
        self.manifest_digest = ""
        self.raw_manifest = b""  # the manifest bytes as stored (its digest is the image's)
        self.manifest: dict[str, Any] = {}
        self.config: dict[str, Any] = {}

    def blob(self, digest: str) -> bytes:
        """A small blob, verified."""
        return self.source.read(digest)

    def manifest_bytes(self, digest: str) -> bytes:
        """Another manifest of the same repository or layout (attestations), verified."""
        return self.source.read_manifest(digest)

    def open_blob(self, descriptor: Descriptor) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A stream of a (large) blob; the caller checks its digest."""
        return self.source.open(descriptor)

    def referrers(self) -> tuple[list[Descriptor], str]:
        """Artifacts attached to the image and where they were looked for."""
        return self.source.referrers(self.manifest_digest)

    def close(self) -> None:
        """Release what the image's source holds open."""
        self.source.close()

    def _load(self, raw: bytes, digest: str, media_type: str, platform: str) -> None:
        """Read the manifest ``raw`` (an index narrowed to ``platform``), then the config."""
        document = json_object(raw, f"{self.what}: manifest")
        kind = document.get("mediaType") or media_type
        if kind in INDEX_TYPES or (not kind and "manifests" in document):
            child = _platform_child(document, platform, self.what)
            raw, digest = self.source.read_manifest(child.digest), child.digest
            document = json_object(raw, f"{self.what}: manifest")
            kind = document.get("mediaType") or child.media_type
        if (kind and kind not in IMAGE_MANIFEST_TYPES) or "config" not in document:
            raise ImageError(f"{self.what} is not an image manifest (media type {kind or 'none'})")
        self.manifest_digest, self.raw_manifest, self.manifest = digest, raw, document
        self.config = json_object(self.blob(self.config_digest), f"{self.what}: image config")

    @property
    def config_descriptor(self) -> Descriptor:
        """The descriptor of the image config."""
        return Descriptor.from_dict(self.manifest["config"])

    @property
    def config_digest(self) -> str:
        """The config digest (the image id)."""
        return str(self.manifest["config"]["digest"])

    @property
    def labels(self) -> dict[str, str]:
        """The image config's labels."""
        labels = (self.config.get("config") or {}).get("Labels") or {}
        return {str(k): str(v) for k, v in labels.items()}

    @property
    def layers(self) -> list[Descriptor]:
        """The manifest's layers, in order."""
        return [Descriptor.from_dict(d) for d in self.manifest.get("layers") or []]


def json_object(raw: bytes, what: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object, or ImageError naming ``what`` (not JSON, not an object)."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise ImageError(f"{what} is not JSON") from None
    if not isinstance(data, dict):
        raise ImageError(f"{what} is not a JSON object")
    return data


def _platform_child(index: dict[str, Any], platform: str, what: str) -> Descriptor:
    """The manifest for ``platform`` ("os/arch[/variant]") in an image index."""
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


def _pick_image(
    entries: Sequence[tuple[Descriptor, str | None]], tag: str | None, what: str
) -> Descriptor:
    """The image manifest named ``tag`` (or by digest), or the only image of a layout/archive."""
    images = [
        (d, name) for d, name in entries if d.media_type in IMAGE_MANIFEST_TYPES | INDEX_TYPES
    ]
    if tag and tag.startswith("sha256:"):
        match = [d for d, _ in images if d.digest == tag]
    elif tag:
        match = [
            d for d, name in images if name and (name == tag or name.rsplit(":", 1)[-1] == tag)
        ]
    else:
        match = [d for d, name in images if name or "artifactType" not in d.extra]
        match = list({d.digest: d for d in match}.values())
    if len(match) == 1:
        return match[0]
    names = ", ".join(sorted({n for _, n in images if n})) or "none"
    if not match:
        raise ImageError(f"{what} has no image {tag!r} (names: {names})")
    raise ImageError(f"{what} holds several images; name one with {what}:TAG (names: {names})")


class LayoutImage(OpenedImage):
    """An image in an OCI image layout: named ``tag`` (or the only one), or the manifest
    ``digest`` read directly; ``store``: the layout is that blob store (the local image store)."""

    kind = "oci-layout"

    def __init__(
        self,
        directory: Path,
        tag: str | None = None,
        *,
        digest: str | None = None,
        platform: str = DEFAULT_PLATFORM,
        what: str | None = None,
        store: BlobStore | None = None,
    ) -> None:
        super().__init__(LayoutBlobs(directory, store), what)
        self.directory = directory
        media_type = ""
        if digest is None:
            entries = [(e.descriptor, e.ref_name) for e in read_layout_index(directory)]
            descriptor = _pick_image(entries, tag, f"oci:{directory}")
            digest, media_type = descriptor.digest, descriptor.media_type
        self._load(self.blob(digest), digest, media_type, platform)


class ArchiveImage(OpenedImage):
    """An image in a docker archive that is also an OCI layout (ours; ``docker save`` >= 25)."""

    kind = "docker-archive"

    def __init__(self, path: Path, tag: str | None = None) -> None:
        source = _ArchiveBlobs(path)
        super().__init__(source)
        if "index.json" not in source.members:
            kind = (
                "a docker archive in the pre-25 format"
                if "manifest.json" in source.members
                else "not an image archive"
            )
            raise ImageError(
                f"{path} is {kind} (no index.json)",
                hint="give an OCI layout or registry reference, or save it with Docker 25 or later",
            )
        index = json_object(source.member("index.json").read(), f"{self.what}: index.json")
        entries = []
        for item in index.get("manifests") or []:
            descriptor = Descriptor.from_dict(item)
            entries.append(
                (descriptor, descriptor.annotations.get("org.opencontainers.image.ref.name"))
            )
        descriptor = _pick_image(entries, tag, self.what)
        self._load(
            self.blob(descriptor.digest), descriptor.digest, descriptor.media_type, DEFAULT_PLATFORM
        )


class RegistryImage(OpenedImage):
    """The image ``ref`` (a tag or a digest) of repository ``path`` in a registry; its layers
    are streamed through ``cache`` (a blob store folder, verified)."""

    kind = "registry"

    def __init__(
        self,
        client: RegistryClient,
        path: str,
        ref: str,
        *,
        cache: Path | None = None,
        platform: str = DEFAULT_PLATFORM,
        what: str | None = None,
    ) -> None:
        super().__init__(RegistryBlobs(client, path, cache), what)
        raw, media_type, digest = client.get_manifest(path, ref)
        self._load(raw, digest, media_type, platform)

    @classmethod
    def at(cls, reference: str, cache: Path, *, insecure: bool | None = None) -> RegistryImage:
        """The image of a registry reference ``host/repo:tag`` or ``host/repo@sha256:...``."""
        ref = parse_reference(reference)
        client = RegistryClient(ref.registry, insecure=insecure)
        return cls(client, ref.path, ref.digest or ref.tag or "latest", cache=cache, what=str(ref))


def open_path(reference: str) -> OpenedImage | None:
    """The image of ``oci:DIR[:TAG]``, ``docker-archive:FILE[:TAG]``, a layout folder or an
    archive file; None when ``reference`` names no local path (a registry reference)."""
    for prefix, kind in (
        ("oci:", "layout"),
        ("docker-archive:", "archive"),
        ("oci-archive:", "archive"),
    ):
        if reference.startswith(prefix):
            location = reference[len(prefix) :]
            path, tag = Path(location), None
            if not path.exists() and ":" in location:
                head, _, tail = location.rpartition(":")
                if head.endswith("@sha256"):
                    head, tail = head.removesuffix("@sha256"), f"sha256:{tail}"
                path, tag = Path(head), tail
            if not path.exists():
                raise ImageError(
                    f"{reference}: no such {'OCI layout' if kind == 'layout' else 'file'}"
                )
            return LayoutImage(path, tag) if kind == "layout" else ArchiveImage(path, tag)
    path = Path(reference).expanduser()
    if path.is_dir():
        return LayoutImage(path)
    if path.is_file():
        return ArchiveImage(path)
    if reference.startswith(("/", ".", "~")):
        raise ImageError(f"{reference}: no such OCI layout or docker archive")
    return None


# == what is inside ===========================================================================


class _HashingReader:
    """Hashes what is read through it, so a layer's digest is checked in the same pass."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(_CHUNK):
            pass
        return "sha256:" + self._sha.hexdigest()


@dataclass
class ImageFiles:
    """The files under some folders of an image's layers, the layers applied in order."""

    files: dict[str, tuple[str, int]]  # path -> (sha256 hex or "link:<target>", size)
    contents: dict[str, bytes]  # the small files of the folders kept
    problems: list[str]  # layers whose content does not hash to their digest


@dataclass(frozen=True)
class _Folders:
    under: tuple[str, ...]  # read the files under these ("app/models/")
    keep: tuple[str, ...]  # and keep the small ones under these in memory


def read_files(
    image: OpenedImage,
    layers: Sequence[tuple[str, Descriptor]],
    *,
    under: Sequence[str],
    keep: Sequence[str] = (),
) -> ImageFiles:
    """Hash every file under the folders ``under`` (``"app/models/"``) in ``layers`` (name,
    descriptor), in order, whiteouts applied; keep the small ones under ``keep`` to read."""
    result = ImageFiles({}, {}, [])
    folders = _Folders(tuple(under), tuple(keep))
    for name, descriptor in layers:
        with image.open_blob(descriptor) as raw:
            reader = _HashingReader(raw)
            try:
                with tarfile.open(fileobj=reader, mode="r|*") as tar:  # type: ignore[call-overload]
                    for member in tar:
                        _scan_member(tar, member, result, folders)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ImageError(
                    f"{image.what}: layer {name} ({descriptor.digest.removeprefix('sha256:')[:19]}) is not a readable tar: {exc}"
                ) from None
            digest = reader.drain()
        if digest != descriptor.digest:
            result.problems.append(
                f"layer {name}: content hashes to {digest}, manifest says {descriptor.digest}"
            )
    return result


def _remove(files: dict[str, Any], path: str) -> None:
    for key in [k for k in files if k == path or k.startswith(f"{path}/")]:
        del files[key]


def _scan_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, result: ImageFiles, folders: _Folders
) -> None:
    path = PurePosixPath(member.name.lstrip("/").removeprefix("./")).as_posix()
    base, parent = PurePosixPath(path).name, PurePosixPath(path).parent.as_posix()
    if base == ".wh..wh..opq":
        _remove(result.files, parent)
        return
    if base.startswith(".wh."):
        _remove(result.files, f"{parent}/{base[4:]}" if parent != "." else base[4:])
        return
    if not path.startswith(folders.under):
        return
    _remove(result.files, path)
    if member.issym() or member.islnk():
        result.files[path] = (f"link:{member.linkname}", 0)
        return
    if not member.isfile():
        return
    source = tar.extractfile(member)
    assert source is not None
    kept = member.size <= _MAX_KEPT and path.startswith(folders.keep)
    sha, data = hashlib.sha256(), bytearray()
    while chunk := source.read(_CHUNK):
        sha.update(chunk)
        if kept:
            data += chunk
    result.files[path] = (sha.hexdigest(), member.size)
    if kept:
        result.contents[path] = bytes(data)
