"""Small file-system helpers shared by the stages."""

from __future__ import annotations

import os
from pathlib import Path

from builder.errors import BuilderError


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write a file so that readers see the old content or the new, never a half-written one.
    ``durable=False`` skips the fsync: for caches, which a crash may lose but never corrupt."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BuilderError(f"cannot write {path}: {exc.strerror or exc}") from None
