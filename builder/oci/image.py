"""Reading images: one :func:`open_image` for a registry, an OCI layout or a docker archive.

Like go-containerregistry's ``v1.Image``: every source gives the same :class:`OpenedImage`
(manifest, config, labels, layers, blobs, attached referrers), and :func:`scan_files` reads
the files of its own layers, each layer hashed in the same pass to check its digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

from builder.errors import ImageError
from builder.oci import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    BlobStore,
    Descriptor,
    RegistryClient,
    layout_blob_path,
    open_nofollow,
    parse_reference,
    read_layout_blob,
    read_layout_index,
    sha256_digest,
)
from builder.oci.referrers import layout_referrers, registry_referrers
from builder.settings import Settings

_KEEP_PREFIXES: Final = ("app/models/", "app/config/")
_MAX_KEPT: Final = 16 << 20  # config files kept in memory to read back; model files are hashed
_CHUNK: Final = 1 << 20
_MODEL_LABEL: Final = re.compile(r"^com\.ivd\.model\.(.+)\.sha256$")
_BUILDER_HISTORY: Final = "ivd-image-builder: COPY "


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


class OpenedImage:
    """An image read from a registry, an OCI layout, a docker archive or the blob store."""

    kind = "image"

    def __init__(self, what: str) -> None:
        self.what = what
        self.notes: list[str] = []  # how it was found, when that is worth saying
        self.manifest_digest = ""
        self.manifest: dict[str, Any] = {}
        self.config: dict[str, Any] = {}

    # what each kind provides
    def blob(self, digest: str) -> bytes:
        """A small blob, verified."""
        raise NotImplementedError

    def manifest_bytes(self, digest: str) -> bytes:
        """Another manifest of the same repository or layout (attestations), verified."""
        return self.blob(digest)

    @contextlib.contextmanager
    def open_blob(self, descriptor: Descriptor) -> Iterator[IO[bytes]]:
        """A stream of a (large) blob; the caller checks its digest."""
        raise NotImplementedError
        yield  # pragma: no cover

    def referrers(self) -> tuple[list[Descriptor], str]:
        """Artifacts attached to the image and where they were looked for."""
        return [], f"{self.kind}s hold no attestations"

    # shared
    def _load(self, raw: bytes, digest: str) -> None:
        manifest = _json_object(raw, f"{self.what}: manifest")
        media_type = manifest.get("mediaType", "")
        if (media_type and media_type not in IMAGE_MANIFEST_TYPES) or "config" not in manifest:
            raise ImageError(
                f"{self.what} is not an image manifest (media type {media_type or 'none'})"
            )
        self.manifest_digest, self.manifest = digest, manifest
        config_digest = str(manifest["config"]["digest"])
        self.config = _json_object(self.blob(config_digest), f"{self.what}: image config")

    @property
    def config_digest(self) -> str:
        return str(self.manifest["config"]["digest"])

    @property
    def labels(self) -> dict[str, str]:
        labels = (self.config.get("config") or {}).get("Labels") or {}
        return {str(k): str(v) for k, v in labels.items()}

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.from_dict(d) for d in self.manifest.get("layers") or []]


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise ImageError(f"{what} is not JSON") from None
    if not isinstance(data, dict):
        raise ImageError(f"{what} is not a JSON object")
    return data


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
    """An image in an OCI image layout (or the blob store, which is laid out the same way)."""

    kind = "oci-layout"

    def __init__(
        self, directory: Path, tag: str | None = None, *, digest: str | None = None
    ) -> None:
        super().__init__(f"OCI layout {directory}")
        self.directory = directory
        if digest is None:
            entries = [(e.descriptor, e.ref_name) for e in read_layout_index(directory)]
            descriptor = _pick_image(entries, tag, f"oci:{directory}")
            raw, digest = read_layout_blob(directory, descriptor.digest), descriptor.digest
            if descriptor.media_type in INDEX_TYPES:
                child = _platform_child(raw, self.what)
                raw, digest = read_layout_blob(directory, child.digest), child.digest
        else:
            raw = read_layout_blob(directory, digest)
        self._load(raw, digest)

    def blob(self, digest: str) -> bytes:
        return read_layout_blob(self.directory, digest)

    @contextlib.contextmanager
    def open_blob(self, descriptor: Descriptor) -> Iterator[IO[bytes]]:
        path = layout_blob_path(self.directory, descriptor.digest)
        try:
            file = os.fdopen(open_nofollow(path, os.O_RDONLY), "rb")  # a link is never read
        except OSError:
            raise ImageError(f"{self.what} lacks blob {descriptor.digest}") from None
        with file:
            yield file

    def referrers(self) -> tuple[list[Descriptor], str]:
        if not (self.directory / "index.json").is_file():
            return [], "blob store (no index)"
        return layout_referrers(self.directory, self.manifest_digest), "OCI layout index"


def _platform_child(
    raw: bytes, what: str, platform: tuple[str, str] = ("linux", "amd64")
) -> Descriptor:
    index = _json_object(raw, f"{what}: image index")
    for item in index.get("manifests") or []:
        plat = item.get("platform") or {}
        if (plat.get("os"), plat.get("architecture")) == platform:
            return Descriptor.from_dict(item)
    raise ImageError(f"{what} is an image index without a {'/'.join(platform)} image")


class ArchiveImage(OpenedImage):
    """An image in a docker archive that is also an OCI layout (ours; ``docker save`` >= 25)."""

    kind = "docker-archive"

    def __init__(self, path: Path, tag: str | None = None) -> None:
        super().__init__(f"docker archive {path}")
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers()}
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None
        except tarfile.TarError:
            raise ImageError(f"{path} is not a readable docker archive (not a tar file)") from None
        if "index.json" not in self._members:
            kind = (
                "a docker archive in the pre-25 format"
                if "manifest.json" in self._members
                else "not an image archive"
            )
            raise ImageError(
                f"{path} is {kind} (no index.json)",
                hint="give an OCI layout or registry reference, or save it with Docker 25 or later",
            )
        index = _json_object(self._read("index.json"), f"{self.what}: index.json")
        entries = []
        for item in index.get("manifests") or []:
            descriptor = Descriptor.from_dict(item)
            entries.append(
                (descriptor, descriptor.annotations.get("org.opencontainers.image.ref.name"))
            )
        descriptor = _pick_image(entries, tag, self.what)
        raw, digest = self.blob(descriptor.digest), descriptor.digest
        if descriptor.media_type in INDEX_TYPES:
            child = _platform_child(raw, self.what)
            raw, digest = self.blob(child.digest), child.digest
        self._load(raw, digest)

    def _member(self, name: str) -> tarfile.TarInfo:
        member = self._members.get(name)
        if member is None or not member.isfile():
            raise ImageError(f"{self.what} lacks {name}")
        return member

    def _read(self, name: str) -> bytes:
        file = self._tar.extractfile(self._member(name))
        assert file is not None
        return file.read()

    def blob(self, digest: str) -> bytes:
        data = self._read(f"blobs/sha256/{digest.split(':', 1)[1]}")
        if sha256_digest(data) != digest:
            raise ImageError(f"blob {digest} in {self.what} is corrupt")
        return data

    @contextlib.contextmanager
    def open_blob(self, descriptor: Descriptor) -> Iterator[IO[bytes]]:
        file = self._tar.extractfile(
            self._member(f"blobs/sha256/{descriptor.digest.split(':', 1)[1]}")
        )
        assert file is not None
        with file:
            yield file

    def close(self) -> None:
        self._tar.close()


class RegistryImage(OpenedImage):
    """An image in a registry; layers are streamed into the local blob store (verified)."""

    kind = "registry"

    def __init__(self, reference: str, settings: Settings, insecure: bool | None = None) -> None:
        ref = parse_reference(reference)
        super().__init__(str(ref))
        self.reference = ref
        self.client: RegistryClient = RegistryClient(ref.registry, insecure=insecure)
        self.path = ref.path
        self._store_root = settings.cache_dir / "oci"
        raw, media_type, digest = self.client.get_manifest(
            ref.path, ref.digest or ref.tag or "latest"
        )
        if (
            media_type in INDEX_TYPES
            or _json_object(raw, self.what).get("mediaType") in INDEX_TYPES
        ):
            child = _platform_child(raw, self.what)
            raw, _, digest = self.client.get_manifest(ref.path, child.digest)
        self._load(raw, digest)

    def blob(self, digest: str) -> bytes:
        return self.client.get_blob_bytes(self.path, digest)

    def manifest_bytes(self, digest: str) -> bytes:
        return self.client.get_manifest(self.path, digest)[0]

    @contextlib.contextmanager
    def open_blob(self, descriptor: Descriptor) -> Iterator[IO[bytes]]:
        store = BlobStore(self._store_root)
        path = store.existing(descriptor.digest)
        if path is None:
            path = self.client.download_blob(
                self.path, descriptor.digest, store, size=descriptor.size
            )
        with path.open("rb") as file:
            yield file

    def referrers(self) -> tuple[list[Descriptor], str]:
        found, mode = registry_referrers(self.client, self.path, self.manifest_digest)
        return found, "referrers API" if mode == "referrers-api" else "referrers tag schema"


def open_image(reference: str, settings: Settings, *, insecure: bool | None = None) -> OpenedImage:
    """Open ``oci:DIR[:TAG]``, ``docker-archive:FILE``, a layout folder, an archive file, or a
    registry reference ``host/repo:tag`` / ``host/repo@sha256:...``."""
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
    try:
        return RegistryImage(reference, settings, insecure)
    except ImageError as online:
        stored = _stored_image(reference, settings.store_dir)
        if stored is None:
            raise
        stored.notes.append(f"{online.message}; read {reference} from the local image store")
        return stored


def _stored_image(reference: str, store: Path) -> LayoutImage | None:
    """The image the local image store names ``reference`` (a build that was not pushed, or
    a registry out of reach), or None."""
    if not (store / "index.json").is_file():
        return None
    if not any(e.ref_name == reference for e in read_layout_index(store)):
        return None
    image = LayoutImage(store, reference)
    image.what = f"{reference} in the local image store {store}"
    return image


# == what is inside ===========================================================================


@dataclass
class ImageFiles:
    """The /app/models and /app/config files of an image's own layers (overlay applied)."""

    files: dict[str, tuple[str, int]]  # path -> (sha256 hex or "symlink:<target>", size)
    contents: dict[str, bytes]  # small /app/config files
    problems: list[str]


