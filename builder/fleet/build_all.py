"""Fleet build: every admitted customer in parallel worker processes through
:func:`builder.pipeline.build`, going on past one customer's failure; records written
in one batch per repository.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    wait,
)
from dataclasses import asdict, dataclass
from typing import Any

from builder.contracts import Progress, ProgressEvent
from builder.errors import (
    BuilderError,
    ConfigError,
    error_dict,
    error_fields,
)
from builder.fleet.fleetfile import Fleet, FleetEntry
from builder.fleet.plan import FleetPlan, PlanItem, plan
from builder.oci import RegistryClient, parse_reference
from builder.pipeline import BuildRequest, build
from builder.record import RELEASES_BRANCH, WriteResult, write_release_records
from builder.settings import Settings

# -- build all ----------------------------------------------------------------------------------


@dataclass
class CustomerResult:
    customer: str
    # "built"; "unchanged" (its image is already there: nothing to build); "skipped" (the
    # constraint does not admit the version); "failed"
    status: str
    summary: str = ""
    report: dict[str, Any] | None = None  # the build report (`builder build --json` result)
    record: dict[str, Any] | None = None  # the release record written, with --record
    error: dict[str, Any] | None = None
    variant: str = "cpu"  # the base image variant of this build
    seconds: float = 0.0


@dataclass
class FleetReport:
    base_version: str
    fleet: str
    results: list[CustomerResult]
    plan_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def failed(self) -> list[CustomerResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        out = {"built": 0, "unchanged": 0, "skipped": 0, "failed": 0}
        for result in self.results:
            out[result.status] = out.get(result.status, 0) + 1
        return out


@dataclass(frozen=True)
class FleetProgress:
    """Where a fleet run stands after one more customer finished (the CLI renders it)."""

    result: CustomerResult  # the customer that just finished
    done: int  # customers finished, of ``total``
    total: int
    counts: Mapping[str, int]  # by status, so far
    builds_done: int  # builds finished (the rate counts these), of ``builds``
    builds: int
    elapsed: float  # seconds since the builds started

    @property
    def rate(self) -> float:
        """Builds per minute so far (0 before the first)."""
        return 60.0 * self.builds_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds until the last build ends at the rate so far (None before the first)."""
        if self.builds_done == self.builds:
            return 0.0
        if not self.builds_done:
            return None
        return (self.builds - self.builds_done) * self.elapsed / self.builds_done


@dataclass(frozen=True)
class _Job:
    customer: str
    location: str
    ref: str
    base_version: str
    settings: Settings
    push: bool
    image_registry: str | None
    base_repository: str | None
    insecure: bool | None
    variant: str = "cpu"
    primary: bool = True  # the customer's first variant
    locked: bool = False  # models from the committed lock (CI's child jobs)

    @property
    def key(self) -> str:
        """The customer, with the variant appended for every variant but its first."""
        return self.customer if self.primary else f"{self.customer} ({self.variant})"


_events: Any = None  # the worker processes' event queue (set by _init_worker)


def _init_worker(events: Any) -> None:
    global _events  # noqa: PLW0603 - one queue per worker process, set once at start
    _events = events


