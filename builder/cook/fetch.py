"""Fetch stage: weights into a content-addressed cache, parallel, ranged, resumable, verified.

Layout under the cache dir:
    blobs/sha256/<hex>      verified content, only ever created by an atomic rename
    tmp/<key>.part          a download in progress, and <key>.part.json: the chunks it has
    locks/<key>.lock        one writer per entry, so concurrent builds share the cache safely

boto3's own transfer manager downloads in parallel but cannot resume a partial file, and a
crash leaves holes it cannot see; the chunk ledger here is what makes downloads resumable.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from threading import Lock, RLock

from builder.contracts import Progress, ProgressEvent, ResolvedModel, WeightFile
from builder.cook.storage import Store, open_store, split_uri
from builder.errors import FetchError
from builder.fsutil import cache_lock

CHUNK_SIZE = 16 << 20
HASH_BLOCK = 4 << 20
RETRIES = 3


@dataclass(frozen=True)
class FetchedFile:
    """One weights file in the cache after a fetch: model, checksum, size, how it got there."""

    model: str
    name: str
    path: Path  # the verified cache entry
    sha256: str
    size: int
    downloaded: bool  # False: it was already in the cache
    resumed_bytes: int = 0  # of ``size``, kept from an earlier interrupted download

    @property
    def status(self) -> str:
        """``cached``, ``resumed`` (part of it came from an interrupted run) or ``downloaded``."""
        if not self.downloaded:
            return "cached"
        return "resumed" if self.resumed_bytes else "downloaded"


@dataclass(frozen=True)
class FetchResult:
    """What a fetch gave: the models with checksums filled in, their cached files, bytes moved."""

    models: tuple[ResolvedModel, ...]  # with every sha256 and size filled in
    files: tuple[FetchedFile, ...]
    bytes_downloaded: int  # transferred by this run
    bytes_resumed: int = 0  # reused from interrupted downloads instead of transferred again

    def path_of(self, model: str, name: str) -> Path:
        """The cached file ``name`` of model ``model``, for the stages that copy it in."""
        return next(f.path for f in self.files if f.model == model and f.name == name)


def sha256_file(path: Path) -> str:
    """The file's SHA-256 (hex), read in blocks so large weights never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class Cache:
    """The content-addressed weights cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("blobs/sha256", "tmp", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def blob(self, sha256: str) -> Path:
        """Where the blob with this SHA-256 lives in the cache (present or not)."""
        return self.root / "blobs" / "sha256" / sha256

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """A file lock for ``key``, so concurrent builds download each file once."""
        return cache_lock(self.root / "locks" / f"{key}.lock", 3600, FetchError)

    def verified(self, sha256: str) -> Path | None:
        """The entry if present and intact; a corrupt or truncated one is removed, never used."""
        path = self.blob(sha256)
        if not path.is_file():
            return None
        if sha256_file(path) != sha256:
            path.unlink(missing_ok=True)
            return None
        return path

    def put_bytes(self, data: bytes) -> Path:
        """Store ``data`` under its SHA-256 (atomically, once) and return its path."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob(sha)
        if not path.is_file():
            tmp = self.root / "tmp" / f"{sha}.{os.getpid()}.put"
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise _cache_write_error(exc) from None
        return path