def own_layers(image: OpenedImage) -> list[tuple[str, Descriptor]]:
    """The layers this tool added (models, config) and any layer after them, with names.

    The image config's history says which layers ivd-image-builder made; everything from the
    first of them on is read, so a layer appended later cannot hide a file.
    """
    layers = image.layers
    history = [h for h in image.config.get("history") or [] if not h.get("empty_layer")]
    names: list[str | None] = [None] * len(layers)
    if len(history) == len(layers):
        for i, entry in enumerate(history):
            created_by = str(entry.get("created_by", ""))
            if created_by.startswith(_BUILDER_HISTORY):
                names[i] = created_by.removeprefix(_BUILDER_HISTORY).split(" ", 1)[0]
    for i, layer in enumerate(layers):
        names[i] = layer.annotations.get("com.ivd.layer.name") or names[i]
    first = next((i for i, n in enumerate(names) if n), None)
    if first is None:
        # The docker backend's layers carry Dockerfile history: ours are the last ones, one
        # per model (the labels list them) plus the config layer.
        models = [k for k in image.labels if _MODEL_LABEL.match(k)]
        first = len(layers) - len(models) - 1
        if not models or first < 0:
            return []
    return [
        (names[i] or f"layer {i} (not made by ivd-image-builder)", layers[i])
        for i in range(first, len(layers))
    ]


