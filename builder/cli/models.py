"""Model commands: publish, models list."""

from __future__ import annotations

import click

from builder.cli._common import cli, load_cli_settings, progress_bar
from builder.cli.options import json_option
from builder.cli.result import Result


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
) -> Result:
    """Promote MODEL_ID to production: copy its weights under <task id>/<model id>/, verify,
    mark published.

    Refuses a model whose training task did not complete, and never overwrites production
    weights. Safe to re-run: a finished publish changes nothing, an interrupted one completes.
    """
    from dataclasses import asdict

    from builder.cook.registries.opener import open_registry
    from builder.publish import publish as run_publish

    settings = load_cli_settings({"production": production, "model_registry": model_registry})
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

    return Result("publish", asdict(result), human)


@cli.group()
def models() -> None:
    """Look up models in the registry."""


@models.command("list")
@click.option("--project", help="Only models of this project (full name or id).")
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
) -> Result:
    """List models (all pages, archived ones left out) with id, name, project, task, published
    state and production presence. Reads no model designs."""
    from builder.cook.registries.opener import open_registry
    from builder.cook.storage import open_store
    from builder.publish import production_presence

    settings = load_cli_settings({"model_registry": model_registry, "production": production})
    registry = open_registry(settings.model_registry)
    store = open_store(settings.production, settings.root) if settings.production else None
    rows = []
    for m in registry.list_models(project=project, published=published):
        presence = (
            production_presence(store, m.task, m.id)
            if store and m.task
            else {"in_production": None if store is None else False, "files": 0}
        )
        rows.append(
            {
                "id": m.id,
                "name": m.name,
                "task": m.task,
                "task_deleted": m.task_deleted,
                "published": m.ready,
                "project": m.project_name,
                "project_id": m.project,
                **presence,
            }
        )

    def human() -> None:
        click.echo(
            f"{'ID':<32}  {'NAME':<24} {'PROJECT':<20} {'TASK':<32}  PUBLISHED  IN PRODUCTION"
        )
        for r in rows:
            task = f"{r['task']}{' (deleted)' if r['task_deleted'] else ''}"
            click.echo(
                f"{r['id']:<32}  {r['name'][:24]:<24} {(r['project'] or r['project_id'] or '')[:20]:<20} "
                f"{task:<32}  {'yes' if r['published'] else 'no':<9}  "
                f"{'yes' if r['in_production'] else 'no'}"
            )

    return Result("models list", {"models": rows}, human)