class _Download:
    """One file's ranged download into ``tmp/<key>.part`` with a ledger of finished chunks."""

    def __init__(self, cache: Cache, key: str, store: Store, object_key: str, size: int) -> None:
        self.store, self.object_key, self.size = store, object_key, size
        self.part = cache.root / "tmp" / f"{key}.part"
        self.ledger = self.part.with_suffix(".part.json")
        # One re-entrant lock orders ledger writes against discard(): a chunk finishing while
        # another hits a full disk must not write the ledger after the discard removed it.
        self._lock = RLock()
        self.discarded = False
        self.failure: FetchError | None = None
        done: set[int] = set()
        if self.part.is_file() and self.ledger.is_file():
            try:
                state = json.loads(self.ledger.read_text())
                if state.get("size") == size and state.get("chunk") == CHUNK_SIZE:
                    done = set(state["done"])
            except (ValueError, KeyError):
                done = set()
        self.done = done
        self.resumed_bytes = sum(min(CHUNK_SIZE, size - c * CHUNK_SIZE) for c in done)
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def pending(self) -> list[int]:
        count = max(1, -(-self.size // CHUNK_SIZE))
        return [c for c in range(count) if c not in self.done]

    def fetch_chunk(self, index: int, on_bytes: Callable[[int], None]) -> None:
        start = index * CHUNK_SIZE
        end = min(self.size, start + CHUNK_SIZE)
        for attempt in range(RETRIES):
            written = 0
            try:
                fd = os.open(self.part, os.O_WRONLY)
                try:
                    for block in self.store.stream(self.object_key, start, end):
                        os.pwrite(fd, block, start + written)
                        written += len(block)
                        on_bytes(len(block))
                finally:
                    os.close(fd)
                if written != end - start:
                    raise FetchError(
                        f"{self.store.uri(self.object_key)}: short read ({written} of {end - start} bytes)"
                    )
                break
            except (FetchError, OSError) as exc:
                on_bytes(-written)
                if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
                    raise self._write_failed(exc) from None
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.5 * 2**attempt)
        with self._lock:
            if self.discarded:
                return
            self.done.add(index)
            tmp = self.ledger.with_suffix(".tmp")
            try:
                tmp.write_text(
                    json.dumps({"size": self.size, "chunk": CHUNK_SIZE, "done": sorted(self.done)})
                )
                os.replace(tmp, self.ledger)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise self._write_failed(exc) from None

    def _write_failed(self, exc: OSError) -> FetchError:
        """The error for a failed cache write; on a full disk the partial file is removed
        (keeping it would only keep the disk full), and the other chunks report the same."""
        with self._lock:
            if self.failure is None:
                self.failure = _cache_write_error(exc)
                if exc.errno in _DISK_FULL:
                    self.discard()
            return self.failure

    def discard(self) -> None:
        with self._lock:
            self.discarded = True
            self.part.unlink(missing_ok=True)
            self.ledger.unlink(missing_ok=True)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _cache_write_error(exc: OSError) -> FetchError:
    if exc.errno in _DISK_FULL:
        return FetchError(
            f"writing the weights cache failed: {exc.strerror or exc}; the partial download was removed",
            hint="free space in the cache folder (setting cache_dir) and build again",
        )
    return FetchError(f"writing the weights cache failed: {exc.strerror or exc}")


def _cache_key(wf: WeightFile) -> str:
    return wf.sha256 or hashlib.sha256(f"{wf.uri}\0{wf.size}".encode()).hexdigest()


def _fetch_file(
    cache: Cache,
    wf: WeightFile,
    model: str,
    pool: ThreadPoolExecutor,
    offline: bool,
    base: Path,
    progress: Progress | None,
) -> FetchedFile:
    label = f"{model}/{wf.name}"
    key = _cache_key(wf)
    with cache.lock(key):
        if wf.sha256 and (hit := cache.verified(wf.sha256)) is not None:
            return FetchedFile(model, wf.name, hit, wf.sha256, hit.stat().st_size, downloaded=False)
        if offline:
            raise FetchError(
                f"{label} ({wf.sha256 or wf.uri}) is not in the cache and --offline forbids downloading",
                hint="run the build once online",
            )
        root, object_key = split_uri(wf.uri)
        store = open_store(root, base)
        size = wf.size
        if size is None:
            listed = [
                o for o in store.list(str(PurePosixPath(object_key).parent)) if o.key == object_key
            ]
            if not listed:
                raise FetchError(f"{wf.uri}: object not found")
            size = listed[0].size
        try:
            download = _Download(cache, key, store, object_key, size)
        except OSError as exc:
            (cache.root / "tmp" / f"{key}.part").unlink(missing_ok=True)
            raise _cache_write_error(exc) from None
        done = download.resumed_bytes
        if download.resumed_bytes:
            label = f"{label} (resumed)"
        counter = Lock()

        def on_bytes(n: int) -> None:
            nonlocal done
            with counter:
                done += n
                if progress:
                    progress(ProgressEvent(label, done, size))

        futures = [
            pool.submit(download.fetch_chunk, index, on_bytes) for index in download.pending()
        ]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            # Keep the finished chunks (unless the disk is full): a re-run resumes from them.
            raise download.failure or errors[0]  # type: ignore[misc]
        actual = sha256_file(download.part)
        if wf.sha256 and actual != wf.sha256:
            download.discard()
            raise FetchError(
                f"{wf.uri}: sha256 mismatch (expected {wf.sha256[:12]}, got {actual[:12]})",
                hint="the object changed after it was published; never overwrite production weights",
            )
        os.replace(download.part, cache.blob(actual))
        download.ledger.unlink(missing_ok=True)
        return FetchedFile(
            model,
            wf.name,
            cache.blob(actual),
            actual,
            size,
            downloaded=True,
            resumed_bytes=download.resumed_bytes,
        )


def _committed(wf: WeightFile, model: str, manual_files: Mapping[str, bytes]) -> bytes:
    """A manual model's file as committed, checked against its recorded sha256 if any."""
    data = manual_files.get(wf.uri.removeprefix("repo:"))
    if data is None:
        raise FetchError(f"{model}/{wf.name}: {wf.uri[:120]} is not a committed file of the model")
    if wf.sha256 and hashlib.sha256(data).hexdigest() != wf.sha256:
        raise FetchError(
            f"{model}/{wf.name}: {wf.uri} does not match its sha256 {wf.sha256[:12]}",
            hint="run `builder lock` and commit the result",
        )
    return data


def fetch(
    models: tuple[ResolvedModel, ...],
    cache: Cache,
    *,
    manual_files: Mapping[str, bytes],
    offline: bool = False,
    base: Path | None = None,
    jobs: int = 4,
    progress: Progress | None = None,
) -> FetchResult:
    """Make every weight file of every model available, verified, in the cache.

    ``base`` anchors relative ``file:`` URIs (the project root, see Settings.root)."""
    base = base or Path.cwd()
    fetched: list[FetchedFile] = []
    # Chunk downloads share one pool; files are handled one after the other so a failure stops
    # early and the progress output stays readable.
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="fetch") as pool:
        for m in models:
            for wf in m.files:
                if wf.uri.startswith("repo:"):
                    path = cache.put_bytes(_committed(wf, m.name, manual_files))
                    fetched.append(
                        FetchedFile(
                            m.name, wf.name, path, path.name, path.stat().st_size, downloaded=False
                        )
                    )
                else:
                    fetched.append(_fetch_file(cache, wf, m.name, pool, offline, base, progress))
    by_key = {(f.model, f.name): f for f in fetched}
    filled = tuple(
        replace(
            m,
            files=tuple(
                replace(
                    wf, sha256=by_key[(m.name, wf.name)].sha256, size=by_key[(m.name, wf.name)].size
                )
                for wf in m.files
            ),
        )
        for m in models
    )
    return FetchResult(
        models=filled,
        files=tuple(fetched),
        bytes_downloaded=sum(f.size - f.resumed_bytes for f in fetched if f.downloaded),
        bytes_resumed=sum(f.resumed_bytes for f in fetched if f.downloaded),
    )
