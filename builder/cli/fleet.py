"""Fleet commands: plan a base release, build every customer it reaches, record what shipped."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from builder.cli._common import cli, info, load_cli_settings
from builder.cli.options import (
    image_registry_option,
    insecure_registry_option,
    json_option,
    report_option,
    settings_options,
)
from builder.cli.result import Result
from builder.contracts import ProgressEvent
from builder.errors import BuilderError, ConfigError, FleetError
from builder.fsutil import write_atomic
from builder.gitauth import git_credentials
from builder.redact import mask_secrets

if TYPE_CHECKING:
    from builder.documents.build_report import BuildReport
    from builder.fleet.build_all import FleetProgress, FleetReport
    from builder.fleet.plan import FleetPlan


def _fleet_options(func: Any) -> Any:
    func = click.option(
        "--only",
        "only",
        multiple=True,
        metavar="NAME",
        help="Only this customer of the fleet (repeatable).",
    )(func)
    func = click.option(
        "--fleet",
        "fleet_file",
        type=click.Path(path_type=Path),
        help="The fleet file (default: fleet.yaml in the customers folder).",
    )(func)
    func = click.option(
        "--base-version",
        required=True,
        help="The released base image version, e.g. 2.5.0.",
    )(func)
    return func


@cli.command()
@_fleet_options
@settings_options
@click.option(
    "--gitlab-child",
    type=click.Path(path_type=Path),
    help="Also write the GitLab child pipeline (one job per customer to rebuild) to this file.",
)
@click.option("--ci-image", help="Image for the child pipeline's jobs (default: the runner's).")
@report_option("Also write the JSON result to this file.")
@json_option
def plan(
    base_version: str,
    fleet_file: Path | None,
    only: tuple[str, ...],
    gitlab_child: Path | None,
    ci_image: str | None,
    report: Path | None,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """Which customers a base release reaches, and what their new image changes.

    One line per image (a customer on one base variant, e.g. `customer-x (gpu)`): rebuild
    (first release, base only, config too), already released, or skipped. Reads each
    customer's repository and its images' last release records (git only: no model registry
    calls, only what changed since the last plan) and lists each base repository's tags once.
    It also says, before anything is built, what a release build would refuse: a missing or
    stale lock, a variant with no base of this version; and customer folders the fleet file
    does not list. Exit 0 when every image could be planned and none would be refused (also
    when none admits the version), 8 otherwise (they are listed; the others are planned).
    """
    from builder.fleet.fleetfile import load_fleet
    from builder.fleet.plan import plan

    settings = load_cli_settings(overrides)
    with git_credentials():
        fleet = load_fleet(fleet_file, settings).select(only)
        result = plan(fleet, settings, base_version)
    data = asdict(result)
    if gitlab_child is not None:
        data["gitlab_child"] = _write_gitlab_child(result, fleet.path, gitlab_child, ci_image)
    for item in result.items:
        for warning in item.warnings:
            click.echo(f"warning: {warning}", err=True)
    # Printed even when some customers failed (in one JSON document), then the error.
    human = partial(_show_plan, result)
    return Result("plan", data, human, error=_plan_error(result), report=report)


def _write_gitlab_child(
    result: FleetPlan, fleet_path: Path, target: Path, ci_image: str | None
) -> dict[str, str]:
    """Write the GitLab child pipeline of a plan; where it went and its sha256."""
    from builder.fleet.gitlab import render_child_pipeline

    text = render_child_pipeline(result, fleet_file=_relative(fleet_path), image=ci_image)
    write_atomic(target, text.encode())
    info(f"wrote {target}")
    return {"path": str(target), "sha256": _sha256(text.encode())}


def _show_plan(result: FleetPlan) -> None:
    """A plan for people: a summary line, then one line per image with its details."""
    from builder.fleet.plan import PlanStatus

    released = f", {len(result.released)} already released" if result.released else ""
    blocked = f", {len(result.blocked)} would be refused" if result.blocked else ""
    click.echo(
        f"base {result.base_version}: {len(result.rebuild)} of {len(result.items)} "
        f"images to rebuild{released}{blocked} ({_count(result.customers, 'customer')}, "
        f"{result.fleet})"
    )
    width = max((len(i.name) for i in result.items), default=8)
    pad = f"  {'':<{width}}  {'':<10}  {'':<8}"
    for item in result.items:
        constraint = item.constraint or "-"
        status = "ERROR" if item.status == PlanStatus.ERROR else item.status
        click.echo(f"  {item.name:<{width}}  {constraint:<10}  {status:<8}  {item.summary}")
        if item.changed_files:
            click.echo(f"{pad}  changed: {', '.join(item.changed_files)}")
        for warning in item.warnings:
            click.echo(f"{pad}  WARNING: {warning}")
        for problem in item.problems:
            click.echo(f"{pad}  REFUSED: {problem}")
    for note in result.notes:
        click.echo(note)


def _plan_error(result: FleetPlan) -> FleetError | None:
    """The error of a plan with images that could not be planned or would be refused."""
    parts = []
    if result.errors:
        names = ", ".join(i.name for i in result.errors)
        parts.append(
            f"{len(result.errors)} of {len(result.items)} images could not be planned: {names}"
        )
    if result.blocked:
        names = ", ".join(i.name for i in result.blocked)
        parts.append(
            f"{len(result.blocked)} of {len(result.items)} images would be refused: {names}"
        )
    if not parts:
        return None
    return FleetError("; ".join(parts), hint="see each image's line above; the others are planned")


def _relative(path: Path) -> str:
    """A path relative to the working directory when it is below it (CI job scripts)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@cli.command("build-all")
