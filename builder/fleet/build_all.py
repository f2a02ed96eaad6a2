"""Fleet build: every admitted customer in parallel worker processes through
:func:`builder.pipeline.build`, going on past one customer's failure; records written
in one batch per repository.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from builder.contracts import Progress, ProgressEvent
from builder.documents.build_report import BuildReport
from builder.errors import (
    BuilderError,
    ConfigError,
    error_dict,
    error_fields,
)
from builder.fleet.fleetfile import Fleet, FleetEntry
from builder.fleet.plan import FleetPlan, PlanItem, PlanStatus, plan
from builder.image.base_resolution import resolve_base_image
from builder.image.store import ImageStore
from builder.imagename import ImageKey
from builder.oci import RegistryClient, parse_reference
from builder.pipeline import BuildRequest, build
from builder.record import RELEASES_BRANCH, WriteResult, write_release_records
from builder.settings import Settings

#: Threads for the manifest HEADs that find what is already in the registry.
_HEAD_THREADS = 8

# -- build all ----------------------------------------------------------------------------------


class ImageStatus(StrEnum):
    """What a fleet run did with one image."""

    BUILT = "built"
    UNCHANGED = "unchanged"  # its image is already there: nothing to build
    SKIPPED = "skipped"  # the constraint does not admit the version
    FAILED = "failed"


@dataclass
class ImageResult:
    """The outcome of a fleet run for one image (a customer on one variant)."""

    customer: str
    status: ImageStatus
    summary: str = ""
    report: BuildReport | None = None  # the build report (`builder build --json` result)
    record: WriteResult | None = None  # the release record written, with --record
    error: dict[str, Any] | None = None
    variant: str | None = "cpu"  # None: the customer could not be read
    seconds: float = 0.0

    @property
    def name(self) -> str:
        """``customer-x``, ``customer-x (gpu)``."""
        return self.customer if self.variant is None else str(ImageKey(self.customer, self.variant))


@dataclass
class FleetReport:
    """A fleet run: one result per image, in fleet file order, and how long it took."""

    base_version: str
    fleet: str
    results: list[ImageResult]  # one per image, in fleet file order
    plan_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def failed(self) -> list[ImageResult]:
        """The images that failed."""
        return [r for r in self.results if r.status == ImageStatus.FAILED]

    @property
    def ok(self) -> bool:
        """Whether no image failed."""
        return not self.failed

    def counts(self) -> dict[str, int]:
        """Images by status."""
        return _counts(self.results)


def _counts(results: Iterable[ImageResult]) -> dict[str, int]:
    """Images by status, every status named."""
    out = dict.fromkeys(ImageStatus, 0)
    for result in results:
        out[result.status] += 1
    return {str(status): n for status, n in out.items()}


@dataclass(frozen=True)
class FleetProgress:
    """Where a fleet run stands after one more image finished (the CLI renders it)."""

    result: ImageResult  # the image that just finished
    done: int  # images finished, of ``total``
    total: int
    counts: Mapping[str, int]  # by status, so far
    builds_done: int  # builds finished, of ``builds``
    builds: int
    built: bool  # ``result`` is a build's (not a plan error, a skip or an image already there)
    rate: float | None = None  # images built per minute at the recent pace (None: not known)
    eta: float | None = None  # seconds until the last build ends at that pace (None: not known)


class Pace:
    """The pace of a fleet run's builds, estimated from the recent ones.

    A worker's first build also pays for starting it (a new process, imports, cold caches),
    so the first ``workers`` builds are left out; the rate is that of the last ``window``
    builds after them, so the estimate follows the run, not its start. Until two builds
    after the warm-up have finished the pace is not known, and says so (None).
    """

    def __init__(self, workers: int, builds: int, window: int = 20) -> None:
        self.workers = max(1, workers)
        self.builds = builds
        self.window = max(1, window)
        self.finished: list[float] = []  # when each build finished (seconds, monotonic)

    def add(self, when: float) -> None:
        """Count a build that finished at ``when`` (seconds, monotonic)."""
        self.finished.append(when)

    @property
    def per_second(self) -> float | None:
        """Builds finished per second lately."""
        after = self.finished[self.workers - 1 :]  # from the end of the warm-up on
        if len(after) < 2:
            return None
        recent = after[-(self.window + 1) :]
        span = recent[-1] - recent[0]
        return (len(recent) - 1) / span if span > 0 else None

    @property
    def rate(self) -> float | None:
        """Builds per minute lately."""
        pace = self.per_second
        return None if pace is None else 60.0 * pace

    @property
    def eta(self) -> float | None:
        """Seconds until the last build ends at the recent pace (None when unknown or done)."""
        left = self.builds - len(self.finished)
        pace = self.per_second
        return None if left <= 0 or pace is None else left / pace


@dataclass(frozen=True)
class _Job:
    image: ImageKey
    location: str
    ref: str
    base_version: str
    settings: Settings
    push: bool
    image_registry: str | None
    base_repository: str | None
    insecure: bool | None
    known_tags: tuple[tuple[str, str | None], ...] = ()
    base_digest: str | None = None
    locked: bool = False  # models from the committed lock (CI's child jobs)


_events: Any = None  # the worker processes' event queue (set by _init_worker)


def _init_worker(events: Any) -> None:
    global _events  # noqa: PLW0603 - one queue per worker process, set once at start
    _events = events


def _build_one(job: _Job) -> ImageResult:
    """Build one image in a worker process; never raises (the result says what failed)."""

    def on_progress(event: ProgressEvent) -> None:
        if _events is not None and event.stage:  # stages only: bytes would flood the queue
            _events.put(ProgressEvent(stage=event.stage, subject=str(job.image)))

    request = BuildRequest(
        customer=job.location,
        ref=job.ref,
        base_version=job.base_version,
        base_repository=job.base_repository,
        variant=job.image.variant,
        image_registry=job.image_registry,
        push=job.push,
        insecure=job.insecure,
        known_tags=job.known_tags,
        base_digest=job.base_digest,
        locked=job.locked,
        fleet=True,  # a release: the committed lock or nothing, even without --push
    )
    started = time.perf_counter()
    try:
        report = build(request, job.settings, progress=on_progress)
    except BuilderError as exc:
        return _failed(job, error_dict(exc), started)
    except Exception as exc:  # one customer's crash must not stop the fleet
        message = f"unexpected {type(exc).__name__}: {exc}"
        return _failed(job, error_fields(type(exc).__name__, message, None, 1), started)
    summary = f"{report.image}@{report.manifest_digest}"
    return ImageResult(
        job.image.customer,
        ImageStatus.BUILT,
        summary,
        report=report,
        variant=job.image.variant,
        seconds=_since(started),
    )


def _failed(job: _Job, error: dict[str, Any], started: float | None = None) -> ImageResult:
    """The result of a build of ``job`` that failed with ``error``."""
    return ImageResult(
        job.image.customer,
        ImageStatus.FAILED,
        error["message"],
        error=error,
        variant=job.image.variant,
        seconds=0.0 if started is None else _since(started),
    )


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _run_jobs(
    jobs: list[_Job],
    workers: int,
    on_event: Progress | None,
    on_done: Callable[[_Job, ImageResult], None],
) -> None:
    """Run the builds in ``workers`` spawned processes (isolated: the ClearML SDK keeps
    process-wide state, and each build has its own main thread for its deadlines);
    ``on_done`` gets each image's outcome as soon as it is known."""
    if not jobs:
        return
    context = multiprocessing.get_context("spawn")
    events = context.Queue()

    def drain() -> None:
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            if on_event:
                on_event(event)

    with ProcessPoolExecutor(
        max_workers=max(1, min(workers, len(jobs))),
        mp_context=context,
        initializer=_init_worker,
        initargs=(events,),
    ) as pool:
        pending: dict[Future[ImageResult], _Job] = {
            pool.submit(_build_one, job): job for job in jobs
        }
        while pending:
            done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                job = pending.pop(future)
                try:
                    outcome = future.result()
                except Exception as exc:  # a worker that died (OOM, signal)
                    outcome = _failed(
                        job, error_fields(type(exc).__name__, f"build worker died: {exc}", None, 1)
                    )
                on_done(job, outcome)
    drain()
    events.close()


