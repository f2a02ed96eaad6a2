"""The base OS image standing in for ``python:3.11-slim-bookworm`` (no Docker Hub here).

The builder makes it (:mod:`builder.image.base_os`: a debootstrap'ed Debian bookworm with
Python 3.11, imported into the engine as the default ``--from`` of ``builder base build``);
the test bed keeps the rootfs tarball in its machine-wide cache and installs debootstrap when
it is missing.
"""

from __future__ import annotations

from builder.image import base_os
from builder.image.base_os import BASE_OS_IMAGE as IMAGE
from testbed._util import ServiceError, cache_root, ensure_command
from testbed.docker_engine import Engine
from testbed.registry import Registry

__all__ = ["IMAGE", "ensure_base_image", "push_to"]


def ensure_base_image(engine: Engine, tag: str = IMAGE) -> str:
    """Import the base OS image into `engine` unless it is already there; return `tag`."""
    ensure_command("debootstrap", "debootstrap")
    client = engine.client()
    try:
        return base_os.ensure_base_os(client, cache_root() / "base-os", tag=tag)
    finally:
        client.close()


def push_to(
    engine: Engine, registry: Registry, tag: str = IMAGE, repository: str | None = None
) -> str:
    """Tag `tag` into `registry` and push it with the engine; return ``host/repo@sha256:...``."""
    repo_path = repository or tag.rpartition(":")[0]
    version = tag.rpartition(":")[2]
    target = f"{registry.host}/{repo_path}"
    client = engine.client()
    try:
        client.images.get(tag).tag(target, version)
        auth = registry.auth_config()
        error = ""
        for line in client.api.push(
            target, tag=version, stream=True, decode=True, auth_config=auth
        ):
            error = error or str(line.get("error", ""))
        if error:
            raise ServiceError(f"push of {target}:{version} failed: {error}")
        digest = client.images.get_registry_data(f"{target}:{version}", auth_config=auth).id
        return f"{target}@{digest}"
    finally:
        client.close()
