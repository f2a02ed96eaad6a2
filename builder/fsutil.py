"""Small file-system helpers shared by the stages."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
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


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that fails (ELOOP) instead of following a link at ``path``."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def read_nofollow(path: Path) -> bytes:
    """A file's bytes; OSError (ELOOP) when ``path`` is a symbolic link."""
    fd = open_nofollow(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as file:
        return file.read()


@contextlib.contextmanager
def locked_file(
    path: Path,
    *,
    exclusive: bool,
    wait: float | None,
    busy: Callable[[], BuilderError],
    error: type[BuilderError] = BuilderError,
) -> Iterator[None]:
    """Hold an ``flock`` on the lock file ``path`` (made if missing; a link there is replaced,
    never followed, and nothing is ever truncated), shared or exclusive, waiting at most
    ``wait`` seconds (None: no limit); ``busy()`` is raised when the wait runs out, ``error``
    when the lock file cannot be made. Every lock in the builder's caches is taken here:
    ``filelock`` opens its file with ``O_TRUNC`` through any link planted at its path."""
    flags = os.O_RDWR | os.O_CREAT
    try:
        try:
            fd = open_nofollow(path, flags)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            path.unlink()  # a planted link: remove it (its target is left alone), lock our own
            fd = open_nofollow(path, flags | os.O_EXCL)
    except OSError as exc:
        raise error(
            f"cannot lock {path}: {exc.strerror or exc}", hint="check that the folder is writable"
        ) from None
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, mode | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise busy() from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def cache_lock(
    path: Path, wait: float, error: type[BuilderError] = BuilderError
) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on ``path`` in one of the builder's caches, so that concurrent builds
    and CI jobs sharing the cache do each piece of work once (see :func:`locked_file`)."""

    def busy() -> BuilderError:
        return error(
            f"{path} is locked by another build for more than {wait:.0f} s",
            hint=f"wait for the other build, or remove {path} if none runs",
        )

    return locked_file(path, exclusive=True, wait=wait, busy=busy, error=error)
