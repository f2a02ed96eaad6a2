"""`build`: the main job."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from builder.cli._common import cli, info, load_cli_settings, progress_bar
from builder.cli.fleet import build_all
from builder.cli.options import (
    base_repository_option,
    image_registry_option,
    insecure_registry_option,
    json_option,
    report_option,
    settings_options,
    worktree_option,
)
from builder.cli.result import Result
from builder.contracts import ProgressEvent

if TYPE_CHECKING:
    from builder.documents.build_report import BuildReport
    from builder.pipeline import BuildRequest


class PlainProgress:
    """Progress for logs (CI, pipes): one line per stage when it ends, with the files and
    bytes it handled and its seconds, like docker's ``--progress=plain``."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self._stage: str | None = None
        self._start = 0.0
        self._items: dict[str, int] = {}

    def stage(self, name: str) -> None:
        """End the current stage (writing its line) and start the stage ``name``."""
        self.close()
        self._stage, self._start, self._items = name, time.monotonic(), {}
        self._write(f"==> {name}")

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage:
            self.stage(event.stage)
        else:
            self._items[event.what] = max(self._items.get(event.what, 0), event.done)

    def close(self) -> None:
        """Print the summary line of the stage in progress (if any)."""
        if self._stage is None:
            return
        seconds = time.monotonic() - self._start
        count, size = len(self._items), sum(self._items.values())
        self._write(
            f"--> {self._stage}: {count} file{'s' if count != 1 else ''}, {size:,} B, "
            f"{seconds:.1f} s"
        )
        self._stage = None


