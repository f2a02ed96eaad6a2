"""What every command shares: the group (with --debug), notes and progress on stderr, settings."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from builder import __version__
from builder.cli.result import debug_mode, json_mode
from builder.contracts import ProgressEvent
from builder.redact import mask_secrets
from builder.settings import Settings, load_settings


def info(message: str) -> None:
    """Progress and notes for people go to stderr, so stdout stays pipeable."""
    if not json_mode.get():
        click.echo(mask_secrets(message), err=True)


@contextmanager
def progress_bar() -> Iterator[Callable[[ProgressEvent], None] | None]:
    """A progress callback drawn with rich (bytes, rate, ETA; a line per build stage), or
    None when quiet."""
    if json_mode.get() or not sys.stderr.isatty():
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

        def update(event: ProgressEvent) -> None:
            if event.stage:
                info(f"==> {event.stage}")
                return
            if event.what not in tasks:
                tasks[event.what] = bar.add_task(event.what, total=event.total)
            bar.update(tasks[event.what], completed=event.done, total=event.total)

        yield update


def load_cli_settings(overrides: dict[str, Any]) -> Settings:
    """builder.toml and BUILDER_* with this call's command-line overrides."""
    return load_settings().with_overrides(**overrides)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        debug_mode.set(True)
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="builder")
@click.option(
    "--debug",
    is_flag=True,
    callback=_set_debug,
    expose_value=False,
    is_eager=True,
    help="Show the traceback of an internal error (same as BUILDER_DEBUG=1).",
)
def cli() -> None:
    """Build per-customer inference images from customer config repos, reproducibly.

    CUSTOMER is a folder name under the customers folder (setting `customers`), a path to a
    customer repo or folder, or a git URL. `build` reads git at --ref (HEAD), never the work
    tree unless --worktree; validate, expand and lock read what is on disk (saying so when it
    differs from HEAD) unless --ref names a revision. Settings come from builder.toml
    (searched upward from the current directory), BUILDER_* environment variables and the
    options below.
    """
