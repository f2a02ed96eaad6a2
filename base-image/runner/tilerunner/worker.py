"""`tilerunner worker`: analyse slides as jobs arrive on a RabbitMQ queue.

Topology, declared by every worker (idempotent; NAME is --queue):

    NAME          quorum queue of jobs (JSON, schemas/worker-job-v1.schema.json), with
                  x-delivery-limit = max_attempts - 1 and x-dead-letter-exchange = NAME.dead
    NAME.dead     fanout exchange + quorum queue: malformed jobs and jobs that failed
                  max_attempts times (header x-tilerunner-reason), and jobs the broker gave up
                  on after max_attempts deliveries without an ack, i.e. the worker died on
                  them (x-first-death-reason: delivery_limit)
    NAME.results  fanout exchange + quorum queue: one message per finished job
                  (status done | failed; format "result_version": 1)

Why quorum queues: the broker counts every delivery of a message (x-delivery-count),
including those whose worker died (SIGKILL, OOM, a crash in a native library) and so could
not count anything itself. A classic queue only flags `redelivered`; a counter kept in a
header needs a republish per attempt and is never incremented by a worker that died, so a
slide that kills the worker would be redelivered forever.

One job at a time: the job runs in a thread while the main thread services the connection
(heartbeats, acks, signals). A job is acknowledged only after its results are durable
(fsynced, renamed into place) and its completion message is confirmed by the broker.

Allowed folders: a job's slide must lie (symlinks resolved) in one of the slide roots and its
output in the output root (WorkerSettings, `--slide-root`, `--output-root`); anything else is
refused. Results go to <output>/<job_id>/ through a staging folder and one rename, so a
redelivered job finds nothing or a complete result. A job id names one job: complete results
of the same payload (slide, analyses), config and runner are answered without recomputing; a
different payload under a used job id (or the same id in another output folder, recorded in
<output root>/.tilerunner-jobs/) is refused, never computed over the old results. A lock
file per job id (<output root>/.tilerunner-locks/<job_id>.lock, flock, released by the kernel
when its worker dies, removed when the job ends) keeps two deliveries of one job id from
running at once.

Failures: permanent ones (refused job, missing or corrupt slide, unwritable output, bad config)
are dead-lettered at once; transient ones (full disk, device, internal errors) are retried by
republishing the job with its failure count in a header, up to max_attempts failures. The
broker's delivery limit only counts deliveries that ended with no answer at all (the worker
died, the connection was lost), so a broker restart does not use up a job's failures.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tilerunner import __version__
from tilerunner.config import RunConfig
from tilerunner.errors import (
    BrokerError,
    ConfigError,
    ModelError,
    OutputError,
    RunnerError,
    SlideError,
)
from tilerunner.metrics import HttpServer, Metrics
from tilerunner.models import EngineOptions, ModelStore
from tilerunner.outputs import DISK_FULL, DiskFullError, output_error, writing
from tilerunner.paths import (
    MEMORY_FILESYSTEMS,
    UnsafePathError,
    filesystem_type,
    in_container,
    resolve_within,
)
from tilerunner.pipeline import Progress, RunOptions, RunReport, run

log = logging.getLogger("tilerunner.worker")

JOB_VERSION = 1
RESULT_VERSION = 1
RESULT_FILE = "job.json"  # in <output>/<job_id>/, written last: the results are complete
LOCKS_DIR = ".tilerunner-locks"  # in the output root: <job_id>.lock while a job is processed
JOBS_DIR = ".tilerunner-jobs"  # in the output root: <job_id>.json, where its results are
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Test-only fault injection: seconds the worker waits after each batch of tiles.
FAULT_DELAY_ENV = "TILERUNNER_FAULT_BATCH_DELAY_S"
TICK_S = 0.2  # the main loop services the connection at least this often
CANCEL_WAIT_S = 15.0  # after cancelling a job on shutdown, how long it may take to stop
JOB_THREAD_PREFIX = "tilerunner-job-"
REASON_LIMIT = 1000  # characters of a reason in a result, a dead letter, a log line
LOG_FIELD_LIMIT = 4000  # characters of any one log message or field
#: Headers the worker keeps on a job it republishes (retry, hand-back): failed attempts so
#: far, and deliveries of earlier copies of the job (the broker counts only this copy's).
FAILURES_HEADER = "x-tilerunner-failures"
DELIVERIES_HEADER = "x-tilerunner-deliveries"


def one_line(text: object, limit: int = REASON_LIMIT) -> str:
    """`text` on one line and at most about `limit` characters (says how long it was)."""
    raw = str(text)
    flat = " ".join(raw[: 4 * limit].split())
    if len(flat) > limit or len(raw) > 4 * limit:
        return f"{flat[:limit]}... ({len(raw)} characters, cut)"
    return flat


def _line(exc: BaseException, limit: int = REASON_LIMIT) -> str:
    return one_line(exc, limit) or type(exc).__name__


def job_thread_alive() -> bool:
    """True while a job thread runs (the CLI then exits without the interpreter's clean-up)."""
    return any(t.name.startswith(JOB_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate())


def redact(url: str) -> str:
    """The AMQP URL without its password (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------- jobs


@cache
def job_schema() -> dict[str, Any]:
    """The JSON Schema of a job message (version 1)."""
    text = (resources.files("tilerunner") / "schemas" / "worker-job-v1.schema.json").read_text(
        encoding="utf-8"
    )
    return dict(json.loads(text))


@dataclass(frozen=True)
class Job:
    """A validated job: analyse `slide` with `analyses`; results in `output/job_id/`.

    `slide` and `output` are as the job named them (and as results report them); the worker
    reads and writes `real_slide` and `real_output`, their resolved paths inside the allowed
    folders (set by JobRunner.admit).
    """

    job_id: str
    slide: Path
    output: Path
    analyses: tuple[str, ...]
    doc: dict[str, Any]
    real_slide: Path | None = None
    real_output: Path | None = None

    @property
    def folder(self) -> Path:
        """Where the results are written (the resolved output folder once admitted)."""
        return (self.real_output or self.output) / self.job_id

    @property
    def shown_folder(self) -> Path:
        """The results folder as the job named it (in result messages)."""
        return self.output / self.job_id


class MalformedJob(Exception):
    """The message is not a valid job; `job_id` is set when one could be read from it."""

    def __init__(self, reason: str, job_id: str | None = None) -> None:
        super().__init__(one_line(reason))
        self.job_id = job_id


class JobRefused(RunnerError):
    """A valid job this worker must not run (outside the allowed folders, job id used)."""


def parse_job(body: bytes, config: RunConfig) -> Job:
    """Validate a job message against the schema and the config; MalformedJob if it is not."""
    import jsonschema

    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedJob(f"malformed job: the body is not JSON ({_line(exc, 120)})") from None
    job_id = None
    if isinstance(doc, dict):
        raw_id = doc.get("job_id")
        if isinstance(raw_id, str) and JOB_ID_RE.fullmatch(raw_id):
            job_id = raw_id
        version = doc.get("job_version")
        if "job_version" in doc and version != JOB_VERSION:
            raise MalformedJob(
                f"malformed job: job_version {one_line(repr(version), 40)} is not supported "
                f"(this worker reads {JOB_VERSION})",
                job_id,
            )
    validator = jsonschema.Draft202012Validator(job_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise MalformedJob(
            f"malformed job: at {where}: {_line(Exception(error.message), 240)}", job_id
        )
    for key in ("slide", "output"):
        if ".." in Path(doc[key]).parts:
            shown = one_line(repr(doc[key]), 300)
            raise MalformedJob(f"malformed job: {key} {shown} must not contain '..'", job_id)
    names = [a.name for a in config.analyses]
    wanted = doc.get("analyses") or names
    unknown = [a for a in wanted if a not in names]
    if unknown:
        raise MalformedJob(
            f"malformed job: analyses {one_line(unknown, 300)} are not in the config "
            f"{config.path.name} (it has {names})",
            job_id,
        )
    return Job(
        job_id=doc["job_id"],
        slide=Path(doc["slide"]),
        output=Path(doc["output"]),
        analyses=tuple(n for n in names if n in wanted),
        doc=doc,
    )


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    """The queues and exchanges of a job queue (see the module docstring)."""

    queue: str
    max_attempts: int = 3

    @property
    def dead(self) -> str:
        return f"{self.queue}.dead"

    @property
    def results(self) -> str:
        return f"{self.queue}.results"

    def queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.max_attempts - 1,
            "x-dead-letter-exchange": self.dead,
        }

    def declare(self, channel: Any) -> None:
        """Declare everything (the broker refuses if the job queue exists with other args)."""
        for name in (self.dead, self.results):
            channel.exchange_declare(name, "fanout", durable=True)
            channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(name, name)
        channel.queue_declare(self.queue, durable=True, arguments=self.queue_arguments())


# --------------------------------------------------------------------------- running a job


class JobCancelled(Exception):
    """The worker is shutting down and the grace period is over."""


@dataclass
class Outcome:
    status: str  # "done", "failed" or "cancelled"
    result: dict[str, Any] | None = None
    reason: str | None = None
    permanent: bool = False  # failed: retrying cannot help (dead-letter at once)


def is_permanent(exc: BaseException) -> bool:
    """Errors retrying cannot fix: the job, its slide, its output folder or the config.

    A full disk, the device and internal errors are transient (retried up to max_attempts).
    """
    if isinstance(exc, DiskFullError):
        return False
    return isinstance(exc, JobRefused | SlideError | OutputError | ConfigError | ModelError)


def describe(exc: BaseException) -> str:
    """One capped line for a failed job: `Class: message`, or `internal error: ...`."""
    if isinstance(exc, JobRefused):
        return f"job refused: {_line(exc)}"
    if isinstance(exc, RunnerError):
        return f"{type(exc).__name__}: {_line(exc)}"
    return f"internal error: {type(exc).__name__}: {_line(exc)}"


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder below `root` (and root) to disk."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), directory=True)


def _counts(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per analysis and feature: the numbers of summary.json (tiles, regions, counts...)."""
    out: dict[str, dict[str, Any]] = {}
    for analysis, summary in summaries.items():
        features = summary["deterministic"]["features"]
        out[analysis] = {
            name: {
                k: v for k, v in f.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            for name, f in features.items()
        }
    return out


@dataclass(frozen=True)
class Roots:
    """The folders jobs may read slides from and write results to."""

    slides: tuple[Path, ...] = (Path("/slides"),)
    output: Path = Path("/out")

    @property
    def locks(self) -> Path:
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
        warnings = []
        fs = filesystem_type(self.output)
        if fs in MEMORY_FILESYSTEMS:
            where, what = (
                ("inside this container", "container")
                if in_container()
                else ("on this host", "host")
            )
            warnings.append(
                f"output root {self.output} is on a {fs} (memory) {where}: results there "
                f"vanish when the {what} stops; mount a volume or host folder there"
            )
        return warnings


class JobRunner:
    """Runs jobs with the models loaded once; commits results atomically per job id."""

    def __init__(
        self,
        config: RunConfig,
        store: ModelStore,
        options: RunOptions,
        metrics: Metrics,
        fault_delay_s: float = 0.0,
        roots: Roots | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.options = options
        self.metrics = metrics
        self.fault_delay_s = fault_delay_s
        self.roots = roots or Roots()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

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

    def identity(self, job: Job) -> dict[str, Any]:
        """What names a job: existing results of its job id are reused only if it all matches."""
        slide = job.real_slide or job.slide
        try:
            size: int | None = slide.stat().st_size
        except OSError:
            size = None
        return {
            "config_sha256": self.config.sha256,
            "runner_version": __version__,
            "slide": str(slide),
            "slide_size": size,
            "analyses": list(job.analyses),
        }

    def failed_result(
        self, job_id: str, reason: str, attempt: int, slide: str | None = None
    ) -> dict[str, Any]:
        return self._result_doc(job_id, "failed", reason=reason, slide=slide, attempt=attempt)

    def _result_doc(
        self,
        job_id: str,
        status: str,
        *,
        attempt: int,
        reason: str | None = None,
        slide: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "result_version": RESULT_VERSION,
            "job_id": job_id,
            "status": status,
            "reason": None if reason is None else one_line(reason),
            "slide": slide,
            "output": None,
            "outputs": {},
            "files": {},
            "summary": {},
            "tiles": 0,
            "device": self.store.device,
            "durations_s": {},
            "config_sha256": self.config.sha256,
            "customer": self.config.customer,
            "runner_version": __version__,
            "attempt": attempt,
            "reused": False,
            "worker": self.worker_id,
        }
        doc.update(fields)
        doc["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        return doc

    def execute(self, job: Job, attempt: int, cancel: threading.Event) -> Outcome:
        """Run one job (in the job thread); never raises."""
        try:
            job = self.admit(job)
            with self._job_lock(job, cancel):
                self._check_home(job)
                stored = self._stored(job)
                result = (
                    self._compute(job, attempt, cancel)
                    if stored is None
                    else self._reused(stored, attempt)
                )
                self._record_home(job)
                return Outcome("done", result)
        except JobCancelled:
            return Outcome("cancelled", reason="the worker is shutting down")
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                exc = output_error(exc, exc.filename or job.folder)
            if not isinstance(exc, RunnerError):
                log.debug("job %s failed", job.job_id, exc_info=True)
            return Outcome("failed", reason=describe(exc), permanent=is_permanent(exc))

    @contextlib.contextmanager
    def _job_lock(self, job: Job, cancel: threading.Event) -> Iterator[None]:
        """Hold <output root>/.tilerunner-locks/<job_id>.lock: one worker at a time per job id.

        The kernel drops the lock of a worker that died; while its holder lives (the same
        job id delivered twice at once), wait for it and then reuse its results. The holder
        removes the file when done; a waiter that then holds a removed file starts over.
        """
        path = self.roots.locks / f"{job.job_id}.lock"
        waiting = False
        while True:
            with writing(path, "create the lock file"):
                path.parent.mkdir(exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
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
                held = os.fstat(fd)
                try:
                    current = path.stat()
                except FileNotFoundError:
                    continue  # its holder finished and removed it: lock the new one
                if (held.st_dev, held.st_ino) != (current.st_dev, current.st_ino):
                    continue
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

    def _check_home(self, job: Job) -> None:
        """JobRefused if this job id's results are in another folder of the output root."""
        try:
            doc = json.loads(self._home_record(job).read_text())
            home = Path(doc["folder"])
        except (OSError, ValueError, TypeError, KeyError):
            return  # never committed (or by a worker without records): nothing to guard
        if home != job.folder and (home / RESULT_FILE).is_file():
            raise JobRefused(
                f"job id {job.job_id} already names another job whose results are in "
                f"{one_line(doc.get('shown', home), 300)}; they are kept: submit this job "
                "under a new job id"
            )

    def _record_home(self, job: Job) -> None:
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
                _fsync_path(tmp)
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_path(path.parent, directory=True)

    def _stored(self, job: Job) -> dict[str, Any] | None:
        """The stored result if <output>/<job_id>/ holds complete results of this very job.

        None if there is nothing (or the same job's results are incomplete: recomputed);
        JobRefused if the folder holds another job's results or is not a result at all.
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
        mine = self.identity(job)
        if mine["slide_size"] is None:  # the slide is gone (archived): its path still names it
            mine.pop("slide_size")
        differ = [
            f"{k} {one_line(stored['identity'].get(k), 200)} (this job: {one_line(v, 200)})"
            for k, v in mine.items()
            if stored["identity"].get(k) != v
        ]
        if differ:
            raise JobRefused(
                f"job id {job.job_id} already names another job whose results are in "
                f"{job.shown_folder} ({'; '.join(differ)}); they are kept: submit this job "
                "under a new job id"
            )
        result = stored.get("result")
        if not isinstance(result, dict) or not all(
            (folder / a / "summary.json").is_file() for a in job.analyses
        ):
            return None
        return dict(result)

    def _reused(self, stored: dict[str, Any], attempt: int) -> dict[str, Any]:
        result = dict(stored)
        result.update(
            attempt=attempt,
            reused=True,
            worker=self.worker_id,
            finished=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        return result

    def _progress(self, cancel: threading.Event) -> Callable[[Progress], None]:
        state: dict[str, Any] = {"key": None, "done": 0, "total": 0}

        def progress(p: Progress) -> None:
            if p.stage != "tiles":
                return
            key = (p.analysis, p.total)
            new_pass = key != state["key"] or p.done <= state["done"]  # done grows within one
            delta = p.done if new_pass else p.done - state["done"]
            state.update(key=key, done=p.done, total=state["total"] + delta)
            self.metrics.tiles.inc(delta)
            if p.elapsed_s > 0:
                self.metrics.tiles_per_s.set(state["total"] / p.elapsed_s)
            if self.fault_delay_s:
                cancel.wait(self.fault_delay_s)
            if cancel.is_set():
                raise JobCancelled

        return progress

    def _compute(self, job: Job, attempt: int, cancel: threading.Event) -> dict[str, Any]:
        t0 = time.perf_counter()
        with writing(job.folder.parent, "create a staging folder in"):
            job.folder.parent.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers(job)
            staging = Path(
                tempfile.mkdtemp(prefix=f".{job.job_id}.partial-", dir=job.folder.parent)
            )
        try:
            config = replace(
                self.config,
                analyses=tuple(a for a in self.config.analyses if a.name in job.analyses),
            )
            slide = job.real_slide or job.slide
            report = run(
                config, slide, staging, self.options, self._progress(cancel), store=self.store
            )
            result = self._done_result(job, report, attempt, time.perf_counter() - t0)
            t = time.perf_counter()
            with writing(staging, "flush the results in"):
                _fsync_tree(staging)
            # job.json holds the result as published, timings included: a reused result
            # carries the same durations (commit: flushing the results to disk)
            result["durations_s"]["commit"] = round(time.perf_counter() - t, 4)
            result["durations_s"]["total"] = round(time.perf_counter() - t0, 4)
            doc = {"identity": self.identity(job), "job": job.doc, "result": result}
            path = staging / RESULT_FILE
            with writing(path):
                path.write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
                _fsync_path(path)
                _fsync_path(staging, directory=True)
            return self._commit(staging, job, result)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

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

    def _commit(self, staging: Path, job: Job, result: dict[str, Any]) -> dict[str, Any]:
        """Rename the staging folder to <output>/<job_id>.

        If the folder appeared meanwhile: the same job's complete results are reused, the same
        job's incomplete ones replaced, anything else refused (JobRefused from _stored).
        """
        final = job.folder
        try:
            try:
                staging.rename(final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    raise
                stored = self._stored(job)
                if stored is not None:
                    return self._reused(stored, result["attempt"])
                old = final.with_name(f".{job.job_id}.old-{uuid.uuid4().hex[:8]}")
                final.rename(old)
                staging.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            _fsync_path(final.parent, directory=True)
        except OSError as exc:
            raise output_error(exc, job.shown_folder, "move the results into") from None
        return result

    def _done_result(
        self, job: Job, report: RunReport, attempt: int, run_s: float
    ) -> dict[str, Any]:
        summaries = report.summaries
        timings = [s["run"]["timings_s"] for s in summaries.values()]
        durations = {
            "slide_open": timings[0]["slide_open"] if timings else 0.0,
            "tissue": max((t["tissue"] for t in timings), default=0.0),
            "tiles": round(sum(t["tiles"] for t in timings), 4),
            "write": round(sum(t["write"] for t in timings), 4),
            "run": round(run_s, 4),
        }
        shown = job.shown_folder
        return self._result_doc(
            job.job_id,
            "done",
            attempt=attempt,
            slide=str(job.slide),
            output=str(shown),
            outputs={a: str(shown / a) for a in summaries},
            files={a: s["deterministic"]["outputs"] for a, s in summaries.items()},
            summary=_counts(summaries),
            tiles=report.tiles,
            device=report.device,
            durations_s=durations,
        )


# --------------------------------------------------------------------------- the AMQP loop


@dataclass(frozen=True)
class WorkerSettings:
    amqp_url: str
    queue: str
    prefetch: int = 1
    max_attempts: int = 3
    grace_s: float = 25.0  # on SIGTERM, how long the current job may take to finish
    retry_delay_s: float = 5.0  # a failed attempt is handed back after this long
    broker_timeout_s: float = 300.0  # give up (exit 7) after this long without a connection
    metrics_host: str = "0.0.0.0"  # inside a container: reachable on its published port
    metrics_port: int = 9464  # 0: no HTTP server
    slide_roots: tuple[Path, ...] = (Path("/slides"),)  # job slides must lie in one of these
    output_root: Path = Path("/out")  # job outputs must lie in it; it holds the job locks

    @property
    def roots(self) -> Roots:
        return Roots(self.slide_roots, self.output_root)


def _count_header(headers: dict[str, Any], name: str) -> int:
    """A non-negative count from a message header (0 if absent or not a count)."""
    value = headers.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass
class _Delivery:
    channel: Any
    tag: int
    redelivered: bool
    properties: Any
    body: bytes

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    @property
    def attempt(self) -> int:
        """Which delivery of the job this is: earlier copies' deliveries plus this copy's.

        The quorum queue counts this copy's deliveries in x-delivery-count (including those
        whose worker died); DELIVERIES_HEADER carries the count of copies the worker
        republished (retries, hand-backs).
        """
        count = self.headers.get("x-delivery-count")
        this_copy = count + 1 if isinstance(count, int) else 2 if self.redelivered else 1
        return _count_header(self.headers, DELIVERIES_HEADER) + this_copy

    @property
    def failures(self) -> int:
        """Failed attempts before this delivery (a lost connection is not a failure)."""
        return _count_header(self.headers, FAILURES_HEADER)


@dataclass
class _Active:
    delivery: _Delivery
    job: Job
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    cancelled_at: float | None = None
    thread: threading.Thread | None = None


class _ConsumerGone(Exception):
    """The broker cancelled our consumer (e.g. the queue was deleted or moved)."""


def _refused(exc: BaseException) -> bool:
    """True for a login the broker refused (bad credentials or vhost): retrying will not help."""
    import pika.exceptions

    if isinstance(exc, pika.exceptions.AuthenticationError):
        return True
    # pika reports the broker's Connection.Close (403 ACCESS_REFUSED, 530 NOT_ALLOWED for a
    # vhost) inside Probable*Error or ConnectionClosedByBroker, as text
    text = str(exc)
    return isinstance(exc, pika.exceptions.AMQPConnectionError) and (
        "ACCESS_REFUSED" in text or "NOT_ALLOWED" in text
    )


class Worker:
    """Consumes jobs, runs them one at a time, publishes results, acks when durable."""

    def __init__(self, settings: WorkerSettings, runner: JobRunner, metrics: Metrics) -> None:
        self.settings = settings
        self.topology = Topology(settings.queue, settings.max_attempts)
        self.runner = runner
        self.metrics = metrics
        self.stopping = False
        self.hurry = False
        self.stop_at = 0.0
        self._noticed_stop = False
        self.conn: Any = None
        self.channel: Any = None
        self.consumer_tag: str | None = None
        self.current: _Active | None = None
        self.pending: deque[_Delivery] = deque()
        self.delayed: list[tuple[float, _Delivery]] = []  # failed, republished when due
        self.connections = 0

    def request_stop(self, signum: int, frame: Any) -> None:
        """Signal handler: first signal stops taking jobs, a second one cancels the current."""
        if self.stopping:
            self.hurry = True
        else:
            self.stopping = True
            self.stop_at = time.monotonic()

    # ------------------------------------------------------------------ connection

    def serve(self) -> int:
        """Run until stopped (0) or the broker stays unreachable (BrokerError).

        Whatever ends it, a job still running is cancelled and its thread joined first:
        exiting while it is inside ONNX Runtime would abort the process (SIGABRT).
        """
        try:
            return self._serve()
        finally:
            self._stop_job_thread()

    def _stop_job_thread(self) -> None:
        a = self.current
        if a is None or a.thread is None or not a.thread.is_alive():
            return
        a.cancel.set()
        log.warning(
            "job %s: the worker is exiting; cancelling it (the broker hands it out again)",
            a.job.job_id,
            extra={"event": "job_cancel", "job_id": a.job.job_id},
        )
        a.thread.join(CANCEL_WAIT_S)
        if a.thread.is_alive():
            log.error(
                "job %s did not stop within %.0f s; exiting without it",
                a.job.job_id,
                CANCEL_WAIT_S,
                extra={"event": "job_abandoned", "job_id": a.job.job_id},
            )

    def _serve(self) -> int:
        import pika.exceptions

        failing_since: float | None = None
        backoff = 0.5
        last = ""
        while True:
            if self.stopping and self.current is None:
                self._log_stop()
                return 0
            try:
                if not self.stopping:
                    self._connect()
                    failing_since, backoff = None, 0.5
                    self._loop()
                    self._close()
                    return 0
            except (pika.exceptions.AMQPError, OSError, _ConsumerGone) as exc:
                if _refused(exc):
                    raise BrokerError(
                        f"the broker at {redact(self.settings.amqp_url)} refused the login "
                        f"({_line(exc)}); check the user, password and vhost of --amqp"
                    ) from None
                last = _line(exc) if str(exc) else repr(exc)[:300]
                self._disconnected(last)
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > self.settings.broker_timeout_s and not self.stopping:
                raise BrokerError(
                    f"no connection to the broker at {redact(self.settings.amqp_url)} for "
                    f"{self.settings.broker_timeout_s:.0f} s (last: {last}); giving up"
                )
            self._offline_wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _connect(self) -> None:
        import pika

        params = pika.URLParameters(self.settings.amqp_url)
        params.client_properties = {"connection_name": f"tilerunner worker {self.runner.worker_id}"}
        if params.blocked_connection_timeout is None:  # broker alarm: reconnect, do not hang
            params.blocked_connection_timeout = 60
        conn = pika.BlockingConnection(params)
        try:
            channel = conn.channel()
            channel.confirm_delivery()
            try:
                self.topology.declare(channel)
            except pika.exceptions.ChannelClosedByBroker as exc:
                raise BrokerError(
                    f"queue {self.topology.queue}: the broker refused to declare it "
                    f"({exc.reply_code} {exc.reply_text}); every worker of a queue needs the "
                    "same --max-attempts, and the queue must be a quorum queue"
                ) from None
            channel.basic_qos(prefetch_count=self.settings.prefetch)
            tag = channel.basic_consume(self.topology.queue, self._on_message)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self.conn, self.channel, self.consumer_tag = conn, channel, tag
        self.connections += 1
        if self.connections > 1:
            self.metrics.reconnects.inc()
        self.metrics.connected.set(1)
        log.info(
            "consuming %s on %s (prefetch %d, max attempts %d)",
            self.topology.queue,
            redact(self.settings.amqp_url),
            self.settings.prefetch,
            self.settings.max_attempts,
            extra={"event": "consuming", "queue": self.topology.queue},
        )

    def _disconnected(self, reason: str) -> None:
        what = "lost the connection to" if self.conn is not None else "cannot connect to"
        log.warning(
            "%s the broker at %s (%s); retrying",
            what,
            redact(self.settings.amqp_url),
            reason,
            extra={"event": "broker_down", "reason": reason},
        )
        self.metrics.connected.set(0)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = self.channel = self.consumer_tag = None
        # the broker requeues every unacked delivery of a closed channel
        self.pending.clear()
        self.delayed.clear()

    def _close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.metrics.connected.set(0)
        self.metrics.tick(connected=False, consuming=False)
        self._log_stop()

    def _log_stop(self) -> None:
        log.info("stopped", extra={"event": "stopped"})

    def _offline_wait(self, seconds: float) -> None:
        """Wait before reconnecting, still reaping and (on shutdown) cancelling the job."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.metrics.tick(connected=False, consuming=False, stopping=self.stopping)
            self._reap()
            if self.stopping:
                self._notice_stop()
                if self.current is None:
                    return
                self._shutdown_job()
            time.sleep(0.1)

    # ------------------------------------------------------------------ the loop

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.pending.append(
            _Delivery(channel, method.delivery_tag, bool(method.redelivered), properties, body)
        )

    def _loop(self) -> None:
        consuming = True
        while True:
            self.conn.process_data_events(time_limit=TICK_S)
            self.metrics.tick(
                connected=True,
                consuming=consuming,
                stopping=self.stopping,
                job_id=self.current.job.job_id if self.current else None,
            )
            self._reap()
            now = time.monotonic()
            for due, d in list(self.delayed):
                if self.stopping or now >= due:
                    self.delayed.remove((due, d))
                    self._republish(d, failed=True)
            if self.stopping:
                self._notice_stop()
                if consuming:
                    self.channel.basic_cancel(self.consumer_tag)
                    consuming = False
                    while self.pending:
                        self._republish(self.pending.popleft(), failed=False)
                if self.current is None:
                    return
                self._shutdown_job()
                continue
            if self.consumer_tag not in self.channel.consumer_tags:
                raise _ConsumerGone("the broker cancelled the consumer")
            if self.current is None and self.pending:
                self._start(self.pending.popleft())

    def _notice_stop(self) -> None:
        if not self._noticed_stop:
            self._noticed_stop = True
            job = self.current.job.job_id if self.current else None
            log.info(
                "stop requested: taking no more jobs%s",
                f"; job {job} has {self.settings.grace_s:g} s to finish" if job else "",
                extra={"event": "stopping", "job_id": job},
            )

    def _shutdown_job(self) -> None:
        """On shutdown: cancel the job after the grace period; give up on it if it hangs."""
        a = self.current
        if a is None:
            return
        now = time.monotonic()
        if a.cancelled_at is None and (self.hurry or now - self.stop_at >= self.settings.grace_s):
            a.cancelled_at = now
            a.cancel.set()
            log.warning(
                "job %s: grace period over; cancelling it, it goes back to the queue",
                a.job.job_id,
                extra={"event": "job_cancel", "job_id": a.job.job_id},
            )
        if a.cancelled_at is not None and now - a.cancelled_at > CANCEL_WAIT_S:
            log.error(
                "job %s did not stop within %.0f s of its cancellation; handing it back",
                a.job.job_id,
                CANCEL_WAIT_S,
                extra={"event": "job_abandoned", "job_id": a.job.job_id},
            )
            self._requeue(a, counted=True)

    def _start(self, d: _Delivery) -> None:
        try:
            job = parse_job(d.body, self.runner.config)
        except MalformedJob as exc:
            self.metrics.jobs_malformed.inc()
            log.warning(
                "%s",
                exc,
                extra={"event": "job_malformed", "job_id": exc.job_id, "reason": str(exc)},
            )
            self._dead_letter(d, str(exc), exc.job_id, None)
            return
        a = _Active(d, job)
        self.current = a
        self.metrics.jobs_in_flight.set(1)
        self.metrics.tiles_per_s.set(0)
        log.info(
            "job %s: %s (attempt %d, %d failed before)",
            job.job_id,
            job.slide,
            d.attempt,
            d.failures,
            extra={"event": "job_start", "job_id": job.job_id, "attempt": d.attempt},
        )
        a.thread = threading.Thread(
            target=self._work, args=(a,), name=f"{JOB_THREAD_PREFIX}{job.job_id}", daemon=True
        )
        a.thread.start()

    def _work(self, a: _Active) -> None:
        try:
            a.outcome = self.runner.execute(a.job, a.delivery.attempt, a.cancel)
        finally:
            if a.outcome is None:
                a.outcome = Outcome("failed", reason="internal error: the job thread died")
            a.finished.set()

    def _reap(self) -> None:
        a = self.current
        if a is None or not a.finished.is_set():
            return
        assert a.outcome is not None
        if a.delivery.channel is not self.channel:
            self.current = None
            self.metrics.jobs_in_flight.set(0)
            log.warning(
                "job %s ended (%s) after its connection was lost: the broker redelivers "
                "it, and complete results are reused",
                a.job.job_id,
                a.outcome.status,
                extra={"event": "job_orphaned", "job_id": a.job.job_id},
            )
            return
        self._finish(a, a.outcome)
        self.current = None
        self.metrics.jobs_in_flight.set(0)

    def _finish(self, a: _Active, o: Outcome) -> None:
        d, job = a.delivery, a.job
        if o.status == "done" and o.result is not None:
            self._publish_result(o.result, d)
            d.channel.basic_ack(d.tag)
            reused = bool(o.result.get("reused"))
            self.metrics.jobs_done.labels(reused=str(reused).lower()).inc()
            if not reused:
                for stage, seconds in o.result["durations_s"].items():
                    if stage in ("slide_open", "tissue", "tiles", "write", "commit", "total"):
                        self.metrics.stage_s.labels(stage=stage).observe(seconds)
            log.info(
                "job %s done%s: %d tiles, results in %s",
                job.job_id,
                " (complete results reused)" if reused else "",
                o.result["tiles"],
                o.result["output"],
                extra={"event": "job_done", "job_id": job.job_id, "attempt": d.attempt},
            )
        elif o.status == "cancelled":
            self._requeue(a)
        elif o.permanent:
            self.metrics.jobs_failed.labels(action="dead_letter").inc()
            reason = f"failed with a permanent error (not retried): {o.reason}"
            self._dead_letter(d, reason, job.job_id, str(job.slide))
        elif d.failures + 1 >= self.settings.max_attempts:
            self.metrics.jobs_failed.labels(action="dead_letter").inc()
            reason = f"failed {d.failures + 1} time(s), last: {o.reason}"
            self._dead_letter(d, reason, job.job_id, str(job.slide))
        else:
            self.metrics.jobs_failed.labels(action="retry").inc()
            log.warning(
                "job %s: failure %d of %d: %s; retrying in %g s",
                job.job_id,
                d.failures + 1,
                self.settings.max_attempts,
                o.reason,
                self.settings.retry_delay_s,
                extra={
                    "event": "job_retry",
                    "job_id": job.job_id,
                    "attempt": d.attempt,
                    "reason": o.reason,
                },
            )
            self.delayed.append((time.monotonic() + self.settings.retry_delay_s, d))

    def _requeue(self, a: _Active, counted: bool = False) -> None:
        """Hand an unfinished job back to the broker (shutdown).

        A job cancelled cleanly is republished (not a failure, not a delivery the broker's
        limit counts); one that would not stop is nacked, so that the broker's delivery limit
        catches a slide every worker hangs on.
        """
        self.current = None
        self.metrics.jobs_in_flight.set(0)
        d = a.delivery
        if self._nack(d) if counted else self._republish(d, failed=False):
            self.metrics.jobs_requeued.inc()
            log.info(
                "job %s handed back to the queue unfinished",
                a.job.job_id,
                extra={"event": "job_requeued", "job_id": a.job.job_id},
            )

    def _nack(self, d: _Delivery) -> bool:
        if d.channel is not self.channel:
            return False  # that channel is gone: the broker has requeued it already
        d.channel.basic_nack(d.tag, requeue=True)
        return True

    def _republish(self, d: _Delivery, *, failed: bool) -> bool:
        """Put a fresh copy of the job at the end of the queue, then ack this delivery.

        The copy carries the failures so far (one more if `failed`) and the deliveries so
        far in headers, so the broker's delivery limit counts only deliveries that ended with
        no answer at all. Published with confirms before the ack: at worst the job is there
        twice, and the job-id lock and stored results make the second a reuse.
        """
        if d.channel is not self.channel:
            return False  # that channel is gone: the broker has requeued it already
        headers = {k: v for k, v in d.headers.items() if k not in ("x-delivery-count", "x-death")}
        headers[FAILURES_HEADER] = d.failures + (1 if failed else 0)
        headers[DELIVERIES_HEADER] = d.attempt
        props = self._properties(
            content_type=d.properties.content_type,
            message_id=d.properties.message_id,
            correlation_id=d.properties.correlation_id,
            headers=headers,
        )
        d.channel.basic_publish("", self.topology.queue, d.body, props, mandatory=True)
        d.channel.basic_ack(d.tag)
        return True

    def _properties(self, **kwargs: Any) -> Any:
        import pika

        return pika.BasicProperties(
            delivery_mode=2, app_id="tilerunner", timestamp=int(time.time()), **kwargs
        )

    def _publish_result(self, doc: dict[str, Any], d: _Delivery) -> None:
        body = json.dumps(doc, sort_keys=True).encode()
        props = self._properties(
            content_type="application/json",
            type=f"tilerunner.result.v{RESULT_VERSION}",
            correlation_id=d.properties.correlation_id or doc["job_id"],
            headers={"job_id": doc["job_id"], "status": doc["status"]},
        )
        d.channel.basic_publish(
            self.topology.results, self.topology.queue, body, props, mandatory=True
        )

    def _dead_letter(
        self, d: _Delivery, reason: str, job_id: str | None, slide: str | None
    ) -> None:
        """Publish the job as it came to the dead-letter exchange, with the reason; then ack."""
        headers = {
            k: v for k, v in (d.properties.headers or {}).items() if k != "x-delivery-count"
        }  # the dead-letter queue counts its own
        reason = one_line(reason)
        headers.update(
            {
                "x-tilerunner-reason": reason,
                "x-tilerunner-attempts": d.attempt,
                FAILURES_HEADER: d.failures + 1,
                "x-tilerunner-worker": self.runner.worker_id,
            }
        )
        props = self._properties(
            content_type=d.properties.content_type,
            message_id=d.properties.message_id,
            correlation_id=d.properties.correlation_id,
            headers=headers,
        )
        d.channel.basic_publish(
            self.topology.dead, self.topology.queue, d.body, props, mandatory=True
        )
        if job_id is not None:
            self._publish_result(self.runner.failed_result(job_id, reason, d.attempt, slide), d)
        d.channel.basic_ack(d.tag)
        log.error(
            "job %s dead-lettered: %s",
            job_id or "(no valid job_id)",
            reason,
            extra={
                "event": "job_dead_lettered",
                "job_id": job_id,
                "reason": reason,
                "attempt": d.attempt,
            },
        )


# --------------------------------------------------------------------------- entry point


def _cap(value: str, limit: int = LOG_FIELD_LIMIT) -> str:
    """`value` cut at `limit` characters (a log line stays short, whatever a job holds)."""
    if len(value) > limit:
        return f"{value[:limit]}... ({len(value)} characters, cut)"
    return value


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, msg, and the event fields given in `extra`."""

    FIELDS = ("event", "job_id", "attempt", "queue", "reason")

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "msg": _cap(record.getMessage()),
        }
        for key in self.FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = _cap(value) if isinstance(value, str) else value
        if record.exc_info:
            doc["exc"] = _cap(self.formatException(record.exc_info), 4 * LOG_FIELD_LIMIT)
        return json.dumps(doc, default=str)


class TextLogFormatter(logging.Formatter):
    """`tilerunner: message`, the message cut at LOG_FIELD_LIMIT characters."""

    def format(self, record: logging.LogRecord) -> str:
        text = "tilerunner: " + _cap(record.getMessage())
        if record.exc_info:
            text += "\n" + _cap(self.formatException(record.exc_info), 4 * LOG_FIELD_LIMIT)
        return text


def fault_delay_from_env() -> float:
    """TILERUNNER_FAULT_BATCH_DELAY_S (test-only): seconds to wait after each batch."""
    raw = os.environ.get(FAULT_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise RunnerError(f"{FAULT_DELAY_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise RunnerError(f"{FAULT_DELAY_ENV} must be >= 0")
    return value


def serve(settings: WorkerSettings, config: RunConfig, options: RunOptions) -> int:
    """Load the models once, serve metrics, consume jobs until SIGTERM/SIGINT; exit code."""
    fault = fault_delay_from_env()
    roots = settings.roots
    for warning in roots.check():
        log.warning("%s", warning, extra={"event": "output_root_in_memory"})
    log.info(
        "jobs may read slides from %s and write results under %s",
        ", ".join(str(r) for r in roots.slides),
        roots.output,
        extra={"event": "roots"},
    )
    metrics = Metrics()
    t = time.perf_counter()
    store = ModelStore(EngineOptions(options.device, options.threads, options.spin))
    store.load(config)
    load_s = time.perf_counter() - t
    metrics.model_load_s.set(load_s)
    metrics.info.info(
        {
            "version": __version__,
            "device": store.device,
            "providers": ",".join(store.providers),
            "customer": config.customer,
            "config_sha256": config.sha256,
        }
    )
    log.info(
        "models loaded in %.1f s on %s (config %s, sha256 %s)",
        load_s,
        store.device,
        config.path,
        config.sha256[:12],
        extra={"event": "models_loaded"},
    )
    if fault:
        log.warning(
            "TEST-ONLY fault injection: waiting %g s after each batch (%s)",
            fault,
            FAULT_DELAY_ENV,
            extra={"event": "fault_injection"},
        )
    http = None
    if settings.metrics_port:
        http = HttpServer(metrics, settings.metrics_host, settings.metrics_port)
        http.start()
        log.info(
            "metrics and health on http://%s:%d/metrics, /healthz, /readyz",
            settings.metrics_host,
            http.port,
            extra={"event": "http"},
        )
    runner = JobRunner(config, store, options, metrics, fault, roots)
    locks, records = runner.prune()
    if locks or records:
        log.info(
            "removed %d stale lock file(s) and %d record(s) of deleted results from %s",
            locks,
            records,
            roots.output,
            extra={"event": "pruned"},
        )
    worker = Worker(settings, runner, metrics)
    previous = {
        sig: signal.signal(sig, worker.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        return worker.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if http is not None:
            http.stop()
