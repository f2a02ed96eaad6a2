"""Assemble stage: base image + one layer per model + one config layer -> an OCI image.

No daemon and no Dockerfile: layers are deterministic tar streams written straight into the
content-addressed :class:`~builder.oci.BlobStore`, hashed while they are written, and the
image config and manifest are canonical JSON. Same inputs give the same manifest digest on
any machine, whatever its clock, umask, TZ, cwd or cache state.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import tarfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

from builder.contracts import Progress, ProgressEvent
from builder.errors import ImageError
from builder.image.base import BaseImage, fetch_base_blob
from builder.oci import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    BlobStore,
    Descriptor,
    RetryPolicy,
    canonical_json,
    is_disk_full,
)

#: The image format: bumped whenever the bytes an image is built into change for the same
#: inputs. Format 1: every entry of every layer carries the config commit time. Format 2: only
#: stamped layers (the config layer) do; the others carry :data:`CONTENT_MTIME`, so a model
#: layer's digest depends on that model's files alone and is one blob for every customer and
#: every config commit. Format 3 (:data:`LOCATION_FREE_FORMAT`): the image names no location
#: (no observed repository, base registry alias or production store spelling; see
#: :func:`builder.image.provenance.image_locations`), so its digest is a function of content
#: identity alone. (Named "layer format" when it only described layers.)
LAYER_FORMAT: Final = 3
#: Formats this builder can still write (``verify`` rebuilds older images with their own).
LAYER_FORMATS: Final = (1, 2, 3)
#: The first format whose images record no location.
LOCATION_FREE_FORMAT: Final = 3
#: Config label recording the format (absent on images built before format 2).
LAYER_FORMAT_LABEL: Final = "com.ivd.layer-format"
#: OCI key naming the base image by where it was pulled from (formats before 3 only).
BASE_NAME_LABEL: Final = "org.opencontainers.image.base.name"
#: OCI keys that name locations: never inherited from the base image from format 3 on (there
#: they would describe the base, not this image).
LOCATION_LABELS: Final = ("org.opencontainers.image.source", BASE_NAME_LABEL)
#: Entry mtime of unstamped layers (format 2): fixed, as Jib does (``Instant.ofEpochSecond(1)``),
#: and not 0, which some tools read as "no time".
CONTENT_MTIME: Final = 1
#: gzip level for compressible layers (recorded in provenance as compressionLevel).
GZIP_LEVEL: Final = 6
#: A layer is gzipped when a zlib level-1 trial shrinks its sample to at most this fraction.
COMPRESS_RATIO: Final = 0.8
#: Layers whose files total less than this are always gzipped (configs, small models).
SMALL_LAYER: Final = 1 << 20
_SAMPLE: Final = 1 << 20
_CHUNK: Final = 1 << 20
DIR_MODE: Final = 0o755
#: Annotation on our layer descriptors naming the layer (model name or "config").
LAYER_NAME_ANNOTATION: Final = "com.ivd.layer.name"
#: How the image config's history names a layer this tool made (``<prefix><name> <folder>``).
HISTORY_PREFIX: Final = "ivd-image-builder: COPY "
#: Config keys inherited from the base image's runtime config.
INHERITED_CONFIG: Final = (
    "Env",
    "Entrypoint",
    "Cmd",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "StopSignal",
    "Healthcheck",
)


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file to put in a layer.

    ``sha256`` (hex or ``sha256:<hex>``), when the caller already knows it (the fetch cache
    does), lets an unchanged layer be reused from the blob store without reading the file.
    """

    path: str  # absolute posix path inside the image
    source: Path | bytes
    mode: int = 0o644
    sha256: str | None = None


@dataclass(frozen=True)
class LayerSpec:
    """A layer: a name (model name or "config") and its files.

    ``compress``: None picks by the rule in :func:`should_compress`; True/False forces it.
    ``stamped``: the entries carry the image's SOURCE_DATE_EPOCH (the config layer); otherwise
    (model layers) a fixed time, so the layer is the same blob whatever the commit or customer.
    """

    name: str
    entries: Sequence[FileEntry]
    compress: bool | None = None
    stamped: bool = False


# -- layers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """A layer of the assembled image."""

    descriptor: Descriptor
    diff_id: str | None  # None only for base layers whose DiffID the config did not list
    new: bool  # built by this assembly (False: reused from the base image by digest)
    name: str | None = None  # LayerSpec.name for new layers
    reused: bool = False  # new layer taken from the blob store's layer cache


