"""The runner's one helper for paths that come from outside data (job messages, configs).

The runner ships alone in the base image and cannot import the builder's `builder/paths.py`;
this is its small equivalent. A path named by a job is resolved (symlinks followed, as the
kernel would when opening it) and must then lie inside one of the folders the site allowed;
a path a config names inside a folder (a model file in its model folder) must be relative,
without '..', and stay there once resolved. Anything else is refused with one line naming
the value, the folders and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tilerunner.errors import RunnerError

#: File systems that live in memory: results written there vanish with the container or host.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class UnsafePathError(RunnerError):
    """A path from outside data lies (symlinks resolved) outside the folders allowed for it."""


def real(path: Path) -> Path:
    """`path` with every symlink resolved (it need not exist)."""
    return Path(os.path.realpath(path))


def is_within(path: Path, root: Path) -> bool:
    """True if `path` (symlinks resolved) is `root` or lies under it."""
    p, r = real(path), real(root)
    return p == r or p.is_relative_to(r)


def resolve_within(path: Path, roots: Sequence[Path], *, what: str, option: str) -> Path:
    """The real path of `path` if it lies in one of `roots`; UnsafePathError if not.

    `what` names the value ("slide"), `option` the setting that lists the roots
    ("--slide-root"), so the message says what to change.
    """
    text = str(path)
    if "\x00" in text or any(ord(ch) < 32 for ch in text):
        raise UnsafePathError(f"{what} {text[:200]!r} holds control characters")
    resolved = real(path)
    for root in roots:
        r = real(root)
        if resolved == r or resolved.is_relative_to(r):
            return resolved
    shown = ", ".join(str(r) for r in roots) or "(none)"
    via = "" if resolved == path else f" (it resolves to {resolved})"
    raise UnsafePathError(
        f"{what} {text} is outside the allowed folders {shown}{via}; "
        f"put it under one of them or add its folder with {option}"
    )


def join_within(folder: Path, relative: str, *, what: str) -> Path:
    """`folder / relative` with every symlink resolved, if it stays inside `folder`.

    UnsafePathError (naming `what`, the value and the folder) for an absolute path, a '..'
    part, control characters, or a link that leads out of the folder.
    """
    shown = repr(relative[:200]) + ("..." if len(relative) > 200 else "")
    parts = PurePosixPath(relative).parts
    bad = (
        not relative
        or any(ord(ch) < 32 for ch in relative)
        or PurePosixPath(relative).is_absolute()
        or ".." in parts
    )
    joined = real(folder / relative) if not bad else folder
    if bad or not (joined != real(folder) and joined.is_relative_to(real(folder))):
        raise UnsafePathError(
            f"{what} {shown} leaves its folder {folder} (absolute, '..', or a link out of "
            "it); it must be a path inside that folder"
        )
    return joined


def filesystem_type(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The file system type of the mount holding `path` (Linux), or None if unknown."""
    target = real(path)
    best: tuple[int, str] | None = None
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        if target == mount_point or target.is_relative_to(mount_point):
            depth = len(mount_point.parts)
            if best is None or depth >= best[0]:  # later mounts over the same point win
                best = (depth, right.split()[0])
    return best[1] if best else None


def in_container() -> bool:
    """True inside a Docker/Podman/OCI container (best effort)."""
    return (
        Path("/.dockerenv").exists()
        or Path("/run/.containerenv").exists()
        or bool(os.environ.get("container"))  # noqa: SIM112 (set so, lowercase, by podman/systemd)
    )
