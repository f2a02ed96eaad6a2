"""Running one job, in the job thread, with the models the worker loaded once.

A job is admitted (its paths inside the allowed folders), locked by job id, answered from
complete results of itself or computed into a staging folder and committed (JobStore); the
attempt ends in an Outcome, never an exception: the main loop decides what the broker hears.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tilerunner import __version__
from tilerunner.config import RunConfig
from tilerunner.errors import RunnerError
from tilerunner.models import ModelStore
from tilerunner.outputs import DISK_FULL, output_error, writing
from tilerunner.pipeline import Progress, RunOptions, run
from tilerunner.worker.jobs import Job, JobCancelled
from tilerunner.worker.metrics import Metrics
from tilerunner.worker.results import Outcome, Results, failed
from tilerunner.worker.store import JobStore, Roots, fsync_tree

log = logging.getLogger("tilerunner.worker")


@dataclass(frozen=True)
class Faults:
    """Test-only fault injection (never set in production; the worker warns at start):
    wait `delay_s` after each batch of tiles, and wait while the file `hold` exists."""

    delay_s: float = 0.0
    hold: Path | None = None

    def __bool__(self) -> bool:
        return bool(self.delay_s or self.hold)

    def wait(self, cancel: threading.Event) -> None:
        """After a batch: wait as told, returning early when the job is cancelled."""
        if self.delay_s:
            cancel.wait(self.delay_s)
        while self.hold is not None and self.hold.exists() and not cancel.wait(0.1):
            pass


class JobRunner:
    """Runs jobs with the models loaded once; commits results atomically per job id."""

    def __init__(
        self,
        config: RunConfig,
        store: ModelStore,
        options: RunOptions,
        metrics: Metrics,
        faults: Faults | None = None,
        roots: Roots | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.options = options
        self.metrics = metrics
        self.faults = faults or Faults()
        self.jobs = JobStore(roots or Roots())
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.results = Results(config, store.device, self.worker_id)

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

    def execute(self, job: Job, attempt: int, message_id: str, cancel: threading.Event) -> Outcome:
        """Run one job (in the job thread); never raises."""
        try:
            job = self.jobs.admit(job)
            with self.jobs.job_lock(job, cancel):
                self.jobs.check_home(job)
                stored = self.jobs.stored(job, self.identity(job))
                if stored is None:
                    result = self._compute(job, attempt, message_id, cancel)
                else:
                    result = self.results.reused(stored, message_id)
                self.jobs.record_home(job)
                return Outcome("done", result)
        except JobCancelled:
            return Outcome("cancelled", reason="the worker is shutting down")
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                exc = output_error(exc, exc.filename or job.folder)
            if not isinstance(exc, RunnerError):
                log.debug("job %s failed", job.job_id, exc_info=True)
            return failed(exc)

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
            self.faults.wait(cancel)
            if cancel.is_set():
                raise JobCancelled

        return progress

    def _compute(
        self, job: Job, attempt: int, message_id: str, cancel: threading.Event
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        staging = self.jobs.staging(job)
        try:
            config = replace(
                self.config,
                analyses=tuple(a for a in self.config.analyses if a.name in job.analyses),
            )
            slide = job.real_slide or job.slide
            report = run(
                config, slide, staging, self.options, self._progress(cancel), store=self.store
            )
            result = self.results.done(job, report, attempt, time.perf_counter() - t0, message_id)
            t = time.perf_counter()
            with writing(staging, "flush the results in"):
                fsync_tree(staging)
            # job.json holds the result as published, timings included: a reused result
            # carries the same durations (commit: flushing the results to disk)
            result["durations_s"]["commit"] = round(time.perf_counter() - t, 4)
            result["durations_s"]["total"] = round(time.perf_counter() - t0, 4)
            identity = self.identity(job)
            self.jobs.write_result(
                staging, {"identity": identity, "job": job.doc, "result": result}
            )
            won = self.jobs.commit(staging, job, identity)
            return result if won is None else self.results.reused(won, message_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