def _in_registry(items: Sequence[PlanItem], insecure: bool | None) -> dict[ImageKey, str | None]:
    """The digest each item's immutable tag points to in its registry (None: not there); an
    image the registry could not answer for is left out. One manifest HEAD per image, on a
    few threads, each with its own client per registry host."""
    local = threading.local()

    def head(item: PlanItem) -> tuple[bool, str | None]:
        """(whether the registry answered, the digest)"""
        ref = parse_reference(item.image or "")
        clients: dict[str, RegistryClient | None] = local.__dict__.setdefault("clients", {})
        try:
            if ref.registry not in clients:
                clients[ref.registry] = RegistryClient(ref.registry, insecure=insecure)
            client = clients[ref.registry]
            if client is not None and ref.tag:
                return True, client.manifest_digest(ref.path, ref.tag)
        except BuilderError:
            clients.setdefault(ref.registry, None)  # the build will say what is wrong
        return False, None

    keyed = [item for item in items if item.key is not None and item.image]
    with ThreadPoolExecutor(max_workers=_HEAD_THREADS) as pool:
        found = list(pool.map(head, keyed))
    return {
        item.key: digest
        for item, (answered, digest) in zip(keyed, found, strict=True)
        if item.key is not None and answered
    }


def _resolve_bases(
    repositories: set[str], fleet_plan: FleetPlan, settings: Settings, insecure: bool | None
) -> dict[str, str]:
    """Each base repository's image of the plan's version, resolved once for the whole run
    and kept in the local image store, by digest: the builds take it from there instead of
    each asking the registry. One that cannot be resolved is left to its builds to report."""
    store = ImageStore(settings.store_dir)
    out: dict[str, str] = {}
    for repository in sorted(repositories):
        with contextlib.suppress(BuilderError):
            base = resolve_base_image(repository, fleet_plan.base_version, store, insecure=insecure)
            out[repository] = base.digest
    return out


