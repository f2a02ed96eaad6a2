"""Low-level OCI data: media types, descriptors, canonical JSON, a blob store, image layouts.

Everything here is plain data and local files; no network. The blob store is itself an OCI
image layout (``oci-layout`` + ``blobs/sha256/<hex>``), so a cache directory can be read by
skopeo/crane/oras as it is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

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
_CHUNK: Final = 1 << 20
#: A temporary file no process holds locked and this old (seconds) was left by a killed one.
_STALE_TMP: Final = 60
_PUSHED_KEPT: Final = 4  # repositories remembered per blob and registry


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
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"malformed OCI descriptor: {dict(data)!r}") from exc
        known = {"mediaType", "digest", "size", "annotations"}
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=dict(data.get("annotations") or {}),
            extra={k: v for k, v in data.items() if k not in known},
        )


# -- blob store ----------------------------------------------------------------------------


class BlobWriter:
    """A file-like sink that hashes what it writes; see :meth:`BlobStore.writer`."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write and hash ``data``."""
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        """Bytes written so far (tarfile and gzip ask)."""
        return self.size

    def flush(self) -> None:
        """Flush the underlying file."""
        self._file.flush()

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of everything written so far."""
        return "sha256:" + self._sha.hexdigest()


class BlobStore:
    """A content-addressed directory laid out as an OCI image layout.

    Blobs land in ``blobs/sha256/<hex>`` only complete and verified: they are written to a
    temporary file in the same directory tree, fsynced and renamed, so a crash or a full
    disk never leaves a blob whose content does not match its name. ``layers/<key>.json``
    maps a layer's input key to the blob built from it, so unchanged layers are not re-tarred.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self._tmp = self.root / "tmp"
        self._layers = self.root / "layers"
        for directory in (self.blobs, self._tmp, self._layers):
            directory.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()
        layout = self.root / "oci-layout"
        if not layout.exists():
            _atomic_write(layout, canonical_json({"imageLayoutVersion": "1.0.0"}), self._tmp)

    def _sweep_tmp(self) -> None:
        """Remove temporary files a killed process left: a writer holds an exclusive ``flock``
        on its file until it is renamed or removed, and the kernel drops it when the writer
        dies, so an unlocked file older than a minute is abandoned, never one in use."""
        cutoff = time.time() - _STALE_TMP
        for path in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= cutoff:
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: in use
                    path.unlink()
                finally:
                    os.close(fd)

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it is present)."""
        return self.blobs / check_digest(digest).split(":", 1)[1]

    def has(self, digest: str) -> bool:
        """Whether the blob is present."""
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        """Size in bytes of a present blob."""
        return self.path(digest).stat().st_size

    def read_bytes(self, digest: str) -> bytes:
        """The content of a present (small) blob, verified against its digest."""
        data = self.path(digest).read_bytes()
        if sha256_digest(data) != digest:
            raise ImageError(f"blob {digest} in {self.root} is corrupt; delete it and rebuild")
        return data

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its digest."""
        with self.writer() as writer:
            writer.write(data)
        return writer.digest

    def ingest(self, chunks: Iterable[bytes], digest: str) -> Path:
        """Store a stream that must hash to ``digest`` (downloads); return the blob path."""
        check_digest(digest)
        if self.has(digest):
            return self.path(digest)
        with self.writer(expected=digest) as writer:
            for chunk in chunks:
                writer.write(chunk)
        return self.path(digest)

    @contextlib.contextmanager
    def writer(self, expected: str | None = None) -> Iterator[BlobWriter]:
        """Yield a :class:`BlobWriter`; on a clean exit the blob is committed under its digest.

        On any exception (including ENOSPC) the temporary file is removed and nothing is
        committed. With ``expected``, a content mismatch raises ImageError instead.
        """
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="blob-")
        tmp = Path(tmp_name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # marks it in use for _sweep_tmp; freed on close
            with os.fdopen(fd, "wb") as file:
                writer = BlobWriter(file)
                yield writer
                file.flush()
                os.fsync(file.fileno())
            digest = writer.digest
            if expected is not None and digest != expected:
                raise ImageError(
                    f"content does not match its digest: expected {expected}, got {digest}"
                )
            tmp.chmod(0o644)
            tmp.replace(self.path(digest))
        finally:
            tmp.unlink(missing_ok=True)

    def layer_record(self, key: str) -> dict[str, Any] | None:
        """The cached result of building the layer with input ``key``, if its blob is present."""
        path = self._layers / f"{key}.json"
        try:
            record: dict[str, Any] = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record.get("digest"), str) or not self.has(record["digest"]):
            return None
        return record

    def save_layer_record(self, key: str, record: Mapping[str, Any]) -> None:
        """Remember which blob the layer with input ``key`` produced."""
        # A cache entry, not content: a record lost in a crash only means re-tarring once.
        _atomic_write(
            self._layers / f"{key}.json", canonical_json(dict(record)), self._tmp, durable=False
        )

    def _pushed_path(self, digest: str) -> Path:
        return self.root / "pushed" / check_digest(digest).split(":", 1)[1]

    def _pushed_record(self, digest: str) -> dict[str, Any]:
        try:
            record = json.loads(self._pushed_path(digest).read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def pushed_to(self, digest: str, host: str) -> list[str]:
        """Repositories on registry ``host`` this store's blob ``digest`` was pushed to, newest
        first: where a push to another repository can mount it from instead of uploading."""
        repos = self._pushed_record(digest).get(host)
        return [str(r) for r in repos] if isinstance(repos, list) else []

    def note_pushed(self, digest: str, host: str, repository: str) -> None:
        """Remember that ``digest`` is now in ``host/repository`` (a hint only: mounts fall back)."""
        record = self._pushed_record(digest)
        known = self.pushed_to(digest, host)
        if known[:1] == [repository]:
            return  # already the newest: no write (and no fsync) on every rebuild
        known = [r for r in known if r != repository]
        record[host] = [repository, *known][:_PUSHED_KEPT]
        path = self._pushed_path(digest)
        path.parent.mkdir(exist_ok=True)
        _atomic_write(path, canonical_json(record), self._tmp, durable=False)


def _atomic_write(
    path: Path, data: bytes, tmp_dir: Path | None = None, *, durable: bool = True
) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    ``durable=False`` skips the fsync, for caches and hints whose readers treat a torn or
    missing file as absent (an fsync on a busy disk costs more than a whole rebuild).
    """
    directory = tmp_dir or path.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        Path(tmp_name).chmod(0o644)
        Path(tmp_name).replace(path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the OS saying there is no space left (or quota exceeded)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


# -- image layout ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutEntry:
    """One manifest named in a layout's index.json."""

    descriptor: Descriptor
    ref_name: str | None


def read_layout_index(directory: Path) -> list[LayoutEntry]:
    """The manifests listed in ``directory/index.json`` (an OCI image layout)."""
    marker = directory / "oci-layout"
    index_path = directory / "index.json"
    if not marker.is_file() or not index_path.is_file():
        raise ImageError(f"{directory} is not an OCI image layout (no oci-layout/index.json)")
    try:
        index = json.loads(index_path.read_text("utf-8"))
        manifests = index.get("manifests") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise ImageError(f"{index_path} is not a valid image index: {exc}") from exc
    entries = []
    for item in manifests:
        descriptor = Descriptor.from_dict(item)
        entries.append(LayoutEntry(descriptor, descriptor.annotations.get(REF_NAME)))
    return entries


def layout_blob_path(directory: Path, digest: str) -> Path:
    """Path of a blob inside an OCI image layout."""
    return directory / "blobs" / "sha256" / check_digest(digest).split(":", 1)[1]


def read_layout_blob(directory: Path, digest: str) -> bytes:
    """A (small) blob of an OCI image layout, verified against its digest."""
    path = layout_blob_path(directory, digest)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"OCI layout {directory} lacks blob {digest}") from exc
    if sha256_digest(data) != digest:
        raise ImageError(f"blob {digest} in OCI layout {directory} is corrupt")
    return data


