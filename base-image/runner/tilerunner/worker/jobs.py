"""Job messages: their JSON Schema, parsing, and the validated Job.

A job names a slide, an output folder and the analyses to run (schemas/worker-job-v1.schema.json,
closed). A message that is not a valid job is MalformedJob, with the job id when one could be
read, so the worker can say which job it refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from tilerunner.config import RunConfig
from tilerunner.errors import RunnerError
from tilerunner.worker.logs import line_of, one_line

JOB_VERSION = 1
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
    folders (set by JobStore.admit).
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


class JobIdTaken(JobRefused):
    """The job id already names another job: the refusal is this message's, not that job's."""


class JobCancelled(Exception):
    """The worker is shutting down and the grace period is over."""


def readable_job_id(doc: Any) -> str | None:
    """The message's job_id if it has a valid one (also of messages that are no valid job)."""
    raw = doc.get("job_id") if isinstance(doc, dict) else None
    return raw if isinstance(raw, str) and JOB_ID_RE.fullmatch(raw) else None


def parse_job(body: bytes, config: RunConfig) -> Job:
    """Validate a job message against the schema and the config; MalformedJob if it is not."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedJob(f"malformed job: the body is not JSON ({line_of(exc, 120)})") from None
    job_id = readable_job_id(doc)
    if isinstance(doc, dict) and "job_version" in doc and doc["job_version"] != JOB_VERSION:
        raise MalformedJob(
            f"malformed job: job_version {one_line(repr(doc['job_version']), 40)} is not "
            f"supported (this worker reads {JOB_VERSION})",
            job_id,
        )
    validator = jsonschema.Draft202012Validator(job_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise MalformedJob(
            f"malformed job: at {where}: {line_of(Exception(error.message), 240)}", job_id
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