def _unchanged(
    items: Sequence[PlanItem],
    present: Mapping[ImageKey, str | None],
    *,
    push: bool,
    record: bool,
) -> dict[ImageKey, str]:
    """Images with nothing to build, and why: the immutable tag ``<version>[-variant]-<config
    rev>`` is already in the registry (``present``: rebuilding gives the same digest or is
    refused), and, with ``record``, its release record is written. Without ``push``: what
    the release records say is already released."""
    if not push:
        return {
            i.key: f"already released: {(i.previous or {}).get('image')}"
            for i in items
            if i.status == PlanStatus.RELEASED and i.key is not None
        }
    out: dict[ImageKey, str] = {}
    for item in items:
        digest = present.get(item.key) if item.key else None
        if item.key is None or digest is None or (record and item.status != PlanStatus.RELEASED):
            continue  # not there, or there without its release record: build (and record)
        out[item.key] = f"already in the registry: {item.image}@{digest}"
    return out


def _what_to_build(
    fleet_plan: FleetPlan, *, push: bool, record: bool, force: bool, insecure: bool | None
) -> tuple[dict[ImageKey, str | None], dict[ImageKey, str], list[PlanItem]]:
    """What is in the registry already (each image's immutable tag read once, in one batch,
    also the check each build's push would otherwise make again), which images are
    unchanged and why, and the images to build."""
    wanted = (PlanStatus.REBUILD, PlanStatus.RELEASED)
    candidates = [i for i in fleet_plan.items if i.status in wanted]
    present = _in_registry(candidates, insecure) if push else {}
    unchanged = {} if force else _unchanged(candidates, present, push=push, record=record)
    building = [i for i in candidates if i.key is not None and i.key not in unchanged]
    return present, unchanged, building


def _jobs(
    building: Sequence[PlanItem],
    entries: Mapping[str, FleetEntry],
    template: _Job,
    present: Mapping[ImageKey, str | None],
    bases: Mapping[str, str],
) -> list[_Job]:
    """One job per image to build: ``template`` (the run's options) for that image, with the
    commit the plan saw, its immutable tag's digest read up front, and its resolved base."""
    return [
        replace(
            template,
            image=item.key,
            location=entries[item.customer].location,
            ref=item.commit or entries[item.customer].ref,  # what plan saw, even if it moves
            known_tags=((item.image or "", present[item.key]),) if item.key in present else (),
            base_digest=bases.get(item.base or ""),
        )
        for item in building
        if item.key is not None
    ]


class _Run:
    """The results of a fleet run as they come in, in plan order, with the counts and pace
    each one reports to ``on_progress``."""

    def __init__(
        self,
        fleet_plan: FleetPlan,
        builds: int,
        workers: int,
        on_progress: Callable[[FleetProgress], None] | None,
    ) -> None:
        self.items = fleet_plan.items
        self.at = {item.key: n for n, item in enumerate(self.items) if item.key is not None}
        self.results: dict[int, ImageResult] = {}  # by the image's place in the plan
        self.builds = builds
        self.pace = Pace(workers, builds)
        self.on_progress = on_progress

    def finish(self, n: int, result: ImageResult, *, built: bool = False) -> None:
        """Take the result of the plan's ``n``-th image."""
        self.results[n] = result
        if built:
            self.pace.add(time.perf_counter())
        if self.on_progress:
            self.on_progress(
                FleetProgress(
                    result,
                    len(self.results),
                    len(self.items),
                    _counts(self.results.values()),
                    len(self.pace.finished),
                    self.builds,
                    built,
                    self.pace.rate,
                    self.pace.eta,
                )
            )

    def settle(self, unchanged: Mapping[ImageKey, str]) -> None:
        """The images with nothing to build: unreadable, not admitted, already there."""
        for n, item in enumerate(self.items):
            if item.status == PlanStatus.ERROR:
                result = ImageResult(
                    item.customer, ImageStatus.FAILED, item.summary, error=item.error, variant=None
                )
            elif item.status == PlanStatus.SKIP:
                result = ImageResult(
                    item.customer, ImageStatus.SKIPPED, item.summary, variant=item.variant
                )
            elif item.key is not None and item.key in unchanged:
                why = unchanged[item.key]
                result = ImageResult(
                    item.customer, ImageStatus.UNCHANGED, why, variant=item.variant
                )
            else:
                continue
            self.finish(n, result)

    def built(self, job: _Job, result: ImageResult) -> None:
        """Take a build's result."""
        self.finish(self.at[job.image], result, built=True)

    def ordered(self) -> list[ImageResult]:
        """Every image's result, in plan order."""
        return [self.results[n] for n in range(len(self.items))]


