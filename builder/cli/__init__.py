"""The command line: parse, call one core function, render its result for people or as JSON.

This package is the only place that prints or exits; one module per command family. Core
failures arrive as ``BuilderError`` subclasses and ``main`` turns them into one line on stderr
(or a JSON error document) and an exit code.
"""

from __future__ import annotations

import json
import os
import sys

import click

from builder.cli import audit, base, build, config, fleet, images, models  # noqa: F401  (each module registers its commands)
from builder.cli._common import RESULT_VERSION, _json_mode, cli, mask_secrets
from builder.errors import BuilderError

__all__ = ["build_main", "cli", "main"]

#: Exit code of an unexpected failure (a bug): EX_SOFTWARE from sysexits.h.
INTERNAL_ERROR = 70


def main(argv: list[str] | None = None) -> int:
    """Entry point of `builder`: the one place errors become messages and exit codes."""
    try:
        # Without standalone mode click returns the code of a `ctx.exit(N)` instead of exiting.
        returned = cli.main(args=argv, prog_name="builder", standalone_mode=False)
    except BuilderError as exc:
        return _fail(type(exc).__name__, exc.message, exc.hint, exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except Exception as exc:
        # A bug, not bad input: still one line and a known exit code, never a traceback
        # (which could print file contents or secrets), unless asked for.
        if os.environ.get("BUILDER_DEBUG"):
            raise
        return _fail(
            "InternalError",
            f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
            "this is a bug; please report it (BUILDER_DEBUG=1 shows the traceback)",
            INTERNAL_ERROR,
        )
    return returned if isinstance(returned, int) else 0


def _fail(kind: str, message: str, hint: str | None, exit_code: int) -> int:
    """Render one failure: a line on stderr, or the JSON error document; secrets masked."""
    message = mask_secrets(message)
    hint = mask_secrets(hint) if hint else hint
    if _json_mode.get():
        error = {"type": kind, "message": message, "hint": hint, "exit_code": exit_code}
        document = {"builder_result_version": RESULT_VERSION, "ok": False, "error": error}
        click.echo(json.dumps(document, indent=2, sort_keys=True))
    else:
        click.echo(f"error: {message} ({hint})" if hint else f"error: {message}", err=True)
    return exit_code


def build_main() -> int:
    """Entry point of `build`: the same as `builder build`."""
    return main(["build", *sys.argv[1:]])
