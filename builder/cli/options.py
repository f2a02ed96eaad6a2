"""Options that more than one command takes, defined once so names, defaults and help agree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from builder.cli.result import current_command, json_mode
from builder.settings import refuse_credentials

F = TypeVar("F", bound=Callable[..., Any])

REF_HELP = "Branch, tag or commit of the customer repo to read."


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        json_mode.set(True)
        current_command.set(ctx.command_path.partition(" ")[2])
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

insecure_registry_option = click.option(
    "--insecure-registry", is_flag=True, help="Allow plain HTTP to a non-loopback registry."
)


def _no_credentials(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return refuse_credentials(value, param.opts[0])


base_repository_option = click.option(
    "--base-repository",
    callback=_no_credentials,
    help="Base image repository (default: customer.yaml, then setting base_repository).",
)

image_registry_option = click.option(
    "--registry",
    "image_registry",
    callback=_no_credentials,
    help="Registry for the image tags (setting image_registry; no credentials in it: they "
    "come from `docker login`).",
)

cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    help="Weights and image cache (setting cache_dir).",
)

image_store_option = click.option(
    "--image-store",
    type=click.Path(path_type=Path, file_okay=False),
    help="The local image store folder (setting image_store; default <cache_dir>/oci).",
)

worktree_option = click.option(
    "--worktree",
    is_flag=True,
    help="Read uncommitted files from the work tree (development only).",
)


def ref_option(help: str = REF_HELP) -> Callable[[F], F]:
    """--ref: the revision of the customer repository to read (HEAD by default)."""
    return click.option("--ref", default="HEAD", show_default=True, help=help)


def report_option(help: str) -> Callable[[F], F]:
    """--report FILE: also write the command's JSON document to a file."""
    return click.option("--report", type=click.Path(path_type=Path), help=help)


def settings_options(func: F) -> F:
    """Options that override builder.toml / BUILDER_* for one call."""
    func = click.option(
        "--model-registry", help="'clearml' or 'local:<folder>' (setting model_registry)."
    )(func)
    func = click.option(
        "--production", help="Production weights store, s3://bucket[/prefix] or file:<folder>."
    )(func)
    return cache_dir_option(func)


def customer_options(func: F) -> F:
    """CUSTOMER, --ref and --worktree: which customer configuration to read, and from where.
    Without --ref, what is on disk: the work tree when the folder has uncommitted changes."""
    func = click.argument("customer")(func)
    func = click.option(
        "--ref",
        help=f"{REF_HELP} Default: what is on disk (uncommitted edits included, said so), "
        "else HEAD.",
    )(func)
    return worktree_option(func)