def build_all(
    fleet: Fleet,
    settings: Settings,
    base_version: str,
    *,
    jobs: int = 2,
    push: bool = False,
    record: bool = False,
    force: bool = False,
    locked: bool = False,
    image_registry: str | None = None,
    base_repository: str | None = None,
    insecure: bool | None = None,
    branch: str = RELEASES_BRANCH,
    record_attempts: int = 5,
    on_event: Progress | None = None,
    on_planned: Callable[[FleetPlan], None] | None = None,
    on_progress: Callable[[FleetProgress], None] | None = None,
) -> FleetReport:
    """Build what changed for every image (customer x variant) whose constraint admits
    ``base_version``, ``jobs`` at a time.

    Incremental, per image: an image whose immutable tag is already in the registry (with
    its release record, under ``record``) is "unchanged" at the cost of one manifest HEAD;
    a variant never built is built, whatever its customer's other variants did. ``force``
    rebuilds every admitted image; ``locked`` builds each from its committed lock (on
    ``base_version``). An image that fails (unreadable repository, invalid config, registry
    error) is reported and the others go on. With ``record`` (implies a pushed, stable
    build) the release records of the successful builds are written back, one commit per
    customer repository for the whole run. ``on_event`` gets build stages, ``on_planned``
    the plan, ``on_progress`` each finished image with the counts, pace and ETA.
    """
    if record and not push:
        raise ConfigError("--record needs --push: only pushed images get a release record")
    started = time.perf_counter()
    fleet_plan = plan(
        fleet,
        settings,
        base_version,
        branch=branch,
        base_repository=base_repository,
        image_registry=image_registry,
        insecure=insecure,
    )
    if on_planned:
        on_planned(fleet_plan)
    present, unchanged, building = _what_to_build(
        fleet_plan, push=push, record=record, force=force, insecure=insecure
    )
    bases = _resolve_bases({i.base for i in building if i.base}, fleet_plan, settings, insecure)
    template = _Job(
        ImageKey(""),
        "",
        "",
        fleet_plan.base_version,
        settings,
        push,
        image_registry,
        base_repository,
        insecure,
        locked=locked,
    )
    entries = {e.name: e for e in fleet.entries}
    to_build = _jobs(building, entries, template, present, bases)
    run = _Run(fleet_plan, len(to_build), jobs, on_progress)
    run.settle(unchanged)
    _run_jobs(to_build, jobs, on_event, run.built)
    ordered = run.ordered()
    if record:
        _record_all(ordered, entries, settings, branch, record_attempts, on_event)
    return FleetReport(
        base_version=fleet_plan.base_version,
        fleet=str(fleet.path),
        results=ordered,
        plan_seconds=fleet_plan.seconds,
        seconds=_since(started),
    )


def _record_all(
    results: Sequence[ImageResult],
    entries: Mapping[str, FleetEntry],
    settings: Settings,
    branch: str,
    attempts: int,
    on_event: Progress | None,
) -> None:
    """Write the release records of the run's builds: one commit per repository, every
    variant of every customer there in it."""
    built = [r for r in results if r.status == ImageStatus.BUILT and r.report]
    outcomes = write_release_records(
        [r.report for r in built if r.report],
        {r.customer: entries[r.customer].location for r in built},
        settings,
        branch=branch,
        attempts=attempts,
    )
    for result, outcome in zip(built, outcomes, strict=True):
        if isinstance(outcome, WriteResult):
            result.record = outcome
            if on_event:
                on_event(
                    ProgressEvent(
                        what=f"recorded {outcome.path} ({outcome.status})", subject=result.name
                    )
                )
        else:
            result.status, result.error = ImageStatus.FAILED, error_dict(outcome)
            result.summary = f"built and pushed, but not recorded: {result.error['message']}"
