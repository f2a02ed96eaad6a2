"""Weights packages: a ClearML model tagged ``package`` is an archive the SDK extracts.

ClearML's SDK (clearml 2.1.12) packs several weight files into one zip
(``model.py::Model.update_weights_package``: ``ZIP_STORED``, names relative to the packed folder,
uploaded as ``model_package.zip``) and tags the model ``package``; ``Model.get_local_copy()``
then calls ``get_weights_package(return_path=True)``, which downloads with
``extract_archive=True``: ``storage/manager.py::StorageManager._extract_to_cache`` extracts a
``.zip`` (``storage/archive.py::extract_zip_archive``) or a ``.tar.gz`` / ``.tgz``
(``extract_tar_archive``) into a folder and returns that folder; any other file is returned as
it is. What a runner loads is that folder's files, so publish copies those, not the archive.

The archive comes from outside, so it is read as hostile input, more strictly than the SDK's
``extractall``: an entry leaving the folder (absolute, ``..``), a link (symbolic or hard), a
device or other special entry, an encrypted entry, a name given twice (or as both a file and a
folder), absurd sizes (more than :data:`MAX_BYTES` in all, or an entry compressed more than
:data:`MAX_RATIO`:1, a zip bomb) and more than :data:`MAX_ENTRIES` entries are each refused
with one line; every target path goes through :func:`builder.paths.safe_join`.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO

from builder.errors import FetchError
from builder.paths import UnsafePathError, safe_join

#: The archive suffixes the SDK extracts (StorageManager._extract_to_cache).
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
#: At most this many entries in one package.
MAX_ENTRIES = 10_000
#: At most this many bytes extracted from one package, all entries together.
MAX_BYTES = 64 << 30
#: An entry larger than :data:`_RATIO_FLOOR` may be compressed at most this much (weights
#: barely compress; the SDK packs them uncompressed).
MAX_RATIO = 100
_RATIO_FLOOR = 1 << 20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackedFile:
    """One file extracted from a package: its path below the folder (posix) and size."""

    name: str
    size: int


def archive_kind(name: str) -> str | None:
    """The suffix the SDK extracts a file by (``.zip``, ``.tar.gz``, ``.tgz``), or None."""
    lower = PurePosixPath(name.rstrip("/")).name.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), None)


@dataclass(frozen=True)
class _Entry:
    name: str
    is_dir: bool
    size: int
    open: Callable[[], AbstractContextManager[IO[bytes]]] | None


def _too_many(label: str) -> FetchError:
    return FetchError(f"{label}: more than {MAX_ENTRIES:,} entries; refused")


def _zip_entries(archive: zipfile.ZipFile, label: str) -> Iterator[_Entry]:
    if len(archive.infolist()) > MAX_ENTRIES:  # known up front: no entry is looked at
        raise _too_many(label)
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise FetchError(f"{label}: entry {info.filename!r} is a symbolic link; refused")
        if info.flag_bits & 0x1:
            raise FetchError(f"{label}: entry {info.filename!r} is encrypted; refused")
        if info.file_size > _RATIO_FLOOR and info.file_size > MAX_RATIO * max(
            1, info.compress_size
        ):
            raise FetchError(
                f"{label}: entry {info.filename!r} expands {info.compress_size:,} bytes to "
                f"{info.file_size:,} (over {MAX_RATIO}:1, a zip bomb); refused"
            )
        yield _Entry(
            info.filename,
            info.is_dir(),
            info.file_size,
            None if info.is_dir() else partial(archive.open, info),
        )


def _tar_entries(archive: tarfile.TarFile, label: str) -> Iterator[_Entry]:
    for member in archive:
        if member.issym() or member.islnk():
            raise FetchError(f"{label}: entry {member.name!r} is a link; refused")
        if not (member.isfile() or member.isdir()):
            raise FetchError(f"{label}: entry {member.name!r} is not a plain file or folder")

        def opener(member: tarfile.TarInfo = member) -> AbstractContextManager[IO[bytes]]:
            handle = archive.extractfile(member)
            assert handle is not None  # a regular file always has data
            return handle

        yield _Entry(member.name, member.isdir(), member.size, opener if member.isfile() else None)


def _target(folder: Path, name: str, label: str) -> Path:
    try:
        return safe_join(folder, name, what=f"{label}: entry")
    except UnsafePathError as exc:
        raise FetchError(f"{exc.message}; refused") from None


def _planned(entries: Iterator[_Entry], folder: Path, label: str) -> list[tuple[_Entry, Path]]:
    """Every entry checked, before anything is written: (entry, target) of each file."""
    plan: list[tuple[_Entry, Path]] = []
    files: set[str] = set()
    folders: set[str] = set()
    total = 0
    for count, entry in enumerate(entries, 1):
        if count > MAX_ENTRIES:
            raise _too_many(label)
        name = PurePosixPath(entry.name).as_posix()
        target = _target(folder, name, label)
        parents = {p.as_posix() for p in PurePosixPath(name).parents if p.as_posix() != "."}
        if name in files or (not entry.is_dir and name in folders):
            raise FetchError(f"{label}: entry {name!r} is given twice; refused")
        if parents & files:
            raise FetchError(f"{label}: entry {name!r} lies below a file of the same package")
        folders |= parents
        if entry.is_dir or entry.open is None:
            folders.add(name)
            continue
        total += entry.size
        if total > MAX_BYTES:
            raise FetchError(
                f"{label}: its entries hold more than {MAX_BYTES:,} bytes (an absurd size); refused"
            )
        files.add(name)
        plan.append((replace(entry, name=name), target))
    if not plan:
        raise FetchError(f"{label}: the package holds no files")
    return plan


def _extract_entries(entries: Iterator[_Entry], folder: Path, label: str) -> list[PackedFile]:
    out = []
    for entry, target in _planned(entries, folder, label):
        assert entry.open is not None  # planned entries are files
        name = entry.name
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with entry.open() as source, target.open("xb") as sink:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > entry.size:
                    raise FetchError(f"{label}: entry {name!r} is larger than it says; refused")
                sink.write(chunk)
        if written != entry.size:
            raise FetchError(f"{label}: entry {name!r} is shorter than it says; refused")
        out.append(PackedFile(name, entry.size))
    return sorted(out, key=lambda f: f.name)


def extract_package(archive: Path, kind: str, folder: Path, label: str) -> list[PackedFile]:
    """Extract ``archive`` (a ``kind`` of :data:`ARCHIVE_SUFFIXES`) into the empty ``folder``,
    checking every entry first; the files it holds. FetchError (one line naming ``label``, the
    package's URI, and the entry) for a corrupt or hostile archive; ``folder`` may then hold
    part of it (the caller removes it)."""
    try:
        if kind == ".zip":
            with zipfile.ZipFile(archive) as zipped:
                return _extract_entries(_zip_entries(zipped, label), folder, label)
        with tarfile.open(archive, "r:*") as tarred:
            return _extract_entries(_tar_entries(tarred, label), folder, label)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise FetchError(f"extracting {label} failed: {exc.strerror or exc}") from None
        raise FetchError(f"{label}: not a valid {kind} archive ({exc})") from None
