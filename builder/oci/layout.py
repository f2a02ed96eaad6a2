"""OCI image layouts on disk: index.json entries (read and locked update) and their blobs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from builder.errors import ImageError
from builder.fsutil import locked_file, open_nofollow, read_nofollow
from builder.oci.blobs import atomic_write, link_refused
from builder.oci.descriptor import (
    OCI_INDEX,
    REF_NAME,
    Descriptor,
    canonical_json,
    check_digest,
    sha256_digest,
)


@dataclass(frozen=True)
class LayoutEntry:
    """One manifest named in a layout's index.json."""

    descriptor: Descriptor
    ref_name: str | None


def read_layout_index(directory: Path) -> list[LayoutEntry]:
    """The manifests listed in ``directory/index.json`` (an OCI image layout)."""
    marker = directory / "oci-layout"
    index_path = directory / "index.json"
    if index_path.is_symlink():
        raise link_refused(directory, index_path)
    if not marker.is_file() or not index_path.is_file():
        raise ImageError(f"{directory} is not an OCI image layout (no oci-layout/index.json)")
    manifests = _index_document(directory).get("manifests") or []
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise ImageError(f"{index_path} is not a valid image index: manifests must be objects")
    entries = []
    for item in manifests:
        try:
            descriptor = Descriptor.from_dict(item)
        except ImageError as exc:
            raise ImageError(f"{index_path} is not a valid image index: {exc.message}") from None
        entries.append(LayoutEntry(descriptor, descriptor.annotations.get(REF_NAME)))
    return entries


def _index_document(directory: Path) -> dict[str, Any]:
    """``directory/index.json`` as a JSON object ({} when absent); never read through a link."""
    index_path = directory / "index.json"
    if index_path.is_symlink():
        raise link_refused(directory, index_path)
    try:
        index = json.loads(read_nofollow(index_path))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ImageError(f"{index_path} is not a valid image index: {exc}") from None
    if not isinstance(index, dict):
        raise ImageError(f"{index_path} is not a valid image index: not a JSON object")
    return index


def layout_blob_path(directory: Path, digest: str) -> Path:
    """Path of a blob inside an OCI image layout."""
    return directory / "blobs" / "sha256" / check_digest(digest).split(":", 1)[1]


def read_layout_blob(directory: Path, digest: str) -> bytes:
    """A (small) blob of an OCI image layout, verified against its digest (never read through
    a link)."""
    path = layout_blob_path(directory, digest)
    try:
        data = read_nofollow(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise link_refused(directory, path) from None
        raise ImageError(f"OCI layout {directory} lacks blob {digest}") from exc
    if sha256_digest(data) != digest:
        raise ImageError(f"blob {digest} in OCI layout {directory} is corrupt")
    return data


def layout_directories(directory: Path) -> Path:
    """Make ``directory/blobs/sha256`` of an OCI layout (written into), refusing a link on the
    way: a layout is written into its own folders, never through a link; returns the folder."""
    path = directory
    path.mkdir(parents=True, exist_ok=True)
    for part in ("blobs", "sha256"):
        path /= part
        if path.is_symlink():
            raise link_refused(directory, path)
        path.mkdir(exist_ok=True)
    return path


def copy_blob(source: Path, target: Path) -> None:
    """Place ``source`` at ``target`` (hard link when possible, else copy), atomically. Neither
    is followed if it is a link: a linked target is replaced, a linked source refused."""
    if target.is_file() and not target.is_symlink():
        return
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        try:
            os.link(source, tmp, follow_symlinks=False)
            if tmp.is_symlink():
                raise ImageError(f"blob {source} is a symbolic link; links are not exported")
        except OSError:
            with os.fdopen(open_nofollow(source, os.O_RDONLY), "rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)
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
    A link planted as the lock file is replaced, never followed.
    """
    directory.mkdir(parents=True, exist_ok=True)

    def busy() -> ImageError:
        return ImageError(
            f"OCI layout {directory} is locked by another writer for more than {timeout:.0f} s",
            hint=f"wait for the other build, or remove {directory / INDEX_LOCK} if none runs",
        )

    with locked_file(
        directory / INDEX_LOCK, exclusive=True, wait=timeout, busy=busy, error=ImageError
    ):
        yield directory / "index.json"


def update_layout_index(
    directory: Path, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Apply ``change`` to the manifests of ``directory/index.json`` under the layout's lock.

    The one writer of image layout indexes: read, change, write atomically, all while holding
    :func:`locked_layout`, so concurrent writers never lose each other's entries. Other keys of
    the index are kept. Returns the manifests written.
    """
    with locked_layout(directory) as index_path:
        index = _index_document(directory)
        existing = index.get("manifests") or []
        if not isinstance(existing, list) or not all(isinstance(i, dict) for i in existing):
            raise ImageError(f"{index_path} is not a valid image index: manifests must be objects")
        manifests = change(list(existing))
        index.update(schemaVersion=2, mediaType=OCI_INDEX, manifests=manifests)
        marker = directory / "oci-layout"
        if not marker.is_file() or marker.is_symlink():  # a link is replaced, not followed
            atomic_write(marker, canonical_json({"imageLayoutVersion": "1.0.0"}))
        atomic_write(index_path, canonical_json(index))
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
