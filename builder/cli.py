"""The command line: parse, call one core function, render its result for people or as JSON.

This is the only module that prints or exits. Core failures arrive as ``BuilderError``
subclasses and are turned into one line on stderr (or a JSON error document) and an exit code
in ``main``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import click

from builder import __version__
from builder.errors import BuilderError

#: Version of every --json document this CLI prints.
RESULT_VERSION = 1

_json_mode: ContextVar[bool] = ContextVar("json_mode", default=False)
F = TypeVar("F", bound=Callable[..., Any])


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        _json_mode.set(True)
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=_set_json, expose_value=True, is_eager=True, help="Print one versioned JSON document instead of human output.")


def emit(command: str, data: Any, human: Callable[[], None]) -> None:
    """Print a result: a JSON envelope in --json mode, else the human rendering."""
    if _json_mode.get():
        doc = {"builder_result_version": RESULT_VERSION, "command": command, "ok": True, "result": data}
        click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        human()


def info(message: str) -> None:
    """Progress and notes for people go to stderr, so stdout stays pipeable."""
    if not _json_mode.get():
        click.echo(message, err=True)


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None] | None]:
    """A byte progress callback drawn with rich (bytes, rate, ETA), or None when quiet."""
    if _json_mode.get() or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        yield update


def _settings(overrides: dict[str, Any]) -> Any:
    from builder.settings import load_settings

    return load_settings().with_overrides(**overrides)


def settings_options(func: F) -> F:
    """Options that override builder.toml / BUILDER_* for one call."""
    func = click.option("--model-registry", help="'clearml' or 'local:<folder>' (setting model_registry).")(func)
    func = click.option("--production", help="Production weights store, s3://bucket[/prefix] or file:<folder>.")(func)
    func = click.option("--cache-dir", type=click.Path(path_type=Path), help="Weights and image cache (setting cache_dir).")(func)
    return func


def customer_options(func: F) -> F:
    func = click.argument("customer")(func)
    func = click.option("--ref", default="HEAD", show_default=True, help="Branch, tag or commit of the customer repo to read.")(func)
    func = click.option("--worktree", is_flag=True, help="Read uncommitted files from the work tree (development only).")(func)
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


@cli.command()
@customer_options
@settings_options
@json_option
def validate(customer: str, ref: str, worktree: bool, as_json: bool, **overrides: Any) -> None:
    """Check customer.yaml and the analysis YAML against their schemas (no registry calls)."""
    from builder.load import load_customer

    spec = load_customer(customer, _settings(overrides), ref=ref, worktree=worktree)
    data = {"customer": spec.customer, "commit": spec.commit, "base_version": spec.base_version, "models": [m.__dict__ for m in spec.models]}
    emit("validate", data, lambda: click.echo(f"{spec.customer}: valid at {spec.commit[:12]} ({len(spec.models)} models, base {spec.base_version})"))


@cli.command()
@customer_options
@settings_options
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the verbose config to this file instead of stdout.")
@click.option("--allow-unpublished", is_flag=True, help="Accept unpublished models (development builds).")
@click.option("--locked", is_flag=True, help="Use the committed lock instead of the registry.")
@json_option
def expand(customer: str, ref: str, worktree: bool, output: Path | None, allow_unpublished: bool, locked: bool, as_json: bool, **overrides: Any) -> None:
    """Print the verbose analysis config the runner loads."""
    from builder.cook import cook

    cooked = cook(customer, _settings(overrides), ref=ref, worktree=worktree, locked=locked, allow_unpublished=allow_unpublished)
    text = cooked.verbose_yaml
    if output:
        from builder.fsutil import write_atomic

        write_atomic(output, text)
    for warning in cooked.warnings:
        info(f"warning: {warning}")

    def human() -> None:
        if output:
            click.echo(f"wrote {output}")
        else:
            click.echo(text.decode("utf-8"), nl=False)

    emit("expand", {"customer": cooked.spec.customer, "commit": cooked.spec.commit, "config": cooked.verbose, "output": str(output) if output else None}, human)


@cli.command()
@customer_options
@settings_options
@click.option("--check", is_flag=True, help="Do not write; exit non-zero and list what drifted from the committed lock.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the lock here instead of next to customer.yaml.")
@click.option("--allow-unpublished", is_flag=True, help="Lock unpublished models (development only).")
@click.option("--base-repository", help="Base image repository (default: customer.yaml, then setting base_repository).")
@click.option("--insecure-registry", is_flag=True, help="Allow plain HTTP to a non-loopback registry.")
@json_option
def lock(customer: str, ref: str, worktree: bool, check: bool, output: Path | None, allow_unpublished: bool, base_repository: str | None, insecure_registry: bool, as_json: bool, **overrides: Any) -> None:
    """Pin every input (models, weights sha256, base digest) in customer.lock.yaml."""
    from builder.cook import cook, make_customer_lock
    from builder.fetch import Cache
    from builder.pipeline import try_resolve_base

    settings = _settings(overrides)
    cooked = cook(customer, settings, ref=ref, worktree=worktree, allow_unpublished=allow_unpublished)
    base, note = try_resolve_base(cooked.spec, settings, repository=base_repository, insecure=insecure_registry or None)
    if note:
        info(f"note: {note}")
    with progress_bar() as bar:
        result = make_customer_lock(cooked, Cache(settings.cache_dir / "weights"), base=base, check=check, output=output, progress=bar)
    message = f"{cooked.spec.customer}: lock matches" if check else f"wrote {result.path}"
    emit("lock", {"path": str(result.path) if result.path else None, "lock": result.lock, "drift": list(result.drift)}, lambda: click.echo(message))


@cli.command()
@click.argument("name", required=False)
@json_option
def schema(name: str | None, as_json: bool) -> None:
    """Print a JSON Schema (customer, analysis-short, analysis-verbose); no NAME lists them."""
    from builder import yamldoc

    if name is None:
        names = yamldoc.schema_names()
        emit("schema", {"schemas": names}, lambda: click.echo("\n".join(names)))
        return
    document = yamldoc.schema(name)
    emit("schema", document, lambda: click.echo(json.dumps(document, indent=2)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `builder`: the one place errors become messages and exit codes."""
    try:
        cli.main(args=argv, prog_name="builder", standalone_mode=False)
    except BuilderError as exc:
        if _json_mode.get():
            error = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
            click.echo(json.dumps({"builder_result_version": RESULT_VERSION, "ok": False, "error": error}, indent=2, sort_keys=True))
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
    return 0


def build_main() -> int:
    """Entry point of `build`: the same as `builder build`."""
    return main(["build", *sys.argv[1:]])