def _build_one(job: _Job) -> dict[str, Any]:
    """Build one customer in a worker process; never raises (the result says what failed)."""

    def on_progress(event: ProgressEvent) -> None:
        if _events is not None and event.stage:  # stages only: bytes would flood the queue
            _events.put(ProgressEvent(stage=event.stage, subject=job.key))

    request = BuildRequest(
        customer=job.location,
        ref=job.ref,
        base_version=job.base_version,
        base_repository=job.base_repository,
        variant=job.variant,
        image_registry=job.image_registry,
        push=job.push,
        insecure=job.insecure,
        locked=job.locked,
        fleet=True,  # a release: the committed lock or nothing, even without --push
    )
    started = time.perf_counter()
    try:
        report = build(request, job.settings, progress=on_progress)
    except BuilderError as exc:
        return {"status": "failed", "error": error_dict(exc), "seconds": _since(started)}
    except Exception as exc:  # one customer's crash must not stop the fleet
        message = f"unexpected {type(exc).__name__}: {exc}"
        return {
            "status": "failed",
            "error": error_fields(type(exc).__name__, message, None, 1),
            "seconds": _since(started),
        }
    return {"status": "built", "report": report.to_dict(), "seconds": _since(started)}


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _run_jobs(
    jobs: list[_Job],
    workers: int,
    on_event: Progress | None,
    on_done: Callable[[str, dict[str, Any]], None],
) -> None:
    """Run the builds in ``workers`` spawned processes (isolated: the ClearML SDK keeps
    process-wide state, and each build has its own main thread for its deadlines);
    ``on_done`` gets each customer's outcome as soon as it is known."""
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
        pending: dict[Future[dict[str, Any]], str] = {
            pool.submit(_build_one, job): job.key for job in jobs
        }
        while pending:
            done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                customer = pending.pop(future)
                try:
                    outcome = future.result()
                except Exception as exc:  # a worker that died (OOM, signal)
                    outcome = {
                        "status": "failed",
                        "error": {
                            "type": type(exc).__name__,
                            "message": f"build worker died: {exc}",
                            "hint": None,
                            "exit_code": 1,
                        },
                    }
                on_done(customer, outcome)
    drain()
    events.close()


def _in_registry(
    items: Sequence[PlanItem], registry: str, insecure: bool | None
) -> dict[str, str | None]:
    """The digest each item's immutable tag points to in ``registry`` (None: not there, or
    the registry could not tell): one manifest HEAD per customer, one client per host."""
    clients: dict[str, RegistryClient | None] = {}
    out: dict[str, str | None] = {}
    for item in items:
        out[item.customer] = None
        ref = parse_reference(_image(item, registry))
        try:
            if ref.registry not in clients:
                clients[ref.registry] = RegistryClient(ref.registry, insecure=insecure)
            client = clients[ref.registry]
            if client is not None and ref.tag:
                out[item.customer] = client.manifest_digest(ref.path, ref.tag)
        except BuilderError:
            clients.setdefault(ref.registry, None)  # the build will say what is wrong
    return out


def _image(item: PlanItem, registry: str) -> str:
    """The item's immutable tag in ``registry``."""
    return f"{registry}/{item.customer}:{(item.image or '').rsplit(':', 1)[-1]}"