@_fleet_options
@settings_options
@click.option("--jobs", default=2, show_default=True, help="Customers built at the same time.")
@click.option("--push", is_flag=True, help="Push each image (immutable and moving tag).")
@click.option(
    "--record",
    is_flag=True,
    help="After each pushed build, commit its release record to the customer repository.",
)
@image_registry_option
@click.option("--base-repository", help="Base image repository (default: each customer's).")
@insecure_registry_option
@click.option(
    "--force",
    is_flag=True,
    help="Rebuild every admitted customer, also those whose image is already in the registry.",
)
@click.option(
    "--locked",
    is_flag=True,
    help="Build each customer from its committed lock (pinned models and weights; the base "
    "is --base-version): a stale lock fails that customer. CI's child jobs use it.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Plan and show what would be built, pushed and recorded where; build nothing.",
)
@click.option(
    "--yes",
    "-y",
    is_flag=True,
    help="With --record: do not ask for confirmation (never asked without a terminal).",
)
@report_option("Also write the JSON report to this file.")
@json_option
def build_all(
    base_version: str,
    fleet_file: Path | None,
    only: tuple[str, ...],
    jobs: int,
    push: bool,
    record: bool,
    image_registry: str | None,
    base_repository: str | None,
    insecure_registry: bool,
    report: Path | None,
    as_json: bool,
    force: bool = False,
    locked: bool = False,
    dry_run: bool = False,
    yes: bool = False,
    **overrides: Any,
) -> Result:
    """Build every image (customer x variant) whose base constraint admits --base-version,
    in parallel.

    Incremental, per image: one whose immutable tag is already in the registry, with its
    release record under --record, is left alone at the cost of one manifest HEAD (a variant
    never built is built); --force rebuilds them all. Progress (a counter of images, the
    recent pace and an ETA once known) goes to stderr, also with --json: a live line on a
    terminal, in CI logs one line per build and per failure. One image's failure does not
    stop the others; all results are reported at the end and the exit code is 8 if any
    image failed. With --record it first says which repository and branch each record is
    pushed to, and on a terminal asks before it builds (--yes skips; --dry-run shows it all
    and writes nothing), as `builder release-record` does.
    """
    from builder.fleet.build_all import build_all
    from builder.fleet.fleetfile import load_fleet

    _check_build_all_options(jobs=jobs, push=push, record=record)
    settings = load_cli_settings(overrides)
    with git_credentials():
        fleet = load_fleet(fleet_file, settings).select(only)
        targets = _record_targets(fleet) if record else {}
    _tell_record_targets(targets, dry_run=dry_run)
    if dry_run:
        return _build_all_dry_run(
            fleet,
            settings,
            base_version,
            push=push,
            targets=targets,
            registry=image_registry,
            report=report,
        )
    if targets and not yes and _interactive(as_json):
        _confirm_records(len(targets))
    progress = FleetProgressLine(live=sys.stderr.isatty())
    try:
        with git_credentials():
            result = build_all(
                fleet,
                settings,
                base_version,
                jobs=jobs,
                push=push,
                record=record,
                image_registry=image_registry,
                base_repository=base_repository,
                insecure=True if insecure_registry else None,
                force=force,
                locked=locked,
                on_event=progress.stage,
                on_planned=progress.planned,
                on_progress=progress.finished,
            )
    finally:
        progress.close()
    return Result(
        "build-all",
        asdict(result),
        partial(_show_fleet_report, result),
        error=_fleet_error(result),
        report=report,
    )