def copy_blob(source: Path, target: Path) -> None:
    """Place ``source`` at ``target`` (hard link when possible, else copy), atomically."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            tmp.chmod(0o644)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


#: Lock file next to an image layout's index.json: every read-merge-write of the index holds it.
INDEX_LOCK: Final = ".index.json.lock"
#: How long a writer waits for another writer of the same index (seconds).
INDEX_LOCK_TIMEOUT: Final = 120.0


@contextlib.contextmanager
def locked_layout(directory: Path, timeout: float = INDEX_LOCK_TIMEOUT) -> Iterator[Path]:
    """Hold the lock of the image layout at ``directory`` (created if missing); yield index.json.

    Concurrent builds writing into one layout (``--oci-layout``, the local image store) would
    otherwise each read the index, add their tags and write it back, losing the others' tags.
    """
    from filelock import FileLock, Timeout

    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / INDEX_LOCK, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise ImageError(
            f"OCI layout {directory} is locked by another writer for more than {timeout:.0f} s",
            hint=f"wait for the other build, or remove {directory / INDEX_LOCK} if none runs",
        ) from None
    try:
        yield directory / "index.json"
    finally:
        lock.release()


def update_layout_index(
    directory: Path, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Apply ``change`` to the manifests of ``directory/index.json`` under the layout's lock.

    The one writer of image layout indexes: read, change, write atomically, all while holding
    :func:`locked_layout`, so concurrent writers never lose each other's entries. Other keys of
    the index are kept. Returns the manifests written.
    """
    with locked_layout(directory) as index_path:
        index: dict[str, Any] = {}
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text("utf-8"))
                if not isinstance(index, dict):
                    raise ValueError("not a JSON object")
                existing = list(index.get("manifests") or [])
                if not all(isinstance(item, dict) for item in existing):
                    raise ValueError("manifests must be JSON objects")
            except (OSError, ValueError, TypeError) as exc:
                raise ImageError(f"{index_path} is not a valid image index: {exc}") from exc
        else:
            existing = []
        manifests = change(existing)
        index.update(schemaVersion=2, mediaType=OCI_INDEX, manifests=manifests)
        marker = directory / "oci-layout"
        if not marker.exists():
            _atomic_write(marker, canonical_json({"imageLayoutVersion": "1.0.0"}))
        _atomic_write(index_path, canonical_json(index))
    return manifests


def write_layout_index(directory: Path, manifest: Descriptor, ref_names: Sequence[str]) -> None:
    """Add ``manifest`` to ``directory/index.json`` under each ref name, merging with what is there.

    A ref name already present is re-pointed to ``manifest``; other entries are kept (under the
    layout's lock: concurrent writers keep each other's tags). The blobs must already be in
    ``directory/blobs``.
    """
    names = set(ref_names)
    added = [
        Descriptor(manifest.media_type, manifest.digest, manifest.size, {REF_NAME: name}).to_dict()
        for name in sorted(names)
    ]
    if not names:
        added = [Descriptor(manifest.media_type, manifest.digest, manifest.size).to_dict()]

    def merge(existing: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = [
            item
            for item in existing
            if (item.get("annotations") or {}).get(REF_NAME) not in names
            and not (not names and item.get("digest") == manifest.digest)
        ]
        return kept + added

    update_layout_index(directory, merge)


def hash_file(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in chunks."""
    sha = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()
