"""`builder base build`: the versioned inference base image (base-image/)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from builder.cli._common import cli, info, load_cli_settings, long_work_progress
from builder.cli.options import json_option
from builder.cli.result import Result
from builder.image.base_os import BASE_OS_IMAGE


@cli.group()
def base() -> None:
    """The inference base image: ONNX Runtime + the tile runner, version in base-image/VERSION."""


@base.command("build")
@click.option("--repository", help="Image repository (default: setting base_repository).")
@click.option(
    "--from",
    "base_from",
    default=BASE_OS_IMAGE,
    show_default=True,
    help="The Python 3.11 image to build on (both variants: gpu adds CUDA as pip wheels). "
    f"The default, {BASE_OS_IMAGE}, needs no Docker Hub: Debian bookworm with Python 3.11, "
    "made with debootstrap from your Debian mirror when the engine lacks it (once, about "
    "3 minutes, as root). `--from python:3.11-slim-bookworm` builds on Docker Hub's image.",
)
@click.option(
    "--debian-mirror",
    metavar="URL",
    help="Debian mirror for the default --from (default: BUILDER_DEBIAN_MIRROR, else the "
    "bookworm mirror of /etc/apt, else deb.debian.org).",
)
@click.option(
    "--variant",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="gpu: onnxruntime-gpu + CUDA/cuDNN wheels, pushed to <repository>-gpu.",
)
@click.option(
    "--wheelhouse",
    type=click.Path(path_type=Path),
    help="Folder of hash-pinned wheels (default: a machine-wide cache filled with pip download).",
)
@click.option(
    "--offline", is_flag=True, help="Never run pip download; the wheelhouse must be complete."
)
@click.option(
    "--push",
    is_flag=True,
    help="Also push <repository>:<version> to its registry (always: into the local image store).",
)
@json_option
def base_build(
    repository: str | None,
    base_from: str,
    debian_mirror: str | None,
    variant: str,
    wheelhouse: Path | None,
    offline: bool,
    push: bool,
    as_json: bool,
) -> Result:
    """Build the base image with the Docker engine (DOCKER_HOST), offline inside.

    Needs a Docker engine (DOCKER_HOST, else the default socket), PyPI for the first
    wheelhouse (`--wheelhouse DIR --offline` without) and, for the default --from, a Debian
    mirror once. It is written into the local image store (setting image_store), where
    `build CUSTOMER` finds it with no registry; --push sends the same manifest to the
    registry. Progress: bars on a terminal; in CI logs one line per step (debootstrap
    phases, each wheel downloaded, each build step), also with --json.
    """
    from builder.image.base_build import build_base_image, variant_repository
    from builder.image.engine import docker_client
    from builder.image.store import ImageStore

    settings = load_cli_settings({})
    target = variant_repository(repository or settings.base_repository, variant)
    client = docker_client(1800, needed_for="`builder base build` builds with it")
    info(f"==> building {target} from {base_from} ({variant})")
    with long_work_progress() as bar:
        result = build_base_image(
            docker_client=client,
            repository=repository or settings.base_repository,
            base_from=base_from,
            wheelhouse=wheelhouse,
            push=push,
            variant=variant,
            download=not offline,
            progress=bar,
            store=ImageStore(settings.store_dir),
            base_os_cache=settings.cache_dir / "base-os",
            debian_mirror=debian_mirror,
        )

    def human() -> None:
        click.echo(f"image     {result.reference}")
        click.echo(f"id        {result.image_id}")
        if result.store_digest:
            click.echo(f"stored    {result.reference}@{result.store_digest} in {result.store}")
        if result.digest:
            click.echo(f"pushed    {result.reference}@{result.digest}")
        for key, value in sorted(result.labels.items()):
            click.echo(f"label     {key}={value}")

    data: dict[str, Any] = {k: v for k, v in asdict(result).items() if k != "log"}
    return Result("base build", data, human)