def _check_build_all_options(*, jobs: int, push: bool, record: bool) -> None:
    """Usage errors of `build-all` that click's option types do not catch."""
    if jobs < 1:
        raise click.BadParameter("must be at least 1", param_hint="--jobs")
    if record and not push:
        raise click.UsageError("--record needs --push: only pushed images get a release record")


def _confirm_records(repositories: int) -> None:
    """Ask before a build that pushes release records (abort on no)."""
    click.confirm(
        f"build, push and push release records to {repositories} repositor"
        f"{'y' if repositories == 1 else 'ies'} (branch {_releases_branch()})?",
        abort=True,
    )


def _fleet_error(result: FleetReport) -> FleetError | None:
    """The error of a fleet run in which some images failed (None: all built or unchanged)."""
    if not result.failed:
        return None
    names = ", ".join(r.name for r in result.failed)
    return FleetError(
        f"{len(result.failed)} of {len(result.results)} images failed: {names}",
        hint="each failure is listed in the report",
    )


def _releases_branch() -> str:
    """The branch release records go to."""
    from builder.record import RELEASES_BRANCH

    return RELEASES_BRANCH


def _interactive(as_json: bool) -> bool:
    """Whether to ask before writing: a terminal on both ends, and no --json."""
    return sys.stdin.isatty() and sys.stderr.isatty() and not as_json


def _tell_record_targets(targets: dict[str, list[str]], *, dry_run: bool) -> None:
    """Say where each customer's release records will be (or would be) pushed."""
    for remote, customers in targets.items():
        info(
            f"{'would record' if dry_run else 'records go to'} {remote} branch "
            f"{_releases_branch()} ({', '.join(customers)})"
        )


def _show_fleet_report(result: FleetReport) -> None:
    """A fleet run for people: one line per image (with upload, base and record), then the
    counts."""
    from builder.fleet.build_all import ImageStatus

    width = max((len(r.name) for r in result.results), default=8)
    for item in result.results:
        status = "FAILED" if item.status == ImageStatus.FAILED else item.status
        click.echo(f"{item.name:<{width}}  {status:<7}  {item.summary}")
        if item.report:
            base = item.report.base
            click.echo(
                f"{'':<{width}}  {'':<7}  uploaded {item.report.bytes_uploaded:,} B, "
                f"base {base['version']}@{base['digest'][:19]}"
            )
        if item.record:
            click.echo(f"{'':<{width}}  {'':<7}  record {item.record.path} ({item.record.status})")
    counts = result.counts()
    click.echo(
        f"{counts['built']} built, {counts['unchanged']} unchanged, "
        f"{counts['skipped']} skipped, {counts['failed']} failed of {len(result.results)} "
        f"images in {_duration(result.seconds)} (plan {result.plan_seconds:.1f} s)"
    )


def _count(n: int, noun: str) -> str:
    """``1 customer``, ``2 customers``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _record_targets(fleet: Any) -> dict[str, list[str]]:
    """Where each customer's release records are pushed: remote -> customers (secrets masked)."""
    from builder.record import record_remote

    targets: dict[str, list[str]] = {}
    for entry in fleet.entries:
        targets.setdefault(mask_secrets(record_remote(entry.location)), []).append(entry.name)
    return targets