@dataclass(frozen=True)
class _Item:
    """A normalised tar member: a directory (entry None) or a file."""

    path: str  # relative tar path, no leading slash
    entry: FileEntry | None
    size: int = 0


def _normalise(spec: LayerSpec) -> list[_Item]:
    """Validated, sorted tar members of ``spec`` with every parent directory made explicit."""
    files: dict[str, FileEntry] = {}
    for entry in spec.entries:
        pure = PurePosixPath(entry.path)
        if (
            not pure.is_absolute()
            or any(p in ("..", ".") for p in pure.parts)
            or pure == pure.parent
        ):
            raise ImageError(f"layer {spec.name}: {entry.path!r} is not an absolute in-image path")
        rel = pure.relative_to("/").as_posix()
        if rel in files:
            raise ImageError(f"layer {spec.name}: {entry.path} is listed twice")
        files[rel] = entry
    dirs = {
        p.as_posix() for rel in files for p in PurePosixPath(rel).parents if p.as_posix() != "."
    }
    clash = dirs & files.keys()
    if clash:
        raise ImageError(f"layer {spec.name}: /{min(clash)} is both a file and a directory")
    items = [_Item(d, None) for d in dirs]
    items += [_Item(rel, entry, _source_size(entry, spec.name)) for rel, entry in files.items()]
    # Component-wise order: depth-first, so each directory comes right before its contents.
    items.sort(key=lambda item: item.path.split("/"))
    return items


def _source_size(entry: FileEntry, layer: str) -> int:
    if isinstance(entry.source, bytes):
        return len(entry.source)
    try:
        return entry.source.stat().st_size
    except OSError as exc:
        raise ImageError(f"layer {layer}: cannot read {entry.source} ({exc.strerror})") from exc


def _open_source(entry: FileEntry) -> IO[bytes]:
    return io.BytesIO(entry.source) if isinstance(entry.source, bytes) else entry.source.open("rb")


