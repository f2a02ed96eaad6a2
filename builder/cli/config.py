"""Config commands: validate, expand, lock, schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from builder.cli._common import cli, info, load_cli_settings, progress_bar
from builder.cli.options import (
    base_repository_option,
    customer_options,
    insecure_registry_option,
    json_option,
    settings_options,
)
from builder.cli.result import Result
from builder.fsutil import write_atomic


@cli.command()
@customer_options
@settings_options
@base_repository_option
@insecure_registry_option
@json_option
def validate(
    customer: str,
    ref: str | None,
    worktree: bool,
    base_repository: str | None,
    insecure_registry: bool,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """Check customer.yaml and the analysis YAML against their schemas, their consistency, the
    model files their params name and the runner contract of the base image they resolve to,
    listing every problem at file:line in one run.

    Reads what is on disk (uncommitted edits included, and said so) unless --ref names a
    revision. No model registry call: model ids are checked for their form (32 hex digits or
    a dashed UUID) and, when the committed lock is current, the models' plug-ins and files
    are checked from it; `builder lock --check` asks the registry.
    """
    from builder.pipeline import validate_customer

    result = validate_customer(
        customer,
        load_cli_settings(overrides),
        ref=ref,
        worktree=worktree,
        base_repository=base_repository,
        insecure=insecure_registry or None,
    )
    spec = result.spec
    for note in result.notes:
        info(f"note: {note}")
    models = (
        "model ids not checked against a registry; models checked from the lock"
        if result.models_from == "lock"
        else "model ids not checked against a registry"
    )
    data = {
        "customer": spec.customer,
        "commit": spec.commit,
        "uncommitted": list(spec.uncommitted),
        "base_version": spec.base_version,
        "models": [m.__dict__ for m in spec.models],
        "registry_checked": False,
        "models_from": result.models_from,
        "contract": result.contract_info,
        "notes": list(result.notes),
    }
    checked = (
        f"runner contract of {result.contract_info['source']} checked"
        if result.contract_info["checked"]
        else "runner contract NOT checked"
    )
    return Result(
        "validate",
        data,
        lambda: click.echo(
            f"{spec.customer}: valid {_revision(spec)} ({len(spec.models)} models, "
            f"base {spec.base_version}; {checked}; {models})"
        ),
    )


def _revision(spec: Any) -> str:
    """Which revision was read: ``at <commit>``, or the work tree (its HEAD, or no commit yet)."""
    from builder.cook.load import UNCOMMITTED

    if spec.worktree:
        if spec.commit == UNCOMMITTED:
            return "in the work tree (nothing committed yet)"
        return f"in the work tree (uncommitted changes; HEAD {spec.commit[:12]})"
    return f"at {spec.commit[:12]}"


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
    ref: str | None,
    worktree: bool,
    output: Path | None,
    allow_unpublished: bool,
    locked: bool,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """Print the verbose analysis config the runner loads, as the image carries it (each
    registry model's weights named ``production:<task id>/<model id>/``, whatever the
    production store's spelling), of what is on disk (uncommitted edits included and said
    so) unless --ref names a revision."""
    from builder.cook.stage import cook

    cooked = cook(
        customer,
        load_cli_settings(overrides),
        ref=ref,
        worktree=worktree,
        locked=locked,
        allow_unpublished=allow_unpublished,
    )
    text = cooked.located.verbose_yaml
    if output:
        write_atomic(output, text)
    for warning in cooked.warnings:
        info(f"warning: {warning}")

    def human() -> None:
        if output:
            click.echo(f"wrote {output}")
        else:
            click.echo(text.decode("utf-8"), nl=False)

    return Result(
        "expand",
        {
            "customer": cooked.spec.customer,
            "commit": cooked.spec.commit,
            "uncommitted": list(cooked.spec.uncommitted),
            "config": cooked.located.verbose,
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
@base_repository_option
@insecure_registry_option
@json_option
def lock(
    customer: str,
    ref: str | None,
    worktree: bool,
    check: bool,
    output: Path | None,
    allow_unpublished: bool,
    base_repository: str | None,
    insecure_registry: bool,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """Pin every input (models, weights sha256, base digest) in customer.lock.yaml.

    Reads what is on disk (uncommitted edits included, and said so) unless --ref names a
    revision; refuses a config whose params name a model file the model does not have, or
    that the runner contract of the base refuses.
    """
    from builder.pipeline import lock_customer

    with progress_bar() as bar:
        result = lock_customer(
            customer,
            load_cli_settings(overrides),
            ref=ref,
            worktree=worktree,
            check=check,
            output=output,
            allow_unpublished=allow_unpublished,
            base_repository=base_repository,
            insecure=insecure_registry or None,
            progress=bar,
        )
    for note in result.warnings:
        info(f"note: {note}")
    message = f"{result.lock.customer}: lock matches" if check else f"wrote {result.path}"
    return Result(
        "lock",
        {
            "path": str(result.path) if result.path else None,
            "lock": result.lock.to_dict(),
            "drift": list(result.drift),
            "notes": list(result.warnings),
        },
        lambda: click.echo(message),
    )


@cli.command()
@click.argument("name", required=False)
@json_option
def schema(name: str | None, as_json: bool) -> Result:
    """Print a JSON Schema (customer, analysis-short, analysis-verbose); no NAME lists them."""
    from builder import yamldoc

    if name is None:
        names = yamldoc.schema_names()
        return Result("schema", {"schemas": names}, lambda: click.echo("\n".join(names)))
    document = yamldoc.schema(name)
    return Result("schema", document, lambda: click.echo(json.dumps(document, indent=2)))


@cli.command()
@click.argument("customer")
@click.option(
    "--model",
    "-m",
    "models",
    multiple=True,
    required=True,
    metavar="ID-OR-NAME",
    help="A registry model: its id, an id prefix (8+ characters) or its name "
    "(`builder models list`). Repeat for each model; each gets the feature it feeds.",
)
@click.option(
    "--path",
    type=click.Path(path_type=Path, file_okay=False),
    help="The new customer folder (default: CUSTOMER in the customers folder); a folder in no "
    "git repository is `git init`ed (the customer's own repository).",
)
@click.option(
    "--base-version",
    help="customer.yaml's base_image.version (default: ~=X.Y of base-image/VERSION).",
)
@click.option(
    "--variant",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="customer.yaml's base_image.variant: the base image the customer runs on.",
)
@click.option("--analysis", default="main", show_default=True, help="The analysis name.")
@click.option(
    "--fleet",
    "fleet_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The fleet file to add the customer to (default: fleet.yaml in the customers folder).",
)
@click.option("--no-fleet", is_flag=True, help="Do not add the customer to a fleet file.")
@click.option(
    "--repo-url",
    help="The fleet entry's repo when the customer has its own repository (a git URL, no "
    "credentials); default: the folder, relative to the fleet file.",
)
@base_repository_option
@settings_options
@json_option
def init(
    customer: str,
    models: tuple[str, ...],
    path: Path | None,
    base_version: str | None,
    variant: str,
    analysis: str,
    fleet_file: Path | None,
    no_fleet: bool,
    repo_url: str | None,
    base_repository: str | None,
    as_json: bool,
    **overrides: Any,
) -> Result:
    """Start a new customer: customer.yaml, analysis.yaml and its fleet entry.

    The models are picked from the model registry; the features are a skeleton from the
    runner contract of the base image the customer builds on (the feature each model feeds;
    the runner's parameter defaults as comments). Nothing is overwritten. The new files are
    not committed: `validate`, `lock` and `build` read them with --worktree until they are
    (the closing lines list the commands, up to a pushed, recorded, verified release).
    """
    from dataclasses import asdict

    from builder.scaffold import InitRequest, init_customer

    result = init_customer(
        InitRequest(
            customer=customer,
            models=models,
            path=path,
            base_version=base_version,
            variant=variant,
            analysis=analysis,
            fleet=fleet_file,
            add_to_fleet=not no_fleet,
            repo_url=repo_url,
            base_repository=base_repository,
        ),
        load_cli_settings(overrides),
    )
    for note in result.notes:
        info(f"note: {note}")

    def human() -> None:
        if result.git_init:
            click.echo(f"initialised a git repository in {result.folder}")
        for written in result.files:
            click.echo(f"wrote     {written}")
        if result.fleet:
            click.echo(f"added     {customer} (repo {result.fleet_repo}) to {result.fleet}")
        for m in result.models:
            click.echo(f"model     {m.slot}: {m.model_id} ({m.name}) -> {m.feature} ({m.role})")
        click.echo(f"features  from {result.contract}")
        click.echo("next (the files are not committed yet: --worktree reads them):")
        for step in result.next_steps:
            click.echo(f"  {step}")

    return Result("init", asdict(result), human)
