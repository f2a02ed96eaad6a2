"""The command line: parse, call one core function, render its result for people or as JSON.

This is the only module that prints or exits. Core failures arrive as ``BuilderError``
subclasses and are turned into one line on stderr (or a JSON error document) and an exit code
in ``main``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import click

from builder import __version__
from builder.errors import BuilderError

#: Version of every --json document this CLI prints.
RESULT_VERSION = 1

_json_mode: ContextVar[bool] = ContextVar("json_mode", default=False)
F = TypeVar("F", bound=Callable[..., Any])


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        _json_mode.set(True)
    return value


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=_set_json,
    expose_value=True,
    is_eager=True,
    help="Print one versioned JSON document instead of human output.",
)


def emit(command: str, data: Any, human: Callable[[], None]) -> None:
    """Print a result: a JSON envelope in --json mode, else the human rendering."""
    if _json_mode.get():
        doc = {
            "builder_result_version": RESULT_VERSION,
            "command": command,
            "ok": True,
            "result": data,
        }
        click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        human()


def info(message: str) -> None:
    """Progress and notes for people go to stderr, so stdout stays pipeable."""
    if not _json_mode.get():
        click.echo(message, err=True)


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None] | None]:
    """A byte progress callback drawn with rich (bytes, rate, ETA), or None when quiet."""
    if _json_mode.get() or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        yield update


def _settings(overrides: dict[str, Any]) -> Any:
    from builder.settings import load_settings

    return load_settings().with_overrides(**overrides)


def settings_options(func: F) -> F:
    """Options that override builder.toml / BUILDER_* for one call."""
    func = click.option(
        "--model-registry", help="'clearml' or 'local:<folder>' (setting model_registry)."
    )(func)
    func = click.option(
        "--production", help="Production weights store, s3://bucket[/prefix] or file:<folder>."
    )(func)
    func = click.option(
        "--cache-dir",
        type=click.Path(path_type=Path),
        help="Weights and image cache (setting cache_dir).",
    )(func)
    return func


def customer_options(func: F) -> F:
    func = click.argument("customer")(func)
    func = click.option(
        "--ref",
        default="HEAD",
        show_default=True,
        help="Branch, tag or commit of the customer repo to read.",
    )(func)
    func = click.option(
        "--worktree",
        is_flag=True,
        help="Read uncommitted files from the work tree (development only).",
    )(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="builder")
def cli() -> None:
    """Build per-customer inference images from customer config repos, reproducibly.

    CUSTOMER is a folder name under the customers folder (setting `customers`), a path to a
    customer repo or folder, or a git URL. Files are read from git at --ref, never from the
    work tree unless --worktree. Settings come from builder.toml (searched upward from the
    current directory), BUILDER_* environment variables and the options below.
    """


@cli.command()
@customer_options
@settings_options
@json_option
def validate(customer: str, ref: str, worktree: bool, as_json: bool, **overrides: Any) -> None:
    """Check customer.yaml and the analysis YAML against their schemas (no registry calls)."""
    from builder.load import load_customer

    spec = load_customer(customer, _settings(overrides), ref=ref, worktree=worktree)
    data = {
        "customer": spec.customer,
        "commit": spec.commit,
        "base_version": spec.base_version,
        "models": [m.__dict__ for m in spec.models],
    }
    emit(
        "validate",
        data,
        lambda: click.echo(
            f"{spec.customer}: valid at {spec.commit[:12]} ({len(spec.models)} models, base {spec.base_version})"
        ),
    )


@cli.command()
@customer_options
@settings_options
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Write the verbose config to this file instead of stdout.",
)
@click.option(
    "--allow-unpublished", is_flag=True, help="Accept unpublished models (development builds)."
)
@click.option("--locked", is_flag=True, help="Use the committed lock instead of the registry.")
@json_option
def expand(
    customer: str,
    ref: str,
    worktree: bool,
    output: Path | None,
    allow_unpublished: bool,
    locked: bool,
    as_json: bool,
    **overrides: Any,
) -> None:
    """Print the verbose analysis config the runner loads."""
    from builder.cook import cook

    cooked = cook(
        customer,
        _settings(overrides),
        ref=ref,
        worktree=worktree,
        locked=locked,
        allow_unpublished=allow_unpublished,
    )
    text = cooked.verbose_yaml
    if output:
        from builder.fsutil import write_atomic

        write_atomic(output, text)
    for warning in cooked.warnings:
        info(f"warning: {warning}")

    def human() -> None:
        if output:
            click.echo(f"wrote {output}")
        else:
            click.echo(text.decode("utf-8"), nl=False)

    emit(
        "expand",
        {
            "customer": cooked.spec.customer,
            "commit": cooked.spec.commit,
            "config": cooked.verbose,
            "output": str(output) if output else None,
        },
        human,
    )


@cli.command()
@customer_options
@settings_options
@click.option(
    "--check",
    is_flag=True,
    help="Do not write; exit non-zero and list what drifted from the committed lock.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Write the lock here instead of next to customer.yaml.",
)
@click.option(
    "--allow-unpublished", is_flag=True, help="Lock unpublished models (development only)."
)
@click.option(
    "--base-repository",
    help="Base image repository (default: customer.yaml, then setting base_repository).",
)
@click.option(
    "--insecure-registry", is_flag=True, help="Allow plain HTTP to a non-loopback registry."
)
@json_option
def lock(
    customer: str,
    ref: str,
    worktree: bool,
    check: bool,
    output: Path | None,
    allow_unpublished: bool,
    base_repository: str | None,
    insecure_registry: bool,
    as_json: bool,
    **overrides: Any,
) -> None:
    """Pin every input (models, weights sha256, base digest) in customer.lock.yaml."""
    from builder.cook import cook, make_customer_lock
    from builder.fetch import Cache
    from builder.pipeline import try_resolve_base

    settings = _settings(overrides)
    cooked = cook(
        customer, settings, ref=ref, worktree=worktree, allow_unpublished=allow_unpublished
    )
    base, note = try_resolve_base(
        cooked.spec, settings, repository=base_repository, insecure=insecure_registry or None
    )
    if note:
        info(f"note: {note}")
    with progress_bar() as bar:
        result = make_customer_lock(
            cooked,
            Cache(settings.cache_dir / "weights"),
            base=base,
            check=check,
            output=output,
            progress=bar,
        )
    message = f"{cooked.spec.customer}: lock matches" if check else f"wrote {result.path}"
    emit(
        "lock",
        {
            "path": str(result.path) if result.path else None,
            "lock": result.lock,
            "drift": list(result.drift),
        },
        lambda: click.echo(message),
    )


@cli.command()
@customer_options
@settings_options
@click.option(
    "--locked",
    is_flag=True,
    help="Use only the committed lock: no registry calls, pinned base digest.",
)
@click.option(
    "--offline",
    is_flag=True,
    help="Never download weights; use the cache (with --locked: fully offline).",
)
@click.option(
    "--allow-unpublished",
    is_flag=True,
    help="Development build: accept unpublished models (the image label says so).",
)
@click.option(
    "--base-version", help="Build on this base version instead of customer.yaml's (fleet rebuilds)."
)
@click.option(
    "--base-repository",
    help="Base image repository (default: customer.yaml, then setting base_repository).",
)
@click.option(
    "--registry", "image_registry", help="Registry for the image tags (setting image_registry)."
)
@click.option(
    "--push",
    is_flag=True,
    help="Push to the registry: immutable <customer>:<base>-<rev> and moving <customer>:<base>.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite an immutable tag that points elsewhere (reported loudly).",
)
@click.option(
    "--insecure-registry", is_flag=True, help="Allow plain HTTP to a non-loopback registry."
)
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
@click.option("--jobs", default=4, show_default=True, help="Parallel downloads.")
@click.option(
    "--backend",
    type=click.Choice(["oci", "docker"]),
    default="oci",
    show_default=True,
    help="oci: no daemon, reproducible; docker: Dockerfile built by the engine (the familiar path, the benchmark baseline).",
)
@json_option
def build(
    customer: str,
    ref: str,
    worktree: bool,
    locked: bool,
    offline: bool,
    allow_unpublished: bool,
    base_version: str | None,
    base_repository: str | None,
    image_registry: str | None,
    push: bool,
    force: bool,
    insecure_registry: bool,
    oci_layout: Path | None,
    docker_archive: Path | None,
    load: bool,
    jobs: int,
    backend: str,
    as_json: bool,
    **overrides: Any,
) -> None:
    """Build CUSTOMER's image: cook the config, fetch weights, assemble on the base, deliver.

    Without --push/--oci-layout/--docker-archive/--load the image is only assembled into the
    local blob cache and its digest printed (a dry run that still proves reproducibility).
    """
    from dataclasses import asdict

    from builder.pipeline import BuildRequest
    from builder.pipeline import build as run_build

    request = BuildRequest(
        customer=customer,
        ref=ref,
        worktree=worktree,
        locked=locked,
        offline=offline,
        allow_unpublished=allow_unpublished,
        base_version=base_version,
        base_repository=base_repository,
        image_registry=image_registry,
        push=push,
        force=force,
        insecure=True if insecure_registry else None,
        oci_layout=oci_layout,
        docker_archive=docker_archive,
        load=load,
        jobs=jobs,
        backend=backend,
    )
    with progress_bar() as bar:
        report = run_build(
            request, _settings(overrides), progress=bar, on_stage=lambda name: info(f"==> {name}")
        )

    def human() -> None:
        for warning in report.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(f"image     {report.image}")
        click.echo(f"digest    {report.manifest_digest}")
        click.echo(
            f"base      {report.base['repository']}:{report.base['version']}@{report.base['digest']}"
        )
        click.echo(f"config    {report.config_commit}")
        for layer in report.layers:
            if layer.new:
                click.echo(
                    f"layer     {layer.name:<20} {layer.size:>12,} B  {layer.push or 'built'}"
                )
        click.echo(
            f"uploaded  {report.bytes_uploaded:,} B   downloaded {report.bytes_downloaded:,} B"
        )
        for kind, where in report.outputs.items():
            click.echo(f"{kind:<9} {where}")
        if report.development:
            click.echo("DEVELOPMENT BUILD: unpublished models; not for release", err=True)

    emit("build", asdict(report), human)


@cli.command()
@click.argument("model_id")
@click.option(
    "--bucket",
    "production",
    help="Production store (s3://bucket[/prefix] or file:<folder>); setting production.",
)
@click.option("--model-registry", help="'clearml' or 'local:<folder>' (setting model_registry).")
@click.option(
    "--dry-run", is_flag=True, help="Verify and show what would be copied; change nothing."
)
@json_option
def publish(
    model_id: str, production: str | None, model_registry: str | None, dry_run: bool, as_json: bool
) -> None:
    """Promote MODEL_ID to production: copy its weights under <task id>/, verify, mark published.

    Refuses a model whose training task did not complete, and never overwrites production
    weights. Safe to re-run: a finished publish changes nothing, an interrupted one completes.
    """
    from dataclasses import asdict

    from builder.publish import publish as run_publish
    from builder.registries import open_registry

    settings = _settings({"production": production, "model_registry": model_registry})
    with progress_bar() as bar:
        result = run_publish(
            model_id,
            open_registry(settings.model_registry),
            settings.production,
            dry_run=dry_run,
            base=settings.root,
            progress=bar,
        )

    def human() -> None:
        for f in result.files:
            click.echo(f"{f.action:<10} {f.name}  {f.size:,} B  sha256 {f.sha256}")
        if dry_run:
            click.echo(f"dry run: nothing changed ({result.destination})")
        else:
            state = "marked published" if result.marked_published else "was already published"
            click.echo(f"{result.model_id}: weights verified at {result.destination}; {state}")

    emit("publish", asdict(result), human)


@cli.group()
def models() -> None:
    """Look up models in the registry."""


@models.command("list")
@click.option("--project", help="Only models of this project (id).")
@click.option("--published", is_flag=True, default=None, help="Only published models.")
@click.option("--model-registry", help="'clearml' or 'local:<folder>' (setting model_registry).")
@click.option("--production", help="Production store to check presence in (setting production).")
@json_option
def models_list(
    project: str | None,
    published: bool | None,
    model_registry: str | None,
    production: str | None,
    as_json: bool,
) -> None:
    """List models with id, name, task, published state and production presence."""
    from builder.publish import production_presence
    from builder.registries import open_registry
    from builder.storage import open_store

    settings = _settings({"model_registry": model_registry, "production": production})
    registry = open_registry(settings.model_registry)
    store = open_store(settings.production, settings.root) if settings.production else None
    rows = []
    for m in registry.list_models(project=project, published=published):
        presence = (
            production_presence(store, m.task) if store else {"in_production": None, "files": 0}
        )
        rows.append(
            {
                "id": m.id,
                "name": m.name,
                "task": m.task,
                "published": m.ready,
                "project": m.project,
                **presence,
            }
        )

    def human() -> None:
        click.echo(f"{'ID':<36}  {'NAME':<24} {'TASK':<32}  PUBLISHED  IN PRODUCTION")
        for r in rows:
            click.echo(
                f"{r['id']:<36}  {r['name'][:24]:<24} {r['task']:<32}  "
                f"{'yes' if r['published'] else 'no':<9}  {'yes' if r['in_production'] else 'no'}"
            )

    emit("models list", {"models": rows}, human)


@cli.command()
@click.argument("name", required=False)
@json_option
def schema(name: str | None, as_json: bool) -> None:
    """Print a JSON Schema (customer, analysis-short, analysis-verbose); no NAME lists them."""
    from builder import yamldoc

    if name is None:
        names = yamldoc.schema_names()
        emit("schema", {"schemas": names}, lambda: click.echo("\n".join(names)))
        return
    document = yamldoc.schema(name)
    emit("schema", document, lambda: click.echo(json.dumps(document, indent=2)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `builder`: the one place errors become messages and exit codes."""
    try:
        cli.main(args=argv, prog_name="builder", standalone_mode=False)
    except BuilderError as exc:
        if _json_mode.get():
            error = {
                "type": type(exc).__name__,
                "message": exc.message,
                "hint": exc.hint,
                "exit_code": exc.exit_code,
            }
            click.echo(
                json.dumps(
                    {"builder_result_version": RESULT_VERSION, "ok": False, "error": error},
                    indent=2,
                    sort_keys=True,
                )
            )
        else:
            click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


def build_main() -> int:
    """Entry point of `build`: the same as `builder build`."""
    return main(["build", *sys.argv[1:]])