def should_compress(items: Sequence[_Item]) -> bool:
    """Whether to gzip a layer: the cheap, deterministic rule.

    Layers under 1 MiB (configs, tiny models) are gzipped. Otherwise 1 MiB from the middle
    of the largest file (the middle, because model formats put compressible graph structure
    first and incompressible tensors after) is compressed with zlib level 1; the layer is
    gzipped only if that shrinks it to 80% or less. Float weights typically do not, and stay
    uncompressed (``application/vnd.oci.image.layer.v1.tar``), which also keeps zlib's version
    out of their digest.
    """
    files = [i for i in items if i.entry is not None]
    if sum(i.size for i in files) < SMALL_LAYER:
        return True
    largest = max(files, key=lambda i: (i.size, i.path))
    assert largest.entry is not None
    offset = max(0, (largest.size - _SAMPLE) // 2)
    with _open_source(largest.entry) as file:
        file.seek(offset)
        sample = file.read(_SAMPLE)
    return len(zlib.compress(sample, 1)) <= COMPRESS_RATIO * max(1, len(sample))


def check_layer_format(layer_format: int) -> int:
    """``layer_format`` if this builder can write it, else ImageError."""
    if layer_format not in LAYER_FORMATS:
        supported = ", ".join(map(str, LAYER_FORMATS))
        raise ImageError(
            f"layer format {layer_format} is not one this builder writes ({supported})",
            hint="rebuild with the ivd-image-builder version that built the image",
        )
    return layer_format


def entry_mtime(spec: LayerSpec, source_date_epoch: int, layer_format: int = LAYER_FORMAT) -> int:
    """The mtime of every entry of ``spec``'s tar: the layout rule of ``layer_format``."""
    if check_layer_format(layer_format) == 1 or spec.stamped:
        return source_date_epoch
    return CONTENT_MTIME


def _layer_key(items: Sequence[_Item], compress: bool | None, mtime: int, fmt: int) -> str | None:
    """The layer's input key for the layer cache, or None when a file's digest is unknown."""
    members: list[list[Any]] = []
    for item in items:
        if item.entry is None:
            continue
        entry = item.entry
        if isinstance(entry.source, bytes):
            digest = hashlib.sha256(entry.source).hexdigest()
        elif entry.sha256:
            digest = entry.sha256.removeprefix("sha256:")
        else:
            return None
        members.append([item.path, entry.mode & 0o7777, item.size, digest])
    key = {
        # Formats 2 and 3 write the same layer bytes (3 changed only labels and the config
        # layer's content): one key, so layers cached before format 3 are still reused.
        "format": 1 if fmt == 1 else 2,
        "mtime": mtime,
        "compress": compress,
        "gzip": [GZIP_LEVEL, zlib.ZLIB_RUNTIME_VERSION],
        "members": members,
    }
    return hashlib.sha256(canonical_json(key)).hexdigest()


class _DiffHasher:
    """Passes the uncompressed tar stream on while hashing it (the DiffID).

    With ``hashing=False`` (uncompressed layers, where the DiffID is the blob digest the
    store computes anyway) it only counts, so each byte is hashed once.
    """

    def __init__(self, sink: Any, *, hashing: bool = True) -> None:
        self._sink = sink
        self._sha = hashlib.sha256() if hashing else None
        self.size = 0

    def write(self, data: bytes) -> int:
        if self._sha is not None:
            self._sha.update(data)
        self.size += len(data)
        self._sink.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    @property
    def digest(self) -> str | None:
        return None if self._sha is None else "sha256:" + self._sha.hexdigest()


class _ProgressReader:
    """A source file that reports bytes read to the progress callback."""

    def __init__(self, file: IO[bytes], report: Callable[[int], None]) -> None:
        self._file = file
        self._report = report

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._report(len(data))
        return data


def _tarinfo(path: str, *, directory: bool, size: int, mode: int, mtime: int) -> tarfile.TarInfo:
    """A member header built by hand: nothing of the host (owner, times, xattrs) leaks in."""
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size = 0 if directory else size
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_layer(
    spec: LayerSpec,
    *,
    source_date_epoch: int,
    store: BlobStore,
    progress: Progress | None = None,
    layer_format: int = LAYER_FORMAT,
) -> Layer:
    """Write ``spec`` as a deterministic tar layer into ``store`` in one pass.

    The tar stream is hashed (DiffID) as it is produced, optionally gzipped (no file name,
    mtime 0) and hashed again as it is written to the store. A layer whose input key is in
    the store's layer cache is not rebuilt. Entry times follow :func:`entry_mtime`: an
    unstamped layer does not depend on ``source_date_epoch`` at all.
    """
    items = _normalise(spec)
    if not any(i.entry is not None for i in items):
        raise ImageError(f"layer {spec.name} has no files")
    mtime = entry_mtime(spec, source_date_epoch, layer_format)
    key = _layer_key(items, spec.compress, mtime, layer_format)
    if key is not None and (record := store.layer_record(key)) is not None:
        return Layer(_layer_descriptor(record, spec.name), record["diff_id"], True, spec.name, True)
    total = sum(i.size for i in items)
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None and n:
            progress(ProgressEvent(f"layer {spec.name}", done, total))

    try:
        compress = should_compress(items) if spec.compress is None else spec.compress
        with store.writer() as blob:
            gz = (
                gzip.GzipFile(
                    filename="", mode="wb", fileobj=blob, mtime=0, compresslevel=GZIP_LEVEL
                )
                if compress
                else None
            )
            diff = _DiffHasher(gz if gz is not None else blob, hashing=gz is not None)
            _write_tar(items, diff, mtime, report)
            if gz is not None:
                gz.close()
    except OSError as exc:
        if is_disk_full(exc):
            raise ImageError(
                f"disk full while writing layer {spec.name} into {store.root}",
                hint="free space or point the cache elsewhere; nothing partial was kept",
            ) from exc
        raise ImageError(f"cannot write layer {spec.name}: {exc}") from exc
    diff_id = diff.digest or blob.digest
    record = {
        "digest": blob.digest,
        "size": blob.size,
        "diff_id": diff_id,
        "mediaType": OCI_LAYER_GZIP if compress else OCI_LAYER,
    }
    if key is not None:
        with contextlib.suppress(OSError):  # only a cache: the next build re-tars instead
            store.save_layer_record(key, record)
    return Layer(_layer_descriptor(record, spec.name), diff_id, True, spec.name)


def _write_tar(
    items: Sequence[_Item], sink: _DiffHasher, mtime: int, report: Callable[[int], None]
) -> None:
    tar = tarfile.TarFile(
        fileobj=sink,  # type: ignore[arg-type]
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        copybufsize=_CHUNK,
    )
    for item in items:
        if item.entry is None:
            tar.addfile(_tarinfo(item.path, directory=True, size=0, mode=DIR_MODE, mtime=mtime))
            continue
        info = _tarinfo(
            item.path, directory=False, size=item.size, mode=item.entry.mode & 0o7777, mtime=mtime
        )
        with _open_source(item.entry) as source:
            tar.addfile(info, _ProgressReader(source, report))
    tar.close()


def _layer_descriptor(record: Mapping[str, Any], name: str) -> Descriptor:
    return Descriptor(
        media_type=str(record["mediaType"]),
        digest=str(record["digest"]),
        size=int(record["size"]),
        annotations={LAYER_NAME_ANNOTATION: name},
    )


# -- config and manifest -----------------------------------------------------------------------


@dataclass(frozen=True)
class AssembledImage:
    """The assembled image: its manifest, config and layers, all blobs in ``store``."""

    manifest_digest: str
    manifest_bytes: bytes
    config_digest: str
    config_bytes: bytes
    layers: tuple[Layer, ...]
    base: BaseImage
    store: BlobStore
    media_type: str = OCI_MANIFEST
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def image_id(self) -> str:
        """The config digest: the compression-independent identity (``docker images`` ID)."""
        return self.config_digest

    @property
    def manifest_descriptor(self) -> Descriptor:
        """Descriptor of the manifest (for indexes and layouts)."""
        return Descriptor(self.media_type, self.manifest_digest, len(self.manifest_bytes))

    @property
    def config_descriptor(self) -> Descriptor:
        """Descriptor of the image config."""
        return Descriptor(OCI_CONFIG, self.config_digest, len(self.config_bytes))

    @property
    def new_layers(self) -> tuple[Layer, ...]:
        """Layers this assembly added on top of the base."""
        return tuple(layer for layer in self.layers if layer.new)

    @property
    def blob_descriptors(self) -> list[Descriptor]:
        """Its blobs to push: the layers, then the config."""
        return [layer.descriptor for layer in self.layers] + [self.config_descriptor]

    def blob_path(
        self,
        descriptor: Descriptor,
        progress: Progress | None = None,
        retry: RetryPolicy | None = None,
        *,
        full: bool = False,
    ) -> Path:
        """A local file holding blob ``descriptor``: from the store, fetching base layers on demand.

        Base layers are not needed to assemble, only to deliver somewhere the base is not
        (another registry, an OCI layout, a docker archive); they are then streamed into the
        blob store (verified) from the base's registry or layout. The stored blob is checked
        first (``full``: hashed whatever its record says, for exports); a bad one is removed
        and fetched again.
        """
        store = self.store
        found = store.checked(descriptor.digest) if full else store.existing(descriptor.digest)
        if found is not None:
            return found
        if not any(layer.digest == descriptor.digest for layer in self.base.layers):
            raise ImageError(
                f"blob {descriptor.digest} is not in {store.root} (removed as corrupt, or never "
                "stored)",
                hint="build again: the layer is then written anew",
            )
        return fetch_base_blob(self.base, descriptor, store, progress, retry)

    def base_layers(self, host: str) -> tuple[frozenset[str], str | None]:
        """The base's layer digests, and its repository on registry ``host`` to mount them
        from: where it was resolved, or the local store's copy of it (named like the
        registry's, as a fleet run's builds take it); None when it is not on ``host``."""
        base = self.base
        digests = frozenset(layer.digest for layer in base.layers)
        if base.registry is not None:
            return digests, base.path if base.registry == host else None
        if base.source != "store" or base.repository.startswith("oci:"):
            return digests, None
        registry, _, path = base.repository.partition("/")
        return digests, path if registry == host and path else None


def rfc3339(epoch: int) -> str:
    """``epoch`` as an RFC 3339 UTC timestamp (second precision, ``Z``)."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def layer_root(spec: LayerSpec) -> str:
    """The deepest directory holding every file of ``spec`` (``/app/models/<name>``)."""
    parents = [PurePosixPath(e.path).parent.parts for e in spec.entries]
    common: list[str] = []
    for parts in zip(*parents, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return PurePosixPath(*common).as_posix() if common else "/"


def standard_metadata(
    base: BaseImage, source_date_epoch: int, layer_format: int = LAYER_FORMAT
) -> dict[str, str]:
    """The OCI keys every image gets, as annotations and as labels: created, base.digest, and
    before format 3 base.name (the name the base was reached by: a registry alias)."""
    metadata = {
        "org.opencontainers.image.created": rfc3339(source_date_epoch),
        "org.opencontainers.image.base.digest": base.digest,
    }
    if layer_format < LOCATION_FREE_FORMAT:
        metadata[BASE_NAME_LABEL] = base.name
    return metadata


def build_config(
    base: BaseImage,
    new_layers: Sequence[tuple[Layer, str]],
    labels: Mapping[str, str],
    source_date_epoch: int,
    layer_format: int = LAYER_FORMAT,
) -> dict[str, Any]:
    """The image config: the base's runtime config, our labels, history and DiffIDs.

    ``new_layers`` pairs each new layer with the in-image directory it fills (history).
    """
    created = rfc3339(source_date_epoch)
    base_cfg = base.config.get("config") or {}
    runtime = {k: base_cfg[k] for k in INHERITED_CONFIG if base_cfg.get(k) is not None}
    merged = {str(k): str(v) for k, v in (base_cfg.get("Labels") or {}).items()}
    if layer_format >= LOCATION_FREE_FORMAT:
        for key in LOCATION_LABELS:
            merged.pop(key, None)
    merged.update({str(k): str(v) for k, v in labels.items()})
    if merged:
        runtime["Labels"] = merged
    history = list(base.config.get("history") or [])
    for layer, root in new_layers:
        history.append(
            {
                "created": created,
                "created_by": f"{HISTORY_PREFIX}{layer.name} {root}",
                "comment": f"layer {layer.name}",
            }
        )
    config: dict[str, Any] = {
        "architecture": base.config.get("architecture", "amd64"),
        "os": base.config.get("os", "linux"),
        "config": runtime,
        "created": created,
        "history": history,
        "rootfs": {
            "type": "layers",
            "diff_ids": base.diff_ids + [layer.diff_id for layer, _ in new_layers],
        },
    }
    for key in ("variant", "os.version", "os.features"):
        if base.config.get(key):
            config[key] = base.config[key]
    return config


def assemble(
    base: BaseImage,
    layers: Sequence[LayerSpec],
    *,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    source_date_epoch: int,
    store: BlobStore,
    progress: Progress | None = None,
    layer_format: int = LAYER_FORMAT,
) -> AssembledImage:
    """Build the image: ``base`` plus one layer per spec, in the order given.

    The base's layer descriptors are kept exactly (Docker media types included) so its blobs
    are reused by digest. ``org.opencontainers.image.{created,base.name,base.digest}`` are
    added to both the manifest annotations and the config labels unless the caller set them.
    ``layer_format`` selects the format's rules (:data:`LAYER_FORMAT`; older ones only to
    rebuild older images); from format 2 on it is recorded as the label
    :data:`LAYER_FORMAT_LABEL`, so a rebuild can pick the same rules. From format 3 on
    ``base.name`` is not added and the location keys of the base's labels are not inherited.
    """
    if source_date_epoch < 0:
        raise ImageError(f"SOURCE_DATE_EPOCH must be >= 0, got {source_date_epoch}")
    check_layer_format(layer_format)
    names = [spec.name for spec in layers]
    if len(set(names)) != len(names):
        raise ImageError(f"layer names must be unique: {names}")
    built = [
        (
            build_layer(
                spec,
                source_date_epoch=source_date_epoch,
                store=store,
                progress=progress,
                layer_format=layer_format,
            ),
            layer_root(spec),
        )
        for spec in layers
    ]
    standard = standard_metadata(base, source_date_epoch, layer_format)
    # Label and annotation values are strings in the image spec, whatever the caller passed.
    all_labels = {**standard, **{str(k): str(v) for k, v in labels.items()}}
    # The rule the layers were written with, never what a caller says it was. Format 1 images
    # predate the label and must rebuild without it.
    all_labels.pop(LAYER_FORMAT_LABEL, None)
    if layer_format >= 2:
        all_labels[LAYER_FORMAT_LABEL] = str(layer_format)
    all_annotations = {**standard, **{str(k): str(v) for k, v in annotations.items()}}
    config = build_config(base, built, all_labels, source_date_epoch, layer_format)
    config_bytes = canonical_json(config)
    try:
        config_digest = store.put_bytes(config_bytes)
    except OSError as exc:
        raise ImageError(f"cannot write the image config into {store.root}: {exc}") from exc
    base_diff_ids: list[str | None] = list(base.diff_ids)
    layer_list = [Layer(d, diff, False) for d, diff in zip(base.layers, base_diff_ids, strict=True)]
    layer_list += [layer for layer, _ in built]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor(OCI_CONFIG, config_digest, len(config_bytes)).to_dict(),
        "layers": [layer.descriptor.to_dict() for layer in layer_list],
        "annotations": all_annotations,
    }
    manifest_bytes = canonical_json(manifest)
    try:
        manifest_digest = store.put_bytes(manifest_bytes)
    except OSError as exc:
        raise ImageError(f"cannot write the image manifest into {store.root}: {exc}") from exc
    return AssembledImage(
        manifest_digest=manifest_digest,
        manifest_bytes=manifest_bytes,
        config_digest=config_digest,
        config_bytes=config_bytes,
        layers=tuple(layer_list),
        base=base,
        store=store,
        annotations=all_annotations,
    )