def _build_all_dry_run(
    fleet: Any,
    settings: Any,
    base_version: str,
    *,
    push: bool,
    targets: dict[str, list[str]],
    registry: str | None,
    report: Path | None,
) -> Result:
    """`build --all --dry-run`: the plan, and where each build would go; nothing written."""
    from builder.fleet.plan import PlanStatus, plan
    from builder.record import RELEASES_BRANCH

    with git_credentials():
        result = plan(fleet, settings, base_version, image_registry=registry)
    remote_of = {name: remote for remote, names in targets.items() for name in names}
    items: list[dict[str, Any]] = []
    for item in result.items:
        rebuild = item.status == PlanStatus.REBUILD
        items.append(
            {
                "customer": item.customer,
                "variant": item.variant,
                "name": item.name,
                "status": item.status,
                "summary": item.summary,
                "image": item.image if rebuild else None,
                "push": push and rebuild,
                "record": remote_of.get(item.customer) if rebuild else None,
            }
        )

    def human() -> None:
        width = max((len(i["name"]) for i in items), default=8)
        for i in items:
            if i["image"]:
                action = "would build and push" if i["push"] else "would build"
                line = f"{i['name']:<{width}}  {action} {i['image']}"
                if i["record"]:
                    line += f", record on {i['record']} branch {RELEASES_BRANCH}"
            else:
                line = f"{i['name']:<{width}}  {i['status']}: {i['summary']}"
            click.echo(line)
        click.echo("dry run: nothing built, pushed or recorded")

    data = {"dry_run": True, "base_version": result.base_version, "items": items}
    return Result("build-all", data, human, report=report)


def _duration(seconds: float) -> str:
    """``42 s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class FleetProgressLine:
    """Fleet progress on stderr, also under --json (stdout keeps the one JSON document):
    on a terminal one live line (counter, pace, ETA, the latest stage); elsewhere (CI logs)
    one line per build and per failure with the same counter, and nothing per stage."""

    def __init__(self, *, live: bool) -> None:
        self.live = live
        self.shown = False  # a live line is on screen
        self.counter = ""

    def _write(self, text: str, *, keep: bool) -> None:
        if self.live:
            click.echo(f"\r\x1b[2K{text}", err=True, nl=keep)
            self.shown = not keep
        else:
            click.echo(text, err=True)

    def planned(self, plan: FleetPlan) -> None:
        """Show the plan's one line: how many images to rebuild, released, refused, unreadable."""
        released = f", {len(plan.released)} already released" if plan.released else ""
        blocked = f", {len(plan.blocked)} would be refused" if plan.blocked else ""
        self._write(
            f"planned {_count(len(plan.items), 'image')} of {_count(plan.customers, 'customer')} in "
            f"{plan.seconds:.1f} s: {len(plan.rebuild)} to rebuild{released}{blocked}, "
            f"{len(plan.errors)} unreadable",
            keep=True,
        )

    def stage(self, event: ProgressEvent) -> None:
        """Show a build's current stage on the live line (nothing in logs, to keep them short)."""
        if self.live and event.stage:
            self._write(f"{self.counter}  {event.subject}: {event.stage}", keep=False)

    def finished(self, progress: FleetProgress) -> None:
        """One line per build and per failure (and the last), with the counts, the recent
        pace and the ETA once they are known; images with nothing to build only count."""
        counts = progress.counts
        rate = "" if progress.rate is None else f", {progress.rate:.1f}/min"
        eta = "" if progress.eta is None else f", ETA {_duration(progress.eta)}"
        self.counter = (
            f"[{progress.done}/{progress.total}] {counts['built']} built, "
            f"{counts['unchanged']} unchanged, {counts['failed']} failed{rate}{eta}"
        )
        result = progress.result
        if progress.built or result.status == "failed":
            took = f" in {_duration(result.seconds)}" if result.seconds else ""
            line = f"{self.counter} | {result.name} {result.status}{took}"
            if result.status == "failed":
                line += f": {result.summary}"
        elif progress.done == progress.total:
            line = self.counter
        else:  # unchanged or skipped: counted, not a line of its own
            if self.live:
                self._write(self.counter, keep=False)
            return
        keep = not self.live or result.status == "failed" or progress.done == progress.total
        self._write(line if keep else self.counter, keep=keep)

    def close(self) -> None:
        """End the live line so that what follows starts on a fresh line."""
        if self.live and self.shown:
            click.echo("", err=True)
            self.shown = False


