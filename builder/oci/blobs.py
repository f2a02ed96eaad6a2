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
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Final

from builder.errors import ImageError
from builder.fsutil import open_nofollow, read_nofollow
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

    The folder is a trust boundary, like a registry: no symbolic link inside it is followed
    (a linked cache folder, lock or record is replaced, a linked blob is dropped, a linked
    ``blobs`` folder or index is refused), and a blob is checked before it is reused: its
    size and a record of when it was last hashed (``verified/<hex>``: inode, size, mtime,
    ctime), hashed again whenever the file changed since; :meth:`checked` hashes it in full
    (exports, ``builder images verify``). A bad blob is removed, so it is fetched or built
    again, and :attr:`repairs` says so in one line each.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        #: What was found wrong in the store and repaired, one line each (for the user).
        self.repairs: list[str] = []
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = self._directory("blobs", "sha256", replace=False)
        self._tmp = self._directory("tmp")
        self._layers = self._directory("layers")
        for records in ("verified", "pushed", "present"):
            self._directory(records)
        self._sweep_tmp()
        layout = self.root / "oci-layout"
        if not layout.is_file() or layout.is_symlink():
            atomic_write(layout, canonical_json({"imageLayoutVersion": "1.0.0"}), self._tmp)

    def _directory(self, *parts: str, replace: bool = True) -> Path:
        """The store's folder ``parts`` (made if missing), never reached through a link: a
        linked cache folder is replaced by an empty one, a linked ``blobs`` is refused."""
        path = self.root
        for part in parts:
            path /= part
            if path.is_symlink():
                if not replace:
                    raise link_refused(self.root, path)
                path.unlink()  # the link itself; what it points to is left alone
                self.repairs.append(f"{path} was a symbolic link; replaced by an empty folder")
            path.mkdir(exist_ok=True)
        return path

    def _sweep_tmp(self) -> None:
        remove_abandoned(self._tmp.iterdir())

    @property
    def tmp(self) -> Path:
        """The store's folder for temporary files (swept of what killed processes left)."""
        return self._tmp

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it is present)."""
        return self.blobs / check_digest(digest).split(":", 1)[1]

    def existing(self, digest: str) -> Path | None:
        """The blob's path when it is present and checked (cheaply, see the class); None when
        it is absent or was bad (then removed, and said in :attr:`repairs`)."""
        return self._check(digest, full=False)

    def checked(self, digest: str) -> Path | None:
        """:meth:`existing`, hashing the blob in full whatever its record says (exports)."""
        return self._check(digest, full=True)

    def has(self, digest: str) -> bool:
        """Whether the blob is present and checked (see :meth:`existing`)."""
        return self.existing(digest) is not None

    def size(self, digest: str) -> int:
        """Size in bytes of a present blob."""
        return self.path(digest).lstat().st_size

    def read_bytes(self, digest: str) -> bytes:
        """The content of a present (small) blob, verified against its digest; a bad one is
        removed (ImageError: fetch or build it again)."""
        path = self.path(digest)
        try:
            data = read_nofollow(path)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise  # absent: the caller says what is missing
            data = b""  # a link: never followed, removed below
        if sha256_digest(data) != digest:
            self._drop(path, digest, "does not match its digest (or is a link)")
            raise ImageError(
                f"blob {digest} in {self.root} was corrupt and has been removed",
                hint="build again (or `builder images verify` to check the whole store)",
            )
        return data

    def _check(self, digest: str, *, full: bool) -> Path | None:
        path = self.path(digest)
        try:
            info = path.lstat()
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(info.st_mode):
            self._drop(path, digest, "is not a regular file (a link?)")
            return None
        if not full and self._verified_record(digest) == _stat_key(info):
            return path
        try:
            actual = hash_file(path)
        except OSError as exc:
            raise ImageError(f"cannot read blob {digest} in {self.root}: {exc.strerror}") from None
        if actual != digest:
            self._drop(
                path, digest, f"does not match its digest (its content hashes to {actual[:19]})"
            )
            return None
        self.note_verified(digest)
        return path

    def _drop(self, path: Path, digest: str, why: str) -> None:
        """Remove a bad blob (a link is removed, never followed) and its verified record."""
        with contextlib.suppress(OSError):  # a folder planted there stays: it is never read
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._verified_path(digest).unlink()
        self.repairs.append(
            f"blob {digest[:19]} in the local store {why}; removed, to be fetched or built again"
        )

    def _verified_path(self, digest: str) -> Path:
        return self.root / "verified" / check_digest(digest).split(":", 1)[1]

    def _verified_record(self, digest: str) -> list[int] | None:
        try:
            record = json.loads(read_nofollow(self._verified_path(digest)))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, list) else None

    def note_verified(self, digest: str) -> None:
        """Remember that the blob hashed to its digest as it is now (inode, size, times):
        after writing it, after hashing it, and after hard-linking a checked blob elsewhere
        (which changes its ctime, not its content)."""
        with contextlib.suppress(OSError):  # only saves a hash next time
            key = _stat_key(self.path(digest).lstat())
            atomic_write(self._verified_path(digest), canonical_json(key), self._tmp, durable=False)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its digest."""
        with self.writer() as writer:
            writer.write(data)
        return writer.digest

    def ingest(self, chunks: Iterable[bytes], digest: str) -> Path:
        """Store a stream that must hash to ``digest`` (downloads); return the blob path."""
        found = self.existing(digest)
        if found is not None:
            return found
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
            tmp.replace(self.path(digest))  # a link planted there is replaced, not followed
            self.note_verified(digest)
        finally:
            tmp.unlink(missing_ok=True)

    def layer_record(self, key: str) -> dict[str, Any] | None:
        """The cached result of building the layer with input ``key``, if its blob is present
        and checked (a changed or corrupt blob means building the layer again)."""
        try:
            record: dict[str, Any] = json.loads(read_nofollow(self._layers / f"{key}.json"))
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
            record = json.loads(read_nofollow(self._pushed_path(digest)))
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
        atomic_write(self._pushed_path(digest), canonical_json(record), self._tmp, durable=False)

    def _present_path(self, host: str, repository: str) -> Path:
        key = hashlib.sha256(f"{host}/{repository}".encode()).hexdigest()
        return self.root / "present" / key

    def present_in(self, host: str, repository: str) -> set[str]:
        """Blobs this store pushed (or found) in ``host/repository``: a push need not ask the
        registry about them again (a hint: a manifest the registry then refuses for a missing
        blob makes the push check every blob)."""
        try:
            found = json.loads(read_nofollow(self._present_path(host, repository)))
        except (OSError, ValueError):
            return set()
        return {d for d in found if isinstance(d, str)} if isinstance(found, list) else set()

    def note_present(self, host: str, repository: str, digests: Iterable[str]) -> None:
        """Remember that ``digests`` are in ``host/repository`` (the newest kept); written only
        when that adds something."""
        path = self._present_path(host, repository)
        try:
            kept = json.loads(read_nofollow(path))
        except (OSError, ValueError):
            kept = []
        known = [d for d in kept if isinstance(d, str)] if isinstance(kept, list) else []
        fresh = [check_digest(d) for d in dict.fromkeys(digests) if d not in set(known)]
        if fresh:
            data = canonical_json((known + fresh)[-_PRESENT_KEPT:])
            atomic_write(path, data, self._tmp, durable=False)

    def forget_present(self, host: str, repository: str) -> None:
        """Drop what :meth:`note_present` remembered of ``host/repository`` (it proved wrong)."""
        self._present_path(host, repository).unlink(missing_ok=True)


def remove_abandoned(paths: Iterable[Path]) -> None:
    """Remove temporary files a killed process left: a writer holds an exclusive ``flock``
    on its file until it is renamed or removed, and the kernel drops it when the writer
    dies, so an unlocked file older than a minute is abandoned, never one in use. A link
    is removed at once (never followed)."""
    cutoff = time.time() - _STALE_TMP
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_symlink():
                path.unlink()
                continue
            if path.lstat().st_mtime >= cutoff:
                continue
            fd = open_nofollow(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: in use
                path.unlink()
            finally:
                os.close(fd)


def _stat_key(info: os.stat_result) -> list[int]:
    """What changes when a file's content may have: inode, size, mtime and ctime (ns)."""
    return [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def link_refused(root: Path, path: Path) -> ImageError:
    """The one-line refusal of a symbolic link where the store or a layout needs a folder or
    file of its own."""
    return ImageError(
        f"{path} is a symbolic link; links are not followed in {root}",
        hint="remove the link (point image_store or the layout at the real folder instead)",
    )


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
    """``sha256:<hex>`` of a file, read in chunks (OSError when ``path`` is a link)."""
    sha = hashlib.sha256()
    with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as file:
        while chunk := file.read(_CHUNK):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()