@cli.command()
@click.argument("customer", required=False)
@click.option(
    "--ref",
    help="Branch, tag or commit of the customer repo to build (default HEAD; a release of "
    "HEAD, not named, refuses uncommitted changes in the customer folder).",
)
@worktree_option
@settings_options
@click.option(
    "--all",
    "all_customers",
    is_flag=True,
    help="Every customer of the fleet file whose constraint admits --base-version (same as `builder build-all`).",
)
@click.option(
    "--fleet", "fleet_file", type=click.Path(path_type=Path), help="With --all: the fleet file."
)
@click.option(
    "--only",
    multiple=True,
    metavar="NAME",
    help="With --all: only this customer of the fleet (repeatable).",
)
@click.option(
    "--record", is_flag=True, help="With --all: commit a release record after each pushed build."
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="With --all: plan and show what would be built, pushed and recorded where.",
)
@click.option("--yes", "-y", is_flag=True, help="With --all --record: do not ask for confirmation.")
@report_option("Also write the JSON result to this file.")
@click.option(
    "--locked",
    is_flag=True,
    help="Use only the committed lock: pinned models and base digest (from the local image "
    "store when it holds it: no registry call).",
)
@click.option(
    "--offline",
    is_flag=True,
    help="Never download weights nor ask a registry for the base: the weights cache and the "
    "local image store only (with --locked: fully offline).",
)
@click.option(
    "--allow-unpublished",
    is_flag=True,
    help="Development build: accept unpublished models (the image label says so).",
)
@click.option(
    "--allow-unlocked",
    is_flag=True,
    help="Development build: push with no committed customer.lock.yaml (the image label says "
    "so; no release record). Without it a release build (--push, --all) refuses, exit 7.",
)
@click.option(
    "--base-version", help="Build on this base version instead of customer.yaml's (fleet rebuilds)."
)
@base_repository_option
@click.option(
    "--variant",
    type=click.Choice(["cpu", "gpu"]),
    help="Base image variant to build on (default: the first of customer.yaml's "
    "base_image.variant; gpu bases live in <base repository>-gpu).",
)
@image_registry_option
@click.option(
    "--push",
    is_flag=True,
    help="Push to the registry: immutable <customer>:<base>-<rev> and moving <customer>:<base>.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite an immutable tag that points elsewhere (reported loudly); with --all: "
    "rebuild every customer, also those whose image is already there.",
)
@insecure_registry_option
@click.option(
    "--oci-layout",
    type=click.Path(path_type=Path),
    help="Also write the image into this OCI image layout folder.",
)
@click.option(
    "--docker-archive",
    type=click.Path(path_type=Path),
    help="Also write a tar that `docker load` reads.",
)
@click.option(
    "--load", is_flag=True, help="Load the image into the local Docker engine (DOCKER_HOST)."
)
@click.option(
    "--jobs",
    default=2,
    show_default=True,
    help="Parallel downloads (with --all: customers built at once).",
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="BUILDER_SIGN_KEY",
    help="PEM ECDSA P-256 private key: sign the provenance attestation (DSSE envelope); "
    "password in BUILDER_SIGN_KEY_PASSWORD. Env: BUILDER_SIGN_KEY.",
)
@click.option(
    "--backend",
    type=click.Choice(["oci", "docker"]),
    default="oci",
    show_default=True,
    help="oci: no daemon, reproducible; docker: Dockerfile built by the engine (the familiar path, the benchmark baseline).",
)
@json_option
@click.pass_context
def build(
    ctx: click.Context,
    /,
    customer: str | None,
    ref: str | None,
    worktree: bool,
    all_customers: bool,
    fleet_file: Path | None,
    only: tuple[str, ...],
    record: bool,
    dry_run: bool,
    yes: bool,
    report: Path | None,
    locked: bool,
    offline: bool,
    allow_unpublished: bool,
    allow_unlocked: bool,
    base_version: str | None,
    base_repository: str | None,
    variant: str | None,
    image_registry: str | None,
    push: bool,
    force: bool,
    insecure_registry: bool,
    oci_layout: Path | None,
    docker_archive: Path | None,
    load: bool,
    jobs: int,
    sign_key: Path | None,
    backend: str,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """Build CUSTOMER's image: cook the config, fetch weights, assemble on the base, deliver.

    Every build lands in the local image store (setting image_store; `builder images` lists
    it); --push, --load, --oci-layout and --docker-archive send it further. The base image
    comes from the registry, else the local store (`builder base build` fills it).
    With --all --base-version V: every customer of the fleet that admits V, --jobs at a time.
    """
    if all_customers:
        return _build_fleet(ctx, customer, base_version)
    if not customer:
        raise click.UsageError("missing CUSTOMER (or --all --base-version V for the whole fleet)")
    _refuse_options(ctx, _FLEET_ONLY, "goes with --all only")

    from builder.pipeline import BuildRequest

    request = BuildRequest(
        customer=customer,
        ref=ref,
        worktree=worktree,
        locked=locked,
        offline=offline,
        allow_unpublished=allow_unpublished,
        allow_unlocked=allow_unlocked,
        base_version=base_version,
        base_repository=base_repository,
        variant=variant,
        image_registry=image_registry,
        push=push,
        force=force,
        insecure=True if insecure_registry else None,
        oci_layout=oci_layout,
        docker_archive=docker_archive,
        load=load,
        jobs=jobs,
        backend=backend,
        sign_key=sign_key,
    )
    built = _run_build(request, overrides, as_json=as_json)
    human = partial(_show_build, built, customer, dirty=worktree)
    return Result("build", built.to_dict(), human, report=report)


def _run_build(request: BuildRequest, overrides: dict[str, Any], *, as_json: bool) -> BuildReport:
    """Run the build with its progress: a bar on a terminal, one line per stage in logs
    (none with --json, whose stdout is the document)."""
    from builder.pipeline import build as run_build

    plain = None if as_json or sys.stderr.isatty() else PlainProgress(info)
    with progress_bar() as bar:
        try:
            return run_build(request, load_cli_settings(overrides), progress=plain or bar)
        finally:
            if plain:
                plain.close()


def _build_fleet(ctx: click.Context, customer: str | None, base_version: str | None) -> Result:
    """`build --all`: the checks of its options, then `build-all` with the options it takes."""
    if customer or not base_version:
        raise click.UsageError("--all takes no CUSTOMER and needs --base-version")
    _refuse_options(ctx, _SINGLE_ONLY, "does not go with --all (see `builder build-all --help`)")
    fleet_result: Result = ctx.invoke(
        build_all,
        **{name: value for name, value in ctx.params.items() if name in _FLEET_PARAMS},
    )
    return fleet_result


def _show_build(built: BuildReport, customer: str, *, dirty: bool) -> None:
    """A build for people: warnings, then the image, its base, config, new layers, bytes and
    where it went (how to push it when it was not pushed)."""
    for warning in built.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"image     {built.image}")
    click.echo(f"digest    {built.manifest_digest}")
    click.echo(
        f"base      {built.base['repository']}:{built.base['version']}@{built.base['digest']}"
    )
    click.echo(f"config    {built.config_commit}")
    for layer in built.layers:
        if layer.new:
            click.echo(f"layer     {layer.name:<20} {layer.size:>12,} B  {layer.push or 'built'}")
    resumed = f" (+{built.bytes_resumed:,} B resumed)" if built.bytes_resumed else ""
    click.echo(
        f"uploaded  {built.bytes_uploaded:,} B   downloaded {built.bytes_downloaded:,} B{resumed}"
    )
    for kind, where in built.outputs.items():
        click.echo(f"{kind:<9} {where}")
    if "registry" not in built.outputs:
        for line in not_pushed_lines(
            built.image, built.manifest_digest, customer, built.outputs, dirty=dirty
        ):
            click.echo(line)
    if built.development:
        click.echo("DEVELOPMENT BUILD (see the warnings above): not for release", err=True)


