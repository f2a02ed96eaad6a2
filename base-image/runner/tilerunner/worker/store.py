"""Where a job's results live: the allowed folders, one job per job id, atomic commits.

A job may only read a slide in a slide root and write under the output root (symlinks
resolved). Results go to <output>/<job_id>/ through a staging folder and one rename, with
job.json (the stored result and the job's identity) written last, so a redelivered job finds
nothing or a complete result. A job id names one job: complete results of the same identity
are reused; another identity under a used id (or the same id in another output folder,
recorded in <output root>/.tilerunner-jobs/) is refused with JobIdTaken, never computed over
the old results. A lock file per job id (<output root>/.tilerunner-locks/<job_id>.lock, flock,
released by the kernel when its worker dies, removed when the job ends) keeps two deliveries
of one job id from running at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tilerunner.errors import OutputError, SlideError
from tilerunner.outputs import output_error, writing
from tilerunner.paths import (
    MEMORY_FILESYSTEMS,
    UnsafePathError,
    filesystem_type,
    in_container,
    resolve_within,
)
from tilerunner.worker.jobs import Job, JobCancelled, JobIdTaken, JobRefused
from tilerunner.worker.logs import one_line

log = logging.getLogger("tilerunner.worker")

RESULT_FILE = "job.json"  # in <output>/<job_id>/, written last: the results are complete
LOCKS_DIR = ".tilerunner-locks"  # in the output root: <job_id>.lock while a job is processed
JOBS_DIR = ".tilerunner-jobs"  # in the output root: <job_id>.json, where its results are


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush one file or folder to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder below `root` (and root) to disk."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder), directory=True)


@dataclass(frozen=True)
class Roots:
    """The folders jobs may read slides from and write results to."""

    slides: tuple[Path, ...] = (Path("/slides"),)
    output: Path = Path("/out")

    @property
    def locks(self) -> Path:
        """The job-id lock files: <output root>/.tilerunner-locks."""
        return self.output / LOCKS_DIR

    @property
    def jobs(self) -> Path:
        """One small record per committed job id: which folder holds its results."""
        return self.output / JOBS_DIR

    def check(self) -> list[str]:
        """Fail (one line) if a root is missing or the output root is not writable; warnings."""
        for root in self.slides:
            if not root.is_dir():
                raise SlideError(
                    f"slide root {root} does not exist or is not a folder; mount the slides "
                    "there or fix --slide-root / TILERUNNER_SLIDE_ROOTS"
                )
        if not self.output.is_dir():
            raise OutputError(
                f"output root {self.output} does not exist or is not a folder; mount the "
                "results volume there or fix --output-root / TILERUNNER_OUTPUT_ROOT"
            )
        with writing(self.locks, "create a file in"):
            self.jobs.mkdir(exist_ok=True)
            self.locks.mkdir(exist_ok=True)
            with tempfile.TemporaryFile(dir=self.locks):
                pass  # the output root is writable (a read-only mount fails here, not per job)
        return self._memory_warnings()

    def _memory_warnings(self) -> list[str]:
        fs = filesystem_type(self.output)
        if fs not in MEMORY_FILESYSTEMS:
            return []
        where, what = (
            ("inside this container", "container") if in_container() else ("on this host", "host")
        )
        return [
            f"output root {self.output} is on a {fs} (memory) {where}: results there "
            f"vanish when the {what} stops; mount a volume or host folder there"
        ]


class JobStore:
    """The results of jobs under the output root: admission, job-id locks, reuse, commits."""

    def __init__(self, roots: Roots) -> None:
        self.roots = roots

    def admit(self, job: Job) -> Job:
        """`job` with its resolved paths; JobRefused if they leave the allowed folders."""
        try:
            slide = resolve_within(
                job.slide, self.roots.slides, what="slide", option="--slide-root"
            )
            output = resolve_within(
                job.output, (self.roots.output,), what="output", option="--output-root"
            )
        except UnsafePathError as exc:
            raise JobRefused(str(exc)) from None
        if job.folder.is_symlink() or (output / job.job_id).is_symlink():
            raise JobRefused(
                f"results folder {job.shown_folder} is a symbolic link; links are not "
                "followed: remove it"
            )
        return replace(job, real_slide=slide, real_output=output)

    @contextlib.contextmanager
    def job_lock(self, job: Job, cancel: threading.Event) -> Iterator[None]:
        """Hold <output root>/.tilerunner-locks/<job_id>.lock: one worker at a time per job id.

        The kernel drops the lock of a worker that died; while its holder lives (the same
        job id delivered twice at once), wait for it and then reuse its results. The holder
        removes the file when done; a waiter that then holds a removed file starts over.
        """
        path = self.roots.locks / f"{job.job_id}.lock"
        while True:
            with writing(path, "create the lock file"):
                path.parent.mkdir(exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                _wait_for_lock(fd, job, cancel)
                if not _still_named(fd, path):
                    continue  # its holder finished and removed it: lock the new one
                try:
                    yield
                finally:
                    with contextlib.suppress(OSError):
                        path.unlink()  # still holding it: waiters see it gone
                return
            finally:
                os.close(fd)  # releases the lock

    def prune(self) -> tuple[int, int]:
        """Remove lock files nobody holds (their worker died) and records of deleted results.

        Run at start-up, so neither piles up: (lock files, records) removed.
        """
        locks = records = 0
        for path in sorted(self.roots.locks.glob("*.lock")):
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink()  # still holding it: a waiter that opened it starts over
                    locks += 1
                finally:
                    os.close(fd)
        for path in sorted(self.roots.jobs.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                if not (Path(json.loads(path.read_text())["folder"]) / RESULT_FILE).is_file():
                    path.unlink()
                    records += 1
        return locks, records

    def _home_record(self, job: Job) -> Path:
        return self.roots.jobs / f"{job.job_id}.json"

    def check_home(self, job: Job) -> None:
        """JobIdTaken if this job id's results are in another folder of the output root."""
        try:
            doc = json.loads(self._home_record(job).read_text())
            home = Path(doc["folder"])
        except (OSError, ValueError, TypeError, KeyError):
            return  # never committed (or by a worker without records): nothing to guard
        if home != job.folder and (home / RESULT_FILE).is_file():
            raise JobIdTaken(
                f"job id {job.job_id} already names another job whose results are in "
                f"{one_line(doc.get('shown', home), 300)}; they are kept: submit this job "
                "under a new job id"
            )

    def record_home(self, job: Job) -> None:
        """Record (atomically) which folder holds the results of this job id."""
        path = self._home_record(job)
        doc = {"folder": str(job.folder), "shown": str(job.shown_folder)}
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()) == doc:
                return
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        with writing(path):
            try:
                tmp.write_text(json.dumps(doc, sort_keys=True) + "\n")
                fsync_path(tmp)
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_path(path.parent, directory=True)

    def stored(self, job: Job, identity: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result if <output>/<job_id>/ holds complete results of this very job.

        None if there is nothing (or the same job's results are incomplete: recomputed);
        JobIdTaken if the folder holds another job's results, JobRefused if it is not a
        result at all.
        """
        folder = job.folder
        if not folder.exists():
            return None
        try:
            stored = json.loads((folder / RESULT_FILE).read_text())
        except (OSError, ValueError):
            stored = None
        if not isinstance(stored, dict) or not isinstance(stored.get("identity"), dict):
            raise JobRefused(
                f"{job.shown_folder} exists but holds no tilerunner result ({RESULT_FILE}); "
                "it is left alone: move it away or submit the job under a new job id"
            )
        _check_identity(job, stored["identity"], identity)
        result = stored.get("result")
        if not isinstance(result, dict) or not all(
            (folder / a / "summary.json").is_file() for a in job.analyses
        ):
            return None
        return dict(result)

    def staging(self, job: Job) -> Path:
        """A fresh staging folder beside the results folder (earlier attempts' removed)."""
        with writing(job.folder.parent, "create a staging folder in"):
            job.folder.parent.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers(job)
            return Path(tempfile.mkdtemp(prefix=f".{job.job_id}.partial-", dir=job.folder.parent))

    def _remove_leftovers(self, job: Job) -> None:
        """Staging folders of earlier attempts at this job (their worker died or lost it)."""
        parent = job.folder.parent
        for path in [
            *parent.glob(f".{job.job_id}.partial-*"),
            *parent.glob(f".{job.job_id}.old-*"),
        ]:
            log.info(
                "job %s: removing %s left by an earlier attempt",
                job.job_id,
                path.name,
                extra={"event": "job_leftovers", "job_id": job.job_id},
            )
            shutil.rmtree(path, ignore_errors=True)

    def write_result(self, staging: Path, doc: dict[str, Any]) -> None:
        """Write job.json into the staging folder last, and flush it."""
        path = staging / RESULT_FILE
        with writing(path):
            path.write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
            fsync_path(path)
            fsync_path(staging, directory=True)

    def commit(self, staging: Path, job: Job, identity: dict[str, Any]) -> dict[str, Any] | None:
        """Rename the staging folder to <output>/<job_id>; None, or the stored result that
        won the race.

        If the folder appeared meanwhile: the same job's complete results are reused (their
        result returned), the same job's incomplete ones replaced, anything else refused.
        """
        final = job.folder
        try:
            try:
                staging.rename(final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    raise
                stored = self.stored(job, identity)
                if stored is not None:
                    return stored
                old = final.with_name(f".{job.job_id}.old-{uuid.uuid4().hex[:8]}")
                final.rename(old)
                staging.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            fsync_path(final.parent, directory=True)
        except OSError as exc:
            raise output_error(exc, job.shown_folder, "move the results into") from None
        return None


def _wait_for_lock(fd: int, job: Job, cancel: threading.Event) -> None:
    """flock `fd`, waiting (and saying so once) while another worker holds it."""
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not waiting:
                waiting = True
                log.info(
                    "job %s is being processed by another worker; waiting for it",
                    job.job_id,
                    extra={"event": "job_wait", "job_id": job.job_id},
                )
            if cancel.wait(0.5):
                raise JobCancelled from None


def _still_named(fd: int, path: Path) -> bool:
    """True if the locked file is still the one `path` names (not removed by its holder)."""
    held = os.fstat(fd)
    try:
        current = path.stat()
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _check_identity(job: Job, stored: dict[str, Any], mine: dict[str, Any]) -> None:
    """JobIdTaken if the stored results are of another job (slide, analyses, config, runner)."""
    mine = dict(mine)
    if mine["slide_size"] is None:  # the slide is gone (archived): its path still names it
        mine.pop("slide_size")
    differ = [
        f"{k} {one_line(stored.get(k), 200)} (this job: {one_line(v, 200)})"
        for k, v in mine.items()
        if stored.get(k) != v
    ]
    if differ:
        raise JobIdTaken(
            f"job id {job.job_id} already names another job whose results are in "
            f"{job.shown_folder} ({'; '.join(differ)}); they are kept: submit this job "
            "under a new job id"
        )
