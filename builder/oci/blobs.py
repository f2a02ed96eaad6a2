"""A content-addressed blob store laid out as an OCI image layout, and atomic file writes.

The store is itself an OCI image layout (``oci-layout`` + ``blobs/sha256/<hex>``), so a cache
directory can be read by skopeo/crane/oras as it is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Final

from builder.errors import ImageError
from builder.oci.descriptor import canonical_json, check_digest, sha256_digest

_CHUNK: Final = 1 << 20

#: A temporary file no process holds locked and this old (seconds) was left by a killed one.
_STALE_TMP: Final = 60
_PUSHED_KEPT: Final = 4  # repositories remembered per blob and registry
_PRESENT_KEPT: Final = 256  # blobs remembered per repository (the newest)


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
            atomic_write(layout, canonical_json({"imageLayoutVersion": "1.0.0"}), self._tmp)

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
        atomic_write(
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
        atomic_write(path, canonical_json(record), self._tmp, durable=False)

    def _present_path(self, host: str, repository: str) -> Path:
        key = hashlib.sha256(f"{host}/{repository}".encode()).hexdigest()
        return self.root / "present" / key

    def present_in(self, host: str, repository: str) -> set[str]:
        """Blobs this store pushed (or found) in ``host/repository``: a push need not ask the
        registry about them again (a hint: a manifest the registry then refuses for a missing
        blob makes the push check every blob)."""
        try:
            found = json.loads(self._present_path(host, repository).read_text("utf-8"))
        except (OSError, ValueError):
            return set()
        return {d for d in found if isinstance(d, str)} if isinstance(found, list) else set()

    def note_present(self, host: str, repository: str, digests: Iterable[str]) -> None:
        """Remember that ``digests`` are in ``host/repository`` (the newest kept); written only
        when that adds something."""
        path = self._present_path(host, repository)
        try:
            known = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            known = []
        known = [d for d in known if isinstance(d, str)] if isinstance(known, list) else []
        fresh = [check_digest(d) for d in dict.fromkeys(digests) if d not in set(known)]
        if not fresh:
            return
        path.parent.mkdir(exist_ok=True)
        data = canonical_json((known + fresh)[-_PRESENT_KEPT:])
        atomic_write(path, data, self._tmp, durable=False)

    def forget_present(self, host: str, repository: str) -> None:
        """Drop what :meth:`note_present` remembered of ``host/repository`` (it proved wrong)."""
        self._present_path(host, repository).unlink(missing_ok=True)


def atomic_write(
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


def hash_file(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in chunks."""
    sha = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()