#: `build` options that `builder build-all` takes too: `build --all` passes them on.
_FLEET_PARAMS = frozenset(
    {p.name for p in build_all.params if p.name} - {"customer", "all_customers"}
)
#: Options of one customer's build that a fleet build does not take.
_SINGLE_ONLY = (
    "ref", "worktree", "offline", "allow_unpublished", "allow_unlocked", "variant", "oci_layout",
    "docker_archive", "load", "sign_key", "backend",
)  # fmt: skip
#: Options that only a fleet build takes.
_FLEET_ONLY = ("fleet_file", "only", "record", "dry_run", "yes")


def _refuse_options(ctx: click.Context, names: tuple[str, ...], why: str) -> None:
    """A UsageError for the first of ``names`` given on the command line: ``<flag> <why>``."""
    for param in ctx.command.params:
        given = ctx.get_parameter_source(param.name or "") == click.core.ParameterSource.COMMANDLINE
        if param.name in names and given:
            raise click.UsageError(f"{param.opts[0] if param.opts else param.name} {why}")


def not_pushed_lines(
    image: str,
    digest: str,
    customer: str | None,
    outputs: Mapping[str, str] | None = None,
    *,
    dirty: bool = False,
) -> list[str]:
    """Say plainly where a build without --push went, and how to send it on: only the ways
    it has not gone yet, and no push for a --worktree build (it cannot be pushed)."""
    name = customer or "CUSTOMER"
    outputs = outputs or {}
    places = {
        "docker": "the Docker engine",
        "oci_layout": f"the OCI layout {outputs.get('oci_layout')}",
        "docker_archive": f"the archive {outputs.get('docker_archive')}",
    }
    sent = [where for key, where in places.items() if key in outputs]
    lines = [
        f"built, not pushed: {image}@{digest} is in the local image store"
        + (f" and {', '.join(sent)}" if sent else " only")
    ]
    if dirty:
        lines.append(
            "  push:   a --worktree (-dirty) build cannot be pushed: commit, then "
            f"build {name} --push"
        )
    else:
        lines.append(
            f"  push:   build {name} --push      (same inputs, same digest; --registry HOST to choose)"
        )
    if "docker" not in outputs:
        lines.append(f"  load:   build {name} --load      (into the Docker engine at DOCKER_HOST)")
    if "oci_layout" not in outputs and "docker_archive" not in outputs:
        lines.append(f"  export: build {name} --oci-layout DIR  or  --docker-archive FILE")
    return lines
