"""One result and error path: commands return a :class:`Result`, ``main`` renders it once.

Like pypa/build's ``_handle_build_error`` and pipx's ``result.py``: a command never prints its
outcome nor exits; it returns what happened, and :func:`render` prints it for people or as the
versioned JSON envelope (always with ``command``), writes the --report copy, and gives the exit
code. A failure the core raised (a :class:`~builder.errors.BuilderError`) or a bug is rendered
by :func:`render_error` the same way. Secrets are masked here, in one place: every string of
a result's data, every line its human form prints, every note and error.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import click

from builder.errors import BuilderError, error_dict, error_fields
from builder.fsutil import write_atomic
from builder.redact import mask_secrets

#: Version of every --json document this CLI prints.
RESULT_VERSION = 1

json_mode: ContextVar[bool] = ContextVar("json_mode", default=False)
#: --debug (or BUILDER_DEBUG): an internal error shows its traceback.
debug_mode: ContextVar[bool] = ContextVar("debug_mode", default=False)
#: The command being run ("build", "base build"), for the error document.
current_command: ContextVar[str | None] = ContextVar("current_command", default=None)


@dataclass(frozen=True)
class Result:
    """What a command did: its data, how people see it, and how it ends.

    ``error`` is a partial failure (a fleet with failed customers): the result is printed in
    full, then the error, and its exit code is the process's. ``exit_code`` alone is a check
    that failed (explain, verify): the whole finding is printed, then the process exits with it.
    """

    command: str
    data: Any
    human: Callable[[], None]
    error: BuilderError | None = None
    exit_code: int = 0
    notes: tuple[str, ...] = ()  # lines for stderr after the human output
    report: Path | None = None  # also write the JSON document to this file


def envelope(command: str | None, data: Any = None, error: dict[str, Any] | None = None) -> str:
    """The versioned JSON document: ``result`` when there is one, ``error`` when it failed."""
    doc: dict[str, Any] = {"builder_result_version": RESULT_VERSION, "command": command}
    doc["ok"] = error is None
    if data is not None or error is None:
        doc["result"] = data
    if error is not None:
        doc["error"] = error
    return json.dumps(doc, indent=2, sort_keys=True, default=str)


def render(result: Result) -> int:
    """Write --report, print the result (human or --json), then its error; the exit code."""
    error = error_dict(result.error) if result.error is not None else None
    data = masked(result.data)
    if result.report is not None:
        write_atomic(result.report, (envelope(result.command, data, error) + "\n").encode())
    if json_mode.get():
        click.echo(envelope(result.command, data, error))
    else:
        _print_masked(result.human)
        for note in result.notes:
            click.echo(mask_secrets(note), err=True)
        if error is not None:
            _error_line(error)
    return error["exit_code"] if error is not None else result.exit_code


def masked(data: Any) -> Any:
    """``data`` with every string in it (keys too) passed through :func:`mask_secrets`."""
    if isinstance(data, str):
        return mask_secrets(data)
    if isinstance(data, dict):
        return {masked(k): masked(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [masked(v) for v in data]
    return data


class _Recorder(io.TextIOBase):
    """Stands in for stdout or stderr: keeps each write, in order across both."""

    def __init__(self, writes: list[tuple[bool, str]], err: bool, real: TextIO) -> None:
        super().__init__()
        self._writes, self._err, self._real = writes, err, real

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # a text stream (click probes with b"" to tell)
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._writes.append((self._err, text))
        return len(text)

    def isatty(self) -> bool:
        return self._real.isatty()

    # What click asks before it writes text here as it is (else it wraps the stream).
    encoding = "utf-8"
    errors = "strict"


def _print_masked(human: Callable[[], None]) -> None:
    """Run a result's human form, then print what it wrote (stdout and stderr, in order) with
    secrets masked: a command's human output never has to remember to mask."""
    writes: list[tuple[bool, str]] = []
    with (
        contextlib.redirect_stdout(_Recorder(writes, False, sys.stdout)),
        contextlib.redirect_stderr(_Recorder(writes, True, sys.stderr)),
    ):
        human()
    for err, text in writes:
        click.echo(mask_secrets(text), err=err, nl=False)


def render_error(exc: BuilderError) -> int:
    """A failure the core raised: one line on stderr, or the JSON error document."""
    return _fail(error_dict(exc))


def render_internal_error(exc: Exception, exit_code: int) -> int:
    """A bug, not bad input: still one line and a known exit code, never a traceback (which
    could print file contents or secrets)."""
    text = " ".join(str(exc).split())[:300]
    message = f"internal error: {type(exc).__name__}: {text}; rerun with --debug for the traceback"
    return _fail(error_fields("InternalError", message, None, exit_code))


def _fail(error: dict[str, Any]) -> int:
    if json_mode.get():
        click.echo(envelope(current_command.get(), error=error))
    else:
        _error_line(error)
    return int(error["exit_code"])


def _error_line(error: dict[str, Any]) -> None:
    message, hint = error["message"], error["hint"]
    click.echo(f"error: {message} ({hint})" if hint else f"error: {message}", err=True)
