"""`builder images`: what the local image store holds, and `builder images prune`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from builder.cli._common import cli, load_cli_settings
from builder.cli.options import cache_dir_option, json_option
from builder.cli.result import Result


@cli.group(invoke_without_command=True)
@click.option(
    "--image-store",
    type=click.Path(path_type=Path, file_okay=False),
    help="The local image store folder (setting image_store; default <cache_dir>/oci).",
)
@cache_dir_option
@json_option
@click.pass_context
def images(ctx: click.Context, /, as_json: bool, **overrides: Any) -> Result | None:
    """The local image store (setting image_store): base and customer images, by name.

    Without a subcommand: list them (name, manifest digest). `builder base build` and every
    `build CUSTOMER` write here; builds find their base here with no registry.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = overrides
        return None
    from builder.image.store import ImageStore

    store = ImageStore(load_cli_settings(overrides).store_dir)
    listed = store.images()

    def human() -> None:
        click.echo(f"store     {store.root}")
        if not listed:
            click.echo("(empty: run `builder base build`, then `build CUSTOMER`)")
        for image in listed:
            click.echo(f"{image.digest[:19]}  {image.reference}")

    return Result(
        "images",
        {"store": str(store.root), "images": [asdict(i) for i in listed]},
        human,
        notes=tuple(store.blobs.repairs),
    )


@images.command("prune")
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@click.option(
    "--wait",
    default=60.0,
    show_default=True,
    help="Seconds to wait for running builds to release the store.",
)
@json_option
@click.pass_context
def images_prune(ctx: click.Context, /, dry_run: bool, wait: float, as_json: bool) -> Result:
    """Remove every blob no named image references (the tags are what is kept)."""
    from builder.image.store import ImageStore

    store = ImageStore(load_cli_settings(ctx.obj or {}).store_dir)
    report = store.prune(dry_run=dry_run, wait=wait)

    def human() -> None:
        verb = "would remove" if dry_run else "removed"
        click.echo(
            f"{verb} {report.blobs_removed} blobs ({report.bytes_removed:,} B); kept "
            f"{report.blobs_kept} blobs of {report.images} named images in {store.root}"
        )

    return Result(
        "images prune",
        {"store": str(store.root), **asdict(report)},
        human,
        notes=tuple(store.blobs.repairs),
    )


@images.command("verify")
@json_option
@click.pass_context
def images_verify(ctx: click.Context, /, as_json: bool) -> Result:
    """Hash every blob of the store in full; remove the bad ones and name the images that
    lack a blob now (the next build fetches or builds it again). Exit 10 when anything was
    wrong, like `builder verify`."""
    from builder.errors import AUDIT_FAILED
    from builder.image.store import ImageStore

    store = ImageStore(load_cli_settings(ctx.obj or {}).store_dir)
    report = store.verify()

    def human() -> None:
        click.echo(
            f"checked {report.blobs_checked} blobs ({report.bytes_checked:,} B) in {store.root}: "
            + ("all sound" if report.ok else f"{len(report.removed)} removed")
        )
        for line in report.removed:
            click.echo(f"removed   {line}")
        for reference in report.incomplete:
            click.echo(f"incomplete {reference} (build it again, or `builder base build`)")

    return Result(
        "images verify",
        {"store": str(store.root), "ok": report.ok, **asdict(report)},
        human,
        exit_code=0 if report.ok else AUDIT_FAILED,
    )
