"""The command line: parse, call one core function, render its result for people or as JSON.

This package is the only place that prints or exits; one module per command family. Each
command returns a :class:`~builder.cli.result.Result`; ``main`` renders it once, and turns a
``BuilderError`` (or a bug) into one line on stderr (or a JSON error document) and an exit code.

Lazy imports, kept for `--help` speed only: the command modules import the core
(builder.pipeline, builder.audit, builder.fleet, builder.cook.stage, ...) inside their command
functions. Measured here, `python -m builder --help` takes 0.4-0.8 s so, and 2.7 s with the core
imported at the top (git, boto3, docker, cryptography, the clearml SDK). What the CLI needs to
parse and render (builder.cli.*, builder.errors, builder.redact, builder.gitauth,
builder.settings) is light and imported at the top.
"""

from __future__ import annotations

import os
import sys

import click

from builder.cli import audit, base, build, config, fleet, images, models  # noqa: F401  (each module registers its commands)
from builder.cli._common import cli
from builder.cli.result import (
    Result,
    debug_mode,
    render,
    render_error,
    render_internal_error,
)
from builder.errors import BuilderError
from builder.redact import remember_url_secrets

__all__ = ["build_main", "cli", "main"]

#: Exit code of an unexpected failure (a bug): EX_SOFTWARE from sysexits.h.
INTERNAL_ERROR = 70


def main(argv: list[str] | None = None) -> int:
    """Entry point of `builder`: the one place results and errors become output and exit codes."""
    args = sys.argv[1:] if argv is None else argv
    remember_url_secrets([*args, *(v for k, v in os.environ.items() if k.startswith("BUILDER_"))])
    try:
        # Without standalone mode click returns what the command returned (its Result), and
        # the code of a `ctx.exit(N)` instead of exiting.
        returned = cli.main(args=args, prog_name="builder", standalone_mode=False)
        return render(returned) if isinstance(returned, Result) else 0
    except BuilderError as exc:
        return render_error(exc)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except Exception as exc:
        if debug_mode.get() or os.environ.get("BUILDER_DEBUG"):
            raise
        return render_internal_error(exc, INTERNAL_ERROR)


def build_main() -> int:
    """Entry point of `build`: the same as `builder build`."""
    return main(["build", *sys.argv[1:]])
