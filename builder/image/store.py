"""The local image store: one OCI image layout on disk holding many tagged images.

The embedded default, like buildah's local storage or ``ko build --local``: ``builder base
build`` writes the base image here, ``build CUSTOMER`` resolves its base here when no registry
answers (or with ``--offline``), keeps bases pulled from a registry here by digest, and writes
every customer image here. Nothing needs a server: a laptop with the store builds the same
digest as a CI runner talking to a registry.

Layout: the build's blob store (``blobs/sha256``, ``oci-layout``) plus ``index.json`` naming
each image by its full reference (``org.opencontainers.image.ref.name`` =
``127.0.0.1:5000/customer-x:2.4.2-abc``; skopeo reads it as ``oci:STORE:REF``). A base kept
from a registry is also named ``REPO@sha256:...``, so a lock's pinned digest finds it even
after its tag moved.

Concurrency: the index is changed only through :func:`builder.oci.update_layout_index`, under
a file lock. Builds hold a shared lock on the store while they write blobs and tags;
:meth:`ImageStore.prune` takes it exclusively, so it never deletes a blob a running build
has written but not tagged yet.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from builder.contracts import Progress, ProgressEvent
from builder.errors import ImageError
from builder.fsutil import locked_file, read_nofollow
from builder.image.assemble import AssembledImage, Layer
from builder.image.base import BaseImage, fetch_base_blob, make_base_image, select_version
from builder.image.provenance import (
    forced_tag_warning,
    image_differences,
    immutable_tag_error,
    layer_format_of,
    moved_tag_warning,
    only_the_base_differs,
)
from builder.oci import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REF_NAME,
    BlobStore,
    Descriptor,
    LayoutImage,
    canonical_json,
    check_digest,
    is_disk_full,
    read_layout_index,
    update_layout_index,
    write_layout_index,
)

#: How long prune waits for running builds to release the store (seconds).
PRUNE_WAIT: Final = 60.0
_GC_LOCK: Final = ".gc.lock"
_CHUNK: Final = 1 << 20
_GZIP_LEVEL: Final = 6
_WRITABLE: Final = "set image_store (builder.toml or BUILDER_IMAGE_STORE) to a writable folder"


@dataclass(frozen=True)
class StoredImage:
    """One name in the store: ``reference`` -> manifest ``digest``."""

    reference: str
    digest: str
    media_type: str
    size: int

    @property
    def repository(self) -> str:
        """The reference without its tag or digest."""
        return split_name(self.reference)[0]

    @property
    def tag(self) -> str | None:
        """The tag, or None for a by-digest name."""
        return split_name(self.reference)[1]


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`ImageStore.verify` hashed, removed and found incomplete."""

    blobs_checked: int
    bytes_checked: int
    removed: tuple[str, ...]  # one line per bad blob or link removed
    incomplete: tuple[str, ...]  # names whose image now lacks a blob (build them again)

    @property
    def ok(self) -> bool:
        """Whether the store was sound: nothing removed, every named image complete."""
        return not self.removed and not self.incomplete


@dataclass(frozen=True)
class PruneReport:
    """What :meth:`ImageStore.prune` kept and removed."""

    images: int  # names in the index (all kept)
    blobs_kept: int
    blobs_removed: int
    bytes_removed: int
    dry_run: bool = False


def split_name(reference: str) -> tuple[str, str | None]:
    """``repo:tag`` -> (repo, tag); ``repo@sha256:..`` -> (repo, None)."""
    if "@" in reference:
        return reference.split("@", 1)[0], None
    head, sep, tail = reference.rpartition(":")
    if sep and "/" not in tail:
        return head, tail
    return reference, None