def _reports(report_file: Path) -> list[BuildReport]:
    """The build reports of pushed builds in a `build --json` or `build-all --json` document
    (or a bare report), each read through its type (ConfigError naming the file)."""
    from builder.documents.build_report import BuildReport

    try:
        document = json.loads(report_file.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{report_file}: not a JSON build report: {exc}") from None
    if isinstance(document, dict) and "result" in document and "builder_result_version" in document:
        document = document["result"]
    found: list[tuple[str, Any]] = []
    if isinstance(document, dict) and "results" in document:
        found = [
            (f"{report_file}: results[{n}].report", r["report"])
            for n, r in enumerate(document["results"])
            if r.get("status") == "built" and r.get("report")
        ]
    elif isinstance(document, dict) and "manifest_digest" in document:
        found = [(str(report_file), document)]
    reports = [BuildReport.from_dict(data, where) for where, data in found]
    if not reports:
        raise ConfigError(
            f"{report_file}: no successful build in this report",
            hint="pass the output of `builder build --push --json` or `builder build-all --json`",
        )
    return reports


@cli.command("release-record")
@click.option(
    "--report",
    "report_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    required=True,
    help="A `build --json` or `build-all --json` report of pushed release builds.",
)
@click.option(
    "--repo",
    help="The customer repository (path or git URL; default: the customer's fleet entry).",
)
@click.option(
    "--fleet",
    "fleet_file",
    type=click.Path(path_type=Path),
    help="Fleet file to find the customer's repository in (default: fleet.yaml in customers).",
)
@click.option(
    "--branch", default="ivd-releases", show_default=True, help="Branch holding the records."
)
@click.option("--attempts", default=5, show_default=True, help="Push attempts before giving up.")
@click.option(
    "--dry-run", is_flag=True, help="Check and show where each record would go; write nothing."
)
@click.option(
    "--yes",
    "-y",
    is_flag=True,
    help="Do not ask for confirmation (never asked without a terminal).",
)
@settings_options
@json_option
def release_record(
    report_file: Path,
    repo: str | None,
    fleet_file: Path | None,
    branch: str,
    attempts: int,
    dry_run: bool,
    yes: bool,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """Commit the release record of each pushed build in REPORT to its customer repository.

    The record (releases/<customer>/<base version>-<config rev>.yaml on the releases branch)
    says which config commit, models and base image the image was built from. A push rejected
    because another job wrote first is retried on top of the new head; nothing is forced.
    """
    from builder.fleet.fleetfile import load_fleet
    from builder.record import record_remote

    reports = _reports(report_file)
    settings = load_cli_settings(overrides)
    with git_credentials():
        locations: dict[str, str] = {}
        fleet = None
        for build_report in reports:
            location = repo
            if location is None:
                fleet = fleet or load_fleet(fleet_file, settings)
                location = fleet.entry(build_report.customer).location
            locations[build_report.customer] = location
            target = mask_secrets(record_remote(location))
            info(
                f"{'would record' if dry_run else 'recording'} {build_report.image} "
                f"on {target} branch {branch}"
            )
        if _interactive(as_json) and not (yes or dry_run):
            click.confirm(f"push {len(reports)} release record(s) to {branch}?", abort=True)
        outcomes = _write_records(
            reports, locations, settings, branch=branch, attempts=attempts, dry_run=dry_run
        )
    failures = [o for o in outcomes if isinstance(o, BuilderError)]
    if failures:
        raise failures[0]
    written = [asdict(o) for o in outcomes if not isinstance(o, BuilderError)]

    def human() -> None:
        for item in written:
            click.echo(
                f"{item['status']:<8} {item['path']} on {item['remote']} {item['branch']} "
                f"({item['commit'][:12]})"
            )

    return Result("release-record", {"records": written}, human)


def _write_records(
    reports: list[BuildReport],
    locations: dict[str, str],
    settings: Any,
    *,
    branch: str,
    attempts: int,
    dry_run: bool,
) -> list[Any]:
    """Write (or with ``dry_run`` check) each report's record: a dry run checks one by one
    (the target has the commit, the record is new); a write makes one commit per customer
    repository for all the report's records. Per report: what was written, or why not."""
    from builder.record import write_release_record, write_release_records

    if not dry_run:
        return list(
            write_release_records(reports, locations, settings, branch=branch, attempts=attempts)
        )
    outcomes: list[Any] = []
    for build_report in reports:
        try:
            outcomes.append(
                write_release_record(
                    build_report,
                    locations[build_report.customer],
                    settings,
                    branch=branch,
                    attempts=attempts,
                    dry_run=True,
                )
            )
        except BuilderError as exc:
            outcomes.append(exc)
    return outcomes