def _remove(files: dict[str, Any], path: str) -> None:
    for key in [k for k in files if k == path or k.startswith(f"{path}/")]:
        del files[key]


def scan_files(image: OpenedImage, layers: Sequence[tuple[str, Descriptor]]) -> ImageFiles:
    """Hash every file under /app/models and /app/config in ``layers``, in order (whiteouts too)."""
    result = ImageFiles({}, {}, [])
    for name, descriptor in layers:
        with image.open_blob(descriptor) as raw:
            reader = _HashingReader(raw)
            try:
                with tarfile.open(fileobj=reader, mode="r|*") as tar:  # type: ignore[call-overload]
                    for member in tar:
                        _scan_member(tar, member, result)
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


def _scan_member(tar: tarfile.TarFile, member: tarfile.TarInfo, result: ImageFiles) -> None:
    path = PurePosixPath(member.name.lstrip("/").removeprefix("./")).as_posix()
    base, parent = PurePosixPath(path).name, PurePosixPath(path).parent.as_posix()
    if base == ".wh..wh..opq":
        _remove(result.files, parent)
        return
    if base.startswith(".wh."):
        _remove(result.files, f"{parent}/{base[4:]}" if parent != "." else base[4:])
        return
    if not path.startswith(_KEEP_PREFIXES):
        return
    _remove(result.files, path)
    if member.issym() or member.islnk():
        result.files[path] = (f"link:{member.linkname}", 0)
        return
    if not member.isfile():
        return
    source = tar.extractfile(member)
    assert source is not None
    sha, kept = hashlib.sha256(), bytearray()
    while chunk := source.read(_CHUNK):
        sha.update(chunk)
        if member.size <= _MAX_KEPT and path.startswith("app/config/"):
            kept += chunk
    result.files[path] = (sha.hexdigest(), member.size)
    if path.startswith("app/config/") and member.size <= _MAX_KEPT:
        result.contents[path] = bytes(kept)
