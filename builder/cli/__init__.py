"""The command line: parse, call one core function, render its result for people or as JSON.

This package is the only place that prints or exits; one module per command family. Core
failures arrive as ``BuilderError`` subclasses and ``main`` turns them into one line on stderr
(or a JSON error document) and an exit code.
"""

from __future__ import annotations

import json
import sys

import click

from builder.cli import audit, base, build, config, fleet, images, models  # noqa: F401  (each module registers its commands)
from builder.cli._common import RESULT_VERSION, _json_mode, cli
from builder.errors import BuilderError

__all__ = ["build_main", "cli", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `builder`: the one place errors become messages and exit codes."""
    try:
        # Without standalone mode click returns the code of a `ctx.exit(N)` instead of exiting.
        returned = cli.main(args=argv, prog_name="builder", standalone_mode=False)
    except BuilderError as exc:
        if _json_mode.get():
            error = {
                "type": type(exc).__name__,
                "message": exc.message,
                "hint": exc.hint,
                "exit_code": exc.exit_code,
            }
            click.echo(
                json.dumps(
                    {"builder_result_version": RESULT_VERSION, "ok": False, "error": error},
                    indent=2,
                    sort_keys=True,
                )
            )
        else:
            click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return returned if isinstance(returned, int) else 0


def build_main() -> int:
    """Entry point of `build`: the same as `builder build`."""
    return main(["build", *sys.argv[1:]])
