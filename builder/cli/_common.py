"""What every command shares: the group (with --debug), notes and progress on stderr, settings."""

from __future__ import annotations

import sys
import time
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


class StageLines:
    """Progress for logs (CI, pipes): each stage event as one line on stderr with the seconds
    since the start, also under --json (stdout keeps the one JSON document); a long transfer
    (bytes of a total) as a line every :attr:`EVERY` seconds and when it completes."""

    EVERY = 15.0

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._seen: dict[str, tuple[float, bool]] = {}  # transfer -> (last line, any line yet)

    def _line(self, text: str) -> None:
        seconds = time.monotonic() - self._start
        click.echo(mask_secrets(f"[{seconds:6.1f} s] {text}"), err=True)

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage:
            self._line(event.stage)
            return
        if event.total <= 0 or event.what in ("build", "wheelhouse"):
            return  # counted steps: their stage lines say it
        now = time.monotonic()
        last, shown = self._seen.setdefault(event.what, (now, False))
        finished = event.done >= event.total
        if (finished and shown) or (not finished and now - last >= self.EVERY):
            share = event.done / event.total
            self._line(f"{event.what}: {_size(event.done)} of {_size(event.total)} ({share:.0%})")
            self._seen[event.what] = (now, True)
        if finished:  # short transfers (under EVERY seconds) get no line at all
            self._seen.pop(event.what, None)


def _size(count: int) -> str:
    """``512 kB``, ``1,234 MB``, ``3.09 GB``."""
    if count >= 10**9:
        return f"{count / 1e9:.2f} GB"
    return f"{count / 1e6:,.0f} MB" if count >= 10**6 else f"{count / 1e3:,.0f} kB"


@contextmanager
def long_work_progress() -> Iterator[Callable[[ProgressEvent], None] | None]:
    """Progress of long work (minutes) that must never look stuck: bars on a terminal,
    :class:`StageLines` elsewhere (CI logs), also with --json."""
    if sys.stderr.isatty() and not json_mode.get():
        with progress_bar() as bar:
            yield bar
    else:
        yield StageLines()


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