class ImageStore:
    """The local OCI image store at ``root`` (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        try:
            self.blobs = BlobStore(self.root)
        except OSError as exc:
            raise ImageError(
                f"cannot open the local image store {self.root}: {exc.strerror or exc}",
                hint=_WRITABLE,
            ) from None

    # -- reading ---------------------------------------------------------------------------

    def images(self) -> list[StoredImage]:
        """Every named image, sorted by reference (an empty store has none)."""
        index = self.root / "index.json"
        if not index.exists() and not index.is_symlink():
            return []
        out = [
            StoredImage(e.ref_name, e.descriptor.digest, e.descriptor.media_type, e.descriptor.size)
            for e in read_layout_index(self.root)
            if e.ref_name
        ]
        return sorted(out, key=lambda i: i.reference)

    def lookup(self, reference: str) -> StoredImage | None:
        """The image named ``reference`` (``repo:tag`` or ``repo@digest``), if stored."""
        return next((i for i in self.images() if i.reference == reference), None)

    def complete(self, digest: str) -> bool:
        """Whether the manifest ``digest`` and every blob it names are in the store."""
        try:
            manifest = json.loads(self.blobs.read_bytes(digest))
            needed = [manifest["config"], *(manifest.get("layers") or [])]
            return all(self.blobs.has(str(d["digest"])) for d in needed)
        except (OSError, ValueError, KeyError, TypeError, ImageError):
            return False

    def base_image(self, repository: str, version: str, digest: str) -> BaseImage:
        """The stored manifest ``digest`` as the base image ``repository:version``.

        Named exactly as a registry base of that repository is (name, repository, version,
        digest), so a customer image built on it has the digest it has online.
        """
        what = f"base image {repository}:{version} ({digest[:19]}) in the local store {self.root}"
        if not self.complete(digest):
            repaired = "".join(f"; {line}" for line in self.blobs.repairs)
            raise ImageError(
                f"{what} lacks some of its blobs{repaired}",
                hint="rebuild it with `builder base build`, or build once online to fetch it again",
            )
        image = LayoutImage(self.root, digest=digest, what=what, store=self.blobs)
        return make_base_image(
            image,
            repository=repository,
            version=version,
            source="store",
            name=f"{repository}:{version}",
            layout=self.root,
        )

    def find_base(self, repository: str, version_spec: str) -> BaseImage:
        """Resolve ``repository`` + ``version_spec`` among the store's tags (as a registry would)."""
        tags = {
            i.tag: i
            for i in self.images()
            if i.repository == repository and i.tag and i.media_type in IMAGE_MANIFEST_TYPES
        }
        if not tags:
            raise ImageError(f"the local image store {self.root} has no image of {repository}")
        tag = select_version(
            sorted(t for t in tags if t), version_spec, what=f"{repository} in the local store"
        )
        return self.base_image(repository, tag, tags[tag].digest)

    def find_digest(self, repository: str, version: str, digest: str) -> BaseImage | None:
        """The base ``repository@digest`` if the store holds it complete, else None."""
        named = {i.digest for i in self.images() if i.repository == repository}
        if digest not in named or not self.complete(digest):
            return None
        return self.base_image(repository, version, digest)

    # -- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def in_use(self) -> Iterator[ImageStore]:
        """Hold the store shared while writing blobs and tags: prune waits until released."""
        with self._gc_lock(exclusive=False, wait=None):
            yield self

    def tag(self, manifest: Descriptor, references: Iterable[str]) -> None:
        """Name ``manifest`` (all its blobs already stored) as each of ``references``."""
        write_layout_index(self.root, manifest, sorted(set(references)))

    def add_image(
        self,
        image: AssembledImage,
        references: Iterable[str],
        progress: Progress | None = None,
        *,
        immutable: Iterable[str] = (),
        force: bool = False,
    ) -> list[str]:
        """Store an assembled image complete (base layers copied in) under ``references``.

        A name in ``immutable`` that already names another image is refused, as a registry
        refuses it (ImageError naming what differs), unless ``force`` or this cache lets it
        move (:meth:`_cache_move`). Returns one warning per moved name: what it named before
        and why it moved.
        """
        forced: list[str] = []
        built = (json.loads(image.manifest_bytes), json.loads(image.config_bytes))
        where = f" in the local image store {self.root}"
        for reference in immutable:
            current = self.lookup(reference)
            if current is None or current.digest == image.manifest_digest:
                continue
            stored = self._read_image(current.digest)
            why = None if stored is None else self._cache_move(stored[1], built[1], image)
            if why is not None:
                forced.append(
                    moved_tag_warning(reference, current.digest, image.manifest_digest, why, where)
                )
                continue
            differences = (
                image_differences(stored, built)
                if stored is not None
                else ["the stored image could not be read"]
            )
            if not force:
                raise immutable_tag_error(
                    reference, current.digest, image.manifest_digest, differences, where
                )
            forced.append(
                forced_tag_warning(
                    reference, current.digest, image.manifest_digest, differences, where
                )
            )
        for layer in image.layers:
            image.blob_path(layer.descriptor, progress)
        self.tag(image.manifest_descriptor, references)
        return forced

    def _cache_move(
        self, tagged: dict[str, Any], built: dict[str, Any], image: AssembledImage
    ) -> str | None:
        """Why this store, the machine's cache, lets an immutable tag move from the image config
        ``tagged`` to ``image`` (None: it does not). Without these every builder upgrade, and
        every base rebuilt during development, would need --force."""
        old, new = layer_format_of(tagged), layer_format_of(built)
        if 0 < old < new:
            return (
                f"the tagged image was written by an earlier builder in image format {old}; "
                f"this builder writes format {new}"
            )
        if self._base_rebuilt_here(tagged, built, image):
            return (
                f"its base {image.base.repository}:{image.base.version} was rebuilt in this "
                "store since (`builder base build`), and only the base differs"
            )
        return None

    def _base_rebuilt_here(
        self, tagged: dict[str, Any], built: dict[str, Any], image: AssembledImage
    ) -> bool:
        """Whether the tagged image differs from ``image`` only in its base, and this store now
        names ``image``'s base by that base version: the base was rebuilt here (a development
        base), so an image on the replaced base is stale in this cache."""
        named = self.lookup(f"{image.base.repository}:{image.base.version}")
        return (
            named is not None
            and named.digest == image.base.digest
            and only_the_base_differs(tagged, built, image.base.labels)
        )

    def _read_image(self, digest: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(manifest, image config) of the stored image ``digest``; None if unreadable."""
        try:
            manifest = json.loads(self.blobs.read_bytes(digest))
            config = json.loads(self.blobs.read_bytes(str(manifest["config"]["digest"])))
        except (OSError, ValueError, KeyError, TypeError, ImageError):
            return None
        return (manifest, config) if isinstance(config, dict) else None

    def keep_base(self, base: BaseImage, progress: Progress | None = None) -> None:
        """Keep a base image resolved elsewhere (a registry) in the store, by tag and digest.

        Its blobs are fetched (verified) once; later builds, ``--locked --offline`` ones
        included, find it here with no registry.
        """
        if base.source == "store":
            return
        for descriptor in (base.config_descriptor, *base.layers):
            fetch_base_blob(base, descriptor, self.blobs, progress)
        digest = self.blobs.put_bytes(base.manifest_bytes)
        media_type = str(base.manifest.get("mediaType") or OCI_MANIFEST)
        descriptor = Descriptor(media_type, digest, len(base.manifest_bytes))
        self.tag(descriptor, [f"{base.repository}:{base.version}", f"{base.repository}@{digest}"])

    def import_docker_archive(
        self, archive: Path, reference: str, progress: Progress | None = None
    ) -> Descriptor:
        """Store the image of a ``docker save`` archive as ``reference``; return its manifest.

        Reads ``manifest.json`` (both the classic and the OCI-layout form of ``docker save``),
        keeps the image config bytes as they are (its digest is the engine's image id), and
        writes each layer gzipped without name or time, its DiffID checked against the config;
        ``progress`` gets the bytes compressed so far (minutes for a 3 GB image).
        """
        try:
            with tarfile.open(archive) as tar:
                entries = json.loads(_member(tar, "manifest.json").read())
                entry = next(
                    (e for e in entries if reference in (e.get("RepoTags") or [])), entries[0]
                )
                config_bytes = _member(tar, entry["Config"]).read()
                diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
                if len(diff_ids) != len(entry["Layers"]):
                    raise ImageError(f"{archive}: config and layers of {reference} disagree")
                total = sum(tar.getmember(name).size for name in entry["Layers"])
                counted = _Counted(f"compressing {reference}", total, progress)
                layers = [
                    self._gzip_layer(_member(tar, name), diff_id, reference, counted)
                    for name, diff_id in zip(entry["Layers"], diff_ids, strict=True)
                ]
        except (OSError, tarfile.TarError, ValueError, KeyError, IndexError, TypeError) as exc:
            if is_disk_full(exc):
                raise ImageError(f"disk full while storing {reference} in {self.root}") from None
            raise ImageError(f"cannot read the image archive of {reference}: {exc}") from None
        config = Descriptor(OCI_CONFIG, self.blobs.put_bytes(config_bytes), len(config_bytes))
        manifest_bytes = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.to_dict(),
                "layers": [d.to_dict() for d in layers],
            }
        )
        manifest = Descriptor(
            OCI_MANIFEST, self.blobs.put_bytes(manifest_bytes), len(manifest_bytes)
        )
        self.tag(manifest, [reference])
        return manifest

    def _gzip_layer(
        self, source: IO[bytes], diff_id: str, reference: str, counted: _Counted
    ) -> Descriptor:
        sha = hashlib.sha256()
        with self.blobs.writer() as blob:
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=blob, compresslevel=_GZIP_LEVEL, mtime=0
            ) as gz:
                while chunk := source.read(_CHUNK):
                    sha.update(chunk)
                    gz.write(chunk)
                    counted.add(len(chunk))
            if "sha256:" + sha.hexdigest() != diff_id:
                raise ImageError(f"a layer of {reference} does not match its DiffID {diff_id}")
        return Descriptor(OCI_LAYER_GZIP, blob.digest, blob.size)

    def stored_image(self, reference: str) -> AssembledImage:
        """A stored image as an :class:`AssembledImage`, to push or export it like a build."""
        found = self.lookup(reference)
        if found is None:
            raise ImageError(f"the local image store {self.root} has no image {reference}")
        repository, tag = split_name(reference)
        base = self.base_image(repository, tag or found.digest, found.digest)
        return AssembledImage(
            manifest_digest=base.digest,
            manifest_bytes=base.manifest_bytes,
            config_digest=base.config_descriptor.digest,
            config_bytes=self.blobs.read_bytes(base.config_descriptor.digest),
            layers=tuple(
                Layer(d, diff, False) for d, diff in zip(base.layers, base.diff_ids, strict=True)
            ),
            base=base,
            store=self.blobs,
            annotations=dict(base.manifest.get("annotations") or {}),
        )

    # -- checks ----------------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Hash every blob in full (``builder images verify``, like ``git fsck``): a blob that
        does not match its name, or is not a regular file, is removed; then say which named
        images lack a blob now (they are fetched or built again by the next build)."""
        checked = size = 0
        with self.in_use():
            for folder, dirs, files in os.walk(self.root):  # never into a linked folder
                for name in [*dirs, *files]:
                    path = Path(folder) / name
                    if path.is_symlink() and path != self.root / "index.json":
                        path.unlink()  # the link itself; index.json is refused by images()
                        self.blobs.repairs.append(f"{path} was a symbolic link; removed")
            for path in sorted(self.blobs.blobs.iterdir()):
                digest = f"sha256:{path.name}"
                try:
                    check_digest(digest)
                except ImageError:
                    continue  # not a blob name: nothing this store reads
                found = self.blobs.checked(digest)
                checked += 1
                size += found.stat().st_size if found is not None else 0
            incomplete = [i.reference for i in self.images() if not self.complete(i.digest)]
        return VerifyReport(checked, size, tuple(self.blobs.repairs), tuple(incomplete))

    # -- garbage collection ----------------------------------------------------------------

    def prune(self, *, dry_run: bool = False, wait: float = PRUNE_WAIT) -> PruneReport:
        """Remove every blob no named image reaches (manifests, configs, layers, index children,
        and the attestations attached to them).

        Waits up to ``wait`` seconds for running builds to release the store, then holds it
        exclusively: nothing is written meanwhile. Layer-cache records whose blob is gone,
        index entries of attestations whose image is gone and leftover temporary files go too.
        """
        with self._gc_lock(exclusive=True, wait=wait):
            names = self.images()
            keep: set[str] = set()
            for image in names:
                self._reach(image.digest, keep)
            self._reach_referrers(keep)
            removed = removed_bytes = kept = 0
            for path in sorted(self.blobs.blobs.iterdir()):
                if f"sha256:{path.name}" in keep and not path.is_symlink():
                    kept += 1
                    continue
                removed += 1
                with contextlib.suppress(OSError):
                    removed_bytes += path.lstat().st_size
                    if not dry_run:
                        path.unlink()  # a link is removed itself, never what it points to
            if not dry_run:
                self._sweep_records_and_tmp()
                if (self.root / "index.json").is_file():
                    update_layout_index(
                        self.root,
                        lambda items: [
                            i
                            for i in items
                            if (i.get("annotations") or {}).get(REF_NAME) or i.get("digest") in keep
                        ],
                    )
        return PruneReport(len(names), kept, removed, removed_bytes, dry_run)

    def _reach_referrers(self, keep: set[str]) -> None:
        """Add what the unnamed index entries (attached attestations) whose subject is kept
        reach: an attestation lives as long as its image."""
        if not (self.root / "index.json").is_file():
            return
        artifacts = [e.descriptor.digest for e in read_layout_index(self.root) if not e.ref_name]
        grew = True
        while grew:
            grew = False
            for digest in artifacts:
                if digest in keep:
                    continue
                try:
                    subject = json.loads(self.blobs.read_bytes(digest)).get("subject") or {}
                except (OSError, ValueError, AttributeError, ImageError):
                    continue
                if isinstance(subject, dict) and subject.get("digest") in keep:
                    self._reach(digest, keep)
                    grew = True

    def _reach(self, digest: str, keep: set[str]) -> None:
        """Add ``digest`` and every blob it references (recursively) to ``keep``."""
        if digest in keep:
            return
        keep.add(digest)
        try:
            doc = json.loads(self.blobs.read_bytes(digest))
        except (OSError, ValueError, ImageError):
            return  # a missing or non-JSON blob references nothing
        if not isinstance(doc, dict):
            return
        media_type = doc.get("mediaType")
        children = list(doc.get("manifests") or []) if media_type in INDEX_TYPES else []
        if "config" in doc:
            children += [doc["config"], *(doc.get("layers") or [])]
        for child in children:
            if isinstance(child, dict) and isinstance(child.get("digest"), str):
                if child.get("mediaType") in (*INDEX_TYPES, *IMAGE_MANIFEST_TYPES):
                    self._reach(child["digest"], keep)
                else:
                    keep.add(child["digest"])

    def _sweep_records_and_tmp(self) -> None:
        for record in (self.root / "layers").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                digest = json.loads(read_nofollow(record)).get("digest")
                if not isinstance(digest, str) or not self.blobs.has(digest):
                    record.unlink()
        for folder in ("verified", "pushed"):
            for record in (self.root / folder).iterdir():
                if not (self.blobs.blobs / record.name).is_file():
                    record.unlink(missing_ok=True)
        for tmp in self.blobs.tmp.iterdir():
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _gc_lock(
        self, *, exclusive: bool, wait: float | None
    ) -> contextlib.AbstractContextManager[None]:
        """flock the store: shared (builds) or exclusive (prune, waiting at most ``wait`` s)."""

        def busy() -> ImageError:
            return ImageError(
                f"the local image store {self.root} is in use by a build",
                hint="run `builder images prune` again when the build has finished",
            )

        return locked_file(
            self.root / _GC_LOCK, exclusive=exclusive, wait=wait, busy=busy, error=ImageError
        )


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    member = tar.extractfile(name)
    if member is None:
        raise KeyError(name)
    return member


class _Counted:
    """Bytes done of a total, reported to an optional progress callback."""

    def __init__(self, what: str, total: int, progress: Progress | None) -> None:
        self.what, self.total, self.done, self.progress = what, total, 0, progress

    def add(self, count: int) -> None:
        self.done += count
        if self.progress:
            self.progress(ProgressEvent(self.what, self.done, max(self.total, self.done)))


def save_from_docker(
    docker_client: Any, reference: str, store: ImageStore, progress: Progress | None = None
) -> Descriptor:
    """Copy the engine's image ``reference`` into ``store`` (``docker save``, then import);
    ``progress`` gets the bytes exported (a GPU base is 3 GB: minutes)."""
    from docker.errors import DockerException

    try:
        image = docker_client.images.get(reference)
    except DockerException as exc:
        raise ImageError(f"cannot export {reference} from the Docker engine: {exc}") from None
    kept = _stored_as(store, reference, str(image.id))
    if kept is not None:
        return kept  # stored before, the same image (config digest = the engine's image id)
    with tempfile.NamedTemporaryFile(dir=store.blobs.tmp, prefix="docker-save-") as spool:
        try:
            total, done = int(image.attrs.get("Size") or 0), 0
            for chunk in image.save(named=True):
                spool.write(chunk)
                done += len(chunk)
                if progress:
                    progress(ProgressEvent(f"exporting {reference}", done, max(total, done)))
            spool.flush()
        except DockerException as exc:
            raise ImageError(f"cannot export {reference} from the Docker engine: {exc}") from None
        except OSError as exc:
            raise ImageError(
                f"cannot export {reference} into {store.root}: {exc.strerror}"
            ) from None
        return store.import_docker_archive(Path(spool.name), reference, progress)


def _stored_as(store: ImageStore, reference: str, image_id: str) -> Descriptor | None:
    """A complete stored manifest whose config is ``image_id`` (the engine's image id is its
    config digest), named ``reference`` from now on: re-exporting it would give the same config
    and layers (minutes for a 3 GB base). ``reference`` itself is looked at first."""
    named = [i for i in store.images() if i.reference == reference]
    for found in [*named, *(i for i in store.images() if i.reference != reference)]:
        try:
            config = json.loads(store.blobs.read_bytes(found.digest))["config"]["digest"]
        except (OSError, ValueError, KeyError, TypeError, ImageError):
            continue
        if config == image_id and store.complete(found.digest):
            manifest = Descriptor(found.media_type, found.digest, found.size)
            if found.reference != reference:
                store.tag(manifest, [reference])
            return manifest
    return None
