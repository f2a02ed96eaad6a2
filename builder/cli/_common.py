"""What every command shares: the group, output (human or versioned JSON), progress, options."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import click

from builder import __version__
from builder.settings import Settings

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


#: Environment variables whose names say they hold a secret; their values never get printed.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """Text fit to print: no user:password@ or query values in URLs, and no value of a
    secret-named environment variable (tokens, AWS and ClearML secret keys)."""
    from builder.load import redact_url

    text = redact_url(text)
    for name, value in os.environ.items():
        if len(value) >= 6 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "[MASKED]")
    return text


def info(message: str) -> None:
    """Progress and notes for people go to stderr, so stdout stays pipeable."""
    if not _json_mode.get():
        click.echo(mask_secrets(message), err=True)


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


def load_cli_settings(overrides: dict[str, Any]) -> Settings:
    """builder.toml and BUILDER_* with this call's command-line overrides."""
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