def _unchanged(
    items: Sequence[PlanItem],
    *,
    push: bool,
    record: bool,
    registry: str,
    insecure: bool | None,
) -> dict[str, str]:
    """Customers with nothing to build, and why: the immutable tag ``<version>-<config
    rev>`` is already in the registry (rebuilding gives the same digest or is refused), and,
    with ``record``, its release record is written. Without ``push``: what the release
    records say is already released."""
    if not push:
        return {
            i.customer: f"already released: {(i.previous or {}).get('image')}"
            for i in items
            if i.status == "released"
        }
    present = _in_registry(items, registry, insecure)
    out: dict[str, str] = {}
    for item in items:
        digest = present[item.customer]
        if digest is None or (record and item.status != "released"):
            continue  # not there, or there without its release record: build (and record)
        out[item.customer] = f"already in the registry: {_image(item, registry)}@{digest}"
    return out


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
    """Build what changed for every customer whose constraint admits ``base_version``,
    ``jobs`` at a time.

    Incremental: a customer whose immutable tag is already in the registry (with its
    release record, under ``record``) is "unchanged" at the cost of one manifest HEAD;
    ``force`` rebuilds every admitted customer; ``locked`` builds each from its committed
    lock (on ``base_version``). A customer that fails (unreadable
    repository, invalid config, registry error) is reported and the others go on. With
    ``record`` (implies a pushed, stable build) the release records of the successful builds
    are written back, one commit per customer repository for the whole run.
    ``on_event`` gets build stages, ``on_planned`` the plan, ``on_progress`` each finished
    customer with the counts, rate and ETA.
    """
    if record and not push:
        raise ConfigError("--record needs --push: only pushed images get a release record")
    started = time.perf_counter()
    fleet_plan = plan(fleet, settings, base_version, branch=branch)
    if on_planned:
        on_planned(fleet_plan)
    registry = image_registry or settings.image_registry
    candidates = [i for i in fleet_plan.items if i.status in ("rebuild", "released")]
    unchanged = (
        {}
        if force
        else _unchanged(candidates, push=push, record=record, registry=registry, insecure=insecure)
    )
    entries = {e.name: e for e in fleet.entries}
    keys = {e.name: [e.name] for e in fleet.entries}  # one result per variant built
    to_build = [
        _Job(
            customer=item.customer,
            location=entries[item.customer].location,
            ref=item.commit or entries[item.customer].ref,  # what plan saw, even if it moves
            base_version=fleet_plan.base_version,
            settings=settings,
            push=push,
            image_registry=image_registry,
            base_repository=base_repository,
            insecure=insecure,
            variant=variant,
            primary=n == 0,
            locked=locked,
        )
        for item in candidates
        if item.customer not in unchanged
        for n, variant in enumerate(item.variants)
    ]
    jobs_by_key = {job.key: job for job in to_build}
    for job in to_build:
        keys[job.customer] = [j.key for j in to_build if j.customer == job.customer]
    results: dict[str, CustomerResult] = {}
    counts = dict.fromkeys(("built", "unchanged", "skipped", "failed"), 0)
    builds_started = time.perf_counter()
    builds_done = 0

    def finish(result: CustomerResult, *, key: str | None = None, built: bool = False) -> None:
        nonlocal builds_done
        results[key or result.customer] = result
        counts[result.status] = counts.get(result.status, 0) + 1
        builds_done += built
        if on_progress:
            on_progress(
                FleetProgress(
                    result,
                    len(results),
                    len(fleet_plan.items),
                    dict(counts),
                    builds_done,
                    len(to_build),
                    time.perf_counter() - builds_started,
                )
            )

    for item in fleet_plan.items:
        if item.status == "error":
            finish(CustomerResult(item.customer, "failed", item.summary, error=item.error))
        elif item.status == "skip":
            finish(CustomerResult(item.customer, "skipped", item.summary))
        elif item.customer in unchanged:
            finish(CustomerResult(item.customer, "unchanged", unchanged[item.customer]))

    def on_done(key: str, outcome: dict[str, Any]) -> None:
        job = jobs_by_key[key]
        seconds = float(outcome.get("seconds") or 0.0)
        if outcome["status"] != "built":
            error = outcome["error"]
            result = CustomerResult(
                job.customer, "failed", error["message"], error=error, variant=job.variant
            )
        else:
            report = outcome["report"]
            summary = f"{report['image']}@{report['manifest_digest']}"
            result = CustomerResult(
                job.customer, "built", summary, report=report, variant=job.variant
            )
        result.seconds = seconds
        finish(result, key=key, built=True)

    _run_jobs(to_build, jobs, on_event, on_done)
    if record:
        _record_all(results, entries, settings, branch, record_attempts, on_event)
    ordered = [results[key] for e in fleet.entries for key in keys[e.name]]
    return FleetReport(
        base_version=fleet_plan.base_version,
        fleet=str(fleet.path),
        results=ordered,
        plan_seconds=fleet_plan.seconds,
        seconds=_since(started),
    )


def _record_all(
    results: Mapping[str, CustomerResult],
    entries: Mapping[str, FleetEntry],
    settings: Settings,
    branch: str,
    attempts: int,
    on_event: Progress | None,
) -> None:
    """Write the release records of the run's builds: one commit per repository."""
    built = [r for r in results.values() if r.status == "built" and r.report]
    written: dict[tuple[str, str], WriteResult | BuilderError] = {}
    for variant in sorted({r.variant for r in built}):  # per variant: one record per customer
        group = [r for r in built if r.variant == variant]
        outcomes = write_release_records(
            [r.report for r in group if r.report],
            {r.customer: entries[r.customer].location for r in group},
            settings,
            branch=branch,
            attempts=attempts,
        )
        written.update({(customer, variant): o for customer, o in outcomes.items()})
    for result in built:
        outcome = written.get((result.customer, result.variant))
        if isinstance(outcome, WriteResult):
            result.record = asdict(outcome)
            if on_event:
                on_event(
                    ProgressEvent(
                        what=f"recorded {outcome.path} ({outcome.status})", subject=result.customer
                    )
                )
        elif isinstance(outcome, BuilderError):
            result.status, result.error = "failed", error_dict(outcome)
            result.summary = f"built and pushed, but not recorded: {result.error['message']}"
