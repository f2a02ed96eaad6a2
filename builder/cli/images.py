"""`builder images`: what the local image store holds, and `builder images prune`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from builder.cli._common import cli, load_cli_settings
from builder.cli.options import cache_dir_option, image_store_option, json_option
from builder.cli.result import Result
from builder.errors import ConfigError


@cli.group(invoke_without_command=True)
@image_store_option
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


@cli.command()
@click.argument("image", required=False)
@click.option(
    "--report",
    "report_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Smoke the image of this `build --json` report (its image at its manifest digest).",
)
@click.option(
    "--timeout",
    default=600,
    show_default=True,
    help="Seconds each container may run before it is killed and the run fails.",
)
@image_store_option
@cache_dir_option
@json_option
def smoke(
    image: str | None, report_file: Path | None, timeout: int, as_json: bool, **overrides: Any
) -> Result:
    """Run IMAGE in the Docker engine (DOCKER_HOST) on a sample slide it generates, and check
    it: the runner exits 0 and writes every analysis's summary.json, made from the image's
    own config, with every feature. No network in the containers.

    IMAGE is taken from the local image store when it is there (what `build` wrote), else the
    engine, else pulled. Without an engine: one line, exit 6.
    """
    from builder.image.store import ImageStore
    from builder.smoke import smoke as run_smoke

    if (image is None) == (report_file is None):
        raise click.UsageError("give IMAGE or --report FILE (one of them)")
    if report_file is not None:
        image = _reported_image(report_file)
    assert image is not None
    report = run_smoke(image, ImageStore(load_cli_settings(overrides).store_dir), timeout=timeout)

    def human() -> None:
        for analysis, features in report.analyses.items():
            click.echo(f"analysis  {analysis}: {', '.join(features)}")
        click.echo(
            f"smoke     {report.image}: passed in {report.seconds:.0f} s (exit 0, image from "
            f"the {report.source}, sample slide {report.slide['size']} px)"
        )

    return Result("smoke", report.to_dict(), human)


def _reported_image(report_file: Path) -> str:
    """``<repository>@<manifest digest>`` of a `build --json` report."""
    from builder.oci import parse_reference

    try:
        result = json.loads(report_file.read_text("utf-8")).get("result") or {}
        image, digest = result["image"], result["manifest_digest"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        raise ConfigError(
            f"{report_file}: not the report of a build (`build --json`)",
            hint="pass the output of `build CUSTOMER --json`",
        ) from None
    return f"{parse_reference(image).repository}@{digest}"
