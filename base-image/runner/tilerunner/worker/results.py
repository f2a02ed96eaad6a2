"""What a job's attempt ends in, and the result messages (`result_version: 1`) that say so.

A result names the job (`job_id`) and the message it answers (`message_id`: the producer's
AMQP message id, else the sha256 of the body). A refusal that is about the job id itself (it
already names another job) is this message's, not that job's: its result has `job_id` null,
so a consumer keyed by job id never reads it as a status of the other job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tilerunner import __version__
from tilerunner.config import RunConfig
from tilerunner.errors import ConfigError, ModelError, OutputError, RunnerError, SlideError
from tilerunner.outputs import DiskFullError
from tilerunner.pipeline import RunReport
from tilerunner.worker.jobs import Job, JobIdTaken, JobRefused
from tilerunner.worker.logs import line_of, one_line

RESULT_VERSION = 1


@dataclass
class Outcome:
    """How one attempt at a job ended (the job thread's answer to the main loop)."""

    status: str  # "done", "failed" or "cancelled"
    result: dict[str, Any] | None = None
    reason: str | None = None
    permanent: bool = False  # failed: retrying cannot help (dead-letter at once)
    id_taken: bool = False  # refused because the job id names another job (see module doc)


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
        return f"job refused: {line_of(exc)}"
    if isinstance(exc, RunnerError):
        return f"{type(exc).__name__}: {line_of(exc)}"
    return f"internal error: {type(exc).__name__}: {line_of(exc)}"


def failed(exc: BaseException) -> Outcome:
    """The Outcome of an attempt that raised `exc`."""
    return Outcome(
        "failed",
        reason=describe(exc),
        permanent=is_permanent(exc),
        id_taken=isinstance(exc, JobIdTaken),
    )


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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Results:
    """Writes the result documents of one worker (its config, device and identity)."""

    def __init__(self, config: RunConfig, device: str, worker_id: str) -> None:
        self.config = config
        self.device = device
        self.worker_id = worker_id

    def document(
        self,
        job_id: str | None,
        status: str,
        *,
        attempt: int,
        message_id: str,
        reason: str | None = None,
        slide: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """A result document with every key; `fields` fill in what a done job has."""
        doc: dict[str, Any] = {
            "result_version": RESULT_VERSION,
            "job_id": job_id,
            "message_id": message_id,
            "status": status,
            "reason": None if reason is None else one_line(reason),
            "slide": slide,
            "output": None,
            "outputs": {},
            "files": {},
            "summary": {},
            "tiles": 0,
            "device": self.device,
            "durations_s": {},
            "config_sha256": self.config.sha256,
            "customer": self.config.customer,
            "runner_version": __version__,
            "attempt": attempt,
            "reused": False,
            "worker": self.worker_id,
        }
        doc.update(fields)
        doc["finished"] = _now()
        return doc

    def done(
        self, job: Job, report: RunReport, attempt: int, run_s: float, message_id: str
    ) -> dict[str, Any]:
        """The result of a computed job (durations `commit` and `total` added at commit)."""
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
        return self.document(
            job.job_id,
            "done",
            attempt=attempt,
            message_id=message_id,
            slide=str(job.slide),
            output=str(shown),
            outputs={a: str(shown / a) for a in summaries},
            files={a: s["deterministic"]["outputs"] for a, s in summaries.items()},
            summary=_counts(summaries),
            tiles=report.tiles,
            device=report.device,
            durations_s=durations,
        )

    def reused(self, stored: dict[str, Any], message_id: str) -> dict[str, Any]:
        """A stored result answering this delivery: the run that computed it (its attempt
        and durations), with this delivery's message, worker and time."""
        result = dict(stored)
        result.update(message_id=message_id, reused=True, worker=self.worker_id, finished=_now())
        return result
